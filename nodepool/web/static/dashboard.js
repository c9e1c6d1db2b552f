// The launcher dashboard: polls dashboard.json and renders tables and SVG charts.
// Plain DOM, no libraries (the page must work offline and needs no build step).
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
let lastData = null;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  if (s < 120) return s + "s";
  if (s < 7200) return Math.round(s / 60) + "m";
  if (s < 172800) return (s / 3600).toFixed(1) + "h";
  return (s / 86400).toFixed(1) + "d";
}

function secs(v) { return v === null || v === undefined ? "-" : v.toFixed(1) + "s"; }

function fillTable(id, rows, cells, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  const ncols = document.querySelectorAll("#" + id + " thead th").length;
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    tr.appendChild(el("td", {colspan: ncols, class: "empty"}, emptyText));
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = el("tr");
    for (const cell of cells(row)) {
      const attrs = {};
      if (typeof cell === "number") attrs.class = cell === 0 ? "num zero" : "num";
      if (cell && typeof cell === "object") {
        tr.appendChild(el("td", cell.attrs || {}, cell.text));
        continue;
      }
      tr.appendChild(el("td", attrs, cell));
    }
    body.appendChild(tr);
  }
}

function upload(u) {
  if (!u) return ["-", "-"];
  return [(u.name || u.external_id || "") + " (build " + (u.build || "").slice(0, 8) +
          ", upload " + u.upload + ")", age(u.age)];
}

// A line chart of points [{time, value}] per series, time on x; null values break the line.
function lineChart(svg, seriesList, yMax, yFormat, window, now) {
  svg.replaceChildren();
  const W = 480, H = 180, L = 44, R = 10, T = 10, B = 22;
  const x = t => L + (W - L - R) * (1 - (now - t) / window);
  const y = v => T + (H - T - B) * (1 - v / yMax);
  for (let i = 0; i <= 4; i++) {
    const v = yMax * i / 4;
    svg.appendChild(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
    svg.appendChild(svgEl("text", {x: 2, y: y(v) + 3}, yFormat(v)));
  }
  svg.appendChild(svgEl("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  svg.appendChild(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  svg.appendChild(svgEl("text", {x: L, y: H - 6}, "-" + age(window)));
  svg.appendChild(svgEl("text", {x: W - R - 22, y: H - 6}, "now"));
  let points = 0;
  for (const {cls, data} of seriesList) {
    let d = "";
    let pen = false;
    for (const p of data) {
      if (p.value === null || p.value === undefined) { pen = false; continue; }
      const px = x(p.time).toFixed(1), py = y(Math.min(p.value, yMax)).toFixed(1);
      d += (pen ? " L" : " M") + px + " " + py;
      pen = true;
      points++;
      svg.appendChild(svgEl("circle", {class: cls, cx: px, cy: py, r: 2}));
    }
    if (d) svg.appendChild(svgEl("path", {class: cls, d: d.trim()}));
  }
  if (!points) {
    svg.appendChild(svgEl("text", {x: W / 2 - 60, y: H / 2}, "no fulfilled requests yet"));
  }
  svg.setAttribute("data-points", String(points));
}

function renderCharts(data) {
  const select = document.getElementById("series-label");
  const wanted = Object.keys(data.series);
  const have = Array.from(select.options).map(o => o.value);
  for (const name of wanted) {
    if (!have.includes(name)) select.appendChild(el("option", {value: name}, name));
  }
  const series = data.series[select.value] || data.series.all;
  const warm = series.map(p => ({time: p.time, value: p.warm_ratio === null ? null : p.warm_ratio * 100}));
  lineChart(document.getElementById("chart-warm"), [{cls: "warm", data: warm}], 100,
            v => v.toFixed(0) + "%", data.window, data.time);
  const top = Math.max(1, ...series.map(p => p.p95 || 0));
  const scale = Math.pow(10, Math.floor(Math.log10(top)));
  const yMax = Math.ceil(top / scale) * scale;
  lineChart(document.getElementById("chart-wait"), [
    {cls: "p50", data: series.map(p => ({time: p.time, value: p.p50}))},
    {cls: "p95", data: series.map(p => ({time: p.time, value: p.p95}))},
  ], yMax, v => (v < 1 ? v.toFixed(2) : v < 10 ? v.toFixed(1) : v.toFixed(0)) + "s", data.window, data.time);
}

function render(data) {
  document.getElementById("launchers").textContent =
    "launchers: " + (data.launchers.join(", ") || "none registered");
  fillTable("nodes", data.nodes, r => [r.label, r.provider, r.ready, r.allocated, r.in_use,
    r.building, r.deleting, r.failed, r.hold], "no labels configured");
  document.getElementById("requests-count").textContent = String(data.requests.length);
  fillTable("requests", data.requests, r => [r.id, r.labels.join(", "), r.state,
    r.requestor || "-", {text: age(r.age), attrs: {class: r.age > 300 ? "old" : ""}},
    r.declined_by], "no request is waiting");
  document.getElementById("window").textContent = "(last " + age(data.window) + ")";
  fillTable("waits", data.waits.filter(r => r.provider === null), r => [r.label, r.requests,
    (r.warm_ratio === null ? "-" : Math.round(r.warm_ratio * 100) + "%") +
      " (" + r.warm + "/" + r.requests + ")",
    secs(r.p50), secs(r.p95), secs(r.p50_warm), secs(r.p50_cold)],
    "no request fulfilled in this window");
  fillTable("images", data.images, r => [r.image, r.provider, ...upload(r.current),
    ...upload(r.previous), r.uploading, r.failed], "no image uploads");
  fillTable("failures", data.failures, r => [age(data.time - r.time) + " ago", r.node,
    r.provider + "/" + r.pool, r.label || "-", r.reason], "no recent launch failure");
  renderCharts(data);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/dashboard.json", {cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    lastData = await resp.json();
    render(lastData);
    status.textContent = "updated " + new Date(lastData.time * 1000).toLocaleTimeString();
    document.body.setAttribute("data-updated", String(lastData.time));
  } catch (err) {
    status.textContent = "cannot reach the launcher: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("series-label").addEventListener("change", () => {
  if (lastData) renderCharts(lastData);
});
poll();
