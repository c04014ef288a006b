/* qdash charts: processed/failed jobs/s and runtime percentiles from /queues/api/history,
   drawn with uPlot (vendored). The <section class="charts" data-history data-queues> names
   the queues (JSON list): throughput is their sum; runtime shows p50/p90/p99 of one queue, or
   the p99 of each of the first five (the busiest) when there are several.
   Ranges: 5 min, 1 h, 24 h from the per-minute points, 30 days from the per-hour points; a
   point's count divided by its length (60 s or 3600 s) is its jobs/s. Minutes or hours with
   no point had no jobs (0 jobs/s, no runtime). Colours come from the CSS custom properties, so
   the charts follow the light/dark theme. */
(function () {
  "use strict";
  var section = document.querySelector("section.charts[data-history]");
  if (!section || typeof window.uPlot !== "function") return;

  var url = section.getAttribute("data-history");
  var queues = [];
  try { queues = JSON.parse(section.getAttribute("data-queues") || "[]"); } catch (e) { queues = []; }
  if (!queues.length) return;
  var single = queues.length === 1;
  var range = 3600;
  var plots = {};
  var cache = {}; // resolution -> {at: ms, data: [history docs]}
  var CACHE_MS = 30000;
  var fmt = window.qdashFormat;

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }
  var PALETTE = ["--c1", "--c2", "--c3", "--c4", "--c5"];

  function load(resolution) {
    var c = cache[resolution];
    if (c && Date.now() - c.at < CACHE_MS) return Promise.resolve(c.data);
    return Promise.all(queues.map(function (q) {
      // the page may already carry a query (the hub's ?host=): add to it, not after it
      var u = new URL(url, window.location.href);
      u.searchParams.set("queue", q);
      u.searchParams.set("resolution", resolution);
      return fetch(u.href, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : { queue: q, points: [] }; });
    })).then(function (docs) {
      cache[resolution] = { at: Date.now(), data: docs };
      return docs;
    });
  }

  /* One x axis for every series: each period from now - range to now. */
  function build(docs, resolution) {
    var period = resolution === "hour" ? 3600 : 60;
    var now = Date.now() / 1000;
    var end = Math.floor(now / period) * period - period; // the last finished period
    var start = end - Math.ceil(range / period) * period + period;
    var xs = [];
    for (var t = start; t <= end; t += period) xs.push(t);
    var index = {};
    xs.forEach(function (t, i) { index[t] = i; });
    var processed = xs.map(function () { return 0; });
    var failed = xs.map(function () { return 0; });
    var runtime = [];
    docs.forEach(function (doc, qi) {
      var p50 = xs.map(function () { return null; });
      var p90 = p50.slice(), p99 = p50.slice();
      (doc.points || []).forEach(function (p) {
        var i = index[Math.floor(p.t / period) * period];
        if (i === undefined) return;
        processed[i] += p.processed / period;
        failed[i] += p.failed / period;
        if (p.runtime && p.runtime.count) {
          p50[i] = p.runtime.p50; p90[i] = p.runtime.p90; p99[i] = p.runtime.p99;
        }
      });
      if (single) runtime.push(["p50", p50], ["p90", p90], ["p99", p99]);
      else if (qi < PALETTE.length) runtime.push(["p99 " + doc.queue, p99]);
    });
    return { xs: xs, processed: processed, failed: failed, runtime: runtime };
  }

  /* short tick labels: "250 ms", "1.5 s", "0" */
  function tick(unit, v) {
    if (unit !== "seconds") return fmt.rate(v);
    if (!v) return "0";
    if (v < 1e-3) return Math.round(v * 1e6) + " \u00b5s";
    if (v < 1) return +(v * 1e3).toPrecision(3) + " ms";
    return +v.toPrecision(3) + " s";
  }

  function axes(unit) {
    var ink = css("--muted"), grid = css("--line");
    return [
      { stroke: ink, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } },
      {
        stroke: ink, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 70,
        label: unit, labelSize: 20, labelGap: 4,
        values: function (u, vals) { return vals.map(function (v) { return tick(unit, v); }); }
      }
    ];
  }

  function draw(name, series, data, unit) {
    var figure = section.querySelector("[data-chart=" + name + "] .plot");
    if (plots[name]) { plots[name].destroy(); delete plots[name]; }
    var width = Math.max(260, figure.clientWidth || 600);
    var opts = {
      width: width,
      height: 220,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max || 0, unit === "seconds" ? 0.001 : 0.01) * 1.1]; } } },
      axes: axes(unit),
      series: [{}].concat(series)
    };
    plots[name] = new window.uPlot(opts, data, figure);
    figure.setAttribute("data-drawn", String(data[0].length));
  }

  function render() {
    var resolution = range > 86400 ? "hour" : "minute";
    var note = section.querySelector("[data-res]");
    if (note) note.textContent = resolution === "hour" ? "(per-hour average)" : "(per-minute average)";
    return load(resolution).then(function (docs) {
      var d = build(docs, resolution);
      var fmtRate = function (u, v) { return v === null || v === undefined ? "\u2014" : fmt.rate(v); };
      draw("rate", [
        { label: "processed", stroke: css("--accent"), width: 2, fill: css("--accent-fill"), value: fmtRate },
        { label: "failed", stroke: css("--bad"), width: 2, value: fmtRate }
      ], [d.xs, d.processed, d.failed], "jobs/s");
      var fmtDur = function (u, v) { return v === null || v === undefined ? "\u2014" : fmt.duration(v); };
      draw("runtime", d.runtime.map(function (s, i) {
        return { label: s[0], stroke: css(PALETTE[i % PALETTE.length]), width: 2, value: fmtDur, spanGaps: false };
      }), [d.xs].concat(d.runtime.map(function (s) { return s[1]; })), "seconds");
      section.setAttribute("data-state", "drawn");
    }).catch(function () {
      section.setAttribute("data-state", "error");
    });
  }

  var buttons = section.querySelectorAll("[data-range]");
  Array.prototype.forEach.call(buttons, function (b) {
    b.addEventListener("click", function () {
      range = parseInt(b.getAttribute("data-range"), 10);
      Array.prototype.forEach.call(buttons, function (o) { o.setAttribute("aria-pressed", String(o === b)); });
      render();
    });
  });
  var dark = null;
  document.addEventListener("qdash:theme", function (e) {
    var now = !!(e.detail && e.detail.dark);
    if (dark !== null && now !== dark) render(); // colours come from the theme
    dark = now;
  });
  var resizeTimer = null;
  window.addEventListener("resize", function () {
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(function () {
      Object.keys(plots).forEach(function (k) {
        var fig = section.querySelector("[data-chart=" + k + "] .plot");
        plots[k].setSize({ width: Math.max(260, fig.clientWidth), height: 220 });
      });
    }, 150);
  });
  render();
  window.setInterval(function () { cache = {}; render(); }, 60000);
})();
