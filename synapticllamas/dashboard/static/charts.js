// Plain SVG charts for the dashboard page: no library, no CDN. Every label goes in with textContent.
// Colours come from CSS classes (the CSP allows no inline style): .series-N, .level-NAME.
"use strict";
(() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 600;                              // viewBox width; the SVG scales to its box
  const PAD = { left: 46, right: 10, top: 10, bottom: 22 };

  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = String(text);
    return n;
  }

  // a round number at or above `value`, for the top of an axis (1, 2, 5 x 10^n)
  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  function shortNumber(v) {
    if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
    if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
    return `${+v.toFixed(v < 10 ? 2 : 1)}`;
  }

  function frame(svg, height, yMax, unit, xLabels) {
    svg.setAttribute("viewBox", `0 0 ${W} ${height}`);
    svg.replaceChildren();
    const bottom = height - PAD.bottom;
    for (const f of [0, 0.5, 1]) {
      const y = bottom - f * (bottom - PAD.top);
      svg.appendChild(node("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }));
      svg.appendChild(node("text", { x: PAD.left - 4, y: y + 4, "text-anchor": "end", class: "axis" },
        `${shortNumber(yMax * f)}${f === 1 && unit ? ` ${unit}` : ""}`));
    }
    for (const [f, label] of xLabels) {
      svg.appendChild(node("text", { x: PAD.left + f * (W - PAD.left - PAD.right), y: height - 6,
        "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle", class: "axis" }, label));
    }
    return bottom;
  }

  // series: [{name, cls, points: [[t, v], ...], dots}] over the time window [from, to] (seconds)
  function lines(svg, series, opts) {
    const height = opts.height || 180;
    const { from, to } = opts;
    let top = 0;
    for (const s of series) for (const [, v] of s.points) if (v > top) top = v;
    const yMax = niceMax(top * 1.05);
    const bottom = frame(svg, height, yMax, opts.unit, opts.xLabels);
    const x = (t) => PAD.left + (t - from) / (to - from) * (W - PAD.left - PAD.right);
    const y = (v) => bottom - v / yMax * (bottom - PAD.top);
    let drawn = 0;
    for (const s of series) {
      const pts = s.points.filter(([t]) => t >= from && t <= to);
      if (!pts.length) continue;
      const line = node("polyline", { points: pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
        class: `series ${s.cls}`, "data-series": s.name, "data-points": pts.length });
      svg.appendChild(line);
      if (s.dots) {
        for (const [t, v] of pts) {
          const dot = node("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2.5, class: `dot ${s.cls}`,
            "data-series": s.name });
          dot.appendChild(node("title", {}, `${shortNumber(v)} ${opts.unit || ""}`.trim()));
          svg.appendChild(dot);
        }
      }
      drawn += pts.length;
    }
    if (!drawn) {
      svg.appendChild(node("text", { x: W / 2, y: height / 2, "text-anchor": "middle", class: "axis" },
        opts.empty || "nothing yet"));
    }
    svg.dataset.points = String(drawn);
    return drawn;
  }

  // rows: [{label, sub, used, offered, free, total}] in MiB; one bar each: total (light), free part
  // (hatched by class), offered (outline), used by the model (solid)
  function bars(svg, rows, opts) {
    const rowH = 34;
    const height = Math.max(60, PAD.top + rows.length * rowH + PAD.bottom);
    let top = 0;
    for (const r of rows) top = Math.max(top, r.used || 0, r.offered || 0, r.total || 0);
    const xMax = niceMax(top * 1.02);
    svg.setAttribute("viewBox", `0 0 ${W} ${height}`);
    svg.replaceChildren();
    const left = 8, width = W - left - PAD.right;
    const scale = (mib) => Math.max(0, mib) / xMax * width;
    rows.forEach((r, i) => {
      const y0 = PAD.top + i * rowH;
      const g = node("g", { class: "bar", "data-address": r.key });
      g.appendChild(node("text", { x: left, y: y0 + 10, class: "bar-label" }, r.label));
      const y = y0 + 14, h = 12;
      if (r.total) g.appendChild(node("rect", { x: left, y, width: scale(r.total), height: h, class: "bar-total" }));
      if (r.total && r.free != null) {
        g.appendChild(node("rect", { x: left + scale(r.total - r.free), y, width: scale(r.free), height: h,
          class: "bar-free" }));
      }
      if (r.offered) g.appendChild(node("rect", { x: left, y, width: scale(r.offered), height: h, class: "bar-offered" }));
      if (r.used) g.appendChild(node("rect", { x: left, y: y + 2, width: Math.max(1, scale(r.used)), height: h - 4,
        class: "bar-used" }));
      const title = node("title", {}, r.sub);
      g.appendChild(title);
      svg.appendChild(g);
    });
    if (!rows.length) {
      svg.appendChild(node("text", { x: W / 2, y: height / 2, "text-anchor": "middle", class: "axis" },
        opts.empty || "nothing yet"));
    } else {
      svg.appendChild(node("text", { x: W - PAD.right, y: height - 6, "text-anchor": "end", class: "axis" },
        `scale: 0 - ${shortNumber(xMax)} MiB`));
    }
    svg.dataset.rows = String(rows.length);
  }

  window.SynapticCharts = Object.freeze({ lines, bars, shortNumber });
})();
