// The browser half of tests/integration/terminal_browser.rs: drives stoa's page in headless
// Chromium the way a person would and checks what xterm.js shows.
//
//   node tests/browser/terminal-test.mjs --url http://127.0.0.1:PORT/ --token TOKEN \
//     --user stoa-t-alice --screenshot target/browser-artifacts/terminal-browser.png \
//     [--admin-token ADMIN]   (also restarts the front, which must not disturb the page, and
//                              the user's worker, after which the page must reattach)
//
// Prints one JSON object on stdout ({"ok": true, ...} or {"ok": false, "error": ...});
// progress goes to stderr. Exit status 0 only when every check passed.
import { launch, parseArgs, bufferLines } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
for (const k of ['url', 'token', 'user', 'screenshot']) {
  if (!args[k]) {
    console.error(`missing --${k}`);
    process.exit(2);
  }
}
const base = args.url.replace(/\/$/, '');
const log = (...a) => console.error('[browser]', ...a);
const result = { ok: false, steps: [] };
const problems = []; // page errors and failed requests, reported with the result

async function step(name, fn) {
  log(name);
  const t0 = Date.now();
  await fn();
  result.steps.push({ name, ms: Date.now() - t0 });
}

/** Polls `fn` in node until it returns a truthy value. */
async function until(what, fn, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const viewState = (page) => page.evaluate(() => {
  const v = window.stoa.view;
  if (!v) return null;
  return {
    id: v.id, welcomed: v.welcomed, canWrite: v.canWrite, connects: v.stats.connects,
    received: v.stats.received, cols: v.term.cols, rows: v.term.rows,
    exit: v.exit, exitShown: v.exitShown, ws: v.ws ? v.ws.readyState : null,
    status: document.getElementById('term-status').textContent,
  };
});

/** Lines of the terminal that are exactly `text` (trimmed). */
async function linesEqual(page, text) {
  return (await bufferLines(page)).filter((l) => l.trim() === text).length;
}

async function typeLine(page, text) {
  await page.click('#term');
  await page.keyboard.type(text, { delay: 5 });
  await page.keyboard.press('Enter');
}

const { context, page, close } = await launch({ width: 1100, height: 700 });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
page.on('response', (r) => {
  if (r.status() >= 400) problems.push(`${r.request().method()} ${r.url()} -> ${r.status()}`);
});

try {
  await step('page loads and asks for the token', async () => {
    const resp = await page.goto(`${base}/`);
    if (!resp || resp.status() !== 200) throw new Error(`GET / -> ${resp && resp.status()}`);
    await page.waitForSelector('#token', { state: 'visible', timeout: 10000 });
    if (await page.isVisible('#app')) throw new Error('the terminal list shows before a token');
    const hasXterm = await page.evaluate(() => typeof Terminal === 'function' &&
      typeof FitAddon === 'object' && typeof window.stoa === 'object');
    if (!hasXterm) throw new Error('xterm.js, the fit addon or app.js did not load');
  });

  await step('a wrong token is refused', async () => {
    await page.fill('#token', 'not-a-token');
    await page.click('#use-token');
    await page.waitForFunction(() => document.getElementById('login-error').textContent !== '');
    if (await page.evaluate(() => sessionStorage.getItem('stoa.token')) !== null) {
      throw new Error('a refused token stayed in sessionStorage');
    }
    problems.length = 0; // the 401 was the point
  });

  await step('enter the token', async () => {
    await page.fill('#token', args.token);
    await page.click('#use-token');
    await page.waitForSelector('#app', { state: 'visible', timeout: 10000 });
    if (await page.isVisible('#login')) throw new Error('the token form still shows');
    const who = await page.textContent('#whoami');
    if (!who.includes(args.user)) throw new Error(`header shows ${JSON.stringify(who)}`);
    // Kept for this tab only.
    const kept = await page.evaluate(() => sessionStorage.getItem('stoa.token'));
    if (kept !== args.token) throw new Error('token not in sessionStorage');
  });

  let first;
  await step('new terminal: created with the fitted size, connected, prompt shown', async () => {
    await page.click('#new');
    first = await until('the terminal to connect', async () => {
      const s = await viewState(page);
      return s && s.id && s.welcomed && s.canWrite && s.received > 0 ? s : null;
    });
    result.terminal_id = first.id;
    const info = await page.evaluate(async (id) => {
      const r = await fetch(`/terminals/${id}`, {
        headers: { Authorization: `Bearer ${sessionStorage.getItem('stoa.token')}` },
      });
      return r.json();
    }, first.id);
    if (info.unix_user !== args.user) throw new Error(`terminal runs as ${info.unix_user}`);
    if (info.cols !== first.cols || info.rows !== first.rows) {
      throw new Error(`server size ${info.cols}x${info.rows}, page ${first.cols}x${first.rows}`);
    }
    await page.waitForSelector(`#terminals li[data-id="${first.id}"]`, { timeout: 10000 });
  });

  await step('type `id -un`, see the unix user', async () => {
    await typeLine(page, 'id -un');
    await until(`a line "${args.user}"`, async () => (await linesEqual(page, args.user)) >= 1);
  });

  await step('a refused "new terminal" leaves the open one as it was', async () => {
    problems.length = 0;
    await page.fill('#new-unix-user', 'root');
    await page.click('#new');
    const err = await until('the refusal in words', async () => {
      const t = await page.textContent('#list-error');
      return t ? t : null;
    });
    if (!/Could not open a terminal/.test(err)) throw new Error(`shows ${JSON.stringify(err)}`);
    const s = await viewState(page);
    if (s.id !== first.id || !s.welcomed || s.ws !== 1) {
      throw new Error(`the open terminal changed: ${JSON.stringify(s)}`);
    }
    if (await page.evaluate(() => window.stoa.views.length) !== 1) throw new Error('a tab was left behind');
    await page.fill('#new-unix-user', '');
    await typeLine(page, 'echo still-$((1+1))');
    await until('"still-2" in the same terminal', async () => (await linesEqual(page, 'still-2')) >= 1);
    problems.length = 0; // the refusal was the point
  });

  await step('screenshot', async () => {
    await page.screenshot({ path: args.screenshot });
  });

  await step('resize the window: RESIZE reaches the pty (`stty size`)', async () => {
    await page.setViewportSize({ width: 820, height: 520 });
    const resized = await until('xterm to refit', async () => {
      const s = await viewState(page);
      return s.cols < first.cols && s.rows < first.rows ? s : null;
    });
    // Let the debounced RESIZE go out before asking.
    await new Promise((r) => setTimeout(r, 300));
    await typeLine(page, 'stty size');
    await until(`"stty size" to say ${resized.rows} ${resized.cols}`,
      async () => (await linesEqual(page, `${resized.rows} ${resized.cols}`)) >= 1);
    result.resized = `${resized.cols}x${resized.rows}`;
  });

  if (args['admin-token']) {
    await step('front restart: the open terminal socket is not even interrupted', async () => {
      // The socket was handed to the user's worker: the front holds none of it.
      const before = (await viewState(page)).connects;
      const status = await page.evaluate(async (admin) => {
        const r = await fetch('/daemon/restart', {
          method: 'POST', headers: { Authorization: `Bearer ${admin}` },
        });
        return r.status;
      }, args['admin-token']);
      if (status !== 202 && status !== 200) throw new Error(`POST /daemon/restart -> ${status}`);
      await new Promise((r) => setTimeout(r, 1500));
      await until('a new front to answer', async () => {
        const ok = await page.evaluate(async () => {
          try { return (await fetch('/health')).status === 200; } catch (e) { return false; }
        });
        return ok;
      }, 30000);
      await typeLine(page, 'echo front-$((40+2))');
      await until('"front-42" across the front restart', async () => (await linesEqual(page, 'front-42')) >= 1);
      const s = await viewState(page);
      if (s.connects !== before) throw new Error(`the socket reconnected (${before} -> ${s.connects})`);
    });
    await step('worker restart: the page reattaches and resumes without repeats', async () => {
      const before = (await viewState(page)).connects;
      const status = await page.evaluate(async ([admin, user]) => {
        const r = await fetch(`/workers/${user}/restart`, {
          method: 'POST', headers: { Authorization: `Bearer ${admin}` },
        });
        return r.status;
      }, [args['admin-token'], args.user]);
      if (status !== 202 && status !== 200) throw new Error(`POST /workers/${args.user}/restart -> ${status}`);
      await until('the page to reconnect', async () => {
        const s = await viewState(page);
        return s.connects > before && s.welcomed && s.ws === 1;
      }, 30000);
      await typeLine(page, 'echo back-$((40+2))');
      await until('"back-42" after the restart', async () => (await linesEqual(page, 'back-42')) >= 1);
      // The new worker finds the terminal's ring as the old one left it (the broker keeps
      // it): the page resumes where it was, and nothing may show twice.
      const repeats = await linesEqual(page, args.user);
      if (repeats > 1) throw new Error(`"${args.user}" shows ${repeats} times after resuming`);
    });
    // The restart's failed requests are expected.
    problems.length = 0;
  }

  await step('a read-only viewer in a second tab: replay, live output, input refused', async () => {
    const viewer = await context.newPage();
    viewer.on('pageerror', (e) => problems.push(`viewer page error: ${e.message}`));
    await viewer.goto(`${base}/#/t/${first.id}/view`);
    await viewer.fill('#token', args.token);
    await viewer.click('#use-token');
    await until('the viewer to connect', async () => {
      const s = await viewState(viewer);
      return s && s.id === first.id && s.welcomed ? s : null;
    });
    const s = await viewState(viewer);
    if (s.canWrite) throw new Error('a mode=view socket may write');
    // What the server kept is replayed to a new viewer.
    const replayed = args['admin-token'] ? 'back-42' : args.user;
    await until(`"${replayed}" replayed to the viewer`,
      async () => (await linesEqual(viewer, replayed)) === 1);
    // Live output from the writer's tab.
    await typeLine(page, 'echo viewer-$((6*7))');
    await until('"viewer-42" in the viewer', async () => (await linesEqual(viewer, 'viewer-42')) === 1);
    // The page sends nothing when it may not write; a hand-made INPUT frame is refused.
    await viewer.click('#term');
    await viewer.keyboard.type('echo typed-by-viewer\n');
    await viewer.evaluate(() => {
      const { encode } = window.stoa.protocol;
      window.stoa.view.ws.send(encode.input(new TextEncoder().encode('echo forged-$((1+1))\r')));
    });
    await until('the read-only ERROR', async () =>
      /error 1\)/.test((await viewState(viewer)).status));
    await new Promise((r) => setTimeout(r, 300));
    for (const p of [page, viewer]) {
      const lines = await bufferLines(p);
      if (lines.some((l) => l.includes('typed-by-viewer') || l.includes('forged'))) {
        throw new Error('input from the read-only viewer reached the shell');
      }
    }
    await viewer.close();
  });

  result.first_terminal_lines = (await bufferLines(page)).filter((l) => l.trim());

  await step('`exit`: EXIT shown, the socket closed cleanly', async () => {
    await typeLine(page, 'exit');
    const s = await until('the exit to show', async () => {
      const s = await viewState(page);
      return s.exitShown && s.ws === null ? s : null;
    });
    if (s.exit.kind !== 'exited' || s.exit.code !== 0) {
      throw new Error(`exit ${JSON.stringify(s.exit)}`);
    }
    await until('"[exited with 0]" on screen',
      async () => (await linesEqual(page, '[exited with 0]')) === 1);
  });

  await step('a second terminal, killed from the list', async () => {
    await page.click('#new');
    const s = await until('the second terminal', async () => {
      const s = await viewState(page);
      return s && s.id && s.id !== first.id && s.welcomed && s.received > 0 ? s : null;
    });
    await page.click(`#terminals li[data-id="${s.id}"] button.kill`);
    const end = await until('the kill to show', async () => {
      const v = await viewState(page);
      return v.exitShown ? v : null;
    });
    result.killed_exit = end.exit;
    await until('the list to drop it or mark it ended', () => page.evaluate((id) => {
      const li = document.querySelector(`#terminals li[data-id="${id}"]`);
      return !li || li.classList.contains('dead');
    }, s.id));
  });

  result.lines = (await bufferLines(page)).filter((l) => l.trim());
  if (problems.length) throw new Error(`page problems: ${problems.join('; ')}`);
  result.ok = true;
} catch (e) {
  result.error = e.message;
  result.problems = problems;
  try {
    result.lines = (await bufferLines(page)).filter((l) => l.trim());
    result.view = await viewState(page);
    await page.screenshot({ path: args.screenshot });
  } catch (_) { /* the page may be gone */ }
} finally {
  await close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
