// The admin dashboard in a real browser: Debian's headless Chromium driven by playwright-core.
// Run by tests/it/dashboard.rs against a running Outrigger under traffic. Reads the numbers from
// the DOM (ids and data-* attributes made for it), checks they move between two reads and agree
// with /metrics, that the ejected endpoint and the expiring certificate show as such, that the
// page loads nothing but itself and /status, that no secret shows, and that it fits a phone.
// Prints {"ok":true,...} on success; throws (non-zero exit) otherwise.
import { chromium } from "playwright-core";
import path from "node:path";

const env = name => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const admin = env("ADMIN_URL").replace(/\/$/, "");
const outDir = env("OUT_DIR");
const check = (cond, what) => {
  if (!cond) throw new Error(`check failed: ${what}`);
};

// The sum of every series of a counter in the Prometheus text.
async function metricSum(name) {
  const text = await (await fetch(`${admin}/metrics`)).text();
  let sum = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + "{") || line.startsWith(name + " ")) sum += Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return sum;
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const foreign = [];
  page.on("request", r => { if (!r.url().startsWith(admin + "/")) foreign.push(r.url()); });
  const errors = [];
  page.on("pageerror", e => errors.push(String(e)));
  page.on("console", m => { if (m.type() === "error") errors.push(m.text()); });

  await page.goto(admin + "/", { waitUntil: "load" });
  await page.waitForFunction(() => Number(document.getElementById("updated").dataset.now) > 0, null, { timeout: 15000 });
  // The sparklines need a few samples (one a second, from the first /status).
  await page.waitForFunction(() => {
    const s = document.querySelector('svg[data-series="requests per second"]');
    return s && Number(s.dataset.points) >= 3;
  }, null, { timeout: 20000 });

  const read = () => page.evaluate(route => {
    const row = document.querySelector(`[data-route="${route}"]`);
    return {
      now: Number(document.getElementById("updated").dataset.now),
      requests: Number(document.getElementById("requests-total").dataset.value),
      rps: Number(document.getElementById("rps-total").dataset.value),
      routeRequests: row ? Number(row.querySelector('[data-field="requests"]').dataset.value) : null,
    };
  }, env("ROUTE"));
  const first = await read();
  await page.waitForFunction(before => Number(document.getElementById("updated").dataset.now) > before, first.now, { timeout: 10000 });
  await page.waitForFunction(before => Number(document.getElementById("requests-total").dataset.value) > before, first.requests, { timeout: 10000 });
  const second = await read();
  const metrics = await metricSum("outrigger_http_requests_total");
  check(second.now > first.now, `the page updated (${first.now} → ${second.now})`);
  check(second.requests > first.requests, `request count moved (${first.requests} → ${second.requests})`);
  check(second.rps > 0, `a request rate shows (${second.rps}/s)`);
  check(second.routeRequests !== null && second.routeRequests > 0, "the route has its row");
  // The page's figure is at most a second or two older than the scrape taken just after it.
  const tolerance = Math.max(50, 3 * second.rps);
  check(metrics >= second.requests && metrics - second.requests <= tolerance,
    `the page's ${second.requests} requests agree with /metrics' ${metrics} (within ${tolerance})`);

  const state = sel => page.evaluate(s => { const e = document.querySelector(s); return e ? e.dataset.state : null; }, sel);
  check(await state(`[data-endpoint="${env("EJECTED")}"]`) === "ejected", `${env("EJECTED")} shows as ejected`);
  check(await state(`[data-endpoint="${env("HEALTHY")}"]`) === "healthy", `${env("HEALTHY")} shows as healthy`);
  check(await state(`[data-cert="${env("EXPIRING")}"]`) === "expiring", `the certificate of ${env("EXPIRING")} shows as expiring`);
  const days = await page.evaluate(s => Number(document.querySelector(`[data-cert="${s}"] [data-field="days_left"]`).dataset.value), env("EXPIRING"));
  check(days > 2.9 && days <= 3, `the certificate has ~3 days left (${days})`);
  check(await state('[data-module="logs"] [data-state]') === "off", "the logs module shows as off");
  const body = await page.evaluate(() => document.body.innerText);
  check(!body.includes(env("SECRET")), "no secret on the page");
  check(foreign.length === 0, `nothing loaded from elsewhere (${foreign.join(", ")})`);
  check(errors.length === 0, `no script errors (${errors.join("; ")})`);
  await page.screenshot({ path: path.join(outDir, "dashboard.png"), fullPage: true });

  // A phone: one column, nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForFunction(before => Number(document.getElementById("updated").dataset.now) > before, second.now, { timeout: 10000 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 1, `the page fits a 390 px screen (${overflow} px too wide)`);
  await page.screenshot({ path: path.join(outDir, "dashboard-phone.png") });

  console.log(JSON.stringify({ ok: true, first, second, metrics, days }));
} finally {
  await browser.close();
}
