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

/** Waits until `fn` gives something truthy (polled every 50 ms); throws after `timeoutMs`. */
export async function until(what, fn, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The frame every browser test script shares: its `--name value` arguments (each of
 * `required` must be there, else it exits 2), the `result` it prints as JSON at the end,
 * and `step` (timed, logged) and `shot` (a screenshot into `--artifacts`). */
export function testScript(tag, required) {
  const args = parseArgs(process.argv.slice(2));
  for (const k of required) {
    if (!args[k]) {
      console.error(`missing --${k}`);
      process.exit(2);
    }
  }
  const log = (...a) => console.error(`[${tag}]`, ...a);
  const result = { ok: false, steps: [], screenshots: [] };
  async function step(name, fn) {
    log(name);
    const t0 = Date.now();
    await fn();
    result.steps.push({ name, ms: Date.now() - t0 });
  }
  async function shot(page, name) {
    const path = join(args.artifacts, name);
    await page.screenshot({ path });
    result.screenshots.push(path);
  }
  const base = typeof args.url === 'string' ? args.url.replace(/\/$/, '') : '';
  return { args, base, log, result, problems: [], step, shot };
}
