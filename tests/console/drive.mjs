// Drives the operator console in headless Chromium (Debian's /usr/bin/chromium; playwright-core
// never downloads a browser) and prints what it saw as one JSON line; screenshots go to OUT.
// Usage: node drive.mjs BASE_URL TOKEN DEVICE_ID ROLLOUT_ID OUT ADMIN_TOKEN
// (TOKEN: an operator's; ADMIN_TOKEN: an admin's, for the kill switch)
import { chromium } from "playwright-core";

const [base, token, deviceId, rolloutId, out, adminToken] = process.argv.slice(2);
const seen = { errors: [] };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The closed network here: no background traffic, no component updates (see the machine's notes).
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.addInitScript((t) => sessionStorage.setItem("iotflow.token", t), token);
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") seen.errors.push(m.text()); });
  page.on("pageerror", (e) => seen.errors.push(String(e)));
  page.on("response", (r) => { if (r.status() >= 400) (seen.refused = seen.refused || []).push(`${r.status()} ${r.url()}`); });
  page.on("dialog", (d) => { seen.dialog = d.message(); d.accept(); });
  const shot = (name) => page.screenshot({ path: `${out}/${name}.png`, fullPage: true });

  await page.goto(`${base}/console#/fleet`);
  await page.waitForSelector("#fleet-list tbody tr");
  seen.fleet_rows = await page.locator("#fleet-list tbody tr").count();
  seen.online = await page.locator("#fleet-summary .card").first().locator(".n").textContent();
  await shot("fleet");
  await page.fill("#fleet-q", deviceId);
  await page.press("#fleet-q", "Enter");
  await page.waitForFunction((id) => {
    const rows = document.querySelectorAll("#fleet-list tbody tr");
    return rows.length === 1 && rows[0].textContent.includes(id);
  }, deviceId);
  seen.searched = await page.locator("#fleet-list tbody tr").count();

  await page.click(`#fleet-list a[href="#/devices/${deviceId}"]`);
  await page.waitForSelector("#chart svg circle", { timeout: 60000 });
  seen.points = await page.locator("#chart svg circle").count();
  await shot("device");

  await page.goto(`${base}/console#/rollouts/${rolloutId}`);
  await page.waitForSelector("#rollout-succeeded");
  seen.succeeded_before = Number(await page.textContent("#rollout-succeeded"));
  await page.waitForFunction((n) => Number(document.querySelector("#rollout-succeeded")?.textContent) > n,
    seen.succeeded_before, { timeout: 90000 });
  seen.succeeded_after = Number(await page.textContent("#rollout-succeeded"));
  await shot("rollout");
  await page.click("#pause");
  await page.waitForFunction(() => document.querySelector("#rollout-status")?.textContent === "paused", null,
    { timeout: 30000 });
  seen.status = await page.textContent("#rollout-status");
  seen.resume_enabled = await page.isEnabled("#resume");
  await shot("rollout-paused");

  // The kill switch: an operator may not flip it; an admin turns it on (confirmed) and off again.
  await page.goto(`${base}/console#/rollouts`);
  await page.waitForSelector("#kill-switch button");
  seen.kill_switch_operator_enabled = await page.isEnabled("#kill-switch button");
  const admin = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await admin.addInitScript((t) => sessionStorage.setItem("iotflow.token", t), adminToken);
  const adminPage = await admin.newPage();
  adminPage.on("console", (m) => { if (m.type() === "error") seen.errors.push(m.text()); });
  adminPage.on("dialog", (d) => { (seen.kill_dialogs = seen.kill_dialogs || []).push(d.message()); d.accept(); });
  await adminPage.goto(`${base}/console#/rollouts`);
  await adminPage.waitForSelector("#kill-switch button:not([disabled])");
  seen.kill_switch_before = (await adminPage.textContent("#kill-switch .badge")).trim();
  await adminPage.click("#kill-switch button");
  await adminPage.waitForFunction(() => document.querySelector("#kill-switch .badge")?.textContent.startsWith("ON"),
    null, { timeout: 20000 });
  seen.kill_switch_on = (await adminPage.textContent("#kill-switch .badge")).trim();
  await adminPage.screenshot({ path: `${out}/kill-switch-on.png`, fullPage: true });
  await adminPage.click("#kill-switch button");
  await adminPage.waitForFunction(() => document.querySelector("#kill-switch .badge")?.textContent === "off",
    null, { timeout: 20000 });
  seen.kill_switch_after = (await adminPage.textContent("#kill-switch .badge")).trim();
  await admin.close();

  await page.goto(`${base}/console#/pipeline`);
  await page.waitForSelector("#health .badge");
  await page.waitForSelector("#loss .card");
  seen.components = await page.locator("#health .card").count();
  await shot("pipeline");

  // Keyboard, in a fresh tab: Tab walks the sections' links, the search and the devices; Enter
  // on a device's link opens it.
  const keys = await context.newPage();
  keys.on("console", (m) => { if (m.type() === "error") seen.errors.push(m.text()); });
  keys.on("response", (r) => { if (r.status() >= 400) (seen.refused = seen.refused || []).push(`${r.status()} ${r.url()}`); });
  await keys.goto(`${base}/console#/fleet?q=${encodeURIComponent(deviceId)}`);
  await keys.waitForSelector("#fleet-list tbody tr");
  seen.tab_stops = [];
  for (let i = 0; i < 10 && !seen.tab_stops.includes(deviceId); i++) {
    await keys.keyboard.press("Tab");
    seen.tab_stops.push(await keys.evaluate(() => {
      const el = document.activeElement;
      return el.getAttribute("aria-label") || el.textContent.trim() || el.tagName;
    }));
  }
  seen.first_focus = seen.tab_stops[0];
  await keys.keyboard.press("Enter");
  await keys.waitForFunction(() => location.hash.startsWith("#/devices/"));
  seen.opened_by_keyboard = await keys.evaluate(() => decodeURIComponent(location.hash));
  await keys.close();

  // A narrow screen: nothing wider than the viewport but the tables' own scroll boxes.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${base}/console#/rollouts/${rolloutId}`);
  await page.waitForSelector("#rollout-succeeded");
  seen.narrow_overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await shot("rollout-narrow");
} catch (error) {
  // What the page showed when a step failed: the test prints it.
  seen.failed = String(error).split("\n")[0];
  const page = browser.contexts()[0]?.pages()[0];
  if (page) {
    seen.url = page.url();
    seen.error_box = await page.textContent("#error").catch(() => null);
    seen.view = (await page.innerHTML("#view").catch(() => "")).slice(0, 2000);
    await page.screenshot({ path: `${out}/failure.png`, fullPage: true }).catch(() => null);
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
