// Shared by the browser test and the render benchmark: headless Debian Chromium through
// playwright-core (no browser download), with a fresh profile and no background traffic.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.STOA_CHROMIUM || '/usr/bin/chromium';

/** Flags from the research notes: without the background-networking ones Chromium keeps
 * trying to reach Google on a closed network. */
export const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Launches Chromium with a fresh --user-data-dir (playwright passes it for a persistent
 * context); returns `{ context, page, close, version }`. */
export async function launch({ width = 1100, height = 700 } = {}) {
  const profile = mkdtempSync(join(tmpdir(), 'stoa-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width, height },
    timeout: 60000,
  });
  const page = context.pages()[0] || (await context.newPage());
  const close = async () => {
    try {
      await context.close();
    } finally {
      rmSync(profile, { recursive: true, force: true });
    }
  };
  const browser = context.browser();
  const version = browser ? `Chromium ${browser.version()}` : 'Chromium';
  return { context, page, close, version };
}

/** Parses `--name value` pairs. */
export function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      const key = a.slice(2);
      const next = argv[i + 1];
      if (next === undefined || next.startsWith('--')) out[key] = true;
      else { out[key] = next; i++; }
    } else {
      (out._ ||= []).push(a);
    }
  }
  return out;
}

/** Every line (scrollback and screen) of the page's current terminal, trailing blanks trimmed. */
export async function bufferLines(page) {
  return page.evaluate(() => {
    const v = window.stoa && window.stoa.view;
    if (!v) return [];
    const buf = v.term.buffer.active;
    const lines = [];
    for (let y = 0; y < buf.length; y++) {
      const line = buf.getLine(y);
      if (line) lines.push(line.translateToString(true));
    }
    return lines;
  });
}
