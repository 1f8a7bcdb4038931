// The dashboard page: one EventSource (/events), panels and charts built from the events it delivers.
// Every piece of event text goes into the page with textContent, never as HTML.
"use strict";
(() => {
  const MAX_ROWS = 500;        // events table rows kept in the DOM
  const KEEP = 5000;           // events kept in memory, so a filter change can refill the table
  const MAX_RAW = 500;         // raw llama.cpp lines kept in the log panel
  const WINDOW_S = 15 * 60;    // the charts' time window
  const BUCKET_S = 10;         // events per second are counted in 10 s buckets
  const MAX_POINTS = 2000;     // inference points kept per coordinator (and gateway requests per gateway)
  const FOLD_AFTER_MS = 10 * 60 * 1000;   // stopped (or long stale) apps and down nodes fold away after this
  const CHART_GAP_MS = 250;    // charts are redrawn at most 4 times a second
  const NODE_APP = "synapticllamas-node";   // source.app of `main.py node`
  // the event contract's names, served by the dashboard from synapticllamas/events/contract.py
  const CONTRACT = window.SYNAPTICLLAMAS_CONTRACT;
  const C = CONTRACT.component, T = CONTRACT.type;
  const LEVELS = CONTRACT.levels;
  const COMPONENTS = CONTRACT.components;
  const Charts = window.SynapticCharts;
  const Schema = window.SynapticSchema;     // static/schema.js: the checks of synapticllamas/events/schema.py
  const COORDINATOR_STATES = {
    [T.coordinator.STARTING]: "starting", [T.model.LOADING]: "starting", [T.model.LOAD]: "starting",
    [T.coordinator.START]: "running", [T.coordinator.HEARTBEAT]: "running", [T.coordinator.STOPPING]: "stopping",
    [T.coordinator.STOP]: "stopped", [T.coordinator.BACKOFF]: "backoff", [T.coordinator.FATAL]: "fatal",
  };
  // a gateway request's status as the page counts it; anything else a publisher invents is "other"
  const GATEWAY_STATUSES = ["ok", "unavailable", "refused", "failed", "cancelled"];
  const BUFFERS = ["model_mib", "kv_mib", "compute_mib", "output_mib"];   // a device's buffers in the load log
  const isType = (ev, component, type) => ev.component === component && ev.event_type === type;

  const token = new URLSearchParams(location.search).get("token");
  const withToken = (path) => token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path;
  const $ = (id) => document.getElementById(id);

  const apps = new Map();      // instance -> what we know about that app
  const nodes = new Map();     // node address -> what we know about that node
  const kept = [];             // recent {ev, gap} items (and notes), oldest first
  const buckets = new Map();   // 10 s bucket index -> {level: count}
  let live = false;            // false while the feed replays the journal
  let paused = false, missedWhilePaused = 0;
  let renderQueued = false;
  let chartsTimer = null, chartsDrawn = 0;
  let skipped = 0, lastSkipped = "";   // feed messages that are not valid events: counted, never shown
  let skippedByServer = 0;             // journal entries the dashboard itself refused (its status events say)
  const newRows = [];          // rows to append at the next animation frame

  // ------------------------------------------------------------ small helpers

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  // any value as display text: strings as they are, objects and arrays as JSON, nothing as fallback
  function text(value, fallback = "") {
    if (value === undefined || value === null) return fallback;
    if (typeof value === "string") return value;
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);
  const num = (value) => (typeof value === "number" && isFinite(value) ? value : null);
  const seconds = (value) => (typeof value === "number" && value > 0 && isFinite(value) ? value : null);

  // Any publisher on the shared Redis can send any JSON. Every event goes through Schema.decode()
  // once, on arrival (the same rules as the Python readers, from /contract.js), so the rest of the
  // page only ever sees checked types: strings, a details object whose typed fields hold what they
  // should, a number or null seq; `sampled` null when the publisher does not say.

  // set by the dashboard (not by the publisher) on a node event when it holds the cluster key
  function trustOf(data) {
    try {
      const raw = JSON.parse(data);
      return ["signed", "unsigned", "other key"].includes(raw.trust) ? raw.trust : null;
    } catch (err) { return null; }
  }

  // an unknown level is filtered as info, not hidden
  const levelRank = (level) => (LEVELS.includes(level) ? LEVELS.indexOf(level) : LEVELS.indexOf("info"));
  const levelClass = (level) => (LEVELS.includes(level) ? `level-${level}` : "");
  const knownLevel = (level) => (LEVELS.includes(level) ? level : "info");

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }

  function stateCell(state, title, note) {
    const td = el("td", state, `state-${String(state).split(" ")[0]}`);
    if (note) td.appendChild(el("span", ` ${note}`, "muted"));
    if (title) td.title = title;
    return td;
  }

  function clock(ts) {
    const d = new Date(ts * 1000);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function age(ms) {
    if (ms == null || !isFinite(ms)) return "-";
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  }

  function ago(ms) {   // "22 min ago", for what happened a while back
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function mib(value) {
    if (value == null) return "-";
    if (value >= 1024) return `${+(value / 1024).toFixed(1)} GiB`;
    return `${+value.toFixed(value < 10 ? 1 : 0)} MiB`;
  }

  function bytes(value) {
    if (value == null) return "-";
    return value < 1 << 20 ? `${Math.round(value / 1024)} KiB` : mib(value / (1 << 20));
  }

  function setOptions(select, values) {
    const have = new Set(Array.from(select.options, (o) => o.value));
    for (const v of values) if (!have.has(v)) select.appendChild(new Option(v, v));
  }

  // "1 in 10 kept" from a registration's sampling settings
  function samplingNote(reg) {
    if (!reg || reg.sampling === false) return "";
    const rate = num(reg.sample_rate);
    if (rate === null || rate >= 1) return "";
    if (rate > 0 && Math.abs(1 / rate - Math.round(1 / rate)) < 1e-6) return `1 in ${Math.round(1 / rate)} kept`;
    return `${rate} kept`;
  }

  // ------------------------------------------------------------ state from events

  function appFor(instance) {
    instance = text(instance, "(unknown)");
    let a = apps.get(instance);
    if (!a) {
      a = { instance, reg: null, source: {}, lastHeard: null, runs: [], confirmedSampled: 0, confirmedLost: 0,
            outOfSequence: 0, sampled: 0, lost: 0, count: 0, unregistered: false, stoppedAt: null, heartbeatEvery: null, coordinator: null,
            backends: new Map(), inference: [], gateway: null };
      apps.set(instance, a);
      setOptions($("filter-app"), [instance]);
    }
    return a;
  }

  // seq counts every event an app created, `sampled` the ones its sampling left out (a running
  // total). So between two events received, seq moved by (sampled out + lost): sampling is shown
  // quietly, loss loudly. The same sum as synapticllamas/events/gaps.py (the terminal viewer, the
  // metrics), runs and all: a forged or absurd seq with a real app's instance starts a run of its
  // own, or is dropped when the real next event lands before it; it never resets the real one.
  const MAX_RUNS = 4;

  function seqGap(fromSeq, fromSampled, seq, sampled) {
    if (seq <= fromSeq + 1) return null;
    const missing = seq - fromSeq - 1;
    let bySampling = 0;
    if (sampled !== null && fromSampled !== null) bySampling = Math.min(missing, Math.max(0, sampled - fromSampled));
    return { sampled: bySampling, lost: missing - bySampling, from: fromSeq + 1, to: seq - 1 };
  }

  function confirm(a, gap) {
    if (gap) { a.confirmedSampled += gap.sampled; a.confirmedLost += gap.lost; }
  }

  function noteSeq(a, ev) {
    const seq = ev.seq;
    if (seq === null || seq <= 0) return null;
    const runs = a.runs;
    if (isType(ev, C.SYSTEM, T.system.REGISTER)) { for (const r of runs) confirm(a, r.pending); runs.length = 0; }
    let gap = null;
    const below = runs.filter((r) => r.seq < seq);
    const best = below.length ? below.reduce((x, y) => (y.seq > x.seq ? y : x)) : null;
    const inside = runs.find((r) => r.prevSeq !== null && r.prevSeq < seq && seq < r.seq);
    if (best && seq - best.seq - 1 <= Schema.jumpLimit) {
      confirm(a, best.pending);
      gap = seqGap(best.seq, best.sampled, seq, ev.sampled);
      Object.assign(best, { prevSeq: best.seq, prevSampled: best.sampled, seq, sampled: ev.sampled, pending: gap });
      runs.splice(runs.indexOf(best), 1);
      runs.push(best);
    } else if (inside) {            // its last event came out of sequence (forged, or out of order)
      a.outOfSequence += 1;
      gap = seqGap(inside.prevSeq, inside.prevSampled, seq, ev.sampled);
      Object.assign(inside, { seq, sampled: ev.sampled, pending: gap });
    } else if (!runs.some((r) => r.seq === seq || r.prevSeq === seq)) {
      runs.push({ seq, sampled: ev.sampled, prevSeq: null, prevSampled: null, pending: null });
      if (runs.length > MAX_RUNS) runs.shift();
    }
    // shown: the confirmed sums and the newest gaps not confirmed yet
    a.sampled = a.confirmedSampled + runs.reduce((n, r) => n + (r.pending ? r.pending.sampled : 0), 0);
    a.lost = a.confirmedLost + runs.reduce((n, r) => n + (r.pending ? r.pending.lost : 0), 0);
    return gap;
  }

  function coordinatorFrom(a, ev) {
    const d = ev.details;
    const c = a.coordinator || (a.coordinator = { state: "stopped", model: null, port: null, backends: [],
                                                  startedAt: null, restarts: 0, reason: null, requests: 0,
                                                  devices: null, placement: [] });
    c.state = typeof d.state === "string" ? d.state : (COORDINATOR_STATES[ev.event_type] || c.state);
    if ([T.coordinator.STOP, T.coordinator.FATAL].includes(ev.event_type) && d.reason) c.reason = text(d.reason);
    if (ev.event_type === T.coordinator.START) { c.startedAt = ev.timestamp; c.reason = null; }
    const uptime = d.uptime_s ?? d.uptime;
    if (typeof uptime === "number" && c.state === "running") c.startedAt = ev.timestamp - uptime;
    if (c.state !== "running") c.startedAt = null;
    const model = d.model_path ?? d.model;
    if (model) c.model = text(model).split("/").pop();
    if (d.port != null) c.port = text(d.port);
    else if (typeof d.url === "string") { const m = d.url.match(/:(\d+)\/?$/); if (m) c.port = m[1]; }
    const backends = d.rpc_backends ?? d.backends;
    if (Array.isArray(backends)) c.backends = backends.map((b) => text(isObject(b) ? b.address : b));
    if (typeof d.restarts === "number") c.restarts = d.restarts;
    else if (ev.event_type === T.coordinator.BACKOFF) c.restarts += 1;
    if ([T.coordinator.START, T.model.LOAD].includes(ev.event_type) && isObject(d.devices)) c.devices = d.devices;
    // distributed starts carry the placement: per backend what it offered (a node's --memory, its free memory...)
    if (ev.event_type === T.coordinator.START) c.placement = Array.isArray(d.placement) ? d.placement.filter(isObject) : [];
    if ([T.coordinator.STOP, T.coordinator.FATAL].includes(ev.event_type)) { c.devices = null; c.placement = []; }
    if (isType(ev, C.COORDINATOR, T.coordinator.INFERENCE)) {
      c.requests += 1;
      const rate = num(d.tokens_per_second);
      if (rate !== null && typeof ev.timestamp === "number") {
        a.inference.push([ev.timestamp, rate]);
        if (a.inference.length > MAX_POINTS) a.inference.splice(0, a.inference.length - MAX_POINTS);
      }
    }
  }

  // the app's gateway (synapticllamas/gateway/): where it listens, and one gateway/request event per
  // request when it ends (its status, the line behind it, the seconds to its first text and in total)
  function gatewayFrom(a, ev) {
    const d = ev.details;
    const g = a.gateway || (a.gateway = { url: null, open: null, why: "", model: null, requests: 0, byStatus: new Map(),
                                          held: 0, resumed: 0, waiting: null, inFlight: null, last: null, points: [] });
    if (ev.event_type === T.gateway.LISTENING) {
      g.open = d.status !== "unavailable";
      g.url = typeof d.url === "string" ? d.url : null;
      g.why = ev.message;
      return;
    }
    if (ev.event_type !== T.gateway.REQUEST) return;
    g.requests += 1;
    const status = GATEWAY_STATUSES.includes(d.status) ? d.status : "other";
    g.byStatus.set(status, (g.byStatus.get(status) || 0) + 1);
    g.held += num(d.held) || 0;
    g.resumed += num(d.resumed) || 0;
    if (num(d.queue_depth) !== null) g.waiting = d.queue_depth;
    if (num(d.in_flight) !== null) g.inFlight = d.in_flight;
    if (typeof d.model === "string" && d.model) g.model = d.model;
    if (g.last === null || ev.timestamp > g.last) g.last = ev.timestamp;
    // the chart: requests served, each at the time it ended
    if (status === "ok" && num(d.seconds) !== null) {
      g.points.push([ev.timestamp, num(d.first_token_s), d.seconds]);
      if (g.points.length > MAX_POINTS) g.points.splice(0, g.points.length - MAX_POINTS);
    }
  }

  function backendFrom(a, address, state, ts) {
    if (!address) return;
    address = text(address);
    state = text(state, "unknown");
    const b = a.backends.get(address);
    if (!b) a.backends.set(address, { state, changed: ts });
    else if (b.state !== state) { b.state = state; b.changed = ts; }
  }

  function nodeFor(address) {
    let n = nodes.get(address);
    if (!n) {
      n = { address, host: "", instance: "", version: null, devices: [], offered: null, cache: null, state: "unknown",
            heard: null, interval: null, downAt: null, trust: null, link: null };
      nodes.set(address, n);
    }
    return n;
  }

  // a node's registration (the nodes hash) or its events
  function nodeFrom(n, d, heard) {
    if (typeof d.link === "string") n.link = d.link;
    if (typeof d.state === "string") n.state = d.state;
    // the machine it runs on: nodes that share one share its memory, shown once
    if (isObject(d.host) && typeof d.host.id === "string") {
      n.hostId = text(d.host.id);
      if (typeof d.host.name === "string") n.hostName = text(d.host.name);
    }
    if (typeof d.rpc_version === "string") n.version = d.rpc_version;
    if (Array.isArray(d.devices)) n.devices = d.devices.filter(isObject);
    if (num(d.memory_offered_mib) !== null) n.offered = d.memory_offered_mib;
    if (isObject(d.cache)) n.cache = { bytes: num(d.cache.bytes), max: num(d.cache.max_bytes), enabled: d.cache.enabled !== false };
    if (num(d.cache_bytes) !== null) n.cache = Object.assign(n.cache || { enabled: true, max: null }, { bytes: d.cache_bytes });
    const every = seconds(d.interval_s) ?? seconds(d.heartbeat_interval);
    if (every) n.interval = every;
    if (heard !== null && (n.heard === null || heard > n.heard)) n.heard = heard;
    if (n.state === "down") n.downAt = n.downAt ?? heard; else n.downAt = null;
  }

  function countBucket(ev) {
    if (typeof ev.timestamp !== "number" || !isFinite(ev.timestamp)) return;
    const index = Math.floor(ev.timestamp / BUCKET_S);
    const newest = Math.floor(Date.now() / 1000 / BUCKET_S);
    if (index < newest - WINDOW_S / BUCKET_S - 1 || index > newest + 60) return;   // outside the window
    let b = buckets.get(index);
    if (!b) { b = {}; buckets.set(index, b); }
    const level = knownLevel(ev.level);
    b[level] = (b[level] || 0) + 1;
  }

  function handle(ev) {
    const instance = ev.source.instance;
    const a = appFor(instance);
    a.source = ev.source;
    a.count += 1;
    // while replaying, an event is as old as its timestamp says; once live, we heard it now
    const heard = live ? Date.now() : Math.min(Date.now(), ev.timestamp * 1000);
    if (a.lastHeard === null || heard > a.lastHeard) a.lastHeard = heard;
    const gap = noteSeq(a, ev);
    const d = ev.details;
    if (isType(ev, C.SYSTEM, T.system.REGISTER)) { a.reg = d; a.unregistered = false; a.stoppedAt = null; }
    else if (isType(ev, C.SYSTEM, T.system.UNREGISTER)) { a.unregistered = true; a.stoppedAt = heard; }
    else if (ev.component === C.COORDINATOR || ev.component === C.MODEL) coordinatorFrom(a, ev);
    else if (ev.component === C.RPC_BACKEND) {
      const state = { [T.rpc_backend.CONNECT]: "up", [T.rpc_backend.DISCONNECT]: "down",
                      [T.rpc_backend.ADDED]: "unknown", [T.rpc_backend.REMOVED]: "removed" }[ev.event_type];
      const removed = ev.event_type === T.rpc_backend.REMOVED;
      if (state) backendFrom(a, d.address, d.state && !removed ? d.state : state, ev.timestamp);
    } else if (isType(ev, C.RPC_REGISTRY, T.rpc_registry.HEARTBEAT) && Array.isArray(d.backends)) {
      for (const b of d.backends) if (isObject(b)) backendFrom(a, b.address, b.state, ev.timestamp);
      if (seconds(d.interval_s)) a.heartbeatEvery = d.interval_s;
    } else if (ev.component === C.NODE && typeof d.address === "string"
               && !(ev.trust && ev.trust !== "signed" && nodes.get(d.address)?.trust === "signed")) {
      // with the cluster key the dashboard says whether the key vouches for a node event (`trust`):
      // one it does not vouch for never changes a node that it does, and marks a node of its own
      const n = nodeFor(d.address);
      if (typeof ev.trust === "string") n.trust = ev.trust;
      n.host = ev.source.host || n.host;
      n.instance = instance;
      nodeFrom(n, d, heard);
      if (n.interval) a.heartbeatEvery = n.interval;   // a node is live while its heartbeats arrive
      if (isType(ev, C.NODE, T.node.NODE_DOWN)) {   // the node left: stopped, as a shell that said goodbye
        n.state = "down";
        n.downAt = n.downAt ?? heard;
        a.unregistered = true;
        a.stoppedAt = heard;
      }
      if (seconds(d.interval_s)) a.heartbeatEvery = d.interval_s;
    } else if (ev.component === C.GATEWAY) gatewayFrom(a, ev);
    else if (ev.component === C.RAW) addRaw(instance, ev);
    countBucket(ev);
    setOptions($("filter-component"), [ev.component]);
    remember({ ev, gap });
    queueRender();
    queueCharts();
  }

  // ------------------------------------------------------------ events table

  function remember(item) {
    kept.push(item);
    if (kept.length > KEEP) kept.splice(0, kept.length - KEEP);
    if (paused) { missedWhilePaused += 1; return; }
    if (matches(item)) newRows.push(item);
  }

  function matches(item) {
    if (item.note) return true;
    const ev = item.ev, app = $("filter-app").value, component = $("filter-component").value;
    if (app && ev.source.instance !== app) return false;
    if (component && ev.component !== component) return false;
    return levelRank(ev.level) >= LEVELS.indexOf($("filter-level").value);
  }

  function messageText(ev) {
    const d = ev.details;
    // the reference strings: "rpc_backend_connect on 127.0.0.1:18080" / "... on rpc_registry" + addresses
    const heartbeat = isType(ev, C.RPC_REGISTRY, T.rpc_registry.HEARTBEAT) || isType(ev, C.COORDINATOR, T.coordinator.HEARTBEAT);
    if (heartbeat && Array.isArray(d.backends) && d.backends.length) {
      const addresses = d.backends.map((b) => (isObject(b) ? `${text(b.address)} (${text(b.state)})` : text(b)));
      const totals = d.total_configured != null
        ? ` [${text(d.total_active, "?")}/${text(d.total_configured)} active]` : "";
      return `${ev.message}: ${addresses.join(", ")}${totals}`;
    }
    const used = d.rpc_backends;
    if (heartbeat && Array.isArray(used) && used.length) {
      return `${ev.message}: ${used.map((u) => text(u)).join(", ")}`;
    }
    return ev.message;
  }

  function seqCell(ev, gap) {
    const td = el("td", ev.seq ?? "");
    if (gap && gap.sampled) {
      const span = el("span", ` +${gap.sampled} sampled`, "sampled");
      const reg = apps.get(ev.source.instance)?.reg;
      const note = samplingNote(reg);
      span.title = `${gap.sampled} event${gap.sampled === 1 ? "" : "s"} before this one left out by the app's sampling` +
        `${note ? ` (${note})` : ""}: on purpose, not lost`;
      td.appendChild(span);
    }
    if (gap && gap.lost) {
      const span = el("span", ` +${gap.lost} lost`, "lost");
      span.title = `${gap.lost} event${gap.lost === 1 ? "" : "s"} between seq ${gap.from} and ${gap.to} never arrived: ` +
        "dropped in a Redis outage (system/events_dropped) or trimmed from the journal";
      td.appendChild(span);
    }
    return td;
  }

  function eventRow(item) {
    if (item.note) {
      const tr = row([clock(item.timestamp), "", "", "", "", "", item.note]);
      tr.className = "note";
      return tr;
    }
    const ev = item.ev;
    const tr = row([clock(ev.timestamp), ev.source.instance, seqCell(ev, item.gap), ev.component,
                     ev.event_type, el("td", ev.level, levelClass(ev.level)), messageText(ev)]);
    tr.className = levelClass(ev.level);
    return tr;
  }

  function rebuildTable() {
    const body = $("events").tBodies[0];
    body.replaceChildren();
    newRows.length = 0;
    const rows = [];
    for (let i = kept.length - 1; i >= 0 && rows.length < MAX_ROWS; i--) if (matches(kept[i])) rows.push(kept[i]);
    for (const item of rows) body.appendChild(eventRow(item));     // newest first
    noteEvents();
  }

  function flushRows() {
    const body = $("events").tBodies[0];
    const items = newRows.splice(0, newRows.length).slice(-MAX_ROWS);
    const fragment = document.createDocumentFragment();
    for (let i = items.length - 1; i >= 0; i--) fragment.appendChild(eventRow(items[i]));
    body.insertBefore(fragment, body.firstChild);                  // newest first
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  }

  function noteEvents() {
    const shown = $("events").tBodies[0].rows.length;
    $("events-note").textContent = paused
      ? `paused: ${missedWhilePaused} new event${missedWhilePaused === 1 ? "" : "s"} not shown`
      : `${shown} shown (at most ${MAX_ROWS})`;
  }

  // ------------------------------------------------------------ raw llama.cpp log

  function addRaw(instance, ev) {
    const box = $("raw");
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    const line = el("div");
    line.appendChild(el("span", `${clock(ev.timestamp)} ${instance} `, "who"));
    line.appendChild(document.createTextNode(ev.message));
    box.appendChild(line);
    while (box.childElementCount > MAX_RAW) box.firstElementChild.remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  // ------------------------------------------------------------ panels

  function expectedInterval(a) {
    const r = a.reg || {};
    const every = [];
    if (a.heartbeatEvery) every.push(a.heartbeatEvery);
    else if (r.backend_heartbeat !== false && seconds(r.backend_heartbeat_interval)) every.push(r.backend_heartbeat_interval);
    if (a.coordinator && a.coordinator.state === "running" && seconds(r.heartbeat_interval)) every.push(r.heartbeat_interval);
    return every.length ? Math.min(...every) : null;
  }

  function appState(a, now) {
    if (a.unregistered) return ["stopped", "the app said goodbye (system/unregister)"];
    const every = expectedInterval(a);
    if (every === null) return ["unknown", "this app sends no heartbeat"];
    const quiet = (now - a.lastHeard) / 1000;
    if (quiet > 2 * every) return ["stale", `nothing heard for ${Math.round(quiet)}s; heartbeat every ${every}s`];
    return ["live", `heartbeat every ${every}s`];
  }

  const STATE_ORDER = { live: 0, unknown: 1, stale: 2, stopped: 3 };

  // stopped apps (and those stale for long: killed without a goodbye) fold away after a while
  function folded(a, state, now) {
    if (state === "stopped") return now - (a.stoppedAt ?? a.lastHeard ?? now) > FOLD_AFTER_MS;
    if (state === "stale") return now - (a.lastHeard ?? now) > FOLD_AFTER_MS;
    return false;
  }

  function renderPanels() {
    const now = Date.now();
    const showStopped = $("show-stopped").checked;
    const states = new Map();
    for (const a of apps.values()) states.set(a.instance, appState(a, now));
    const list = Array.from(apps.values()).sort((x, y) =>
      (STATE_ORDER[states.get(x.instance)[0]] - STATE_ORDER[states.get(y.instance)[0]]) || x.instance.localeCompare(y.instance));
    const hidden = new Set(list.filter((a) => folded(a, states.get(a.instance)[0], now)).map((a) => a.instance));
    const shown = showStopped ? list : list.filter((a) => !hidden.has(a.instance));

    const appRows = shown.map((a) => {
      const r = a.reg || {};
      const [state, why] = states.get(a.instance);
      const when = state === "stopped" && a.stoppedAt ? ago(now - a.stoppedAt) : null;
      const sampled = el("td", a.sampled, "sampled-count");
      const note = samplingNote(r);
      if (note) sampled.appendChild(el("span", ` (${note})`, "muted"));
      sampled.title = "left out by the app's sampling on purpose: not lost";
      const lost = el("td", a.lost, a.lost ? "lost" : "");
      lost.title = "created and kept by the app, never arrived: dropped in a Redis outage or trimmed from the journal";
      const mode = text(r.mode) || (a.source.app === NODE_APP ? C.NODE : "");   // a node: the mode column says so
      return row([a.instance, text(r.app) || a.source.app, mode, text(r.version), stateCell(state, why, when),
                  a.lastHeard ? `${age(now - a.lastHeard)} ago` : "-", a.count, sampled, lost]);
    });
    $("apps").tBodies[0].replaceChildren(...appRows);
    $("apps-panel").querySelector(".empty").hidden = appRows.length > 0;
    $("stopped-toggle").hidden = hidden.size === 0;
    $("stopped-note").textContent = `show ${hidden.size} stopped app${hidden.size === 1 ? "" : "s"} (folded after 10 min)`;

    const coordRows = shown.filter((a) => a.coordinator).map((a) => {
      const c = a.coordinator;
      const ended = ["stopped", "exited", "fatal"].includes(c.state);
      const state = ended && c.reason ? `${c.state} (${c.reason})` : c.state;
      const backends = el("td", c.backends.length ? "" : "none");
      c.backends.forEach((b, i) => backends.appendChild(el("span", i ? `, ${b}` : b, "nowrap")));   // wrap between addresses
      return row([a.instance, stateCell(state), c.model || "-", c.port ?? "-", backends,
                  c.startedAt ? age(now - c.startedAt * 1000) : "-", c.restarts, c.requests]);
    });
    $("coordinators").tBodies[0].replaceChildren(...coordRows);
    $("coordinator-panel").querySelector(".empty").hidden = coordRows.length > 0;

    renderGateways(now, shown, states);

    const backendRows = [];
    for (const a of shown) {
      for (const [address, b] of Array.from(a.backends).sort()) {
        backendRows.push(row([a.instance, address, stateCell(b.state),
                              `${clock(b.changed)} (${age(now - b.changed * 1000)} ago)`]));
      }
    }
    $("backends").tBodies[0].replaceChildren(...backendRows);
    $("backends-panel").querySelector(".empty").hidden = backendRows.length > 0;

    renderNodes(now, showStopped);

    const running = list.filter((a) => a.coordinator && a.coordinator.state === "running").length;
    const liveApps = list.filter((a) => states.get(a.instance)[0] === "live").length;
    const bad = skipped + skippedByServer;
    $("summary").textContent = `${list.length} app${list.length === 1 ? "" : "s"} (${liveApps} live), ` +
      `${running} coordinator${running === 1 ? "" : "s"} running, ${nodes.size} node${nodes.size === 1 ? "" : "s"}` +
      (bad ? `; ${bad} invalid event${bad === 1 ? "" : "s"} skipped` : "");
    $("summary").title = bad ? "messages on the Redis that are not valid SynapticLlamas events: not shown" +
      (lastSkipped ? `; last refused here: ${lastSkipped}` : "; GET /healthz says why") : "";
  }

  function renderGateways(now, shown, states) {
    const rows = shown.filter((a) => a.gateway).map((a) => {
      const g = a.gateway;
      const stopped = states.get(a.instance)[0] === "stopped";
      const endpoint = g.open === null ? el("td", "-") : g.open ? el("td", g.url || "open") : stateCell("unavailable", g.why);
      if (g.open === null) endpoint.title = "no gateway/listening event heard: requests from the shell's ask and chat";
      if (stopped && g.open) endpoint.appendChild(el("span", " (app stopped)", "muted"));
      const requests = el("td", `${g.requests}`);
      const parts = [...GATEWAY_STATUSES, "other"].filter((s) => g.byStatus.get(s));
      parts.forEach((s, i) => {
        requests.appendChild(document.createTextNode(i ? ", " : ": "));
        requests.appendChild(el("span", `${s} ${g.byStatus.get(s)}`, `status-${s}`));
      });
      const current = (value) => (stopped || value === null ? "-" : value);
      return row([a.instance, endpoint, g.model || "-", current(g.waiting), current(g.inFlight), requests, g.held, g.resumed,
                  g.last !== null ? `${age(now - g.last * 1000)} ago` : "-"]);
    });
    $("gateways").tBodies[0].replaceChildren(...rows);
    $("gateways-panel").querySelector(".empty").hidden = rows.length > 0;
  }

  function nodeState(n, now) {
    if (n.trust && n.trust !== "signed") {
      return ["untrusted", `its announcements are ${n.trust === "unsigned" ? "not signed" : "signed with another key"}: ` +
                           "shells with the cluster key ignore it"];
    }
    if (n.state === "up" && n.interval && n.heard !== null && now - n.heard > 2.5 * n.interval * 1000) {
      return ["overdue", `no heartbeat for ${age(now - n.heard)}; one every ${n.interval}s`];
    }
    return [n.state, n.interval ? `heartbeat every ${n.interval}s` : ""];
  }

  function renderNodes(now, showStopped) {
    const list = Array.from(nodes.values())
      .filter((n) => showStopped || !(n.state === "down" && now - (n.downAt ?? now) > FOLD_AFTER_MS))
      .sort((x, y) => (x.state === "down") - (y.state === "down") || x.address.localeCompare(y.address));
    const rows = list.map((n) => {
      const devices = el("td");
      for (const d of n.devices) {
        const line = el("div", `${text(d.name)}${d.description ? ` (${text(d.description)})` : ""}: `);
        line.appendChild(el("span", `${mib(num(d.free_mib))} free / ${mib(num(d.total_mib))}`, "nowrap"));
        devices.appendChild(line);
      }
      if (!n.devices.length) devices.textContent = "-";
      const cache = n.cache ? (n.cache.enabled ? `${bytes(n.cache.bytes)}${n.cache.max ? ` (max ${bytes(n.cache.max)})` : ""}` : "off") : "-";
      const [state, reason] = nodeState(n, now);
      const why = [reason, n.link === "tls-psk" ? "rpc-server behind an encrypted link" :
                   n.link === "plain" ? "rpc-server without authentication (--insecure)" : ""].filter(Boolean).join("; ");
      return row([n.address, n.host || "-", n.version ? `v${n.version}` : "-", devices, mib(n.offered), cache,
                  stateCell(state, why), n.heard !== null ? `${age(now - n.heard)} ago` : "-"]);
    });
    $("nodes").tBodies[0].replaceChildren(...rows);
    $("nodes-panel").querySelector(".empty").hidden = rows.length > 0;
  }

  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      flushRows();
      renderPanels();
      noteEvents();
    });
  }

  // ------------------------------------------------------------ charts (charts.js draws them)

  function queueCharts() {
    if (chartsTimer !== null) return;
    chartsTimer = setTimeout(() => { chartsTimer = null; drawCharts(); },
                             Math.max(0, CHART_GAP_MS - (Date.now() - chartsDrawn)));
  }

  const timeAxis = [[0, "-15 min"], [1 / 3, "-10 min"], [2 / 3, "-5 min"], [1, "now"]];

  function drawCharts() {
    chartsDrawn = Date.now();
    const to = Date.now() / 1000, from = to - WINDOW_S;
    const oldest = Math.floor(from / BUCKET_S) - 1;
    for (const index of buckets.keys()) if (index < oldest) buckets.delete(index);

    // events per second, per level: one point per 10 s bucket (the current one counts as far as it went)
    const indices = [];
    for (let i = Math.floor(from / BUCKET_S) + 1; i <= Math.floor(to / BUCKET_S); i++) indices.push(i);
    let total = 0;
    const series = LEVELS.map((level) => {
      const points = indices.map((i) => {
        const n = (buckets.get(i) || {})[level] || 0;
        total += n;
        const span = Math.min(BUCKET_S, Math.max(1, to - i * BUCKET_S));
        return [Math.min(to, i * BUCKET_S + span), n / span];
      });
      return { name: level, cls: `level-${level}`, points: points.some(([, v]) => v > 0) ? points : [] };
    });
    Charts.lines($("chart-events"), series, { from, to, unit: "/s", xLabels: timeAxis, empty: "no events in 15 min" });
    $("chart-events").dataset.total = String(total);
    legend($("legend-events"), series.filter((s) => s.points.length).map((s) => [s.cls, s.name,
      `${Charts.shortNumber(s.points[s.points.length - 1][1])}/s now`]));

    // tokens per second of each request, per coordinator
    const coords = Array.from(apps.values()).filter((a) => a.inference.length).sort((x, y) => x.instance.localeCompare(y.instance));
    const tokenSeries = coords.map((a, i) => {
      const points = a.inference.filter(([t]) => t >= from);
      return { name: a.instance, cls: `series-${i % 8}`, dots: points.length <= 300, points };   // a dot per request
    });
    Charts.lines($("chart-tokens"), tokenSeries, { from, to, unit: "tok/s", xLabels: timeAxis,
      empty: "no request in 15 min (coordinator/inference events)" });
    legend($("legend-tokens"), tokenSeries.filter((s) => s.points.length).map((s) => [s.cls, s.name,
      `last ${Charts.shortNumber(s.points[s.points.length - 1][1])} tok/s, ${s.points.length} request${s.points.length === 1 ? "" : "s"}`]));

    // seconds per request served through each app's gateway: to the first token (solid), in total (dashed)
    const gateways = Array.from(apps.values()).filter((a) => a.gateway && a.gateway.points.length)
      .sort((x, y) => x.instance.localeCompare(y.instance));
    const gatewaySeries = [];
    gateways.forEach((a, i) => {
      const points = a.gateway.points.filter(([t]) => t >= from);
      const dots = points.length <= 300;
      gatewaySeries.push({ name: `${a.instance} first token`, cls: `series-${i % 8}`, dots,
                           points: points.filter(([, first]) => first !== null).map(([t, first]) => [t, first]) });
      gatewaySeries.push({ name: `${a.instance} total`, cls: `series-${i % 8} total`, dots,
                           points: points.map(([t, , total]) => [t, total]) });
    });
    Charts.lines($("chart-gateway"), gatewaySeries, { from, to, unit: "s", xLabels: timeAxis,
      empty: "no request served through a gateway in 15 min" });
    legend($("legend-gateway"), gatewaySeries.filter((s) => s.points.length).map((s) => [s.cls, s.name,
      `last ${Charts.shortNumber(s.points[s.points.length - 1][1])} s, ${s.points.length} request${s.points.length === 1 ? "" : "s"}`]));

    // memory per backend or node
    const rows = memoryRows();
    Charts.bars($("chart-memory"), rows, { empty: "no model loaded and no node announced" });
    legend($("legend-memory"), [["bar-used", "used by the model", ""], ["bar-offered", "offered by the node", ""],
                                ["bar-free", "free", ""], ["bar-total", "total", ""]]);
  }

  function legend(box, items) {
    box.replaceChildren(...items.map(([cls, name, note]) => {
      const item = el("span", "", "item");
      item.appendChild(el("span", "", `swatch ${cls}`));
      item.appendChild(el("span", name));
      if (note) item.appendChild(el("span", ` ${note}`, "muted"));
      return item;
    }));
  }

  function memoryRows() {
    const now = Date.now();
    const byKey = new Map();
    // what the coordinators' load logs said: per backend (or local device) buffers, with free/total
    for (const a of apps.values()) {
      const c = a.coordinator;
      if (!c || c.state !== "running" || !c.devices || a.unregistered) continue;
      for (const [device, d] of Object.entries(c.devices)) {
        if (!isObject(d)) continue;
        const used = BUFFERS.reduce((sum, key) => sum + (num(d[key]) || 0), 0);
        const key = nodes.has(device) ? device : `${a.instance} ${device}`;
        const r = byKey.get(key) || { key, label: nodes.has(device) ? device : `${device} (${a.instance})`,
                                      used: 0, offered: null, free: null, total: null };
        r.used += used;
        if (num(d.total_mib) !== null) r.total = d.total_mib;
        if (num(d.free_mib) !== null) r.free = d.free_mib;
        const planned = c.placement.find((p) => p.address === device);
        if (planned && num(planned.offered_mib) !== null) r.offered = planned.offered_mib;
        if (planned && typeof planned.host === "string") r.host = text(planned.host);
        byKey.set(key, r);
      }
    }
    // what the nodes announced: offered memory, devices' free and total
    for (const n of nodes.values()) {
      if (n.state === "down" && now - (n.downAt ?? now) > FOLD_AFTER_MS) continue;
      const r = byKey.get(n.address) || { key: n.address, label: n.address, used: 0, offered: null, free: null, total: null };
      if (n.offered !== null) r.offered = n.offered;
      const totals = n.devices.map((d) => num(d.total_mib)).filter((v) => v !== null);
      const frees = n.devices.map((d) => num(d.free_mib)).filter((v) => v !== null);
      if (totals.length) r.total = totals.reduce((x, y) => x + y, 0);
      if (frees.length) r.free = frees.reduce((x, y) => x + y, 0);
      r.label = `${n.address} (node)`;
      if (n.hostId) { r.host = n.hostId; r.hostName = n.hostName; }
      byKey.set(n.address, r);
    }
    // the devices of one machine share its memory: it is one row of its own (free and total once),
    // and theirs show what they hold and offer
    const perHost = new Map();
    for (const r of byKey.values()) if (r.host) perHost.set(r.host, [...(perHost.get(r.host) || []), r]);
    for (const [id, on] of perHost) {
      if (on.length < 2) continue;
      const name = on.find((r) => r.hostName)?.hostName || id;
      const row = { key: `host ${id}`, label: `${name}: one machine (${on.map((r) => r.key).join(", ")})`, used: 0,
                    offered: null, free: on.find((r) => r.free !== null)?.free ?? null,
                    total: on.find((r) => r.total !== null)?.total ?? null };
      for (const r of on) { r.free = null; r.total = null; r.label += ` on ${name}`; }
      byKey.set(row.key, row);
    }
    return Array.from(byKey.values()).sort((x, y) => x.label.localeCompare(y.label)).map((r) => {
      const parts = [`used ${mib(r.used)}`];
      if (r.offered !== null) parts.push(`offered ${mib(r.offered)}`);
      if (r.free !== null) parts.push(`free ${mib(r.free)}`);
      if (r.total !== null) parts.push(`of ${mib(r.total)}`);
      return Object.assign(r, { sub: parts.join(", "), label: `${r.label}: ${parts.join(", ")}` });
    });
  }

  // ------------------------------------------------------------ connection and banner

  let redisDown = false, feedDown = false;

  function showBanner() {
    const banner = $("banner");
    if (feedDown) banner.textContent = feedDown;
    else if (redisDown) banner.textContent = redisDown;
    banner.hidden = !feedDown && !redisDown;
    const conn = $("conn");
    conn.textContent = feedDown ? "disconnected" : redisDown ? "Redis down" : live ? "live" : "replaying";
    conn.className = `pill ${feedDown || redisDown ? "down" : live ? "live" : ""}`;
  }

  async function loadApps() {
    try {
      const response = await fetch(withToken("api/apps"), { cache: "no-store" });
      if (!response.ok) return;
      const body = await response.json();
      for (const reg of body.apps || []) {
        if (!valid(reg, false)) continue;
        const a = appFor(reg.instance);
        if (!a.reg) a.reg = reg;
        if (a.lastHeard === null && typeof reg.started_at === "number") a.lastHeard = reg.started_at * 1000;
      }
      queueRender();
    } catch (err) { /* the feed's status event tells the user what is wrong */ }
  }

  async function loadNodes() {
    try {
      const response = await fetch(withToken("api/nodes"), { cache: "no-store" });
      if (!response.ok) return;
      const body = await response.json();
      for (const reg of body.nodes || []) {
        if (!valid(reg, true) || typeof reg.address !== "string") continue;
        const n = nodeFor(reg.address);
        if (!n.host) n.host = text(reg.hostname);
        if (!n.instance) n.instance = text(reg.instance);
        if (typeof reg.trust === "string") n.trust = reg.trust;
        // the node's own clock says when it last beat; events heard later take over
        const beat = num(reg.last_heartbeat);
        nodeFrom(n, reg, beat !== null && n.heard === null ? Math.min(Date.now(), beat * 1000) : null);
        const a = apps.get(n.instance);
        if (a && n.interval) a.heartbeatEvery = n.interval;
        if (a && !a.reg && typeof reg.version === "string") a.reg = { version: reg.version };
      }
      queueRender();
      queueCharts();
    } catch (err) { /* the feed's status event tells the user what is wrong */ }
  }

  function valid(reg, node) {
    try { Schema.registration(reg, node); return true; } catch (err) { return false; }
  }

  function connect() {
    const source = new EventSource(withToken("events"));
    source.onmessage = (message) => {
      let ev;
      try {
        ev = Schema.decode(message.data);
        ev.trust = ev.component === C.NODE ? trustOf(message.data) : null;
      } catch (err) {
        if (!(err instanceof Schema.Invalid)) throw err;
        skipped += 1;
        lastSkipped = err.message;
        queueRender();
        return;
      }
      handle(ev);
    };
    source.addEventListener("status", (message) => {
      const s = JSON.parse(message.data);
      if (Number.isSafeInteger(s.invalid)) skippedByServer = s.invalid;
      const wasDown = redisDown;
      redisDown = s.redis === "down"
        ? `Redis at ${s.url} is unreachable (${s.error || "no answer"}). Retrying; events resume by themselves.`
        : false;
      if (s.redis === "up" && wasDown) { loadApps(); loadNodes(); }
      showBanner();
    });
    source.addEventListener("live", () => { live = true; showBanner(); queueCharts(); });
    source.addEventListener("lagged", (message) => {
      const s = JSON.parse(message.data);
      remember({ note: `${s.skipped} events skipped: this page fell behind the feed`, timestamp: Date.now() / 1000 });
      queueRender();
    });
    source.onopen = () => { feedDown = false; showBanner(); };
    source.onerror = () => {
      live = false;
      feedDown = source.readyState === EventSource.CLOSED
        ? "The dashboard refused the live feed (wrong or missing token?). Reload the page to retry."
        : "Lost the connection to the dashboard server; reconnecting.";
      showBanner();
    };
  }

  // ------------------------------------------------------------ controls

  function start() {
    setOptions($("filter-component"), COMPONENTS);
    $("filter-level").value = "debug";
    for (const id of ["filter-app", "filter-component", "filter-level"]) $(id).addEventListener("change", rebuildTable);
    $("show-stopped").addEventListener("change", () => { renderPanels(); drawCharts(); });
    $("pause").addEventListener("click", () => {
      paused = !paused;
      $("pause").textContent = paused ? "Resume" : "Pause";
      if (!paused) { missedWhilePaused = 0; rebuildTable(); }
      noteEvents();
    });
    // ages, staleness and the charts' time axis move with the clock
    setInterval(() => { renderPanels(); drawCharts(); }, 1000);
    renderPanels();
    drawCharts();
    noteEvents();
    loadApps();
    loadNodes();
    connect();
  }

  start();
})();
