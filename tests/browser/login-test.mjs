// The browser half of tests/integration/terminal_browser.rs's login test: stoa's page logs
// in with a real Unix user's password (POST /login, an HttpOnly cookie and a CSRF token),
// refuses what it must with words, and works as that user: a session with the recorded
// agent, a terminal.
//
//   node tests/browser/login-test.mjs --url http://127.0.0.1:PORT/ --user stoa-t-alice \
//     --password PW --outside stoa-t-carol --outside-password PW2 \
//     --worktree /home/stoa-t-alice/wt --artifacts target/browser-artifacts
//
// Prints one JSON object on stdout; exit status 0 only when every check passed.
import { launch, parseArgs, bufferLines, testScript, until } from './lib.mjs';

const { args, base, log, result, problems, step, shot } = testScript('login', ['url', 'user', 'password', 'outside', 'outside-password', 'worktree', 'artifacts']);

const { page, close } = await launch({ width: 1100, height: 760 });
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));

/** Submits the password form; returns the words the page shows (or '' once logged in). */
async function tryLogin(user, password) {
  await page.fill('#username', user);
  await page.fill('#password', password);
  await page.evaluate(() => { document.getElementById('login-error').textContent = ''; });
  await page.click('#login-submit');
  return until(`an answer to ${user}'s login`, async () => {
    const err = await page.textContent('#login-error');
    if (err) return err;
    return (await page.isVisible('#app')) ? ' ' : null;
  });
}

try {
  await step('the page shows the login form', async () => {
    await page.goto(`${base}/`);
    await page.waitForSelector('#username', { state: 'visible', timeout: 10000 });
    if (await page.isVisible('#app')) throw new Error('the app shows before logging in');
  });

  await step('a wrong password is refused with words', async () => {
    const err = await tryLogin(args.user, `${args.password}-wrong`);
    if (!/wrong user name or password/i.test(err)) throw new Error(`shows ${JSON.stringify(err)}`);
    await shot(page, 'login-wrong-password.png');
  });

  await step('root is refused with words', async () => {
    const err = await tryLogin('root', 'anything');
    if (!/does not let root log in/i.test(err)) throw new Error(`shows ${JSON.stringify(err)}`);
  });

  await step('a user outside the policy is refused with words, even with the right password', async () => {
    const err = await tryLogin(args.outside, args['outside-password']);
    if (!new RegExp(`does not let ${args.outside} log in`).test(err)) {
      throw new Error(`shows ${JSON.stringify(err)}`);
    }
    await shot(page, 'login-refused.png');
  });

  await step('the right password logs in; the cookie is out of the script\'s reach', async () => {
    const err = await tryLogin(args.user, args.password);
    if (err.trim()) throw new Error(`refused: ${err}`);
    const who = await page.textContent('#whoami');
    if (!who.includes(args.user)) throw new Error(`header shows ${JSON.stringify(who)}`);
    if (await page.evaluate(() => window.stoa.auth) !== 'cookie') throw new Error('not a cookie login');
    if (await page.evaluate(() => document.cookie.includes('stoa_session'))) {
      throw new Error('the session cookie is readable by scripts (not HttpOnly)');
    }
    if (await page.evaluate(() => sessionStorage.length) !== 0) throw new Error('something kept in sessionStorage');
  });

  await step('a state-changing request without the CSRF header is refused', async () => {
    const status = await page.evaluate(async () => (await fetch('/terminals', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ cols: 80, rows: 24 }),
    })).status);
    if (status !== 403 && status !== 401) throw new Error(`POST /terminals without X-CSRF-Token -> ${status}`);
  });

  await step('a session with the recorded agent, prompted, its transcript', async () => {
    await page.fill('#new-worktree', args.worktree);
    await page.click('#new-session-submit');
    await page.waitForSelector('#session-view', { state: 'visible', timeout: 10000 });
    await page.fill('#prompt', 'hello over a cookie');
    await page.click('#send-prompt');
    await until('the answer', async () =>
      (await page.textContent('#transcript')).includes('Hello from the mock server.'), 30000);
    const t = await page.textContent('#transcript');
    if (!t.includes('tool call: Bash')) throw new Error(`no tool call in ${t}`);
  });

  await step('a terminal runs as the user', async () => {
    await page.click('#new');
    await until('the terminal', async () => page.evaluate(() => {
      const v = window.stoa.view;
      return v && v.welcomed && v.canWrite && v.stats.received > 0;
    }));
    await page.click('#term');
    await page.keyboard.type('id -un', { delay: 5 });
    await page.keyboard.press('Enter');
    await until(`"${args.user}" in the terminal`, async () =>
      (await bufferLines(page)).some((l) => l.trim() === args.user));
    await shot(page, 'login-terminal.png');
  });

  await step('log out: the cookie no longer works', async () => {
    await page.click('#forget');
    await page.waitForSelector('#username', { state: 'visible', timeout: 10000 });
    const status = await page.evaluate(async () => (await fetch('/users/me')).status);
    if (status !== 401) throw new Error(`GET /users/me after logging out -> ${status}`);
  });

  if (problems.length) throw new Error(`page problems: ${problems.join('; ')}`);
  result.ok = true;
} catch (e) {
  result.error = e.message;
  result.problems = problems;
  try { await shot(page, 'login-failure.png'); } catch (_) { /* the page may be gone */ }
} finally {
  await close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
