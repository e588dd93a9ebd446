// Loss charts for the dashboard, drawn by the vendored uPlot (uPlot.iife.min.js, v1.6.32, MIT license:
// uPlot.LICENSE beside it), served from /static like every other file here: nothing is fetched from outside.
// The pages are rebuilt on every poll; a chart is not: each one is kept by key and its element moved into
// the new page, with its data replaced only when it changed, so hover, legend and zoom survive the 2 s poll.
// The batch page calls lossChart()/sparkline() while it builds, refresh() calls Charts.sweep() once the
// new page is on screen, which destroys the charts the page no longer shows. h() is app.js's (loaded after).
"use strict";

const Charts = (() => {
  const live = new Map(); // key -> {u, box, shape, sig}
  let used = new Set();
  const color = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const fmtLoss = (u, v) => (v === null || v === undefined ? null : v.toFixed(4)); // null: uPlot shows "--"

  // x runs from the first logged step to the job's total steps, so a curve grows across the chart; a range
  // other than the data's own is a zoom (a drag across the plot), kept as asked
  const xRange = (total) => (u, min, max) => {
    const xs = u.data[0];
    if (xs.length && (min !== xs[0] || max !== xs[xs.length - 1]) && max > min) return [min, max];
    const lo = min ?? 0;
    return [lo, Math.max(max ?? lo, total || 0, lo + 1)];
  };
  const lastPoint = (size, fill) => ({ show: false, size, fill, filter: (u) => (u.data[0].length ? [u.data[0].length - 1] : null) });

  function placeholder(cls, text) {
    return h("div", { class: "chart-none " + cls }, text);
  }

  // the chart under `key`, made by make() when new or when its shape (size, series, x range) changed
  function keep(key, shape, sig, make, data, label) {
    used.add(key);
    let c = live.get(key);
    if (c && c.shape !== shape) { c.u.destroy(); live.delete(key); c = null; }
    if (!c) {
      const box = h("div", { class: "chart", role: "img" });
      c = { u: new uPlot(make(), data, box), box, shape, sig };
      box.uplot = c.u; // for the browser test: the instance behind the canvas
      live.set(key, c);
    } else if (c.sig !== sig) {
      c.u.setData(data);
      c.sig = sig;
    }
    c.box.setAttribute("aria-label", label);
    return c.box;
  }

  function summary(points) {
    const first = points[0][1], last = points[points.length - 1][1];
    return `loss ${first.toFixed(3)} to ${last.toFixed(3)} over ${points.length} steps`;
  }

  // a job row's curve: no axes, no legend, no cursor (the row's click opens the large chart)
  function sparkline(jobId, points, total) {
    if (typeof uPlot === "undefined") return placeholder("spark", "chart library missing");
    if (!points || !points.length) return placeholder("spark", "no loss yet");
    const accent = color("--accent");
    const data = [points.map((p) => p[0]), points.map((p) => p[1])];
    const sig = `${points.length}|${points[points.length - 1].join(",")}`;
    return keep("spark:" + jobId, `spark|${total}`, sig, () => ({
      width: 140, height: 36, padding: [4, 4, 4, 4], legend: { show: false }, cursor: { show: false },
      select: { show: false }, axes: [{ show: false }, { show: false }],
      scales: { x: { time: false, range: xRange(total) } },
      series: [{}, { stroke: accent, width: 1.5, points: lastPoint(5, accent) }],
    }), data, summary(points));
  }

  // the selected job's chart: train loss per step, with the held-out eval loss of the adapter and of the
  // base (measured once, after training) as flat reference lines; the legend shows the values under the cursor
  function lossChart(job, points, width) {
    if (typeof uPlot === "undefined") return placeholder("large", "The chart library (/static/uPlot.iife.min.js) did not load.");
    if (!points || !points.length) return placeholder("large", "no loss yet");
    const ev = job.eval || {};
    const refs = [["eval_loss", "eval loss (held-out)", "--ok", [6, 4]],
      ["base_eval_loss", "base eval loss (held-out)", "--warn", [2, 4]]].filter(([k]) => typeof ev[k] === "number");
    const xs = points.map((p) => p[0]);
    const data = [xs, points.map((p) => p[1]), ...refs.map(([k]) => xs.map(() => ev[k]))];
    const sig = `${points.length}|${points[points.length - 1].join(",")}|${refs.map(([k]) => ev[k]).join(",")}`;
    const accent = color("--accent"), muted = color("--muted"), grid = color("--line");
    const axis = (label) => ({ label, stroke: muted, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 },
      font: "11px system-ui, sans-serif", labelFont: "12px system-ui, sans-serif" });
    const shape = `large|${job.id}|${job.total_steps}|${width}|${refs.map(([k]) => k).join(",")}`;
    return keep("detail", shape, sig, () => ({
      width, height: 220, scales: { x: { time: false, range: xRange(job.total_steps) } },
      axes: [axis("step"), { ...axis("loss"), size: 56 }],
      series: [{ label: "step", value: (u, v) => (v === null || v === undefined ? null : String(v)) },
        { label: "train loss", stroke: accent, width: 2, value: fmtLoss, points: lastPoint(7, accent) },
        ...refs.map(([, label, c, dash]) => ({ label, stroke: color(c), width: 1.5, dash, value: fmtLoss, points: { show: false } }))],
    }), data, summary(points));
  }

  function sweep() {
    for (const [key, c] of live) {
      if (!used.has(key)) { c.u.destroy(); live.delete(key); }
      else if (c.u.syncRect) c.u.syncRect(true); // (charts with a cursor) the page around it was rebuilt: measure the plot again on the next hover
    }
    used = new Set();
  }

  return { sparkline, lossChart, sweep };
})();
