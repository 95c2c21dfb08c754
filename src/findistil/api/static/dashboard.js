// findistil dashboard: three pages drawn from the JSON API, charts as hand-made SVG.
//   #/                  jobs, live status and progress
//   #/jobs/<id>         one job: scores, per-class F1, confusion, cost vs quality, loss, timeline
//   #/workloads/<id>    the learning curve across a workload's jobs (the flywheel effect)
// No library and no CDN: the five chart kinds below are ~200 lines, work offline, and carry no
// licence to track. Every mark has data-* attributes with the API's numbers (the browser tests
// read them back).
"use strict";

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
const EVAL_ORDER = ["base-eval", "icl-eval", "customized-eval"];
const SVGNS = "http://www.w3.org/2000/svg";
let timer = null;

// -- small helpers -----------------------------------------------------------------------
const esc = (s) => String(s ?? "—").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const num = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "—" : Number(x).toFixed(d);
const shortName = (m) => String(m || "").split("/").pop();
const when = (t) => (t || "").replace("T", " ").slice(0, 19);

// An API with tokens (api_tokens / FINDISTIL_API_TOKEN) answers 401 without one: the page
// then asks for a token and keeps it in this tab's sessionStorage only.
const TOKEN_KEY = "findistil-token";

class NeedsToken extends Error {}

async function getJSON(url) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const answer = await fetch(url, token ? { headers: { Authorization: `Bearer ${token}` } } : {});
  if (answer.status === 401) throw new NeedsToken(token ? "that token was refused" : "this API needs a token");
  if (!answer.ok) throw new Error(`${url}: HTTP ${answer.status}`);
  return answer.json();
}

function tokenForm(app, why) {
  app.innerHTML = `<h1>token</h1><p class="failed" id="token-why">${esc(why)}</p>
    <form id="token-form"><input type="password" id="token" placeholder="bearer token (read scope is enough)"
      autocomplete="off" size="40"> <button type="submit">use</button></form>`;
  app.querySelector("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, app.querySelector("#token").value.trim());
    route();
  });
  app.dataset.ready = "token";
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function figure(name, caption, width, height) {
  const fig = document.createElement("figure");
  fig.innerHTML = `<figcaption>${esc(caption)}</figcaption>`;
  const root = svg("svg", { "data-chart": name, width, height, viewBox: `0 0 ${width} ${height}` });
  fig.appendChild(root);
  return { fig, root };
}

function legend(names) {
  const div = document.createElement("div");
  div.className = "legend";
  div.innerHTML = names.map((n, i) =>
    `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${esc(n)}</span>`).join("");
  return div;
}

function linear(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function axes(root, box, xTicks, yTicks) {
  root.appendChild(svg("line", { class: "axis", x1: box.l, y1: box.b, x2: box.r, y2: box.b }));
  root.appendChild(svg("line", { class: "axis", x1: box.l, y1: box.t, x2: box.l, y2: box.b }));
  for (const [y, label] of yTicks) {
    root.appendChild(svg("line", { class: "grid-line", x1: box.l, y1: y, x2: box.r, y2: y }));
    root.appendChild(svg("text", { x: box.l - 6, y: y + 4, "text-anchor": "end" }, label));
  }
  for (const [x, label] of xTicks) {
    root.appendChild(svg("text", { x, y: box.b + 15, "text-anchor": "middle" }, label));
  }
}

function ticks(lo, hi, n = 5) {
  return Array.from({ length: n + 1 }, (_, i) => lo + ((hi - lo) * i) / n);
}

// -- chart kinds ---------------------------------------------------------------------------
// Vertical bars in groups (one group per category, one bar per series) with a reference line.
function groupedBars(name, caption, categories, series, reference) {
  const W = 560, H = 280, box = { l: 44, r: W - 10, t: 12, b: H - 40 };
  const { fig, root } = figure(name, caption, W, H);
  const y = linear(0, 1, box.b, box.t);
  axes(root, box, [], ticks(0, 1).map((v) => [y(v), v.toFixed(1)]));
  const slot = (box.r - box.l) / Math.max(1, categories.length);
  const bar = (slot * 0.8) / Math.max(1, series.length);
  categories.forEach((cat, ci) => {
    const x0 = box.l + ci * slot + slot * 0.1;
    root.appendChild(svg("text", { x: x0 + slot * 0.4, y: box.b + 15, "text-anchor": "middle" }, cat));
    series.forEach((s, si) => {
      const v = s.values[ci];
      if (v === null || v === undefined) return;
      const rect = svg("rect", {
        class: "bar", x: x0 + si * bar, y: y(v), width: bar - 2, height: box.b - y(v),
        fill: COLORS[si % COLORS.length], "data-label": `${cat}|${s.name}`, "data-value": v,
      });
      rect.appendChild(svg("title", {}, `${cat} ${s.name}: ${num(v)}`));
      root.appendChild(rect);
    });
  });
  if (reference) referenceLine(root, box, y(reference.value), reference.label);
  fig.appendChild(legend(series.map((s) => s.name)));
  return fig;
}

function referenceLine(root, box, y, label) {
  root.appendChild(svg("line", { class: "reference", x1: box.l, y1: y, x2: box.r, y2: y, "data-reference": label }));
  root.appendChild(svg("text", { x: box.r - 4, y: y - 4, "text-anchor": "end" }, label));
}

// Horizontal bars, one per label (per-class F1).
function hBars(name, caption, items) {
  const row = 18, W = 560, H = 24 + row * items.length, box = { l: 170, r: W - 50, t: 6 };
  const { fig, root } = figure(name, caption, W, H);
  const x = linear(0, 1, box.l, box.r);
  items.forEach((it, i) => {
    const yy = box.t + i * row;
    root.appendChild(svg("text", { x: box.l - 6, y: yy + 12, "text-anchor": "end" }, it.label));
    root.appendChild(svg("rect", {
      class: "bar", x: box.l, y: yy + 2, width: Math.max(0, x(it.value) - box.l), height: row - 5,
      fill: it.value < 0.5 ? "#d62728" : "#1f77b4", "data-label": it.label, "data-value": it.value,
    }));
    root.appendChild(svg("text", { x: x(it.value) + 4, y: yy + 12 }, `${num(it.value, 2)} (n=${it.support})`));
  });
  return fig;
}

// A confusion matrix: rows the teacher's label, columns the student's answer.
function heatmap(name, caption, confusion) {
  const n = confusion.labels.length, m = confusion.columns.length, cell = 24;
  const left = 150, top = 130, W = left + m * cell + 70, H = top + n * cell + 10;
  const { fig, root } = figure(name, caption, W, H);
  const peak = Math.max(1, ...confusion.matrix.flat());
  confusion.columns.forEach((c, j) => {
    const x = left + j * cell + cell / 2;
    root.appendChild(svg("text", { x, y: top - 6, transform: `rotate(-55 ${x} ${top - 6})` }, c));
  });
  confusion.matrix.forEach((rowValues, i) => {
    root.appendChild(svg("text", { x: left - 6, y: top + i * cell + 16, "text-anchor": "end" }, confusion.labels[i]));
    rowValues.forEach((v, j) => {
      const shade = Math.round(255 - (v / peak) * 200);
      root.appendChild(svg("rect", {
        class: "cell", x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1,
        fill: v ? `rgb(${shade},${shade},255)` : "#f7f7f7", "data-row": confusion.labels[i],
        "data-col": confusion.columns[j], "data-value": v,
      }));
      if (v) root.appendChild(svg("text", { x: left + j * cell + cell / 2, y: top + i * cell + 16, "text-anchor": "middle" }, v));
    });
  });
  return fig;
}

// Points with named series; optional reference line and a ring around the recommended one.
function scatter(name, caption, points, opts) {
  const W = 560, H = 300, box = { l: 50, r: W - 90, t: 24, b: H - 44 };
  const { fig, root } = figure(name, caption, W, H);
  const xs = points.map((p) => p.x);
  const x = linear(0, Math.max(...xs, 1) * 1.1, box.l, box.r);
  const y = linear(0, 1, box.b, box.t);
  const xMax = Math.max(...xs, 1) * 1.1;
  axes(root, box, ticks(0, xMax, 4).map((v) => [x(v), v.toFixed(v < 10 ? 1 : 0)]),
       ticks(0, 1).map((v) => [y(v), v.toFixed(1)]));
  root.appendChild(svg("text", { x: (box.l + box.r) / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel));
  root.appendChild(svg("text", { x: 8, y: 12 }, opts.yLabel));
  if (opts.reference) referenceLine(root, box, y(opts.reference.value), opts.reference.label);
  points.forEach((p) => {
    const dot = svg("circle", {
      class: `point${p.recommended ? " recommended" : ""}`, cx: x(p.x), cy: y(p.y), r: p.recommended ? 8 : 6,
      fill: COLORS[p.series % COLORS.length], "data-label": p.label, "data-x": p.x, "data-y": p.y,
    });
    dot.appendChild(svg("title", {}, `${p.label}: ${num(p.x, 2)}, ${num(p.y)}`));
    root.appendChild(dot);
    root.appendChild(svg("text", { x: x(p.x) + 10, y: y(p.y) - 8 }, p.label + (p.recommended ? " ★ recommended" : "")));
  });
  return fig;
}

// Lines, one per series: [{name, points: [[x, y], ...]}].
function lines(name, caption, series, opts) {
  const W = 560, H = 280, box = { l: 50, r: W - 16, t: 12, b: H - 40 };
  const { fig, root } = figure(name, caption, W, H);
  const all = series.flatMap((s) => s.points);
  const xMax = Math.max(1, ...all.map((p) => p[0]));
  const yMax = opts.yMax ?? Math.max(1e-9, ...all.map((p) => p[1]));
  const x = linear(opts.xMin ?? 0, xMax, box.l, box.r), y = linear(0, yMax, box.b, box.t);
  axes(root, box, ticks(opts.xMin ?? 0, xMax, 4).map((v) => [x(v), Math.round(v)]),
       ticks(0, yMax).map((v) => [y(v), v.toFixed(yMax < 10 ? 2 : 0)]));
  root.appendChild(svg("text", { x: (box.l + box.r) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel));
  series.forEach((s, i) => {
    const d = s.points.map((p, k) => `${k ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    root.appendChild(svg("path", { class: "line", d, fill: "none", stroke: COLORS[i % COLORS.length],
      "stroke-width": 2, "data-series": s.name, "data-points": s.points.length }));
    for (const p of opts.dots ? s.points : []) {
      root.appendChild(svg("circle", { class: "point", cx: x(p[0]), cy: y(p[1]), r: 4,
        fill: COLORS[i % COLORS.length], "data-label": s.name, "data-x": p[0], "data-y": p[1] }));
    }
  });
  fig.appendChild(legend(series.map((s) => s.name)));
  return fig;
}

// One row per stage: a bar from its start to its end, in seconds since the job started.
function timeline(name, caption, rows) {
  const row = 20, W = 560, H = 40 + row * rows.length, box = { l: 230, r: W - 20, t: 6, b: 10 + row * rows.length };
  const { fig, root } = figure(name, caption, W, H);
  const end = Math.max(1, ...rows.map((r) => r.end));
  const x = linear(0, end, box.l, box.r);
  axes(root, box, ticks(0, end, 5).map((v) => [x(v), `${v.toFixed(end < 10 ? 1 : 0)} s`]), []);
  rows.forEach((r, i) => {
    const yy = box.t + i * row;
    root.appendChild(svg("text", { x: box.l - 6, y: yy + 13, "text-anchor": "end" }, r.label));
    root.appendChild(svg("rect", {
      class: `stage ${r.status}`, x: x(r.start), y: yy + 3, width: Math.max(2, x(r.end) - x(r.start)),
      height: row - 6, fill: COLORS[r.series % COLORS.length], "data-label": r.label,
      "data-start": r.start.toFixed(2), "data-end": r.end.toFixed(2),
    }));
  });
  return fig;
}

// -- what the charts show --------------------------------------------------------------------
function finalEval(nim) {
  const done = (nim.evaluations || []).filter((e) => e.status === "completed" && e.scores);
  done.sort((a, b) => EVAL_ORDER.indexOf(b.eval_type) - EVAL_ORDER.indexOf(a.eval_type));
  return done[0] || null;
}

function scoresChart(job) {
  const cats = job.nims.map((n) => shortName(n.model_name));
  const series = EVAL_ORDER.map((type) => ({
    name: type,
    values: job.nims.map((n) => {
      const ev = (n.evaluations || []).find((e) => e.eval_type === type && e.status === "completed");
      return ev ? ev.scores.f1_score : null;
    }),
  }));
  return groupedBars("scores", "f1_score against the teacher, per eval type", cats, series,
                     { value: 1, label: "teacher (reference) = 1.0" });
}

function costChart(job) {
  const points = [];
  job.nims.forEach((n, i) => {
    const ev = finalEval(n);
    if (ev && n.cost_per_1k_rows_s) {
      points.push({ x: n.cost_per_1k_rows_s, y: ev.scores.macro_f1, label: shortName(n.model_name),
                    series: i, recommended: n.recommended });
    }
  });
  if (!points.length) return null;
  return scatter("cost", "cost (CPU s per 1k rows) vs macro-F1 against the teacher", points, {
    xLabel: "seconds per 1,000 rows", yLabel: "macro-F1",
    reference: { value: 1, label: "teacher (reference) = 1.0" },
  });
}

function lossChart(job) {
  const series = [];
  for (const n of job.nims) {
    const steps = ((n.customizations || [])[0]?.metrics?.steps || []).filter((p) => p.loss !== null);
    if (steps.length) series.push({ name: shortName(n.model_name), points: steps.map((p) => [p.step, p.loss]) });
  }
  if (!series.length) return null;
  return lines("loss", "training loss per step", series, { xLabel: "step" });
}

// Risk-coverage of each tuned student on eval: agreement with the teacher of its surest
// share, from 10% to all rows; the caption says where the route's threshold put it.
function cascadeChart(job) {
  const tuned = job.nims.filter((n) => n.cascade?.curve?.length);
  if (!tuned.length) return null;
  const series = tuned.map((n) => ({ name: shortName(n.model_name),
    points: n.cascade.curve.map((p) => [Math.round(p.coverage * 100), p.agreement]) }));
  const at = tuned.map((n) => `${shortName(n.model_name)}: ${n.cascade.threshold === null
    ? "teacher answers all" : `student answers ${num(n.cascade.coverage * 100, 0)}% at agreement ${num(n.cascade.agreement)}`}`);
  return lines("cascade", `risk-coverage on eval (route: ${at.join("; ")})`, series,
               { xLabel: "% of requests the student answers", yMax: 1, dots: true });
}

function stageRows(job) {
  const starts = job.nims.flatMap((n) => [n.started_at, ...(n.evaluations || []).map((e) => e.started_at),
    ...(n.customizations || []).map((c) => c.started_at)]).filter(Boolean).map((t) => Date.parse(t));
  const t0 = Math.min(...starts, Date.parse(job.started_at || "") || Infinity);
  const now = Date.now(), rows = [];
  job.nims.forEach((n, i) => {
    const stages = [...(n.evaluations || []).map((e) => [e.eval_type, e]),
                    ...(n.customizations || []).map((c) => ["customization", c])];
    stages.sort((a, b) => Date.parse(a[1].started_at) - Date.parse(b[1].started_at));
    for (const [label, s] of stages) {
      if (!s.started_at) continue;
      const end = s.finished_at ? Date.parse(s.finished_at) : now;
      rows.push({ label: `${shortName(n.model_name)} ${label}`, status: s.status, series: i,
                  start: (Date.parse(s.started_at) - t0) / 1000, end: (end - t0) / 1000 });
    }
  });
  return rows;
}

// -- pages -----------------------------------------------------------------------------------
async function jobsPage(app) {
  const { jobs } = await getJSON("/api/jobs?limit=100");
  const live = await Promise.all(jobs.filter((j) => j.status === "running").map((j) => getJSON(`/api/jobs/${j.id}`)));
  const progress = Object.fromEntries(live.map((d) => [d.id, d.progress]));
  crumbs([]);
  app.innerHTML = `<h1>jobs</h1>
    <table id="jobs"><thead><tr><th>id</th><th>workload</th><th>client</th><th>status</th>
      <th>progress</th><th>started</th><th>finished</th><th>error</th></tr></thead><tbody>
    ${jobs.map((j) => `<tr class="link" data-job="${esc(j.id)}" onclick="location.hash='#/jobs/${esc(j.id)}'">
      <td><code>${esc(j.id)}</code></td>
      <td><a href="#/workloads/${encodeURIComponent(j.workload_id)}" onclick="event.stopPropagation()">${esc(j.workload_id)}</a></td>
      <td>${esc(j.client_id)}</td><td class="${esc(j.status)}">${esc(j.status)}</td>
      <td>${j.status === "running" ? `<progress max="100" value="${progress[j.id] || 0}"></progress> ${num(progress[j.id], 0)}%` : ""}</td>
      <td>${esc(when(j.started_at))}</td><td>${esc(when(j.finished_at))}</td><td>${esc(j.error || "")}</td>
    </tr>`).join("")}</tbody></table>
    ${jobs.length ? "" : `<p class="empty">no jobs yet: <code>findistil jobs create</code></p>`}`;
  return true; // keep polling
}

function scoresTable(job) {
  const rows = job.nims.flatMap((n) => (n.evaluations || []).map((e) => `<tr>
    <td>${esc(shortName(n.model_name))}${n.recommended ? " ★" : ""}</td><td>${esc(e.eval_type)}</td>
    <td class="${esc(e.status)}">${esc(e.status)}</td>
    <td class="num" data-score="f1_score">${num(e.scores?.f1_score)}</td><td class="num">${num(e.scores?.accuracy)}</td>
    <td class="num">${num(e.scores?.macro_f1)}</td><td class="num">${num(e.scores?.rows_per_s, 1)}</td>
    <td>${e.mlflow_uri ? `<a href="${esc(e.mlflow_uri)}">run</a>` : ""}</td><td>${esc(e.error || "")}</td></tr>`));
  return `<table id="scores"><thead><tr><th>candidate</th><th>eval</th><th>status</th><th>f1_score</th>
    <th>accuracy</th><th>macro-F1</th><th>rows/s</th><th>MLflow</th><th>error</th></tr></thead>
    <tbody>${rows.join("")}</tbody></table>`;
}

async function jobPage(app, id) {
  const job = await getJSON(`/api/jobs/${id}`);
  crumbs([[`#/workloads/${encodeURIComponent(job.workload_id)}`, job.workload_id], [`#/jobs/${id}`, `job ${id}`]]);
  const rec = job.recommendation;
  app.innerHTML = `<h1>job <code>${esc(job.id)}</code> <span class="${esc(job.status)}" id="status">${esc(job.status)}</span></h1>
    <p><progress max="100" value="${job.progress || 0}"></progress> ${num(job.progress, 0)}% ·
      ${esc(job.num_records)} records · ${esc(job.workload_id)} / ${esc(job.client_id)}</p>
    ${rec ? `<p class="recommendation" id="recommendation"><b>recommended:</b> ${esc(rec.reason)}</p>` : ""}
    ${(job.warnings || []).map((w) => `<p class="warning">warning: ${esc(w)}</p>`).join("")}
    ${job.error ? `<p class="failed">error: ${esc(job.error)}</p>` : ""}
    ${scoresTable(job)}<div class="grid" id="charts"></div>`;
  const grid = app.querySelector("#charts");
  const add = (fig) => fig && grid.appendChild(fig);
  add(scoresChart(job));
  add(costChart(job));
  add(lossChart(job));
  add(cascadeChart(job));
  const rows = stageRows(job);
  if (rows.length) add(timeline("timeline", "stages per candidate (seconds since the first started)", rows));
  job.nims.forEach((n, i) => {
    const ev = finalEval(n);
    if (!ev?.per_class) return;
    const items = Object.entries(ev.per_class).filter(([, r]) => r.support > 0)
      .map(([label, r]) => ({ label, value: r.f1, support: r.support }));
    add(hBars(`per-class-${i}`, `per-class F1 — ${shortName(n.model_name)} ${ev.eval_type}`, items));
    if (ev.confusion) add(heatmap(`confusion-${i}`, `confusion — ${shortName(n.model_name)} ${ev.eval_type} (rows: teacher, columns: student)`, ev.confusion));
  });
  return !["completed", "failed", "cancelled"].includes(job.status);
}

async function workloadPage(app, workload) {
  const { jobs } = await getJSON(`/api/jobs?workload_id=${encodeURIComponent(workload)}&status=completed&limit=100`);
  const details = await Promise.all(jobs.map((j) => getJSON(`/api/jobs/${j.id}`)));
  crumbs([[`#/workloads/${encodeURIComponent(workload)}`, workload]]);
  const byModel = new Map();
  for (const d of details) {
    for (const n of d.nims) {
      const ev = finalEval(n);
      if (!ev || !d.num_records) continue;
      const name = shortName(n.model_name);
      if (!byModel.has(name)) byModel.set(name, []);
      byModel.get(name).push([d.num_records, ev.scores.macro_f1]);
    }
  }
  const series = [...byModel].map(([name, pts]) => ({ name, points: pts.sort((a, b) => a[0] - b[0]) }));
  app.innerHTML = `<h1>workload ${esc(workload)}</h1><div class="grid" id="charts"></div>
    <table id="workload-jobs"><thead><tr><th>job</th><th>records</th><th>recommended</th><th>finished</th></tr></thead><tbody>
    ${details.map((d) => `<tr class="link" onclick="location.hash='#/jobs/${esc(d.id)}'"><td><code>${esc(d.id)}</code></td>
      <td class="num">${esc(d.num_records)}</td><td>${esc(shortName(d.recommendation?.model_name))}</td>
      <td>${esc(when(d.finished_at))}</td></tr>`).join("")}</tbody></table>`;
  if (series.length) {
    app.querySelector("#charts").appendChild(lines("learning-curve",
      "learning curve: logged records vs macro-F1 against the teacher (final eval of each job)",
      series, { xLabel: "records in the job", yMax: 1, dots: true, xMin: 0 }));
  } else {
    app.querySelector("#charts").innerHTML = `<p class="empty">no completed job of this workload yet</p>`;
  }
  return false;
}

// -- shell -----------------------------------------------------------------------------------
function crumbs(items) {
  document.getElementById("crumbs").innerHTML =
    [["#/", "jobs"], ...items].map(([href, text]) => `<a href="${href}">${esc(text)}</a>`).join(" › ");
}

async function health() {
  try {
    const h = await getJSON("/health");
    document.getElementById("health").textContent =
      `${h.status} · database ${h.database} · runner ${h.runner_kind || ""} ${h.runner} · ${h.workers.length} workers`;
  } catch (err) {
    document.getElementById("health").textContent = `API unreachable: ${err.message}`;
  }
}

async function route() {
  clearTimeout(timer);
  const app = document.getElementById("app");
  const hash = location.hash || "#/";
  let again = false;
  try {
    const job = hash.match(/^#\/jobs\/([0-9a-f]{24})$/);
    const workload = hash.match(/^#\/workloads\/(.+)$/);
    if (job) again = await jobPage(app, job[1]);
    else if (workload) again = await workloadPage(app, decodeURIComponent(workload[1]));
    else again = await jobsPage(app);
    app.dataset.ready = hash;
  } catch (err) {
    if (err instanceof NeedsToken) return tokenForm(app, err.message);
    app.innerHTML = `<p class="failed">could not load ${esc(hash)}: ${esc(err.message)}</p>`;
  }
  if (again) timer = setTimeout(route, 2000);
}

window.addEventListener("hashchange", route);
health();
setInterval(health, 5000);
route();
