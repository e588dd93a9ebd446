// The adapterfab dashboard: hash routes (#/batches, #/batches/ID, #/cluster, #/registry[/TENANT[/PERSONA/V]]),
// each drawn from the JSON API and redrawn every POLL_MS, so states and loss curves move without a reload.
// Every value goes into the page through textContent/attributes (h() below), never as HTML.
"use strict";

const POLL_MS = 2000;
const REGISTRY_POLL_MS = 10000;
const KEY = "adapterfab.key";
const main = document.getElementById("main");
const curves = {}; // job id -> {key, points, error}: refetched only when the job's step or state changes
let me = null; // /api/whoami
let selected = null; // the job drawn large on the batch page
let timer = null;
let generation = 0; // a response for a page the user already left is dropped
let scrolledFor = null;

class HttpError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

async function api(path) {
  const key = localStorage.getItem(KEY);
  if (!key) throw new HttpError(401, "", "no_key");
  let r;
  try {
    r = await fetch(path, { headers: { Authorization: "Bearer " + key } });
  } catch (e) {
    throw new HttpError(0, "The dashboard server did not answer (" + e.message + "); retrying.", "network");
  }
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: the status says enough */ }
  if (!r.ok) {
    const err = body && body.error;
    throw new HttpError(r.status, (err && err.message) || `${r.status} ${r.statusText}`, err && err.code);
  }
  return body;
}

// formatting ---------------------------------------------------------------------------------------
const pad2 = (n) => String(n).padStart(2, "0");
function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}
function fmtDur(sec) {
  if (sec === null || sec === undefined) return "–";
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return sec + " s";
  if (sec < 3600) return `${Math.floor(sec / 60)} min ${sec % 60} s`;
  return `${Math.floor(sec / 3600)} h ${Math.floor((sec % 3600) / 60)} min`;
}
const fmtNum = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const fmtPct = (x) => (x === null || x === undefined ? "–" : Math.round(x) + "%");
const shortId = (id) => (id ? id.slice(0, 8) : "–");
const badge = (state) => h("span", { class: "badge st-" + String(state).toLowerCase() }, state);
const link = (href, text, external) => (href ? h("a", { href, target: external ? "_blank" : null, rel: external ? "noopener" : null }, text) : null);
const empty = (title, hint) => h("div", { class: "empty" }, h("h2", {}, title), h("p", {}, hint));

function bar(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h("div", { class: "bar", title: label || pct.toFixed(0) + "%" },
    h("div", { class: "fill", style: `width:${pct.toFixed(1)}%` }), h("span", {}, label || pct.toFixed(0) + "%"));
}

function counts(c) {
  return h("span", { class: "counts" }, Object.entries(c).sort().map(([st, n]) => h("span", { class: "count st-" + st.toLowerCase() }, `${n} ${st.toLowerCase()}`)));
}

// loss curves: charts.js (uPlot), fed from each job's MLflow history --------------------------------
async function updateCurves(batchId, jobs) {
  const stale = jobs.filter((j) => j.has_loss_curve && (!curves[j.id] || curves[j.id].key !== `${j.step}|${j.state}`));
  const errors = [];
  await Promise.all(stale.map(async (j) => {
    try {
      const r = await api(`/api/batches/${encodeURIComponent(batchId)}/jobs/${encodeURIComponent(j.id)}/loss`);
      curves[j.id] = { key: `${j.step}|${j.state}`, points: r.points };
    } catch (e) {
      if (e.status === 401) throw e;
      curves[j.id] = { key: null, points: (curves[j.id] || {}).points || [], error: e.message };
      errors.push(`Loss curve of ${j.tenant}/${j.persona}: ${e.message}`);
    }
  }));
  return errors[0] || null;
}

// pages --------------------------------------------------------------------------------------------
async function pageBatches() {
  const { batches } = await api("/api/batches");
  if (!batches.length) {
    return { node: me.role === "operator" ? empty("No batches yet", "Submit one with `adapterfab submit BATCH.yaml`; it appears here within seconds.")
      : empty("No batches yet", "No batch has any of your jobs yet.") };
  }
  const rows = batches.map((b) => h("tr", { "data-batch-id": b.id },
    h("td", {}, h("a", { href: "#/batches/" + encodeURIComponent(b.id) }, b.name), h("div", { class: "muted mono" }, b.id)),
    h("td", {}, badge(b.state)), h("td", {}, counts(b.counts)), h("td", {}, bar(b.progress)),
    h("td", {}, fmtTime(b.started_s)), h("td", {}, fmtTime(b.ended_s)),
    h("td", {}, b.started_s ? fmtDur((b.ended_s || Date.now() / 1000) - b.started_s) : "–"),
    h("td", { class: "num" }, fmtNum(b.gpu_s, 1)), h("td", { class: "num" }, fmtNum(b.cpu_s, 1))));
  return { node: h("section", {}, h("h1", {}, "Batches"),
    h("div", { class: "scroll" }, h("table", { id: "batches" },
      h("thead", {}, h("tr", {}, ["Batch", "State", "Jobs", "Progress", "Started", "Ended", "Duration", "GPU-s", "CPU-s"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows)))) };
}

// the share of the probe facts the base states that the adapter still states (adapterfab/retention.py)
function retentionText(m) {
  if (m.retention_known === undefined) return null;
  if (!Number(m.retention_known)) return "retention: base knows no probe";
  return `retention ${fmtPct(100 * Number(m.retention))} (${Number(m.retention_kept)}/${Number(m.retention_known)})`;
}

function retentionLine(m) {
  const text = retentionText(m);
  return text ? h("div", { class: "muted retention", title: "facts the base states that the adapter still states" }, text) : null;
}

function jobRow(j) {
  const c = curves[j.id] || { points: [] };
  const ev = j.eval;
  const evalCell = ev.eval_loss !== undefined
    ? h("span", { title: "held-out loss: adapter vs base" }, `${fmtNum(ev.eval_loss)} (base ${fmtNum(ev.base_eval_loss)})`,
      ev.eval_token_accuracy !== undefined ? h("div", { class: "muted" }, `token acc ${fmtPct(100 * ev.eval_token_accuracy)}`) : null,
      retentionLine(ev))
    : "–";
  const version = j.model_version ? link(j.links.registry, `v${j.model_version}`) : null;
  return h("tr", { "data-job-id": j.id, class: j.id === selected ? "selected" : null, onclick: () => { selected = j.id; refresh(); } },
    h("td", {}, j.tenant), h("td", {}, j.persona), h("td", {}, j.method), h("td", {}, badge(j.state)),
    h("td", {}, bar(j.progress, `${Math.round(100 * j.progress)}% · ${j.step}/${j.total_steps}`)),
    h("td", {}, j.eta_s !== null ? fmtDur(j.eta_s) : "–"), h("td", { class: "num" }, fmtNum(j.loss)),
    h("td", { title: c.error || "click the row for a larger chart" }, Charts.sparkline(j.id, c.points, j.total_steps)),
    h("td", {}, evalCell),
    h("td", {}, version || "–", j.reused ? h("div", { class: "muted" }, "reused") : null),
    h("td", {}, link(j.links.mlflow_run, "MLflow run", true) || "–"));
}

async function pageBatch(id) {
  const { batch: b, jobs } = await api("/api/batches/" + encodeURIComponent(id));
  const warning = await updateCurves(b.id, jobs);
  const head = h("div", { class: "card" },
    h("h1", {}, b.name, " ", badge(b.state)),
    h("dl", { class: "facts" },
      h("dt", {}, "Batch"), h("dd", { class: "mono" }, b.id),
      h("dt", {}, "Jobs"), h("dd", {}, counts(b.counts)),
      h("dt", {}, "Started"), h("dd", {}, fmtTime(b.started_s)),
      h("dt", {}, "Ended"), h("dd", {}, fmtTime(b.ended_s)),
      h("dt", {}, "Cost"), h("dd", {}, `${fmtNum(b.gpu_s, 1)} GPU-s · ${fmtNum(b.cpu_s, 1)} CPU-s`),
      b.links.mlflow_run ? [h("dt", {}, "MLflow"), h("dd", {}, link(b.links.mlflow_run, "batch run", true))] : null),
    b.error ? h("p", { class: "error-text" }, b.error) : null);
  if (!jobs.length) return { node: h("section", {}, head, empty("No jobs", "This batch has no jobs.")), warning };
  const rows = [];
  for (const j of jobs) {
    rows.push(jobRow(j));
    if (j.error) rows.push(h("tr", { class: "job-error" }, h("td", { colspan: 11 }, h("span", { class: "error-text" }, `${j.tenant}/${j.persona}: ${j.error}`))));
  }
  const sel = jobs.find((j) => j.id === selected) || jobs.find((j) => j.has_loss_curve) || jobs[0];
  const detail = h("div", { class: "card", id: "job-detail" },
    h("h2", {}, `Loss: ${sel.tenant}/${sel.persona}`, " ", badge(sel.state)),
    Charts.lossChart(sel, (curves[sel.id] || {}).points, Math.max(320, main.clientWidth - 82)));
  return { node: h("section", {}, head,
    h("div", { class: "scroll" }, h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["Tenant", "Persona", "Method", "State", "Progress", "ETA", "Loss", "Curve", "Eval loss", "Version", "Links"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows))), detail), warning };
}

function jobsTable(jobs, id) {
  return h("div", { class: "scroll" }, h("table", { id },
    h("thead", {}, h("tr", {}, ["Job", "State", "Node", "Workers", "Per worker", "Fused group", "Progress", "GPU-s"].map((c) => h("th", {}, c)))),
    h("tbody", {}, jobs.map((j) => {
      const p = j.placement || {};
      return h("tr", { "data-job-id": j.id },
        h("td", {}, h("a", { href: "#/batches/" + encodeURIComponent(j.batch_id) }, `${j.tenant}/${j.persona}`)),
        h("td", {}, badge(j.state)), h("td", { class: "mono", title: p.node_id || "" }, shortId(p.node_id)),
        h("td", { class: "num" }, p.workers || "–"), h("td", {}, p.cpus !== undefined ? `${p.cpus} CPU · ${p.gpus || 0} GPU` : "–"),
        h("td", {}, p.fused_group_size ? `${p.fused_group_size} adapters` : "–"),
        h("td", {}, bar(j.progress)), h("td", { class: "num" }, fmtNum(j.gpu_s, 1)));
    }))));
}

async function pageCluster() {
  const c = await api("/api/cluster");
  const onNode = (n) => c.jobs.filter((j) => j.placement && j.placement.node_id === n.node_id).length;
  const parts = [h("h1", {}, "Cluster ", c.links.ray_dashboard ? h("small", {}, link(c.links.ray_dashboard, "Ray dashboard ↗", true)) : null)];
  if (c.error) parts.push(h("p", { class: "error-text card" }, c.error));
  if (c.nodes.length) {
    parts.push(h("div", { class: "scroll" }, h("table", { id: "nodes" },
      h("thead", {}, h("tr", {}, ["Node", "State", "CPUs in use", "GPUs in use", "CPU load", "Memory", "GPU load", "Jobs here"].map((x) => h("th", {}, x)))),
      h("tbody", {}, c.nodes.map((n) => h("tr", { "data-node-id": n.node_id },
        h("td", {}, n.ip || n.node_id || "?", n.head ? h("span", { class: "tag" }, "head") : null, n.ip ? h("div", { class: "muted mono" }, shortId(n.node_id)) : null),
        h("td", {}, badge(n.state)),
        h("td", {}, n.cpus_used !== null ? bar(n.cpus ? n.cpus_used / n.cpus : 0, `${n.cpus_used} / ${n.cpus}`) : `? / ${n.cpus}`),
        h("td", {}, !n.gpus ? "none" : n.gpus_used !== null ? bar(n.gpus_used / n.gpus, `${n.gpus_used} / ${n.gpus}`) : `? / ${n.gpus}`),
        h("td", {}, fmtPct(n.cpu_percent)), h("td", {}, `${fmtPct(n.mem_percent)} of ${n.memory_gb} GB`),
        h("td", {}, n.gpu_util_percent.length ? n.gpu_util_percent.map(fmtPct).join(" · ") : "–"),
        h("td", { class: "num" }, onNode(n))))))));
  } else if (!c.error) parts.push(empty("No nodes", "Ray reports no nodes."));
  parts.push(h("h2", {}, "Running jobs"));
  parts.push(c.jobs.length ? jobsTable(c.jobs, "active-jobs") : empty("Nothing running", "No job is preparing, training or registering right now."));
  if (c.recent_jobs.length) parts.push(h("h2", {}, "Recently finished"), jobsTable(c.recent_jobs, "recent-jobs"));
  return { node: h("section", {}, parts) };
}

async function pageRegistry(tenant, persona, version) {
  const { tenants } = await api(tenant ? "/api/registry/" + encodeURIComponent(tenant) : "/api/registry");
  if (!tenants.length) return { node: empty("No adapters registered yet", "Each job that succeeds registers its adapter as a version here."), pollMs: REGISTRY_POLL_MS };
  const target = persona && version ? `v-${tenant}-${persona}-${version}` : null;
  const sections = tenants.map((t) => h("section", { class: "tenant", "data-tenant": t.tenant },
    h("h2", {}, h("a", { href: "#/registry/" + encodeURIComponent(t.tenant) }, t.tenant), h("span", { class: "muted" }, ` · ${t.adapters.length} persona(s)`)),
    t.adapters.map((a) => h("div", { class: "card" },
      h("h3", {}, a.id, " ", Object.entries(a.aliases).sort().map(([al, v]) => h("span", { class: "tag" }, `${al} → v${v}`))),
      h("div", { class: "scroll" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Version", "Aliases", "Created", "Method", "Eval loss (base)", "Retention", "Decision", "Reason", "Batch", "Links"].map((c) => h("th", {}, c)))),
        h("tbody", {}, a.versions.map((v) => {
          const rid = `v-${t.tenant}-${a.persona}-${v.version}`;
          return h("tr", { id: rid, class: rid === target ? "selected" : null },
            h("td", {}, "v" + v.version), h("td", {}, v.aliases.join(", ") || "–"), h("td", {}, fmtTime(v.created_s)),
            h("td", {}, v.method || "–"),
            h("td", {}, v.metrics.eval_loss !== undefined ? `${fmtNum(v.metrics.eval_loss)} (${fmtNum(v.metrics.base_eval_loss)})` : "–"),
            h("td", {}, retentionText(v.metrics) || "–"),
            h("td", {}, v.decision ? badge(v.decision) : "–"), h("td", { class: "reason" }, v.reason || "–"),
            h("td", {}, v.batch_id ? h("a", { href: "#/batches/" + encodeURIComponent(v.batch_id), class: "mono" }, v.batch_id) : "–"),
            h("td", {}, link(v.links.mlflow_version, "MLflow", true) || "–"));
        }))))))));
  return { node: h("section", {}, h("h1", {}, "Registry"), sections), pollMs: REGISTRY_POLL_MS, scrollTo: target };
}

// shell --------------------------------------------------------------------------------------------
// A malformed escape in the hash ("#/batches/%E0") is taken as written: decodeURIComponent throws on
// it, and route() runs before refresh()'s try, after the poll timer was cleared, so a throw here would
// stop the page from ever refreshing again.
function decodePart(part) {
  try { return decodeURIComponent(part); } catch { return part; }
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodePart);
  return { page: parts[0] || "batches", args: parts.slice(1) };
}

function render(r) {
  if (r.page === "batches") return r.args[0] ? pageBatch(r.args[0]) : pageBatches();
  if (r.page === "cluster") return pageCluster();
  if (r.page === "registry") return pageRegistry(...r.args);
  return Promise.resolve({ node: empty("No such page", "Use the links at the top.") });
}

function setError(msg) {
  const el = document.getElementById("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

function stamp(pollMs) {
  document.getElementById("updated").textContent = `Updated ${fmtTime(Date.now() / 1000).slice(11)} · refreshes every ${pollMs / 1000} s`;
}

function showWho() {
  const el = document.getElementById("whoami");
  el.replaceChildren(me.role === "operator" ? "operator" : `tenant ${me.tenant}`,
    ...(me.links.mlflow ? [" · ", link(me.links.mlflow, "MLflow ↗", true)] : []),
    ...(me.links.ray_dashboard ? [" · ", link(me.links.ray_dashboard, "Ray dashboard ↗", true)] : []));
  document.getElementById("change-key").hidden = false;
}

function showKeyForm(message) {
  const input = h("input", { type: "password", id: "key-input", placeholder: "af_…", autocomplete: "off", required: true });
  main.replaceChildren(h("form", { class: "card keyform", id: "key-form", onsubmit: (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, input.value.trim());
    me = null;
    refresh();
  } },
  h("h2", {}, "Enter an API key"),
  h("p", {}, "An operator key (", h("code", {}, "adapterfab keys create-operator"), ") sees every tenant; a tenant key (",
    h("code", {}, "adapterfab keys create TENANT"), ") sees only that tenant's batches and adapters. The key stays in this browser."),
  message ? h("p", { class: "error-text" }, message) : null,
  input, h("button", { type: "submit" }, "Open")));
  document.getElementById("whoami").textContent = "";
  document.getElementById("change-key").hidden = true;
  Charts.sweep();
  setError(null);
  input.focus();
}

async function refresh() {
  clearTimeout(timer);
  const gen = ++generation;
  const r = route();
  let pollMs = POLL_MS;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === r.page));
  try {
    if (!me) { me = await api("/api/whoami"); showWho(); }
    const view = await render(r);
    if (gen !== generation) return;
    main.replaceChildren(view.node);
    Charts.sweep(); // destroys the charts this page no longer shows
    pollMs = view.pollMs || POLL_MS;
    setError(view.warning || null);
    stamp(pollMs);
    const hereKey = location.hash + "|" + (view.scrollTo || "");
    if (view.scrollTo && scrolledFor !== hereKey) {
      const el = document.getElementById(view.scrollTo);
      if (el) el.scrollIntoView({ block: "center" });
    }
    scrolledFor = hereKey;
  } catch (e) {
    if (gen !== generation) return;
    if (e.status === 401) {
      me = null;
      showKeyForm(e.code === "no_key" ? null : "That key was not accepted: " + e.message);
      return; // no polling until a key is entered
    }
    if (e.status === 404) { main.replaceChildren(empty("Not found", e.message)); Charts.sweep(); setError(null); stamp(pollMs); }
    else setError(e.message); // keep the last good view on screen
  }
  timer = setTimeout(refresh, pollMs);
}

document.getElementById("change-key").addEventListener("click", () => {
  localStorage.removeItem(KEY);
  me = null;
  clearTimeout(timer);
  generation++;
  showKeyForm(null);
});
window.addEventListener("hashchange", () => { selected = null; refresh(); });
refresh();
