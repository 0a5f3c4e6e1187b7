// Kensho dashboard: follows GET /v1/kensho/status (server-sent events) with fetch()
// streaming, so an API key can travel as a Bearer header (EventSource cannot send
// headers). No framework, no build step, nothing loaded from elsewhere. Every value
// from the server is written with textContent: file names and reasons are data.
"use strict";

const KEY_STORE = "kensho.apiKey";
const WINDOW_S = 300; // charts: the last five minutes
const PRIORITIES = ["CRITICAL", "HIGH", "NORMAL", "LOW"];
const state = { snapshot: null, samples: [], events: [], progress: null, breakers: {} };

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}

// -- the API key: asked once, kept for this tab -----------------------------------------

function takeKeyFromFragment() {
  // A kiosk can open /#key=…; the fragment never reaches the server and is removed.
  const match = location.hash.match(/key=([^&]+)/);
  if (match) {
    sessionStorage.setItem(KEY_STORE, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function askForKey(why) {
  $("key-why").textContent = why;
  $("key-form").hidden = false;
  $("board").hidden = true;
  $("connection").textContent = "API key needed";
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
  $("key-form").hidden = true;
  $("board").hidden = false;
  connect();
});

// -- the stream ---------------------------------------------------------------------

async function connect() {
  const headers = { Accept: "text/event-stream" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = "Bearer " + key;
  let response;
  try {
    response = await fetch("/v1/kensho/status", { headers, cache: "no-store" });
  } catch (err) {
    return retry("server unreachable");
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    return askForKey(key ? "That API key was refused; enter the server's API key."
                         : "This server requires its API key.");
  }
  if (!response.ok) {
    const text = await response.text();
    return retry("HTTP " + response.status + ": " + text.slice(0, 200));
  }
  $("connection").textContent = "live";
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", kind = "message", data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") {
          if (data.length) dispatch(kind, JSON.parse(data.join("\n")));
          kind = "message"; data = [];
        } else if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
    }
  } catch (err) {
    return retry("stream interrupted");
  }
  retry("server closed the stream");
}

function retry(why) {
  document.body.dataset.live = "no";
  $("connection").textContent = why + "; reconnecting…";
  setTimeout(connect, 2000);
}

function dispatch(kind, data) {
  if (kind === "snapshot") return onSnapshot(data);
  if (kind === "shutdown") {
    addEvent(data, "warn");
    return;
  }
  onEvent(kind, data);
  if (state.snapshot) render();
}

// -- state ----------------------------------------------------------------------------

function onSnapshot(snap) {
  state.snapshot = snap;
  for (const b of snap.breakers) state.breakers[b.name] = { state: b.state, change: b.last_change };
  state.samples.push({ t: snap.ts, ...snap.traffic });
  while (state.samples.length > 2 && snap.ts - state.samples[0].t > WINDOW_S) state.samples.shift();
  render();
  document.body.dataset.live = "yes";
}

const TONES = {
  "breaker.state_changed": (e) => (e.to_state === "closed" ? "ok" : "bad"),
  "runtime.fallback_activated": () => "bad",
  "runtime.primary_restored": () => "ok",
  "runtime.unavailable": () => "bad",
  "runtime.available": () => "ok",
  "executor.overloaded": () => "warn",
  "executor.recovered": () => "ok",
  "storage.repair.failed": () => "bad",
  "storage.source.failed": () => "warn",
  "storage.chunk.rejected": () => "warn",
  "storage.ready": (e) => (e.state === "ok" ? "ok" : "warn"),
};

function onEvent(kind, e) {
  if (kind === "breaker.state_changed") {
    state.breakers[e.breaker] = {
      state: e.to_state,
      change: { from_state: e.from_state, to_state: e.to_state, reason: e.reason, ts: e.ts },
    };
  }
  trackProgress(kind, e);
  // Progress ticks move the bar; the log keeps the lines a person reads.
  if (kind !== "storage.hash.progress" && kind !== "storage.download.progress") {
    addEvent(e, (TONES[kind] || (() => ""))(e));
  }
}

function trackProgress(kind, e) {
  const p = state.progress;
  if (kind === "storage.verify.started") {
    state.progress = { what: "verifying " + e.files + " files", total: e.total_bytes, done: 0, files: {} };
  } else if (kind === "storage.file.checked" && p) {
    p.done += e.expected_size || 0;
  } else if (kind === "storage.repair.started") {
    state.progress = { what: "repairing " + e.files + " files", total: e.bytes_needed, done: 0, files: {} };
  } else if (kind === "storage.update.planned" && !e.dry_run) {
    state.progress = { what: "updating " + e.files + " files", total: e.bytes_to_fetch, done: 0, files: {} };
  } else if (kind === "storage.download.progress" && p) {
    p.done += e.done - (p.files[e.path] || 0);
    p.files[e.path] = e.done;
  } else if (["storage.verify.finished", "storage.ready", "storage.update.finished"].includes(kind)) {
    if (p) { p.done = p.total; p.finished = e.message; }
  }
}

function addEvent(e, tone) {
  state.events.unshift({ ts: e.ts || Date.now() / 1000, message: e.message || "", tone });
  state.events.length = Math.min(state.events.length, 100);
}

// -- rendering ------------------------------------------------------------------------

function render() {
  const snap = state.snapshot;
  renderHeader(snap);
  renderBreakers(snap);
  renderQueue(snap);
  renderTasks(snap);
  renderIntegrity(snap);
  renderCharts();
  renderEvents();
}

function renderHeader(snap) {
  $("model").textContent = snap.model + " · engines " + snap.engines.join(", ");
  let level = "ok", text = "OK";
  if (snap.integrity.status === "failed" || !Object.values(state.breakers).some((b) => b.state !== "open" && b.state !== "forced_open")) {
    level = "bad"; text = "UNAVAILABLE";
  } else if (snap.draining) { level = "degraded"; text = "SHUTTING DOWN"; }
  else if (snap.overloaded) { level = "degraded"; text = "OVERLOADED"; }
  else if (snap.degraded || snap.integrity.status === "degraded") { level = "degraded"; text = "DEGRADED"; }
  $("overall").dataset.level = level;
  $("overall").textContent = text;
}

function renderBreakers(snap) {
  $("active").textContent = "serving on " + snap.active_engine + (snap.degraded ? " (fallback)" : "");
  const rows = snap.breakers.map((b) => {
    const live = state.breakers[b.name] || { state: b.state, change: b.last_change };
    const change = live.change;
    const why = change ? "since " + clock(change.ts) + ": " + change.reason : "no transition yet";
    const rate = b.failure_rate == null ? "" : " · failure rate " + Math.round(b.failure_rate * 100) + "%";
    return el("div", { class: "breaker", "data-breaker": b.name, "data-state": live.state },
      el("span", { class: "name" }, b.name),
      el("span", { class: "state", "data-state": live.state }, live.state),
      el("span", { class: "why" }, why + " · " + b.transitions + " transitions, " + b.trips + " trips" + rate));
  });
  $("breakers").replaceChildren(...rows);
}

function renderQueue(snap) {
  const q = snap.queue;
  const waiting = Object.values(q.depth).reduce((a, b) => a + b, 0);
  $("queue").textContent = waiting + " waiting of " + q.capacity;
  const fill = $("queue-fill");
  fill.style.width = Math.min(100, (100 * waiting) / Math.max(1, q.capacity)) + "%";
  fill.classList.toggle("full", waiting >= q.capacity);
  $("queue-depth").replaceChildren(...PRIORITIES.map((p) =>
    el("tr", { "data-priority": p.toLowerCase() }, el("td", {}, p.toLowerCase()), el("td", { class: "n" }, String(q.depth[p] || 0)))));
  const running = Object.entries(q.in_flight).filter(([, n]) => n).map(([e, n]) => e + " " + n);
  $("running").textContent = "running: " + (running.join(", ") || "none") +
    (q.capacity < q.max_queue_size ? " · capacity reduced from " + q.max_queue_size : "");
  $("overloaded").hidden = !snap.overloaded;
}

function renderTasks(snap) {
  $("tasks").replaceChildren(...Object.entries(snap.tasks).map(([outcome, n]) =>
    el("tr", { "data-outcome": outcome }, el("td", {}, outcome.replace("_", " ")), el("td", { class: "n" }, String(n)))));
}

function releaseText(r) {
  // Over-the-air releases (docs/releases.md): served serial, staged one, last check.
  if (!r) return "";
  let text = "release " + r.current_serial;
  if (r.staged_serial !== null) {
    text += r.staged_complete
      ? " · " + r.staged_serial + " staged" + (r.auto_apply ? "" : " (applied at next boot)")
      : " · staging " + r.staged_serial + ": " + bytes(r.staged_done) + " of " + bytes(r.staged_total);
  }
  if (r.last_check_at) text += " · checked " + clock(r.last_check_at) + " (" + r.last_check_result + ")";
  return text;
}

function renderIntegrity(snap) {
  const i = snap.integrity;
  const node = $("integrity");
  node.dataset.status = i.status;
  node.textContent = i.status + (i.offline ? " · offline" : "");
  const counts = Object.entries(i.files).map(([s, n]) => n + " " + s).join(", ");
  $("integrity-files").textContent = (counts || "no files") + (i.checked_at ? " · checked " + clock(i.checked_at) : "");
  $("release").textContent = releaseText(snap.release);
  $("problems").replaceChildren(...Object.entries(i.problems).map(([path, why]) => el("li", {}, path + ": " + why)));
  const p = state.progress;
  $("progress").hidden = !p;
  if (p) {
    const pct = p.total ? Math.min(100, (100 * p.done) / p.total) : 100;
    $("progress-text").textContent = p.finished ? p.finished : p.what + ": " + bytes(p.done) + " of " + bytes(p.total);
    $("progress-fill").style.width = pct + "%";
  }
}

function series() {
  const tps = [], latency = [];
  const s = state.samples;
  for (let k = 1; k < s.length; k++) {
    const dt = s[k].t - s[k - 1].t;
    if (dt <= 0) continue;
    tps.push([s[k].t, (s[k].tokens - s[k - 1].tokens) / dt]);
    const n = s[k].completions - s[k - 1].completions;
    latency.push([s[k].t, n > 0 ? (s[k].latency_seconds - s[k - 1].latency_seconds) / n : null]);
  }
  return { tps, latency };
}

const SVG = "http://www.w3.org/2000/svg";

function chart(svg, points) {
  // x: the last WINDOW_S seconds, now at the right; y: 0 to 110% of the highest value.
  const known = points.filter(([, v]) => v != null);
  const now = state.snapshot ? state.snapshot.ts : 0;
  const top = Math.max(1e-9, ...known.map(([, v]) => v)) * 1.1;
  const xy = known.map(([t, v]) => [300 - ((now - t) / WINDOW_S) * 300, 80 - (v / top) * 76]);
  const coords = xy.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1));
  const parts = [];
  if (xy.length > 1) {
    const area = document.createElementNS(SVG, "polygon");
    area.setAttribute("points", [xy[0][0].toFixed(1) + ",80", ...coords, xy[xy.length - 1][0].toFixed(1) + ",80"].join(" "));
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", coords.join(" "));
    parts.push(area, line);
  } else if (xy.length === 1) {
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", xy[0][0].toFixed(1));
    dot.setAttribute("cy", xy[0][1].toFixed(1));
    dot.setAttribute("r", "2");
    parts.push(dot);
  }
  svg.replaceChildren(...parts);
  svg.dataset.points = String(coords.length);
  svg.dataset.max = String(top / 1.1);
}

function renderCharts() {
  const { tps, latency } = series();
  chart($("tps-chart"), tps);
  chart($("latency-chart"), latency);
  const last = (xs) => { for (let k = xs.length - 1; k >= 0; k--) if (xs[k][1] != null) return xs[k][1]; return null; };
  const rate = last(tps), lat = last(latency);
  $("tps").textContent = rate == null ? "–" : rate.toFixed(1);
  $("latency").textContent = lat == null ? "–" : lat < 1 ? (lat * 1000).toFixed(0) + " ms" : lat.toFixed(2) + " s";
}

function renderEvents() {
  $("events").replaceChildren(...state.events.slice(0, 50).map((e) =>
    el("li", e.tone ? { "data-tone": e.tone } : {}, el("span", { class: "time" }, clock(e.ts)), e.message)));
}

takeKeyFromFragment();
connect();
