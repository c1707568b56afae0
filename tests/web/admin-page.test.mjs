// The admin page in a real browser: headless Debian Chromium, driven by
// playwright-core, against a real hub started by tests/web/run.sh, which
// passes HUB_HTTP (base URL), HUB_ADMIN_TOKEN, the names it registered
// (SPOKES, comma separated), the ids it sent (DIRECTIVES), SCREENSHOT, and
// HUB_BIN, GRPC_ADDR and WORK (the hub's directory) for the CLI.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const base = process.env.HUB_HTTP;
const token = process.env.HUB_ADMIN_TOKEN;
const spokes = process.env.SPOKES.split(',');
const directives = process.env.DIRECTIVES.split(',');

/** Sends a sync_doc directive with the hub CLI (run.sh's GRPC_ADDR, WORK, HUB_BIN); its id. */
async function send(spoke, payload) {
  const { stdout } = await promisify(execFile)(
    process.env.HUB_BIN,
    ['--addr', process.env.GRPC_ADDR, 'send', 'sync_doc', '--to', spoke, '--payload', payload, '--json'],
    { cwd: process.env.WORK },
  );
  return JSON.parse(stdout).directives[0].id;
}

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});
after(async () => { await browser?.close(); });

test('without the token the page is refused and asks for it', async () => {
  const page = await browser.newPage();
  const response = await page.goto(base + '/');
  assert.equal(response.status(), 401);
  assert.equal(await page.locator('input[name=token][type=password]').count(), 1);
  assert.equal(await page.locator('#spokes-table').count(), 0);
  for (const name of spokes) {
    assert.ok(!(await page.content()).includes(name), `${name} must not leak before sign-in`);
  }
  await page.fill('input[name=token]', 'not-the-admin-token');
  await page.click('button[type=submit]');
  assert.match(await page.locator('.error').innerText(), /not the admin token/);
  await page.close();
});

test('signed in, the page shows spokes, outstanding directives and events', async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(base + '/');
  await page.fill('input[name=token]', token);
  await Promise.all([page.waitForURL(base + '/'), page.click('button[type=submit]')]);
  assert.equal(await page.title(), 'hub');

  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === 'hub_session');
  assert.ok(session, 'a session cookie');
  assert.equal(session.httpOnly, true);
  assert.equal(session.sameSite, 'Strict');

  const spokeRows = page.locator('#spokes-table tbody tr');
  const names = await spokeRows.locator('td:first-child').allInnerTexts();
  assert.deepEqual(names.sort(), [...spokes].sort());
  const health = await spokeRows.locator('.health').allInnerTexts();
  assert.ok(health.every((h) => ['ONLINE', 'STALE', 'OFFLINE', 'REVOKED'].includes(h)), String(health));
  // Colour and text: an ONLINE badge is green-ish.
  const online = page.locator('#spokes-table .health.ONLINE').first();
  assert.equal(await online.innerText(), 'ONLINE');
  const colour = await online.evaluate((el) => getComputedStyle(el).backgroundColor);
  assert.equal(colour, 'rgb(211, 245, 220)');

  const directiveText = await page.locator('#directives-table').innerText();
  for (const id of directives) assert.ok(directiveText.includes(id), `directive ${id} listed`);
  assert.match(directiveText, /PENDING/);
  const eventText = await page.locator('#events-table').innerText();
  assert.match(eventText, /SPOKE_REGISTERED/);
  assert.match(eventText, /DIRECTIVE_CREATED/);

  // Untrusted text is shown as text, never run as markup.
  const spokeText = await page.locator('#spokes-table').innerText();
  assert.ok(spokeText.includes("<script>window.pwned = 1</script>"), spokeText);
  assert.ok(directiveText.includes('<img src=x onerror=window.pwned=2>'), directiveText);
  assert.equal(await page.evaluate(() => window.pwned), undefined);
  assert.equal(await page.locator('main script, main img').count(), 0);

  // It follows the event log instead of reloading: the status line says
  // so, and a directive sent meanwhile (with the CLI) appears in place.
  assert.equal(await page.locator('meta[http-equiv=refresh]').count(), 0);
  await page.locator('#live.on').waitFor({ timeout: 20_000 });
  assert.match(await page.locator('#live').innerText(), /^Live/);
  await page.evaluate(() => { window.__marker = 1; });
  const sent = await send(spokes[1], '{"doc": "sent while the page is open"}');
  await page.locator('#directives-table', { hasText: sent }).waitFor({ timeout: 20_000 });
  assert.equal(await page.evaluate(() => window.__marker), 1, 'updated without a reload');

  await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  await context.close();
});
