// The operator console in a real browser: headless Debian Chromium, driven
// by playwright-core, against a real hub and the Node example spoke started
// by tests/web/run.sh. run.sh passes HUB_HTTP (base URL), HUB_ADMIN_TOKEN,
// GRPC_ADDR, HUB_BIN, WORK (the hub's directory, with hub-data/), ROOT,
// HUB_PID (the hub, which the last test restarts on the same ports:
// HUB_TEST_LISTEN, HUB_TEST_HTTP_LISTEN), NODE_SPOKE_PID, ARTIFACTS (for
// screenshots), HOSTILE_DIRECTIVE (a delivered sync_doc to billing-eu with a
// hostile payload) and FAILED_DIRECTIVE (one billing-eu failed with a hostile
// error). It registered billing-eu (hostile label and status message, metric
// points with a hostile label and unit), payroll-us and node-spoke.
//
// The browser context bypasses the page's Content-Security-Policy, so that
// hostile text that became markup would run and set window.pwned: escaping,
// not only the policy, is what keeps it inert. (admin-page.test.mjs runs
// under the policy.)
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const run = promisify(execFile);
const env = process.env;
const base = env.HUB_HTTP;
const shots = env.ARTIFACTS;
const WAIT = 20_000;

const hostile = {
  label: 'team=<script>window.pwned=4</script>',
  status: 'DEGRADED: <script>window.pwned = 1</script>',
  doc: '<img src=x onerror=window.pwned=2>',
  metricLabel: 'route=<img src=x onerror=window.pwned=3>',
  reason: '<img src=x onerror=window.pwned=5> no longer needed',
  error: '<script>window.pwned=6</script> disk full',
  echoed: '<img src=x onerror=window.pwned=7>',
  unit: '<svg onload=window.pwned=8>',
  filter: '"><img src=x onerror=window.pwned=9>',
};

let browser;
let context;
/** The echo directive sent from the spoke page. */
let echoId;

before(async () => {
  browser = await chromium.launch({
    executablePath: env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  context = await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(WAIT);
  const page = await context.newPage();
  await page.goto(base + '/');
  await page.fill('input[name=token]', env.HUB_ADMIN_TOKEN);
  await Promise.all([page.waitForURL(base + '/'), page.click('button[type=submit]')]);
  await page.close();
});
after(async () => {
  // Never leave the spoke stopped, whatever failed.
  try { process.kill(Number(env.NODE_SPOKE_PID), 'SIGCONT'); } catch { /* gone */ }
  await browser?.close();
});

/** Nothing hostile ran or became markup; the hub's script is the only one. */
async function assertInert(page, where) {
  assert.equal(await page.evaluate(() => window.pwned), undefined, `${where}: hostile text ran`);
  const markup = 'main script, main img, main iframe, main [onerror], main [onload], figure svg svg';
  assert.equal(await page.locator(markup).count(), 0, `${where}: hostile text became markup`);
  assert.deepEqual(
    await page.evaluate(() => [...document.scripts].map((s) => new URL(s.src).pathname)),
    ['/console.js'],
    `${where}: scripts`,
  );
}

async function text(page, selector) {
  return page.locator(selector).innerText();
}

async function open(url) {
  const page = await context.newPage();
  const response = await page.goto(base + url);
  assert.equal(response.status(), 200, `GET ${url}`);
  return page;
}

async function live(page) {
  await page.locator('#live.on').waitFor();
  assert.match(await text(page, '#live'), /^Live/);
}

async function screenshot(page, name) {
  await page.screenshot({ path: path.join(shots, `console-${name}.png`), fullPage: true });
}

test('every response carries the security headers', async () => {
  const response = await context.request.get(base + '/');
  assert.equal(response.status(), 200);
  const headers = response.headers();
  assert.match(headers['content-security-policy'], /script-src 'self'/);
  assert.match(headers['content-security-policy'], /default-src 'none'/);
  assert.equal(headers['x-frame-options'], 'DENY');
});

test('the fleet page: spokes, outstanding directives, events; hostile text as text; filters', async () => {
  const page = await open('/');
  const spokes = await text(page, '#spokes-table');
  assert.ok(spokes.includes(hostile.label), spokes);
  assert.ok(spokes.includes(hostile.status), spokes);
  const names = await page.locator('#spokes-table tbody tr td:first-child').allInnerTexts();
  assert.deepEqual(names.sort(), ['billing-eu', 'node-spoke', 'payroll-us']);
  const outstanding = await text(page, '#directives-table');
  assert.ok(outstanding.includes(env.HOSTILE_DIRECTIVE), outstanding);
  assert.ok(outstanding.includes(hostile.doc), outstanding);
  assert.ok(!outstanding.includes(env.FAILED_DIRECTIVE), 'a failed directive is not outstanding');
  assert.match(await text(page, '#events-table'), /DIRECTIVE_FAILED/);
  await live(page);
  await assertInert(page, 'fleet');
  await screenshot(page, 'fleet');
  await page.close();

  const filtered = await open('/?label=' + encodeURIComponent('region=us'));
  assert.deepEqual(await filtered.locator('#spokes-table tbody tr td:first-child').allInnerTexts(), ['payroll-us']);
  await filtered.close();

  const echoed = await open('/?label=' + encodeURIComponent(hostile.filter));
  assert.equal(await echoed.inputValue('#f-label'), hostile.filter);
  assert.match(await text(echoed, '#spokes-table'), /No spokes match/);
  await assertInert(echoed, 'fleet filtered by a hostile label');
  await echoed.close();
});

test('the spoke page: details, directives, events, and charts of the points it pushed', async () => {
  const page = await open('/spokes/billing-eu');
  const details = await text(page, '#spoke-details');
  assert.ok(details.includes(hostile.label), details);
  assert.ok(details.includes(hostile.status), details);
  assert.equal(await text(page, '#capabilities tbody td:first-child'), 'sync_doc');
  const rows = page.locator('#directives-table tbody tr');
  assert.equal(await rows.filter({ hasText: env.FAILED_DIRECTIVE }).locator('td.state').innerText(), 'FAILED');
  assert.ok((await text(page, '#directives-table')).includes(hostile.doc));
  assert.match(await text(page, '#events-table'), /METRICS_RECEIVED/);

  // statistics/latency: 3 points in 2 series (one label set hostile).
  const latency = page.locator('figure.chart[data-metric="statistics/latency"]');
  assert.equal(await latency.locator('g.series').count(), 2);
  const series = await latency.locator('g.series').evaluateAll((gs) => gs.map((g) => g.dataset.series));
  assert.deepEqual(series.sort(), ['route=checkout', hostile.metricLabel].sort());
  assert.equal(await latency.locator('g.series circle').count(), 3);
  const titles = await latency.locator('circle > title').allTextContents();
  assert.ok(titles.some((t) => t.startsWith('route=checkout: 99 ms at ')), titles.join('\n'));
  assert.ok(titles.some((t) => t.startsWith(`${hostile.metricLabel}: 17.25 ms at `)), titles.join('\n'));
  assert.ok((await latency.locator('.legend').innerText()).includes(hostile.metricLabel));
  const errors = page.locator('figure.chart[data-metric="statistics/errors"]');
  assert.equal(await errors.locator('figcaption').innerText(), `statistics/errors (${hostile.unit})`);
  assert.ok((await errors.locator('circle > title').textContent()).includes(`: 5 ${hostile.unit} at `));
  await live(page);
  await assertInert(page, 'spoke');
  await screenshot(page, 'spoke');

  // The range links: the points are from the last 20 minutes.
  await Promise.all([page.waitForURL(/range=1h$/), page.click('#metrics a[href$="range=1h"]')]);
  assert.match(await text(page, '#metrics h3'), /last 1h/);
  assert.equal(await page.locator('figure.chart[data-metric="statistics/latency"] g.series').count(), 2);
  await page.close();

  // The Node spoke's own batch.
  const node = await open('/spokes/node-spoke');
  const orders = node.locator('figure.chart[data-metric="statistics/orders_processed"]');
  assert.equal(await orders.locator('g.series').count(), 1);
  assert.match(await orders.locator('circle > title').textContent(), /^lang=node: 42 1 at /);
  const payout = node.locator('figure.chart[data-metric="compensation/payout_total"] circle > title');
  assert.match(await payout.textContent(), /: 1234\.5 EUR at /);
  await node.close();
});

test('the directive page: hostile payload and error as text; no cancel once final', async () => {
  const page = await open(`/directives/${env.FAILED_DIRECTIVE}`);
  assert.equal(await text(page, '#state'), 'FAILED');
  assert.equal(await text(page, '#error'), hostile.error);
  assert.match(await text(page, '#timeline'), /DIRECTIVE_CREATED[\s\S]*DIRECTIVE_FAILED/);
  assert.equal(await page.locator('form.cancel').count(), 0);
  await assertInert(page, 'failed directive');
  await page.close();

  const delivered = await open(`/directives/${env.HOSTILE_DIRECTIVE}`);
  assert.equal(JSON.parse(await text(delivered, '#payload')).doc, hostile.doc);
  assert.equal(await delivered.locator('form.cancel').count(), 1);
  await assertInert(delivered, 'hostile directive');
  await delivered.close();
});

test('a directive sent from the spoke page completes while its page is open', async () => {
  const spokePid = Number(env.NODE_SPOKE_PID);
  const page = await open('/spokes/node-spoke');
  assert.deepEqual(await page.locator('#send-type option').allInnerTexts(), ['echo', 'sum']);
  // The browser checks the payload before sending.
  const payload = page.locator('#send-payload');
  await payload.fill('{"greeting": ');
  assert.match(await payload.evaluate((el) => el.validationMessage), /^Not valid JSON/);
  await payload.fill('[1, 2]');
  assert.match(await payload.evaluate((el) => el.validationMessage), /must be a JSON object/);

  const sent = { greeting: hostile.echoed, n: 3 };
  await payload.fill(JSON.stringify(sent));
  assert.equal(await payload.evaluate((el) => el.validationMessage), '');
  await page.selectOption('#send-type', 'echo');
  // The spoke is held until the directive's page shows it unfinished.
  process.kill(spokePid, 'SIGSTOP');
  try {
    await Promise.all([
      page.waitForURL(/\/directives\/[0-9a-f-]+\?done=sent$/),
      page.click('#actions form.send button[type=submit]'),
    ]);
    await page.evaluate(() => { window.__marker = 1; });
    echoId = new URL(page.url()).pathname.split('/').pop();
    assert.match(await text(page, 'main'), /The directive was created/);
    assert.match(await text(page, '#state'), /^(PENDING|DELIVERED)$/);
    assert.equal(await page.locator('#result').count(), 0);
    await live(page);
  } finally {
    process.kill(spokePid, 'SIGCONT');
  }
  await page.waitForFunction(() => document.getElementById('state')?.textContent === 'COMPLETED', null, { timeout: WAIT });
  assert.deepEqual(JSON.parse(await text(page, '#result')), sent);
  assert.match(await text(page, '#timeline'), /DIRECTIVE_COMPLETED/);
  assert.equal(await page.locator('form.cancel').count(), 0);
  assert.equal(await page.evaluate(() => window.__marker), 1, 'updated without a reload');
  await live(page);
  await assertInert(page, 'echo directive');
  await screenshot(page, 'directive');
  await page.close();
});

test('the event log: filters by type and spoke; hostile details as text', async () => {
  assert.ok(echoId, 'the echo directive was sent');
  const page = await open('/events?type=DIRECTIVE_COMPLETED&spoke=node-spoke');
  const types = await page.locator('#events-table tbody td:nth-child(3)').allInnerTexts();
  assert.ok(types.length >= 1 && types.every((t) => t === 'DIRECTIVE_COMPLETED'), types.join());
  assert.ok((await text(page, '#events-table')).includes(echoId));
  assert.ok(!(await text(page, '#events-table')).includes(env.FAILED_DIRECTIVE));
  await page.close();

  const all = await open('/events');
  const log = await text(all, '#events-table');
  for (const t of [hostile.error, 'SPOKE_REGISTERED', 'DIRECTIVE_FAILED', 'DIRECTIVE_COMPLETED']) {
    assert.ok(log.includes(t), `${t} in the log`);
  }
  await live(all);
  await assertInert(all, 'events');
  await screenshot(all, 'events');
  await all.close();

  const unknown = await open('/events?spoke=' + encodeURIComponent(hostile.filter));
  assert.ok((await text(unknown, 'main .error')).includes(hostile.filter));
  await assertInert(unknown, 'events of an unknown spoke');
  await unknown.close();
});

test('a forged POST without the session\'s form token is refused and changes nothing', async () => {
  const page = await open('/spokes/payroll-us');
  const answers = await page.evaluate(async () => {
    const post = async (body) => {
      const r = await fetch('/spokes/payroll-us/revoke', {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body,
      });
      return { status: r.status, text: await r.text() };
    };
    const real = document.querySelector('form[action$="/revoke"] input[name=csrf]').value;
    return {
      missing: await post('confirm=yes'),
      wrong: await post('confirm=yes&csrf=' + 'a'.repeat(64)),
      // The page's own token, unconfirmed: only the confirmation page.
      real: await post('csrf=' + encodeURIComponent(real)),
    };
  });
  for (const forged of [answers.missing, answers.wrong]) {
    assert.equal(forged.status, 403);
    assert.match(forged.text, /did not come from your console session/);
  }
  assert.equal(answers.real.status, 200);
  assert.match(answers.real.text, /Revoke spoke payroll-us\?/);
  await page.reload();
  // (It never heartbeats: ONLINE or, later, STALE; not REVOKED.)
  assert.notEqual(await text(page, '#spoke-details .health'), 'REVOKED');
  assert.doesNotMatch(await text(page, '#events-table'), /SPOKE_REVOKED/);
  await page.close();
});

test('cancel a directive from its page, through the confirmation', async () => {
  const id = env.HOSTILE_DIRECTIVE;
  const page = await open(`/directives/${id}`);
  assert.match(await text(page, '#state'), /^(PENDING|DELIVERED)$/);
  await page.fill('#cancel-reason', hostile.reason);
  await Promise.all([page.waitForURL(`${base}/directives/${id}/cancel`), page.click('form.cancel button[type=submit]')]);
  assert.ok((await text(page, 'main')).includes(`Cancel directive ${id}?`));
  assert.equal(await page.inputValue('form.confirm input[name=reason]'), hostile.reason);
  assert.equal(await page.inputValue('form.confirm input[name=confirm]'), 'yes');
  await assertInert(page, 'cancel confirmation');
  await screenshot(page, 'confirm');
  await Promise.all([
    page.waitForURL(`${base}/directives/${id}?done=cancelled`),
    page.click('form.confirm button[type=submit]'),
  ]);
  assert.equal(await text(page, '#state'), 'CANCELLED');
  assert.equal(await text(page, '#error'), hostile.reason);
  assert.match(await text(page, 'main'), /The directive is cancelled/);
  assert.match(await text(page, '#timeline'), /DIRECTIVE_CANCELLED/);
  assert.equal(await page.locator('form.cancel').count(), 0);
  await assertInert(page, 'cancelled directive');
  await page.close();
});

test('revoke a spoke from its page, through the confirmation', async () => {
  const page = await open('/spokes/payroll-us');
  await Promise.all([
    page.waitForURL(`${base}/spokes/payroll-us/revoke`),
    page.click('form[action="/spokes/payroll-us/revoke"] button[type=submit]'),
  ]);
  assert.match(await text(page, 'main'), /Revoke spoke payroll-us\? Its key stops working/);
  await Promise.all([
    page.waitForURL(`${base}/spokes/payroll-us?done=revoked`),
    page.click('form.confirm button[type=submit]'),
  ]);
  assert.equal(await text(page, '#spoke-details .health'), 'REVOKED');
  assert.match(await text(page, 'main'), /The spoke is revoked/);
  await page.locator('#events-table', { hasText: 'SPOKE_REVOKED' }).waitFor();
  await page.close();

  const fleet = await open('/');
  const row = fleet.locator('#spokes-table tbody tr', { hasText: 'payroll-us' });
  assert.equal(await row.locator('.health').innerText(), 'REVOKED');
  await fleet.close();
});

/** Whether process `pid` is gone (or a zombie waiting for its parent). */
function exited(pid) {
  const stat = `/proc/${pid}/stat`;
  return !existsSync(stat) || / Z /.test(readFileSync(stat, 'utf8'));
}

test('the live stream says when the hub is gone and resumes after it restarts', async () => {
  const page = await open('/');
  await live(page);
  await page.evaluate(() => { window.__marker = 1; });

  const pid = Number(env.HUB_PID);
  process.kill(pid, 'SIGTERM');
  await page.locator('#live.off').waitFor();
  assert.equal(await text(page, '#live'), 'Disconnected from the hub: reconnecting…');
  const deadline = Date.now() + WAIT;
  while (!exited(pid)) {
    assert.ok(Date.now() < deadline, 'the hub exits within 20 s of SIGTERM');
    await new Promise((r) => setTimeout(r, 100));
  }

  // The same ports, data directory and admin token (so the same session).
  const { stdout } = await run('bash', ['-c', `
    source "$ROOT/tests/lib/hub.sh"
    start_hub "$WORK" "$WORK/hub-restarted.log"
    echo "$HUB_PID" >"$WORK/hub-restarted.pid"
    echo "$GRPC_ADDR $HTTP_ADDR"`]);
  assert.equal(stdout.trim(), `${env.GRPC_ADDR} ${new URL(base).host}`);
  await live(page);

  // An event after the restart shows without a reload: a new spoke's row.
  const enrollment = readFileSync(path.join(env.WORK, 'hub-data', 'enrollment.token'), 'utf8').trim();
  await run('grpcurl', [
    '-plaintext', '-H', `authorization: Bearer ${enrollment}`,
    '-d', JSON.stringify({ name: 'late-spoke', capabilities: [{ directive_type: 'sync_doc', version: '1' }] }),
    env.GRPC_ADDR, 'hub.v1.SpokeService/Register',
  ]);
  await page.locator('#spokes-table tbody a', { hasText: 'late-spoke' }).waitFor();
  await page.locator('#events-table tr', { hasText: 'late-spoke' }).filter({ hasText: 'SPOKE_REGISTERED' }).waitFor();
  assert.equal(await page.evaluate(() => window.__marker), 1, 'updated without a reload');
  await live(page);
  await page.close();
});
