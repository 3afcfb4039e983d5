// Drives the dashboard in headless Chromium as a user would; run by
// tests/dashboard.rs, which starts the watcher and checks the effects.
//
// Environment: BASE_URL (http://127.0.0.1:PORT), TOKEN (when the watcher
// has one), WORKERS (how many run), FAILED_JOB (the id of a failed job
// whose error is HTML), CLUSTER_BIN and PID_FILE (to compare with
// `cluster status --json`), SCREENSHOT (a path, optional), CHROMIUM
// (default /usr/bin/chromium).
//
// Prints one JSON line of what it saw; exits 1 with the reason on the
// first check that fails.
import { execFileSync } from 'node:child_process';
import { chromium } from 'playwright-core';

const base = process.env.BASE_URL;
const token = process.env.TOKEN || '';
const workers = Number(process.env.WORKERS);
const failedJob = process.env.FAILED_JOB;
const T = 20000;

function check(ok, what) {
  if (!ok) throw new Error('check failed: ' + what);
}

async function rows(page) {
  return page.$$eval('#workers tbody tr', (trs) => trs.map((tr) => ({
    pid: Number(tr.dataset.pid),
    state: tr.querySelector('.pill').textContent,
  })));
}

async function waitRows(page, n, what) {
  await page.waitForFunction((n) => {
    const trs = [...document.querySelectorAll('#workers tbody tr')];
    return trs.length === n && trs.every((tr) => tr.querySelector('.pill').textContent === 'ready');
  }, n, { timeout: T }).catch(() => { throw new Error(`${what}: not ${n} ready workers`); });
  return rows(page);
}

// What `cluster status --json` says: [slot, pid, state] sorted.
function cliRows() {
  const out = execFileSync(process.env.CLUSTER_BIN, ['status', '--json', '--pid-file', process.env.PID_FILE]);
  return JSON.parse(out).workers.map((w) => [w.slot, w.pid, w.state]).sort((a, b) => a[0] - b[0]);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const seen = {};
try {
  if (token) {
    // Without the token: the login form, and no data.
    const page = await browser.newPage();
    await page.goto(base + '/');
    await page.waitForSelector('#login:not([hidden])', { timeout: T });
    check(await page.isHidden('#app'), 'the app is hidden without the token');
    // A wrong token is refused as well.
    await page.fill('#token', 'wrong-token-wrong-token');
    await page.click('#login button');
    await page.waitForSelector('#login:not([hidden])', { timeout: T });
    await page.close();
  }

  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(base + '/' + (token ? '?token=' + encodeURIComponent(token) : ''));
  await page.waitForSelector('#live.on', { timeout: T });
  check(!page.url().includes('token='), 'the token leaves the address bar');
  check(await page.isHidden('#login'), 'no login form once the token is known');
  const first = await waitRows(page, workers, 'at start');
  seen.pids = first.map((r) => r.pid);

  // The rows are what `cluster status --json` says.
  const pageRows = await page.$$eval('#workers tbody tr', (trs) => trs.map((tr) =>
    [Number(tr.dataset.slot), Number(tr.dataset.pid), tr.querySelector('.pill').textContent]));
  const cli = cliRows();
  check(JSON.stringify(pageRows) === JSON.stringify(cli),
    `the rows match cluster status: ${JSON.stringify(pageRows)} vs ${JSON.stringify(cli)}`);

  // A killed worker: its row changes within 2 s.
  const victim = first[0].pid;
  const killedAt = Date.now();
  process.kill(victim, 'SIGKILL');
  await page.waitForFunction((pid) => !document.querySelector(`#workers tr[data-pid="${pid}"]`),
    victim, { timeout: 2000, polling: 50 }).catch(() => { throw new Error('the killed worker\'s row did not change within 2 s'); });
  seen.killedRowMs = Date.now() - killedAt;
  await waitRows(page, workers, 'after the kill');

  // The failed job, its HTML error shown as text.
  await page.waitForSelector('#jobs:not([hidden])', { timeout: T });
  const row = `#job-list tr[data-job="${failedJob}"]`;
  await page.waitForSelector(row, { timeout: T });
  const errorText = await page.textContent(row + ' td:last-child');
  check(errorText.includes('<img'), 'the error is shown as text: ' + errorText);
  check(await page.evaluate(() => window.__xss === undefined), 'no script from a job ran');
  seen.counters = await page.$$eval('#counters .card', (cs) =>
    Object.fromEntries(cs.map((c) => [c.dataset.counter, Number(c.querySelector('.n').textContent)])));
  check(seen.counters.failed >= 1, 'the failed counter counts it');

  // Its detail, and a retry.
  await page.click(row);
  await page.waitForSelector('#job-detail:not([hidden])', { timeout: T });
  check((await page.textContent('#detail-id')).trim() === failedJob, 'the detail is that job');
  check((await page.$$('#detail-errors li')).length >= 1, 'its errors are listed');
  check(await page.isEnabled('#detail-retry'), 'a failed job can be retried');
  check(await page.isDisabled('#detail-cancel'), 'a failed job cannot be cancelled');
  await page.click('#detail-retry');
  await page.waitForFunction(() => document.querySelector('#message').textContent.includes('queued again'),
    null, { timeout: T });
  // The retry runs (and fails again): the open detail follows by itself.
  await page.waitForFunction(() => document.querySelectorAll('#detail-errors li').length >= 2
    && document.querySelector('#detail-state').textContent === 'failed', null, { timeout: T })
    .catch(() => { throw new Error('the detail did not follow the retry'); });
  check(await page.$(`#recent tr td:nth-child(2)`) !== null, 'the latest outcomes are listed');

  // Scale up and down with the buttons.
  await page.click('#scale-up');
  seen.scaledUp = (await waitRows(page, workers + 1, 'after +')).length;
  await page.click('#scale-down');
  const back = await waitRows(page, workers, 'after −');

  // Reload: every worker is replaced.
  const before = new Set(back.map((r) => r.pid));
  await page.click('#reload');
  await page.waitForFunction(() => document.querySelector('#message').textContent.startsWith('reloaded'),
    null, { timeout: 60000 }).catch(async () => {
    throw new Error('reload: ' + await page.textContent('#message'));
  });
  // The page shows the new workers within a few status events.
  await page.waitForFunction((old) => {
    const trs = [...document.querySelectorAll('#workers tbody tr')];
    return trs.length > 0 && trs.every((tr) => !old.includes(Number(tr.dataset.pid)));
  }, [...before], { timeout: T }).catch(() => { throw new Error('reload: the old workers are still shown'); });
  const after = await waitRows(page, workers, 'after reload');
  check(after.every((r) => !before.has(r.pid)), 'reload replaced every worker');
  seen.reloaded = after.map((r) => r.pid);

  // The sparklines have points by now.
  await page.waitForFunction(() => document.querySelectorAll('#workers svg.spark polyline').length > 0,
    null, { timeout: T });
  if (process.env.SCREENSHOT) {
    await page.addStyleTag({ content: 'header { position: static !important; }' });
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  }
  check(errors.length === 0, 'no script errors: ' + errors.join('; '));
  await page.close();

  // Phone width: one card per worker, nothing wider than the screen.
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true });
  await phone.goto(base + '/' + (token ? '?token=' + encodeURIComponent(token) : ''));
  await waitRows(phone, workers, 'on a phone');
  check(await phone.isHidden('#workers thead'), 'no table head on a phone');
  if (process.env.SCREENSHOT) {
    await phone.screenshot({ path: process.env.SCREENSHOT.replace(/\.png$/, '-phone.png'), fullPage: true });
  }
  const width = await phone.evaluate(() => document.documentElement.scrollWidth);
  const wide = await phone.evaluate(() => [...document.querySelectorAll('body *')]
    .filter((e) => e.getBoundingClientRect().right > 391 && !e.closest('.scroll'))
    .slice(0, 5).map((e) => e.tagName + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : '')));
  check(width <= 390, 'the page fits a phone: ' + width + 'px, too wide: ' + wide.join(' '));
  seen.phoneWidth = width;
  await phone.close();

  console.log(JSON.stringify(seen));
} catch (e) {
  console.error(e.message || String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
