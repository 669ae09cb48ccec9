// Drives Debian's Chromium (never a downloaded browser) with playwright-core through the front door.
//
//   node e2e.mjs PLAN.json RESULT.json
//
// PLAN: {"executable": "/usr/bin/chromium", "base": "http://127.0.0.1:PORT", "artifacts": DIR,
//        "timeout_ms": N, "users": [{"name", "token", "file", "marker", "whoami", "command", "port_path"}]}
// Every user gets its own browser context (its own cookie jar, as a separate browser profile) in one
// headless Chromium, and concurrently: signs in with `/?token=...`, waits for the Theia workbench
// and its own seeded file in the explorer, opens the file in the editor, opens a terminal and runs
// `command` in it, waiting (as root, on disk) until `whoami` holds two lines, then (with
// `port_path`) loads the dev server the command started through the front door's /port/<N>/. Screenshots of each
// step go to ARTIFACTS/<user>-<n>-<step>.png. RESULT gets, per user, timings, what the explorer
// listed, the editor text, both cookies of the context and any page errors; the Python test
// (test_browser_e2e.py) judges them and checks the files on disk.
// Then the second user's sign-in link is opened in the first user's browser (RESULT.switch): what
// the page showed, the cookies before and after, a localStorage marker the first user's page left,
// the confirmation's answer headers, and whether the second user's workbench came up.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [planPath, resultPath] = process.argv.slice(2);
const plan = JSON.parse(fs.readFileSync(planPath, 'utf8'));
const TIMEOUT = plan.timeout_ms ?? 90000;
// The flags these machines need (ENVIRONMENT.md): no sandbox as root, no GPU, and no background
// traffic to hosts a closed network cannot reach. playwright-core adds --headless and a fresh
// temporary --user-data-dir of its own (it refuses one in `args`); each user's context is a
// separate, empty cookie jar inside it.
const FLAGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync',
];

const started = Date.now();
const since = () => (Date.now() - started) / 1000;
const log = (...args) => console.error(`[e2e ${since().toFixed(1)}s]`, ...args);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function shot(page, user, step) {
  const file = path.join(plan.artifacts, `${user.name}-${step}.png`);
  try {
    await page.screenshot({ path: file, timeout: 15000 });
    return file;
  } catch (err) {
    log(`${user.name}: screenshot ${step} failed: ${err.message}`);
    return null;
  }
}

async function openTerminal(page, user) {
  // The command palette (F1), as a person would: "Terminal: Create New Terminal".
  for (let attempt = 1; attempt <= 3; attempt++) {
    const before = await page.locator('.xterm').count();
    await page.locator('#theia-app-shell').click({ position: { x: 640, y: 300 }, timeout: TIMEOUT }).catch(() => {});
    await page.keyboard.press('F1');
    const input = page.locator('.quick-input-widget input[type="text"], .quick-input-box input').first();
    await input.waitFor({ state: 'visible', timeout: 15000 });
    await input.fill('>Create New Terminal');
    const entry = page.locator('.quick-input-list .monaco-list-row', { hasText: 'Create New Terminal' }).first();
    await entry.waitFor({ state: 'visible', timeout: 15000 });
    await entry.click();
    try {
      await page.waitForFunction((n) => document.querySelectorAll('.xterm').length > n, before, { timeout: 20000 });
      return;
    } catch (err) {
      log(`${user.name}: no terminal appeared (attempt ${attempt}): ${err.message}`);
      await page.keyboard.press('Escape');
    }
  }
  throw new Error('could not open a terminal from the command palette');
}

function whoamiDone(file) {
  try {
    return fs.readFileSync(file, 'utf8').trim().split('\n').length >= 2;
  } catch {
    return false;
  }
}

async function switchUser(run, from, to) {
  // The first user's browser opens the second user's link, as a victim opening a link sent to them.
  const { context, page } = run;
  const out = { ok: false };
  const session = async () => (await context.cookies()).find((c) => c.name === 'wsup_session')?.value ?? null;
  try {
    await page.evaluate(() => localStorage.setItem('e2e-switch-marker', 'left by the first user'));
    out.session_before = await session();
    const answer = await page.goto(`${plan.base}/?token=${to.token}`, { waitUntil: 'domcontentloaded', timeout: TIMEOUT });
    out.interstitial_status = answer ? answer.status() : null;
    out.interstitial_text = (await page.locator('body').innerText({ timeout: 15000 })).slice(0, 1000);
    out.session_while_asked = await session();
    out.screenshot_asked = await shot(page, from, '5-switch-asked');
    const [confirmation] = await Promise.all([
      page.waitForResponse((r) => r.url().endsWith('/.wsup/sign-in') && r.request().method() === 'POST', { timeout: TIMEOUT }),
      page.locator('#continue').click(),
    ]);
    out.confirm_status = confirmation.status();
    out.confirm_headers = await confirmation.allHeaders();
    delete out.confirm_headers['set-cookie'];
    const fileNode = page.locator('.theia-TreeNode', { hasText: to.file }).first();
    await page.waitForSelector('#theia-app-shell', { timeout: TIMEOUT });
    const explorerTab = page.locator('#shell-tab-explorer-view-container');
    await explorerTab.waitFor({ state: 'visible', timeout: TIMEOUT });
    if (!(await page.locator('#explorer-view-container').isVisible())) await explorerTab.click();
    await fileNode.waitFor({ state: 'visible', timeout: TIMEOUT });
    out.url_after = page.url().replace(to.token, '<token>');
    out.explorer = (await page.locator('.theia-TreeNode').allInnerTexts()).map((t) => t.trim()).filter(Boolean);
    out.marker_after = await page.evaluate(() => localStorage.getItem('e2e-switch-marker'));
    out.session_after = await session();
    out.screenshot_switched = await shot(page, from, '6-switched');
    out.ok = true;
    log(`${from.name}'s browser: asked, confirmed, now in ${to.name}'s workbench`);
  } catch (err) {
    out.error = String(err && err.stack || err).slice(0, 2000);
    log(`switch: FAILED: ${err.message}`);
    await shot(page, from, 'switch-failure');
    try { out.body_text = (await page.locator('body').innerText({ timeout: 5000 })).slice(0, 2000); } catch { /* gone */ }
  }
  return out;
}

async function runUser(browser, user) {
  const out = { name: user.name, ok: false, steps: {}, screenshots: [], page_errors: [], console_errors: [] };
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => out.page_errors.push(String(err).slice(0, 300)));
  page.on('console', (msg) => { if (msg.type() === 'error') out.console_errors.push(msg.text().slice(0, 300)); });
  try {
    // 1. Sign in: the token on the first load; the front door answers 303 and sets its cookie.
    const t0 = Date.now();
    const response = await page.goto(`${plan.base}/?token=${user.token}`, { waitUntil: 'domcontentloaded', timeout: TIMEOUT });
    out.first_status = response ? response.status() : null;
    out.redirected_from = response ? response.request().redirectedFrom()?.url().replace(user.token, '<token>') ?? null : null;
    out.url_after_sign_in = page.url().replace(user.token, '<token>');
    out.steps.html = (Date.now() - t0) / 1000;
    // 2. The workbench: Theia's shell up, its preloader gone, the user's own file in the explorer.
    await page.waitForSelector('#theia-app-shell', { timeout: TIMEOUT });
    await page.waitForSelector('.theia-preload', { state: 'detached', timeout: TIMEOUT });
    // The Explorer (a fresh profile may start with the left panel collapsed: open it as a person would).
    const fileNode = page.locator('.theia-TreeNode', { hasText: user.file }).first();
    const explorerTab = page.locator('#shell-tab-explorer-view-container');
    await explorerTab.waitFor({ state: 'visible', timeout: TIMEOUT });
    if (!(await page.locator('#explorer-view-container').isVisible())) await explorerTab.click();
    await fileNode.waitFor({ state: 'visible', timeout: TIMEOUT });
    out.steps.workbench = (Date.now() - t0) / 1000;
    out.explorer = (await page.locator('.theia-TreeNode').allInnerTexts()).map((s) => s.trim()).filter(Boolean);
    out.title = await page.title();
    out.screenshots.push(await shot(page, user, '1-workbench'));
    log(`${user.name}: workbench with ${user.file} after ${out.steps.workbench}s`);

    // 3. Open the file: double-click in the explorer, its text in a Monaco editor.
    await fileNode.dblclick();
    const editor = page.locator('.monaco-editor .view-lines', { hasText: user.marker }).first();
    await editor.waitFor({ state: 'visible', timeout: TIMEOUT });
    out.editor_text = (await editor.innerText()).replace(/\u00a0/g, ' ');
    out.editor_tab = (await page.locator('.lm-TabBar-tab.lm-mod-current, .p-TabBar-tab.p-mod-current').allInnerTexts()).map((s) => s.trim());
    out.steps.editor = (Date.now() - t0) / 1000;
    out.screenshots.push(await shot(page, user, '2-editor'));
    log(`${user.name}: ${user.file} open in the editor`);

    // 4. A terminal, and a command typed into it; the result is read from disk (we run as root).
    await openTerminal(page, user);
    // Keys typed before the shell is attached to the widget are lost, and the terminal paints on a
    // canvas (no text to wait for): type a harmless probe until its file appears, then the command.
    const term = page.locator('.xterm-helper-textarea').last();
    const ready = path.join(path.dirname(user.whoami), '.e2e-terminal-ready');
    const deadline = Date.now() + TIMEOUT;
    out.probes = 0;
    while (!fs.existsSync(ready)) {
      if (Date.now() > deadline) throw new Error(`the terminal never ran a command (${out.probes} probes typed)`);
      await term.focus();
      await page.keyboard.type('touch .e2e-terminal-ready', { delay: 5 });
      await page.keyboard.press('Enter');
      out.probes += 1;
      for (let i = 0; i < 20 && !fs.existsSync(ready); i++) await sleep(100);
    }
    let typed = 0;
    while (!whoamiDone(user.whoami)) {
      if (Date.now() > deadline) throw new Error(`${user.whoami} did not appear after typing the command ${typed} time(s)`);
      if (typed === 0 || (Date.now() - out.steps.typed_at) > 15000) {
        await term.focus();
        await page.keyboard.type(user.command, { delay: 5 });
        await page.keyboard.press('Enter');
        typed += 1;
        out.steps.typed_at = Date.now();
      }
      await sleep(100);
    }
    delete out.steps.typed_at;
    out.typed = typed;
    out.steps.terminal = (Date.now() - t0) / 1000;
    await sleep(500); // let the terminal paint the prompt again for the screenshot
    out.screenshots.push(await shot(page, user, '3-terminal'));
    log(`${user.name}: terminal command ran (typed ${typed}x) after ${out.steps.terminal}s`);
    // 5. The dev server the command started, in the browser through the front door's /port/<N>/
    //    (the user's own loopback): retried until it listens, in a second tab of the same session.
    if (user.port_path) {
      const tab = await context.newPage();
      const until = Date.now() + 30000;
      for (;;) {
        const answer = await tab.goto(plan.base + user.port_path, { waitUntil: 'load' }).catch((err) => ({ status: () => 0, err }));
        out.port_status = answer.status();
        out.port_text = out.port_status ? (await tab.locator('body').innerText()).slice(0, 2000) : String(answer.err);
        if (out.port_status === 200 || Date.now() > until) break;
        await sleep(250);
      }
      out.screenshots.push(await shot(tab, user, '3b-port'));
      await tab.close();
      log(`${user.name}: ${user.port_path} answered ${out.port_status}`);
    }
    out.cookies = Object.fromEntries((await context.cookies()).map((c) => [c.name, c.value]));
    out.cookie_flags = Object.fromEntries((await context.cookies()).map((c) => [c.name, { httpOnly: c.httpOnly, sameSite: c.sameSite, secure: c.secure }]));
    out.ok = true;
  } catch (err) {
    out.error = String(err && err.stack || err).slice(0, 2000);
    log(`${user.name}: FAILED: ${err.message}`);
    out.screenshots.push(await shot(page, user, 'failure'));
    try {
      out.cookies = Object.fromEntries((await context.cookies()).map((c) => [c.name, c.value]));
      out.body_text = (await page.locator('body').innerText({ timeout: 5000 })).slice(0, 2000);
    } catch { /* the page is gone */ }
  }
  return { out, context, page };
}

const result = { ok: false, users: [], browser_version: null };
let browser;
// A deadline of our own (inside the test's): close the browser rather than leave it behind.
setTimeout(async () => {
  log('deadline reached: closing the browser');
  result.error = `deadline of ${plan.deadline_ms ?? 240000} ms reached`;
  fs.writeFileSync(resultPath, JSON.stringify(result, null, 2));
  if (browser) await browser.close().catch(() => {});
  process.exit(3);
}, plan.deadline_ms ?? 240000).unref();
try {
  browser = await chromium.launch({ executablePath: plan.executable, headless: true, args: FLAGS, timeout: 60000 });
  result.browser_version = browser.version();
  log(`chromium ${result.browser_version}`);
  const runs = await Promise.all(plan.users.map((user) => runUser(browser, user)));
  result.users = runs.map((r) => r.out);
  // Both workbenches still open, side by side in time: one last picture of each.
  for (const [i, r] of runs.entries()) {
    if (r.out.ok) r.out.screenshots.push(await shot(r.page, plan.users[i], '4-final'));
  }
  result.ok = result.users.every((u) => u.ok);
  if (result.ok && plan.users.length >= 2) {
    result.switch = await switchUser(runs[0], plan.users[0], plan.users[1]);
    result.ok = result.switch.ok;
  }
} catch (err) {
  result.error = String(err && err.stack || err).slice(0, 2000);
  log(`FAILED: ${err.message}`);
} finally {
  result.seconds = since();
  fs.writeFileSync(resultPath, JSON.stringify(result, null, 2));
  if (browser) await browser.close().catch(() => {});
}
process.exit(result.ok ? 0 : 1);
