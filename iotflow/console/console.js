// The iotflow operator console: fleet, pipeline and rollouts, over the worker's /api/v1 with a
// bearer token kept in this tab's sessionStorage. No framework, no build step, nothing from a CDN;
// every text from the API is set as text (never as HTML).

const TOKEN_KEY = "iotflow.token";
const STATES = ["SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "UPDATING", "VERIFIED",
  "DOWNLOADED", "DOWNLOADING", "NOTIFIED", "QUEUED"];
const RANGES = { "1h": [3600, "1m"], "6h": [6 * 3600, "5m"], "24h": [86400, "15m"], "7d": [7 * 86400, "2h"] };
const ROLES = ["viewer", "operator", "admin"];

let timer = null;  // the current view's refresh

function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "polyline", "circle", "path", "text", "line", "g", "title"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function claims() {
  try {
    const part = token().split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch { return {}; }
}

function may(role) { return ROLES.indexOf(claims().role) >= ROLES.indexOf(role); }

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  if (response.status === 401) { signOut("The token was refused: sign in again."); throw new Error("unauthorized"); }
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = body && body.detail ? `${body.title}: ${body.detail}` : `${response.status}`;
    throw new Error(detail);
  }
  return body;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  render();
  showError(message || "");
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : "—"; }

function card(label, value, cls) {
  return h("div", { class: "card" }, h("div", { class: `n ${cls || ""}` }, value), h("div", { class: "k" }, label));
}

function table(headers, rows) {
  return h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows)));
}

function refresh(fn, every) {
  clearInterval(timer);
  const run = () => fn().catch((e) => showError(e.message));
  run();
  timer = setInterval(run, every);
}

// ---- Fleet ----------------------------------------------------------------------------------

async function fleet(view, params) {
  const q = params.get("q") || "";
  const cursors = (params.get("pages") || "").split(",").filter(Boolean);
  const summary = h("div", { class: "cards", id: "fleet-summary" });
  const search = h("input", { type: "search", id: "fleet-q", value: q, "aria-label": "Search devices by id or name",
    placeholder: "id or name" });
  const form = h("form", { class: "toolbar", role: "search", onsubmit: (e) => {
    e.preventDefault();
    location.hash = `#/fleet?q=${encodeURIComponent(search.value)}`;
  } }, h("label", { for: "fleet-q" }, "Search"), search, h("button", { type: "submit" }, "Search"));
  const list = h("div", { id: "fleet-list" });
  view.append(h("h2", {}, "Fleet"), summary, form, list);

  const counts = await api("/api/v1/fleet/summary");
  summary.append(card("online", counts.online, "ok"), card("offline", counts.offline),
    card("live", counts.live), card("deleted", counts.deleted));
  const query = new URLSearchParams({ limit: "25" });
  if (q) query.set("q", q);
  if (cursors.length) query.set("cursor", cursors[cursors.length - 1]);
  const page = await api(`/api/v1/devices?${query}`);
  const rows = page.items.map((d) => h("tr", {},
    h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)), h("td", {}, d.name),
    h("td", {}, d.type), h("td", {}, d.status), h("td", {}, d.firmware_version || "—"), h("td", {}, when(d.updated_at))));
  const base = `#/fleet?q=${encodeURIComponent(q)}`;
  list.append(table(["id", "name", "type", "status", "firmware", "updated"], rows),
    h("div", { class: "toolbar" },
      h("button", { type: "button", disabled: !cursors.length,
        onclick: () => { location.hash = `${base}&pages=${cursors.slice(0, -1).join(",")}`; } }, "Previous"),
      h("span", {}, `page ${cursors.length + 1}, ${page.items.length} devices`),
      h("button", { type: "button", disabled: !page.next_cursor,
        onclick: () => { location.hash = `${base}&pages=${[...cursors, page.next_cursor].join(",")}`; } }, "Next")));
}

async function device(view, id) {
  const [d, state, history] = await Promise.all([
    api(`/api/v1/devices/${encodeURIComponent(id)}`),
    api(`/api/v1/devices/${encodeURIComponent(id)}/state`).catch(() => null),
    api(`/api/v1/devices/${encodeURIComponent(id)}/firmware`),
  ]);
  const metrics = Object.keys((state && state.metrics) || {});
  const metric = h("select", { id: "chart-metric", "aria-label": "Metric" },
    (metrics.length ? metrics : ["temp"]).map((m) => h("option", { value: m }, m)));
  const range = h("select", { id: "chart-range", "aria-label": "Time range" },
    Object.keys(RANGES).map((r) => h("option", { value: r }, r)));
  const chart = h("div", { id: "chart" });
  const draw = () => telemetryChart(chart, id, metric.value, range.value).catch((e) => showError(e.message));
  metric.addEventListener("change", draw);
  range.addEventListener("change", draw);
  view.append(
    h("h2", {}, `Device ${d.id}`),
    h("div", { class: "cards" }, card("name", d.name), card("type", d.type), card("firmware", d.firmware_version || "—"),
      card(state && state.online ? "online" : "offline", state && state.online ? "●" : "○", state && state.online ? "ok" : ""),
      card("last seen", state ? when(state.last_seen) : "—")),
    h("h3", {}, "Telemetry"),
    h("div", { class: "toolbar" }, h("label", { for: "chart-metric" }, "Metric"), metric,
      h("label", { for: "chart-range" }, "Range"), range),
    chart,
    h("h3", {}, "Firmware history"),
    table(["rollout", "firmware", "from", "state", "attempts", "changed"], history.items.map((e) => h("tr", {},
      h("td", {}, h("a", { href: `#/rollouts/${e.rollout_id}` }, e.rollout_id.slice(0, 8))), h("td", {}, e.firmware_version),
      h("td", {}, e.from_version || "—"), h("td", {}, e.state + (e.health === "failed" ? " (unhealthy)" : "")),
      h("td", {}, e.attempts), h("td", {}, when(e.state_changed_at)))))
  );
  refresh(() => telemetryChart(chart, id, metric.value, range.value), 10000);  // new buckets as they come
}

async function telemetryChart(box, id, metric, range) {
  const [seconds, bucket] = RANGES[range];
  const to = new Date();
  const from = new Date(to.getTime() - seconds * 1000);
  const query = new URLSearchParams({ metric, bucket, from: from.toISOString(), to: to.toISOString() });
  const body = await api(`/api/v1/devices/${encodeURIComponent(id)}/telemetry?${query}`);
  const points = body.buckets.filter((b) => b.metric === metric);
  const W = Math.max(320, Math.round(box.clientWidth || 800)), H = 240, P = 32;  // drawn at the box's width
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${metric} of ${id}, ${points.length} points over ${range}` });
  if (!points.length) {
    svg.append(h("text", { x: W / 2 - 60, y: H / 2 }, "no measurements in this range"));
  } else {
    const lo = Math.min(...points.map((p) => p.min)), hi = Math.max(...points.map((p) => p.max));
    const t0 = from.getTime(), t1 = to.getTime();
    const x = (iso) => P + (W - 2 * P) * (new Date(iso).getTime() - t0) / (t1 - t0);
    const y = (v) => H - P - (H - 2 * P) * (hi === lo ? 0.5 : (v - lo) / (hi - lo));
    const band = points.map((p) => `${x(p.bucket)},${y(p.max)}`).concat(
      points.slice().reverse().map((p) => `${x(p.bucket)},${y(p.min)}`));
    svg.append(h("path", { class: "band", d: `M${band.join("L")}Z` }),
      h("polyline", { class: "line", points: points.map((p) => `${x(p.bucket)},${y(p.avg)}`).join(" ") }),
      ...points.map((p) => h("circle", { cx: x(p.bucket), cy: y(p.avg), r: 3 },
        h("title", {}, `${when(p.bucket)}: avg ${p.avg.toFixed(2)} (min ${p.min}, max ${p.max}, ${p.count})`))),
      h("text", { x: 4, y: P - 8 }, hi.toFixed(1)), h("text", { x: 4, y: H - P + 14 }, lo.toFixed(1)));
  }
  box.replaceChildren(svg);
}

// ---- Pipeline -------------------------------------------------------------------------------

let previous = null;  // the last /metrics sample, for rates

function parseMetrics(text) {
  const found = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (match) (found[match[1]] = found[match[1]] || []).push({ labels: match[2] || "", value: Number(match[3]) });
  }
  return found;
}

function total(m, name, filter = () => true) {
  return (m[name] || []).filter((s) => filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

function quantile(m, name, q) {
  const buckets = (m[`${name}_bucket`] || []).map((s) => ({ le: Number((s.labels.match(/le="([^"]+)"/) || [])[1]), n: s.value }))
    .sort((a, b) => a.le - b.le);
  const count = buckets.length ? buckets[buckets.length - 1].n : 0;
  if (!count) return null;
  const hit = buckets.find((b) => b.n >= q * count);
  return hit ? hit.le : null;
}

async function pipeline(view) {
  const health = h("div", { id: "health", class: "cards" });
  const flow = h("div", { id: "flow", class: "cards" });
  const loss = h("div", { id: "loss", class: "cards" });
  view.append(h("h2", {}, "Pipeline"), h("h3", {}, "Components"), health, h("h3", {}, "Flow (this worker)"), flow,
    h("h3", {}, "Loss accounting (fleet)"), loss);
  refresh(async () => {
    const readiness = await fetch("/health/ready").then((r) => r.json());
    health.replaceChildren(card("worker", h("span", { class: `badge ${readiness.status}` }, readiness.status)),
      ...Object.entries(readiness.checks || {}).map(([name, check]) =>
        card(name, h("span", { class: `badge ${check.status}` }, check.status))));
    const m = parseMetrics(await fetch("/metrics").then((r) => r.text()));
    const now = Date.now() / 1000;
    const sample = { at: now, ingested: total(m, "iotflow_ingest_messages_total", (l) => !/replay|parked/.test(l)),
      dlq: total(m, "iotflow_dlq_messages_total") };
    const rate = (k) => previous && now > previous.at ? ((sample[k] - previous[k]) / (now - previous.at)).toFixed(1) : "…";
    const lag = total(m, "iotflow_consumer_lag_records");
    const p99 = quantile(m, "iotflow_ingest_e2e_latency_seconds", 0.99);
    flow.replaceChildren(card("ingest msg/s", rate("ingested")), card("DLQ msg/s", rate("dlq")),
      card("consumer lag (records)", lag, lag > 10000 ? "bad" : ""), card("e2e latency p99 ≤", p99 === null ? "—" : `${p99} s`));
    previous = sample;
    const accounting = await api("/api/v1/pipeline/accounting");
    const totals = accounting.totals || accounting;
    const accepted = totals.accepted || 0, gaps = totals.gaps || 0;
    const ratio = accepted + gaps ? gaps / (accepted + gaps) : 0;
    loss.replaceChildren(card("received", totals.received || 0), card("stored", totals.stored || 0),
      card("duplicates", totals.duplicates || 0), card("invalid", totals.invalid || 0),
      card("missing (seq gaps)", gaps, gaps ? "bad" : "ok"), card("loss ratio", `${(100 * ratio).toFixed(3)} %`));
  }, 5000);
}

// ---- Rollouts -------------------------------------------------------------------------------

async function rollouts(view) {
  const box = h("div", { id: "rollout-list" });
  const kill = h("div", { class: "toolbar", id: "kill-switch" });
  view.append(h("h2", {}, "Rollouts"), kill, box);
  const load = async () => {
    const [list, flags] = await Promise.all([api("/api/v1/firmware/rollouts"), api("/api/v1/flags")]);
    const switchFlag = (flags.items || flags).find?.((f) => f.name === "rollouts.kill_switch");
    const on = Boolean(switchFlag && switchFlag.enabled);
    kill.replaceChildren(h("span", {}, "Kill switch: "), h("span", { class: `badge ${on ? "red" : "green"}` }, on ? "ON — dispatch stopped" : "off"),
      h("button", { type: "button", class: "danger", disabled: !may("admin"), onclick: async () => {
        if (!confirm(on ? "Turn the kill switch off? Dispatch resumes." : "Turn the kill switch ON? Every rollout stops dispatching.")) return;
        await api("/api/v1/flags/rollouts.kill_switch", { method: "PUT", body: JSON.stringify({ enabled: !on }) })
          .then(load).catch((e) => showError(e.message));
      } }, on ? "Turn off" : "Turn on"));
    box.replaceChildren(table(["id", "firmware", "status", "created"], list.items.map((r) => h("tr", {},
      h("td", {}, h("a", { href: `#/rollouts/${r.id}` }, r.id.slice(0, 8))), h("td", {}, r.firmware_version),
      h("td", {}, r.status), h("td", {}, when(r.created_at))))));
  };
  refresh(load, 5000);
}

function bar(byState, size, label) {
  return h("div", { class: "bar", role: "img", "aria-label": label },
    STATES.filter((s) => byState[s]).map((s) => {
      const part = h("span", { class: `s-${s}`, title: `${s}: ${byState[s]}` });
      part.style.flexGrow = String(byState[s] / Math.max(size, 1));
      part.style.flexBasis = "0";
      return part;
    }), (() => {
      const rest = h("span");
      rest.style.flexGrow = String(Math.max(0, size - Object.values(byState).reduce((a, b) => a + b, 0)) / Math.max(size, 1));
      return rest;
    })());
}

async function rollout(view, id) {
  const head = h("div", { id: "rollout-head" });
  const actions = h("div", { class: "toolbar", id: "rollout-actions" });
  const waves = h("div", { id: "rollout-waves" });
  view.append(h("h2", {}, `Rollout ${id.slice(0, 8)}`), head, actions, waves);
  const act = (action, question) => async () => {
    if (!confirm(question)) return;
    await api(`/api/v1/firmware/rollouts/${id}/${action}`, { method: "POST" })
      .then((r) => { if (action === "rollback") location.hash = `#/rollouts/${r.id}`; })
      .catch((e) => showError(e.message));
  };
  refresh(async () => {
    const r = await api(`/api/v1/firmware/rollouts/${id}`);
    const active = ["scheduled", "running", "paused"].includes(r.status);
    head.replaceChildren(h("div", { class: "cards" },
      card("status", h("span", { id: "rollout-status" }, r.status)), card("firmware", r.firmware_version),
      card("devices", r.devices), card("succeeded", h("span", { id: "rollout-succeeded" }, r.by_state.SUCCEEDED || 0), "ok"),
      card("unhealthy", r.unhealthy), card("rate / min", r.rate_per_min), card("ETA", r.eta_s === null ? "—" : `${r.eta_s} s`)),
      bar(r.by_state, r.devices, `overall: ${JSON.stringify(r.by_state)}`),
      h("p", { class: "legend" }, STATES.map((s) => h("span", {}, h("i", { class: `s-${s}` }), s))));
    const operator = may("operator");
    actions.replaceChildren(
      h("button", { type: "button", id: "pause", disabled: !operator || !["running", "scheduled"].includes(r.status),
        onclick: act("pause", "Pause this rollout? No more commands go out.") }, "Pause"),
      h("button", { type: "button", id: "resume", disabled: !operator || r.status !== "paused",
        onclick: act("resume", "Resume this rollout?") }, "Resume"),
      h("button", { type: "button", id: "cancel", class: "danger", disabled: !operator || !active,
        onclick: act("cancel", "Cancel this rollout? Devices not commanded yet are canceled.") }, "Cancel"),
      h("button", { type: "button", id: "rollback", class: "danger", disabled: !operator || !(r.by_state.SUCCEEDED > 0),
        onclick: act("rollback", "Roll back: send the previous version to every device that took this one?") }, "Roll back"));
    waves.replaceChildren(h("h3", {}, "Waves"), ...r.waves.map((w) => h("div", {},
      h("p", {}, `wave ${w.wave + 1}: ${w.size} devices — ${Object.entries(w.by_state).map(([s, n]) => `${s} ${n}`).join(", ")}`),
      bar(w.by_state, w.size, `wave ${w.wave + 1}`))));
  }, 2000);
}

// ---- Shell ----------------------------------------------------------------------------------

async function render() {
  clearInterval(timer);
  const signedIn = Boolean(token());
  document.getElementById("sign-in").hidden = signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
  const c = claims();
  document.getElementById("who").textContent = signedIn ? `${c.sub || "?"} (${c.role || "?"})` : "";
  const view = document.getElementById("view");
  view.replaceChildren();
  if (!signedIn) return;
  showError("");
  const [path, query] = (location.hash.slice(1) || "/fleet").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.toggleAttribute("aria-current", false);
    if (link.dataset.nav === (parts[0] === "devices" ? "fleet" : parts[0])) link.setAttribute("aria-current", "page");
  }
  try {
    if (parts[0] === "devices" && parts[1]) await device(view, parts[1]);
    else if (parts[0] === "pipeline") await pipeline(view);
    else if (parts[0] === "rollouts" && parts[1]) await rollout(view, parts[1]);
    else if (parts[0] === "rollouts") await rollouts(view);
    else await fleet(view, params);
  } catch (e) {
    showError(e.message);
  }
}

document.getElementById("sign-in").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim().replace(/^Bearer\s+/i, ""));
  render();
});
document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", render);
render();
