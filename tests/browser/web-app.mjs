// The browser half of tests/integration/terminal_browser.rs's web app test: stoa's page at a
// phone's size (390×844), then a desktop's, driven the way a person would.
//
//   node tests/browser/web-app.mjs --url http://127.0.0.1:PORT/ --token TOKEN \
//     --user stoa-t-alice --worktree /home/stoa-t-alice/wt --artifacts target/browser-artifacts
//
// Sessions: create one with the recorded agent, prompt it, read the transcript (the tool
// call, its result, the answer), see it in the history; a hanging agent: a second prompt
// refused in words, Stop; its permission requests answered with the page's buttons. Terminals: open one from the phone's
// menu, type, use the key bar (Esc, arrows and Tab through `cat -v`, the sticky Ctrl to end
// `cat` with ^D, ^C to interrupt), and check that it fits the screen. Screenshots go to
// --artifacts. Prints one JSON object on stdout; exit status 0 only when every check passed.
import { launch, parseArgs, bufferLines, testScript, until } from './lib.mjs';

const { args, base, log, result, problems, step, shot } = testScript('web-app', ['url', 'token', 'user', 'worktree', 'artifacts']);

const linesEqual = async (page, text) =>
  (await bufferLines(page)).filter((l) => l.trim() === text).length;

/** The element's box, and whether all of it is inside the viewport. */
async function inViewport(page, selector) {
  return page.evaluate((sel) => {
    const el = document.querySelector(sel);
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return {
      x: r.x, y: r.y, width: r.width, height: r.height,
      inside: r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0 &&
        r.right <= window.innerWidth + 0.5 && r.bottom <= window.innerHeight + 0.5,
    };
  }, selector);
}

const { page, close } = await launch({ width: 390, height: 844 });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('response', (r) => {
  if (r.status() >= 400) problems.push(`${r.request().method()} ${r.url()} -> ${r.status()}`);
});

try {
  await step('phone: log in with the token', async () => {
    await page.goto(`${base}/`);
    await page.waitForSelector('#token', { state: 'visible', timeout: 10000 });
    problems.length = 0; // GET /users/me without a cookie is a 401: that is how the page asks
    await page.fill('#token', args.token);
    await page.click('#use-token');
    await page.waitForSelector('#app', { state: 'visible', timeout: 10000 });
    const who = await page.textContent('#whoami');
    if (!who.includes(args.user)) throw new Error(`header shows ${JSON.stringify(who)}`);
    // Nothing wider than the phone.
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    if (width > 390) throw new Error(`the page is ${width}px wide on a 390px screen`);
    if (!(await page.isVisible('#menu'))) throw new Error('no menu button on a phone');
    if (!(await page.isVisible('#new-session'))) throw new Error('the menu is not open at first');
  });

  await step('phone: a session with the recorded agent', async () => {
    await page.selectOption('#new-tool', 'claude-code');
    await page.fill('#new-worktree', args.worktree);
    await page.click('#new-session-submit');
    await page.waitForSelector('#session-view', { state: 'visible', timeout: 10000 });
    if (await page.isVisible('#new-session')) throw new Error('the menu still covers the session');
    result.session_id = await page.evaluate(() => window.stoa.session.id);
    await page.fill('#prompt', 'say hello and run id');
    await page.click('#send-prompt');
    const text = await until('the transcript to show the answer', async () => {
      const t = await page.textContent('#transcript');
      return t.includes('Hello from the mock server.') && /\bdone\b/.test(t) ? t : null;
    }, 30000);
    for (const want of ['say hello and run id', 'tool call: Bash', '$ id -un > whoami.txt',
      'tool result', '/srv/work/demo']) {
      if (!text.includes(want)) throw new Error(`the transcript lacks ${JSON.stringify(want)}: ${text}`);
    }
    // The turns are in order: prompt, tool call, its result, the answer.
    const kinds = await page.$$eval('#transcript .turn', (els) => els.map((e) => e.className));
    const at = (k) => kinds.findIndex((c) => c.split(' ').includes(k));
    if (!(at('prompt') < at('tool') && at('tool') < at('tool-result') && at('tool-result') < at('text'))) {
      throw new Error(`transcript out of order: ${kinds.join(', ')}`);
    }
    await until('the status to say completed',
      async () => /completed/.test(await page.textContent('#session-status')));
    if (!(await page.isDisabled('#stop'))) throw new Error('Stop is enabled with nothing running');
    const box = await inViewport(page, '#send-prompt');
    if (!box || !box.inside) throw new Error(`the Send button is off the screen: ${JSON.stringify(box)}`);
    await shot(page, 'phone-session.png');
  });

  await step('phone: the session is in the history and reopens with its transcript', async () => {
    await page.click('#menu');
    await page.waitForSelector(`#sessions li[data-id="${result.session_id}"]`, { timeout: 10000 });
    const meta = await page.textContent(`#sessions li[data-id="${result.session_id}"] .meta`);
    if (!meta.includes(args.worktree)) throw new Error(`history shows ${JSON.stringify(meta)}`);
    await page.reload();
    // sessionStorage survives a reload: the page comes back logged in, on the session.
    await until('the transcript after a reload', async () =>
      (await page.textContent('#transcript')).includes('Hello from the mock server.'), 15000);
  });

  await step('phone: a running agent: a second prompt refused in words, then Stop', async () => {
    await page.fill('#prompt', 'HANG until stopped');
    await page.click('#send-prompt');
    await until('the task to run and Stop to be enabled', async () =>
      !(await page.isDisabled('#stop')) && /running/.test(await page.textContent('#session-status')));
    problems.length = 0;
    await page.fill('#prompt', 'one more');
    await page.click('#send-prompt');
    const err = await until('the 409 in words', async () => (await page.textContent('#session-error')) || null);
    if (!/still working on the last prompt/.test(err)) throw new Error(`shows ${JSON.stringify(err)}`);
    problems.length = 0; // the 409 was the point
    await page.click('#stop');
    await until('"task stopped" in the transcript', async () =>
      (await page.textContent('#transcript')).includes('task stopped'), 20000);
    await until('Stop to be disabled again', () => page.isDisabled('#stop'));
  });

  await step('a permission request: shown above the prompt, allowed, then one denied', async () => {
    for (const [answer, button, outcome] of [
      ['allow', '.approval .actions button:nth-child(1)', 'Bash allowed'],
      ['deny', '.approval .actions button.danger', 'Bash denied'],
    ]) {
      await page.fill('#prompt', `ASK before you run it (${answer})`);
      await page.click('#send-prompt');
      const card = await until('the request above the prompt', async () => {
        const t = await page.textContent('#approvals');
        return t && t.includes('id -un > whoami.txt') ? t : null;
      }, 20000);
      if (!/asks to use Bash/.test(card)) throw new Error(`the request shows ${JSON.stringify(card)}`);
      await until('the status to say it waits for an answer', async () =>
        /waiting for your answer/.test(await page.textContent('#session-status')));
      if (answer === 'allow') await shot(page, 'phone-approval.png');
      await page.click(button);
      await until(`"${outcome}" in the transcript`, async () =>
        (await page.textContent('#transcript')).includes(outcome), 20000);
      await until('the request to leave the page', async () =>
        (await page.$$('#approvals .approval')).length === 0);
      await until('the status to say completed',
        async () => /completed/.test(await page.textContent('#session-status')), 20000);
    }
  });

  await step('an answer made of markup shows as text, never as the page\'s HTML', async () => {
    await page.fill('#prompt', 'HTML please');
    await page.click('#send-prompt');
    await until('the markup as text', async () =>
      (await page.textContent('#transcript')).includes('<b>bold</b>'));
    const injected = await page.evaluate(() => ({
      elements: document.querySelectorAll('#transcript img, #transcript b').length,
      pwned: window.pwned !== undefined,
    }));
    if (injected.elements || injected.pwned) throw new Error(`the agent's text became HTML: ${JSON.stringify(injected)}`);
  });

  let term;
  await step('phone: a terminal from the menu, full width, with the key bar', async () => {
    problems.length = 0;
    await page.click('#menu');
    await page.click('#new');
    term = await until('the terminal to connect', async () => page.evaluate(() => {
      const v = window.stoa.view;
      return v && v.id && v.welcomed && v.canWrite && v.stats.received > 0
        ? { id: v.id, cols: v.term.cols, rows: v.term.rows } : null;
    }));
    if (term.cols < 30 || term.rows < 10) throw new Error(`the terminal is ${term.cols}×${term.rows} on a phone`);
    const t = await inViewport(page, '#term');
    if (!t.inside || t.width < 370) throw new Error(`the terminal does not fill the screen: ${JSON.stringify(t)}`);
    const bar = await inViewport(page, '#keybar');
    if (!bar || !bar.inside) throw new Error(`the key bar is not on the screen: ${JSON.stringify(bar)}`);
    for (const key of ['esc', 'ctrl', 'tab', 'left', 'up', 'down', 'right']) {
      const b = await inViewport(page, `#keybar [data-key="${key}"]`);
      if (!b || !b.inside || b.height < 32 || b.width < 32) {
        throw new Error(`the ${key} key is too small or off the screen: ${JSON.stringify(b)}`);
      }
    }
  });

  const typeLine = async (text) => {
    await page.keyboard.type(text, { delay: 5 });
    await page.keyboard.press('Enter');
  };
  const key = (k) => page.click(`#keybar [data-key="${k}"]`);

  await step('phone: type in the terminal', async () => {
    await page.click('#term');
    await typeLine('id -un');
    await until(`a line "${args.user}"`, async () => (await linesEqual(page, args.user)) >= 1);
  });

  await step('key bar: Esc, arrows and Tab reach the program (cat -v)', async () => {
    await typeLine('cat -vT');
    await new Promise((r) => setTimeout(r, 300));
    for (const k of ['esc', 'up', 'left', 'tab']) await key(k);
    await page.keyboard.press('Enter');
    await until('"^[^[[A^[[D^I" from cat -vT', async () => (await linesEqual(page, '^[^[[A^[[D^I')) >= 1);
  });

  await step('key bar: the sticky Ctrl sends ^D (cat ends)', async () => {
    await key('ctrl');
    const pressed = await page.getAttribute('#keybar [data-key="ctrl"]', 'aria-pressed');
    if (pressed !== 'true') throw new Error('Ctrl does not show as held');
    await page.keyboard.type('d');
    await typeLine('echo after-$((20+1))');
    await until('"after-21" from the shell', async () => (await linesEqual(page, 'after-21')) >= 1);
    if (await page.getAttribute('#keybar [data-key="ctrl"]', 'aria-pressed') !== 'false') {
      throw new Error('Ctrl stays held after one key');
    }
  });

  await step('key bar: ^C interrupts', async () => {
    await typeLine('sleep 60; echo not-interrupted');
    await new Promise((r) => setTimeout(r, 400));
    await key('ctrl-c');
    await typeLine('echo intr-$((40+2))');
    await until('"intr-42" soon after ^C', async () => (await linesEqual(page, 'intr-42')) >= 1, 8000);
    if ((await linesEqual(page, 'not-interrupted')) > 0) throw new Error('sleep was not interrupted');
    await shot(page, 'phone-terminal.png');
  });

  await step('desktop: the same page at 1280×800', async () => {
    await page.setViewportSize({ width: 1280, height: 800 });
    if (!(await page.isVisible('#side'))) throw new Error('the lists are hidden on a desktop');
    if (await page.isVisible('#menu')) throw new Error('the phone menu shows on a desktop');
    await page.click(`#sessions li[data-id="${result.session_id}"]`);
    await until('the transcript on the desktop', async () =>
      (await page.textContent('#transcript')).includes('Hello from the mock server.'));
    await shot(page, 'desktop-session.png');
    await page.click(`#terminals li[data-id="${term.id}"]`);
    const s = await until('the terminal to refit', async () => page.evaluate(() => {
      const v = window.stoa.view;
      return v && v.welcomed && v.term.cols > 60 ? { cols: v.term.cols } : null;
    }));
    result.desktop_cols = s.cols;
    await shot(page, 'desktop-terminal.png');
  });

  await step('desktop: two terminals at once, in tabs', async () => {
    await page.click('#new');
    const second = await until('a second terminal', async () => page.evaluate((first) => {
      const v = window.stoa.view;
      return v && v.id && v.id !== first && v.welcomed && v.stats.received > 0 ? v.id : null;
    }, term.id));
    await page.click('#term');
    await page.keyboard.type('echo two-$((1+1))', { delay: 5 });
    await page.keyboard.press('Enter');
    await until('"two-2" in the second', async () => (await linesEqual(page, 'two-2')) >= 1);
    const tabs = await page.$$eval('#term-tabs .tab', (els) => els.map((e) => e.dataset.key));
    if (!tabs.includes(term.id) || !tabs.includes(second)) throw new Error(`tabs: ${tabs}`);
    await page.click(`#term-tabs .tab[data-key="${term.id}"]`);
    await until('the first terminal back, as it was', async () => {
      const id = await page.evaluate(() => window.stoa.view.id);
      return id === term.id && (await linesEqual(page, 'intr-42')) >= 1 && (await linesEqual(page, 'two-2')) === 0;
    });
    await page.keyboard.type('echo one-$((0+1))', { delay: 5 });
    await page.keyboard.press('Enter');
    await until('"one-1" in the first', async () => (await linesEqual(page, 'one-1')) >= 1);
    await page.click(`#term-tabs .tab[data-key="${second}"]`);
    await until('the second again, still connected', async () => page.evaluate((id) => {
      const v = window.stoa.view;
      return v.id === id && v.ws && v.ws.readyState === 1;
    }, second));
    await shot(page, 'desktop-two-terminals.png');
  });

  if (problems.length) throw new Error(`page problems: ${problems.join('; ')}`);
  result.ok = true;
} catch (e) {
  result.error = e.message;
  result.problems = problems;
  try {
    result.transcript = await page.textContent('#transcript');
    result.lines = (await bufferLines(page)).filter((l) => l.trim());
    await shot(page, 'web-app-failure.png');
  } catch (_) { /* the page may be gone */ }
} finally {
  await close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
