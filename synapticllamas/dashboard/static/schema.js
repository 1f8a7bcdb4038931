// The event schema on the page: the same checks as synapticllamas/events/schema.py, from the rules
// /contract.js carries (limits, patterns, typed details). An event that fails is skipped and
// counted by the caller; nothing malformed reaches the panels.
"use strict";
window.SynapticSchema = (() => {
  const R = window.SYNAPTICLLAMAS_CONTRACT.schema;
  const IDENTIFIER = new RegExp(R.identifier), STATE = new RegExp(R.state), VERSION = new RegExp(R.version);
  const UNPRINTABLE = new RegExp(R.unprintable_categories.map((c) => `\\p{${c}}`).join("|"), "u");
  const ADDRESS = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]{1,253})):(\d{1,5})$/;   // HOST:PORT, [IPv6]:PORT

  class Invalid extends Error {
    constructor(where, what) { super(where ? `${where}: ${what}` : what); this.where = where; }
  }

  const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
  const short = (v) => { const t = JSON.stringify(v) ?? String(v); return t.length <= 40 ? t : `${t.slice(0, 37)}...`; };

  function integer(v, where, low, high) {
    if (isNumber(v) && Number.isInteger(v) && v >= low && v <= high) return v;
    throw new Invalid(where, `${short(v)} is not an integer from ${low} to ${high}`);
  }
  function number(v, where, low, high, above = false) {
    if (isNumber(v) && (above ? v > low : v >= low) && v <= high) return v;
    throw new Invalid(where, `${short(v)} is not a number ${above ? "more than" : "from"} ${low} to ${high}`);
  }
  function text(v, where, limit, pattern = null) {
    if (typeof v !== "string") throw new Invalid(where, `${short(v)} is not a string`);
    if (v.length > limit) throw new Invalid(where, `a string of ${v.length} characters; at most ${limit}`);
    if (pattern && !pattern.test(v)) throw new Invalid(where, `${short(v)} does not match ${pattern.source}`);
    if (UNPRINTABLE.test(v)) throw new Invalid(where, `${short(v)} holds characters that cannot be shown`);
    return v;
  }
  function address(v, where) {
    const m = typeof v === "string" ? ADDRESS.exec(v.trim()) : null;
    if (!m || +m[3] < 1 || +m[3] > 65535) throw new Invalid(where, `${short(v)} is not a HOST:PORT address`);
    return v;
  }

  function kind(k, v, where) {
    switch (k) {
      case "count": return integer(v, where, 0, R.max_seq);
      case "port": return integer(v, where, 1, 65535);
      case "number": return number(v, where, -R.max_number, R.max_number);
      case "positive": return number(v, where, 0, R.max_number, true);
      case "mib": return number(v, where, 0, R.max_mib);
      case "timestamp": return number(v, where, 0, R.max_timestamp);
      case "bool": if (typeof v === "boolean") return v; throw new Invalid(where, `${short(v)} is not true or false`);
      case "state": return text(v, where, 32, STATE);
      case "label": return text(v, where, R.max_name_chars);
      case "text": return text(v, where, R.max_text_chars);
      case "version": return text(v, where, R.max_version_chars, VERSION);
      case "address": return address(v, where);
      default: break;
    }
    const [how, inner] = k.split(":");
    if (how === "list") {
      if (!Array.isArray(v)) throw new Invalid(where, `${short(v)} is not a list`);
      v.forEach((item, i) => kind(inner in R.shapes ? `shape:${inner}` : inner, item, `${where}[${i}]`));
      return v;
    }
    if (how === "map") {
      if (!isObject(v)) throw new Invalid(where, `${short(v)} is not an object`);
      for (const [key, item] of Object.entries(v)) { text(key, `${where} key`, R.max_name_chars); kind(`shape:${inner}`, item, `${where}.${key}`); }
      return v;
    }
    if (how === "shape") return fields(R.shapes[inner], v, where);
    throw new Invalid(where, `unknown kind ${k}`);
  }

  function fields(spec, v, where) {
    if (!isObject(v)) throw new Invalid(where, `${short(v)} is not an object`);
    for (const [key, k] of Object.entries(spec)) {
      if (v[key] !== undefined && v[key] !== null) kind(k, v[key], where ? `${where}.${key}` : key);
    }
    return v;
  }

  function sizes(value, where) {
    let budget = R.max_values;
    const walk = (v, path, depth) => {
      if (--budget < 0) throw new Invalid(where, `more than ${R.max_values} values`);
      if (typeof v === "string") {
        if (v.length > R.max_string_chars) throw new Invalid(path, `a string of ${v.length} characters`);
      } else if (typeof v === "number") {
        if (!Number.isFinite(v) || Math.abs(v) > R.max_any_number) throw new Invalid(path, `${v} is not a finite number`);
      } else if (Array.isArray(v)) {
        if (depth >= R.max_depth) throw new Invalid(path, `nested deeper than ${R.max_depth} levels`);
        if (v.length > R.max_list_items) throw new Invalid(path, `a list of ${v.length} items`);
        v.forEach((item, i) => walk(item, `${path}[${i}]`, depth + 1));
      } else if (isObject(v)) {
        if (depth >= R.max_depth) throw new Invalid(path, `nested deeper than ${R.max_depth} levels`);
        const entries = Object.entries(v);
        if (entries.length > R.max_object_keys) throw new Invalid(path, `an object of ${entries.length} keys`);
        for (const [key, item] of entries) {
          if (key.length > R.max_key_chars) throw new Invalid(path, `a key of ${key.length} characters`);
          walk(item, `${path}.${key.slice(0, 40)}`, depth + 1);
        }
      }
    };
    walk(value, where, 0);
  }

  function detailsSpec(component, type) {
    const per = R.details[component];
    return per ? (per[type] || per["*"] || {}) : {};
  }

  // the raw event object -> the event the page uses (strings, a details object, numbers or null), or Invalid
  function event(raw) {
    if (!isObject(raw)) throw new Invalid("", "not a JSON object");
    if (raw.timestamp === undefined) throw new Invalid("timestamp", "missing");
    const timestamp = number(raw.timestamp, "timestamp", 0, R.max_timestamp);
    const component = text(raw.component, "component", 64, IDENTIFIER);
    const type = text(raw.event_type, "event_type", 64, IDENTIFIER);
    let message = raw.message ?? "";
    if (typeof message !== "string") throw new Invalid("message", `${short(message)} is not a string`);
    if (message.length > R.max_message_chars) throw new Invalid("message", `${message.length} characters`);
    const level = raw.level === undefined || raw.level === null ? "info" : text(raw.level, "level", 16).toLowerCase();
    if (!/^[a-z]+$/.test(level)) throw new Invalid("level", `${short(level)} is not a level`);
    const source = {};
    if (raw.source !== undefined && raw.source !== null) {
      if (!isObject(raw.source)) throw new Invalid("source", `${short(raw.source)} is not an object`);
      for (const key of ["app", "instance", "host"]) {
        if (raw.source[key] !== undefined && raw.source[key] !== null) source[key] = text(raw.source[key], `source.${key}`, R.max_name_chars);
      }
    }
    const seq = raw.seq === undefined || raw.seq === null ? 0 : integer(raw.seq, "seq", 0, R.max_seq);
    const sampled = raw.sampled === undefined || raw.sampled === null ? null : integer(raw.sampled, "sampled", 0, R.max_seq);
    if (sampled !== null && seq && sampled >= seq) throw new Invalid("sampled", `${sampled} sampled out before seq ${seq}`);
    let details = {};
    if (raw.details !== undefined && raw.details !== null) {
      if (!isObject(raw.details)) throw new Invalid("details", `${short(raw.details)} is not an object`);
      sizes(raw.details, "details");
      details = fields(detailsSpec(component, type), raw.details, "details");
    }
    return { timestamp, component, event_type: type, message, details, level, seq: seq || null, sampled,
             source: { app: source.app || "", host: source.host || "", instance: source.instance || "(unknown)" } };
  }

  // one SSE message's text -> the event, or Invalid
  function decode(data) {
    if (typeof data !== "string" || data.length > R.max_payload_bytes) throw new Invalid("size", "too large");
    let raw;
    try { raw = JSON.parse(data); } catch (err) { throw new Invalid("json", "not JSON"); }
    return event(raw);
  }

  // an apps-hash or nodes-hash value, as /api/apps and /api/nodes return them
  function registration(reg, node = false) {
    if (!isObject(reg)) throw new Invalid("", "not a JSON object");
    sizes(reg, "registration");
    return fields(node ? R.node_registration : R.registration, reg, "");
  }

  return { Invalid, decode, event, registration, jumpLimit: R.jump_limit };
})();
