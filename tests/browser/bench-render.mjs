// Render benchmark (by hand, not in CI): `cat` a big file in a terminal shown by stoa's page
// in headless Chromium + xterm.js, and measure the throughput xterm.js parses and renders,
// checking that no byte was lost.
//
//   node tests/browser/bench-render.mjs http://127.0.0.1:PORT/ TOKEN [--mb 100] [--file PATH]
//                                       [--runs 1] [--cols 160] [--rows 45] [--screenshot PNG]
//
// TOKEN is an API token (`stoa user add NAME --unix-user USER` prints one); the terminal runs
// as that token's Unix user, which must be able to read the file. The file (base64 text in
// 120-character lines, made in /tmp unless --file is given) is `cat` with the pty in its
// default cooked mode, so ONLCR adds one '\r' per '\n': the terminal's output must be exactly
// size + lines bytes. The page counts the OUTPUT bytes it received, the bytes xterm.js
// parsed (write callbacks) and the last ACK it sent; all three must equal that. MB/s is
// 10^6 bytes of terminal output per second, from the first OUTPUT frame to the animation
// frame after the last byte was parsed.
import { createWriteStream, existsSync, statSync, openSync, readSync, closeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { launch, parseArgs, bufferLines } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
const [url, token] = args._ || [];
if (!url || !token) {
  console.error('usage: node tests/browser/bench-render.mjs URL TOKEN [--mb 100] [--file PATH] [--runs N]');
  process.exit(2);
}
const base = url.replace(/\/$/, '');
const mb = Number(args.mb || 100);
const runs = Number(args.runs || 1);
const cols = Number(args.cols || 160);
const rows = Number(args.rows || 45);
const LINE = 120;

async function makeFile(path, bytes) {
  const lines = Math.floor(bytes / (LINE + 1));
  const out = createWriteStream(path, { mode: 0o644 });
  const perChunk = 8192;
  for (let done = 0; done < lines;) {
    const n = Math.min(perChunk, lines - done);
    const b64 = randomBytes(Math.ceil((n * LINE * 3) / 4)).toString('base64');
    let chunk = '';
    for (let i = 0; i < n; i++) chunk += b64.slice(i * LINE, (i + 1) * LINE) + '\n';
    if (!out.write(chunk)) await new Promise((r) => out.once('drain', r));
    done += n;
  }
  await new Promise((r) => out.end(r));
}

function countNewlines(path) {
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(1 << 20);
  let n = 0;
  for (;;) {
    const got = readSync(fd, buf, 0, buf.length, null);
    if (!got) break;
    for (let i = 0; i < got; i++) if (buf[i] === 10) n++;
  }
  closeSync(fd);
  return n;
}

function lastLines(path, n) {
  const size = statSync(path).size;
  const fd = openSync(path, 'r');
  const len = Math.min(size, (LINE + 1) * (n + 2) * 4);
  const buf = Buffer.alloc(len);
  readSync(fd, buf, 0, len, size - len);
  closeSync(fd);
  return buf.toString('latin1').split('\n').filter((l) => l).slice(-n);
}

async function api(method, path, body) {
  const r = await fetch(`${base}${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: body && JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

const file = args.file || `/tmp/stoa-bench-${mb}MB.txt`;
if (!args.file && (!existsSync(file) || statSync(file).size !== Math.floor((mb * 1e6) / (LINE + 1)) * (LINE + 1))) {
  console.error(`making ${file} (${mb} MB of base64 lines)`);
  await makeFile(file, mb * 1e6);
}
const size = statSync(file).size;
const newlines = countNewlines(file);
const expected = size + newlines;
const tail = lastLines(file, 3);
console.error(`${file}: ${size} bytes, ${newlines} lines; expecting ${expected} bytes of terminal output`);

const { page, close, version } = await launch({ width: 1400, height: 900 });
const errors = [];
page.on('pageerror', (e) => errors.push(e.message));
await page.addInitScript((t) => sessionStorage.setItem('stoa.token', t), token);
const results = [];
try {
  for (let run = 1; run <= runs; run++) {
    // Echo off and wait for Enter, so that nothing but the file reaches the terminal and
    // the clock starts with the page attached.
    const created = await api('POST', '/terminals', {
      command: ['sh', '-c', `stty -echo && read x && exec cat '${file.replace(/'/g, "'\\''")}'`],
      cols, rows,
    });
    const id = created.terminal_id;
    await page.goto(`${base}/?run=${run}#/t/${id}`); // a fresh page per run
    await page.waitForFunction((id) => {
      const v = window.stoa && window.stoa.view;
      return v && v.id === id && v.welcomed;
    }, id, { timeout: 20000 });
    // Give `stty -echo` time to run: an Enter echoed before it would add 2 bytes (and show
    // as a count mismatch).
    await new Promise((r) => setTimeout(r, 500));
    await page.click('#term');
    // Count animation frames, to show the page was painting all along.
    await page.evaluate(() => {
      window.benchFrames = 0;
      const tick = () => { window.benchFrames++; requestAnimationFrame(tick); };
      requestAnimationFrame(tick);
    });
    const t0 = Date.now();
    await page.keyboard.press('Enter');
    const m = await page.evaluate(() => new Promise((resolve) => {
      const v = window.stoa.view;
      const check = () => {
        if (v.exit && v.pendingWrites === 0) {
          requestAnimationFrame(() => resolve({
            rendered: performance.now(),
            stats: { ...v.stats },
            consumed: v.consumed,
            acked: v.acked,
            exit: v.exit,
            animationFrames: window.benchFrames,
          }));
        } else {
          setTimeout(check, 10);
        }
      };
      check();
    }), null);
    const wall = (Date.now() - t0) / 1000;
    const secs = (m.rendered - m.stats.firstOutputAt) / 1000;
    const parseSecs = (m.stats.lastWriteAt - m.stats.firstOutputAt) / 1000;
    const lines = (await bufferLines(page)).filter((l) => l.trim());
    const shown = lines.slice(-4, -1);
    const r = {
      run,
      expected,
      received: m.stats.received,
      parsed: m.stats.written,
      last_ack: m.acked,
      frames: m.stats.frames,
      avg_frame_kib: +(m.stats.received / m.stats.frames / 1024).toFixed(1),
      exit: m.exit,
      seconds: +secs.toFixed(2),
      mb_per_s: +(m.stats.received / 1e6 / secs).toFixed(2),
      parse_mb_per_s: +(m.stats.received / 1e6 / parseSecs).toFixed(2),
      wall_seconds_from_enter: +wall.toFixed(2),
      animation_frames_per_s: +(m.animationFrames / wall).toFixed(1),
      tail_matches: JSON.stringify(shown) === JSON.stringify(tail),
      lossless: m.stats.received === expected && m.stats.written === expected && m.acked === expected,
    };
    results.push(r);
    if (args.screenshot) await page.screenshot({ path: args.screenshot });
    console.error(JSON.stringify(r));
    await api('DELETE', `/terminals/${id}`).catch(() => {});
  }
} finally {
  await close();
}
const ok = results.every((r) => r.lossless && r.tail_matches) && !errors.length;
const speeds = results.map((r) => r.mb_per_s).sort((a, b) => a - b);
const best = speeds[speeds.length - 1];
const median = speeds[Math.floor(speeds.length / 2)];
console.log(JSON.stringify({ ok, file, size, expected, runs: results, best_mb_per_s: best, median_mb_per_s: median, page_errors: errors, browser: version }, null, 1));
process.exit(ok ? 0 : 1);
