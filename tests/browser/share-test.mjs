// The browser half of tests/integration/terminal_browser.rs's sharing test: alice and bob
// log in with their Unix passwords in two browsers; alice shares a terminal with bob to
// watch; bob sees its output live and cannot type into it; alice stops sharing and bob's
// view ends.
//
//   node tests/browser/share-test.mjs --url http://127.0.0.1:PORT/ --owner stoa-t-alice \
//     --owner-password PW --viewer stoa-t-bob --viewer-password PW2 --artifacts DIR
//
// Prints one JSON object on stdout; exit status 0 only when every check passed.
import { launch, parseArgs, bufferLines, testScript, until } from './lib.mjs';

const { args, base, log, result, problems, step, shot } = testScript('share', ['url', 'owner', 'owner-password', 'viewer', 'viewer-password', 'artifacts']);

async function logIn(page, user, password) {
  await page.goto(`${base}/`);
  await page.waitForSelector('#username', { state: 'visible', timeout: 10000 });
  await page.fill('#username', user);
  await page.fill('#password', password);
  await page.click('#login-submit');
  await page.waitForSelector('#app', { state: 'visible', timeout: 15000 });
}

const hasLine = async (page, text) => (await bufferLines(page)).some((l) => l.includes(text));

const alice = await launch({ width: 1100, height: 700 });
const bob = await launch({ width: 1100, height: 700 });
for (const [who, p] of [['alice', alice.page], ['bob', bob.page]]) {
  p.on('pageerror', (e) => problems.push(`${who}'s page error: ${e.message}`));
}
let terminal = null;
try {
  await step('both log in with their passwords', async () => {
    await logIn(alice.page, args.owner, args['owner-password']);
    await logIn(bob.page, args.viewer, args['viewer-password']);
  });

  await step('alice opens a terminal and types', async () => {
    const page = alice.page;
    await page.click('#new');
    await until('the terminal', async () => page.evaluate(() => {
      const v = window.stoa.view;
      return v && v.welcomed && v.canWrite && v.stats.received > 0;
    }));
    terminal = await page.evaluate(() => window.stoa.view.id);
    await page.click('#term');
    await page.keyboard.type('echo BEFORE-$((6*7))', { delay: 5 });
    await page.keyboard.press('Enter');
    await until('BEFORE-42', () => hasLine(page, 'BEFORE-42'));
  });

  await step('alice shares it with bob, to watch', async () => {
    const page = alice.page;
    const answers = [args.viewer, ''];
    page.on('dialog', (d) => d.accept(answers.shift() ?? ''));
    await page.evaluate(() => window.stoa.refreshList());
    await page.click(`#terminals li[data-id="${terminal}"] button.share`);
    await until('the share in alice\'s list', async () =>
      (await page.textContent(`#terminals li[data-id="${terminal}"]`)).includes(`shared with ${args.viewer}`));
  });

  await step('bob sees it under "Shared with you" and watches it live', async () => {
    const page = bob.page;
    await page.evaluate(() => window.stoa.refreshList());
    await page.waitForSelector(`#shared li[data-id="${terminal}"]`, { timeout: 10000 });
    if (await page.isVisible(`#shared li[data-id="${terminal}"] button.type`)) {
      throw new Error('a watch-only share offers typing');
    }
    await page.click(`#shared li[data-id="${terminal}"] button.watch`);
    await until('alice\'s earlier output on bob\'s screen', () => hasLine(page, 'BEFORE-42'));
    const canWrite = await page.evaluate(() => window.stoa.view.canWrite);
    if (canWrite) throw new Error('bob may write to a watch-only share');
    await alice.page.click('#term');
    await alice.page.keyboard.type('echo LIVE-$((2*3))', { delay: 5 });
    await alice.page.keyboard.press('Enter');
    await until('alice\'s live output on bob\'s screen', () => hasLine(page, 'LIVE-6'));
    await shot(page, 'share-viewer.png');
  });

  await step('bob cannot type into it', async () => {
    await bob.page.click('#term');
    await bob.page.keyboard.type('echo BOB-TYPED', { delay: 5 });
    await bob.page.keyboard.press('Enter');
    await new Promise((r) => setTimeout(r, 1000));
    if (await hasLine(alice.page, 'BOB-TYPED')) throw new Error('bob\'s keys reached alice\'s shell');
  });

  await step('alice stops sharing; bob\'s view ends and the share is gone', async () => {
    await alice.page.evaluate(() => window.stoa.refreshList());
    await alice.page.click(`#terminals li[data-id="${terminal}"] button.unshare`);
    await until('bob\'s view to end', async () => bob.page.evaluate(() => {
      const v = window.stoa.view;
      return v && v.closedForGood;
    }));
    const status = await bob.page.textContent('#term-status');
    if (!/no longer shared/i.test(status)) throw new Error(`bob's view says ${JSON.stringify(status)}`);
    await until('the share gone from bob\'s list', async () => {
      await bob.page.evaluate(() => window.stoa.refreshList());
      return !(await bob.page.isVisible(`#shared li[data-id="${terminal}"]`));
    });
    await shot(bob.page, 'share-ended.png');
    await shot(alice.page, 'share-owner.png');
  });

  if (problems.length) throw new Error(`page problems: ${problems.join('; ')}`);
  result.ok = true;
} catch (e) {
  result.error = e.message;
  result.problems = problems;
  try { await shot(bob.page, 'share-failure-viewer.png'); } catch (_) { /* gone */ }
  try { await shot(alice.page, 'share-failure-owner.png'); } catch (_) { /* gone */ }
} finally {
  await alice.close();
  await bob.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
