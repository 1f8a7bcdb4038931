// The dashboard page: one EventSource (/events), panels built from the events it delivers.
// Every piece of event text goes into the page with textContent, never as HTML.
"use strict";
(() => {
  const MAX_ROWS = 500;        // events table rows kept in the DOM
  const KEEP = 5000;           // events kept in memory, so a filter change can refill the table
  const MAX_RAW = 500;         // raw llama.cpp lines kept in the log panel
  // the event contract's names, served by the dashboard from synapticllamas/events/contract.py
  const CONTRACT = window.SYNAPTICLLAMAS_CONTRACT;
  const C = CONTRACT.component, T = CONTRACT.type;
  const LEVELS = CONTRACT.levels;
  const COMPONENTS = CONTRACT.components;
  const COORDINATOR_STATES = {
    [T.coordinator.STARTING]: "starting", [T.model.LOADING]: "starting", [T.model.LOAD]: "starting",
    [T.coordinator.START]: "running", [T.coordinator.HEARTBEAT]: "running", [T.coordinator.STOPPING]: "stopping",
    [T.coordinator.STOP]: "stopped", [T.coordinator.BACKOFF]: "backoff", [T.coordinator.FATAL]: "fatal",
  };
  const isType = (ev, component, type) => ev.component === component && ev.event_type === type;

  const token = new URLSearchParams(location.search).get("token");
  const withToken = (path) => token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path;
  const $ = (id) => document.getElementById(id);

  const apps = new Map();      // instance -> what we know about that app
  const kept = [];             // recent {ev, gap} items (and notes), oldest first
  let live = false;            // false while the feed replays the journal
  let paused = false, missedWhilePaused = 0;
  let renderQueued = false;
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
  const seconds = (value) => (typeof value === "number" && value > 0 && isFinite(value) ? value : null);

  // Any publisher on the shared Redis can send any JSON. Every field is checked here, once, so the
  // rest of the page only ever sees these types (strings, a details object, a number or null seq).
  function normalise(raw) {
    const source = isObject(raw.source) ? raw.source : {};
    return {
      timestamp: raw.timestamp,
      component: text(raw.component),
      event_type: text(raw.event_type),
      message: text(raw.message),
      details: isObject(raw.details) ? raw.details : {},
      level: text(raw.level, "info").toLowerCase(),
      seq: Number.isSafeInteger(raw.seq) ? raw.seq : null,
      source: { app: text(source.app), host: text(source.host), instance: text(source.instance) || "(unknown)" },
    };
  }

  // an unknown level is filtered as info, not hidden
  const levelRank = (level) => (LEVELS.includes(level) ? LEVELS.indexOf(level) : LEVELS.indexOf("info"));
  const levelClass = (level) => (LEVELS.includes(level) ? `level-${level}` : "");

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }

  function stateCell(state, title) {
    const td = el("td", state, `state-${String(state).split(" ")[0]}`);
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

  function setOptions(select, values) {
    const have = new Set(Array.from(select.options, (o) => o.value));
    for (const v of values) if (!have.has(v)) select.appendChild(new Option(v, v));
  }

  // ------------------------------------------------------------ state from events

  function appFor(instance) {
    instance = text(instance, "(unknown)");
    let a = apps.get(instance);
    if (!a) {
      a = { instance, reg: null, source: {}, lastHeard: null, lastSeq: null, gaps: 0, count: 0,
            unregistered: false, heartbeatEvery: null, coordinator: null, backends: new Map() };
      apps.set(instance, a);
      setOptions($("filter-app"), [instance]);
    }
    return a;
  }

  // seq counts every event an app created: a jump means events it sampled out or that were lost.
  // The gap is shown on the event after it (the table's seq column) and summed in the apps panel.
  function noteSeq(a, ev) {
    if (ev.seq === null) return null;
    if (isType(ev, C.SYSTEM, T.system.REGISTER)) a.lastSeq = null;  // a new run
    let gap = null;
    if (a.lastSeq !== null && ev.seq > a.lastSeq + 1) {
      gap = { missing: ev.seq - a.lastSeq - 1, from: a.lastSeq + 1, to: ev.seq - 1 };
      a.gaps += gap.missing;
    }
    if (a.lastSeq === null || ev.seq > a.lastSeq) a.lastSeq = ev.seq;
    return gap;
  }

  function coordinatorFrom(a, ev) {
    const d = ev.details;
    const c = a.coordinator || (a.coordinator = { state: "stopped", model: null, port: null, backends: [],
                                                  startedAt: null, restarts: 0, reason: null });
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
  }

  function backendFrom(a, address, state, ts) {
    if (!address) return;
    address = text(address);
    state = text(state, "unknown");
    const b = a.backends.get(address);
    if (!b) a.backends.set(address, { state, changed: ts });
    else if (b.state !== state) { b.state = state; b.changed = ts; }
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
    if (isType(ev, C.SYSTEM, T.system.REGISTER)) { a.reg = d; a.unregistered = false; }
    else if (isType(ev, C.SYSTEM, T.system.UNREGISTER)) a.unregistered = true;
    else if (ev.component === C.COORDINATOR) coordinatorFrom(a, ev);
    else if (ev.component === C.RPC_BACKEND) {
      const state = { [T.rpc_backend.CONNECT]: "up", [T.rpc_backend.DISCONNECT]: "down",
                      [T.rpc_backend.ADDED]: "unknown", [T.rpc_backend.REMOVED]: "removed" }[ev.event_type];
      const removed = ev.event_type === T.rpc_backend.REMOVED;
      if (state) backendFrom(a, d.address, d.state && !removed ? d.state : state, ev.timestamp);
    } else if (isType(ev, C.RPC_REGISTRY, T.rpc_registry.HEARTBEAT) && Array.isArray(d.backends)) {
      for (const b of d.backends) if (isObject(b)) backendFrom(a, b.address, b.state, ev.timestamp);
      if (seconds(d.interval_s)) a.heartbeatEvery = d.interval_s;
    } else if (ev.component === C.RAW) addRaw(instance, ev);
    setOptions($("filter-component"), [ev.component]);
    remember({ ev, gap });
    queueRender();
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
    if (gap) {
      const span = el("span", ` +${gap.missing} missing`, "gap");
      span.title = `seq ${gap.from}${gap.to > gap.from ? `-${gap.to}` : ""} never arrived: sampled out by the app, or lost`;
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

  function renderPanels() {
    const now = Date.now();
    const list = Array.from(apps.values()).sort((x, y) => x.instance.localeCompare(y.instance));

    const appRows = list.map((a) => {
      const r = a.reg || {};
      const [state, why] = appState(a, now);
      return row([a.instance, text(r.app) || a.source.app, text(r.mode), text(r.version), stateCell(state, why),
                  a.lastHeard ? `${age(now - a.lastHeard)} ago` : "-", a.count, a.gaps]);
    });
    $("apps").tBodies[0].replaceChildren(...appRows);
    $("apps-panel").querySelector(".empty").hidden = appRows.length > 0;

    const coordRows = list.filter((a) => a.coordinator).map((a) => {
      const c = a.coordinator;
      const ended = ["stopped", "exited", "fatal"].includes(c.state);
      const state = ended && c.reason ? `${c.state} (${c.reason})` : c.state;
      return row([a.instance, stateCell(state), c.model || "-", c.port ?? "-",
                  c.backends.length ? c.backends.join(", ") : "none",
                  c.startedAt ? age(now - c.startedAt * 1000) : "-", c.restarts]);
    });
    $("coordinators").tBodies[0].replaceChildren(...coordRows);
    $("coordinator-panel").querySelector(".empty").hidden = coordRows.length > 0;

    const backendRows = [];
    for (const a of list) {
      for (const [address, b] of Array.from(a.backends).sort()) {
        backendRows.push(row([a.instance, address, stateCell(b.state),
                              `${clock(b.changed)} (${age(now - b.changed * 1000)} ago)`]));
      }
    }
    $("backends").tBodies[0].replaceChildren(...backendRows);
    $("backends-panel").querySelector(".empty").hidden = backendRows.length > 0;

    const running = list.filter((a) => a.coordinator && a.coordinator.state === "running").length;
    $("summary").textContent = `${list.length} app${list.length === 1 ? "" : "s"}, ${running} coordinator${running === 1 ? "" : "s"} running`;
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
        if (!isObject(reg)) continue;
        const a = appFor(reg.instance);
        if (!a.reg) a.reg = reg;
        if (a.lastHeard === null && typeof reg.started_at === "number") a.lastHeard = reg.started_at * 1000;
      }
      queueRender();
    } catch (err) { /* the feed's status event tells the user what is wrong */ }
  }

  function connect() {
    const source = new EventSource(withToken("events"));
    source.onmessage = (message) => {
      let ev;
      try { ev = JSON.parse(message.data); } catch (err) { return; }
      if (isObject(ev) && typeof ev.timestamp === "number" && isFinite(ev.timestamp)) handle(normalise(ev));
    };
    source.addEventListener("status", (message) => {
      const s = JSON.parse(message.data);
      const wasDown = redisDown;
      redisDown = s.redis === "down"
        ? `Redis at ${s.url} is unreachable (${s.error || "no answer"}). Retrying; events resume by themselves.`
        : false;
      if (s.redis === "up" && wasDown) loadApps();
      showBanner();
    });
    source.addEventListener("live", () => { live = true; showBanner(); });
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
    $("pause").addEventListener("click", () => {
      paused = !paused;
      $("pause").textContent = paused ? "Resume" : "Pause";
      if (!paused) { missedWhilePaused = 0; rebuildTable(); }
      noteEvents();
    });
    setInterval(renderPanels, 1000);   // ages and staleness move with the clock
    renderPanels();
    noteEvents();
    loadApps();
    connect();
  }

  start();
})();
