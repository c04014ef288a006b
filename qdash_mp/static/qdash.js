/* qdash: the live parts of the dashboard pages. Loaded on every page, after htmx and its SSE
   extension; all it does is optional (without it the pages are plain HTML that reloads).

   - theme toggle: light/dark over the system's choice, kept in localStorage (theme.js applies
     it before the first paint);
   - live counters: the page's <div hx-ext="sse" sse-connect=".../api/events"> (htmx's SSE
     extension keeps the one EventSource open and reconnects); its `stats` and `failed`
     events update the cells marked data-k (overview rows by queue, a queue page's facts) and
     the Failed badge. Values are written with textContent, never as HTML;
   - sparklines: per overview row, its last 30 minutes of processed jobs/s (/api/history),
     loaded when the row scrolls into view, refreshed every minute;
   - "since" cells (data-since, UNIX seconds) count up every second.
   CSP: no inline script or style; element styles are never set (classes and attributes only). */
(function () {
  "use strict";

  var root = document.documentElement;

  /* -- formatting (mirrors qdash_mp/web/display.py: num, rate, duration) ------------------- */
  var nf = new Intl.NumberFormat("en-US");
  var rf = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  function num(n) { return nf.format(n); }
  function rate(r) { return rf.format(r); }
  function two(n) { return (n < 10 ? "0" : "") + n; }
  function duration(s) {
    if (s === null || s === undefined) return "\u2014";
    if (s < 1e-3) return nf.format(Math.round(s * 1e6)) + " \u00b5s";
    if (s < 1) return new Intl.NumberFormat("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 }).format(s * 1e3) + " ms";
    if (s < 60) return rf.format(s) + " s";
    var m = Math.floor(s / 60), sec = Math.floor(s) % 60;
    if (m < 60) return m + "m " + two(sec) + "s";
    return Math.floor(m / 60) + "h " + two(m % 60) + "m";
  }
  window.qdashFormat = { num: num, rate: rate, duration: duration };

  /* -- theme ------------------------------------------------------------------------------ */
  var KEY = "qdash-theme";
  var media = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  function systemDark() { return !!(media && media.matches); }
  function isDark() {
    var t = root.getAttribute("data-theme");
    return t ? t === "dark" : systemDark();
  }
  function themeChanged() {
    var btn = document.getElementById("theme-toggle");
    if (btn) btn.setAttribute("aria-pressed", String(isDark()));
    document.dispatchEvent(new CustomEvent("qdash:theme", { detail: { dark: isDark() } }));
  }
  function setupTheme() {
    var btn = document.getElementById("theme-toggle");
    if (!btn) return;
    btn.hidden = false;
    btn.textContent = "Dark mode";
    btn.addEventListener("click", function () {
      var want = !isDark();
      try {
        if (want === systemDark()) {
          root.removeAttribute("data-theme"); // back to following the system
          window.localStorage.removeItem(KEY);
        } else {
          root.setAttribute("data-theme", want ? "dark" : "light");
          window.localStorage.setItem(KEY, want ? "dark" : "light");
        }
      } catch (e) {
        root.setAttribute("data-theme", want ? "dark" : "light");
      }
      themeChanged();
    });
    if (media && media.addEventListener) media.addEventListener("change", themeChanged);
    themeChanged();
  }

  /* -- live counters ---------------------------------------------------------------------- */
  function setText(el, text) {
    if (el.textContent !== text) {
      el.textContent = text;
      el.classList.remove("changed");
      void el.offsetWidth; // restart the highlight
      el.classList.add("changed");
    }
  }

  function value(stat, key) {
    switch (key) {
      case "p50": return duration(stat.runtime ? stat.runtime.p50 : null);
      case "p99": return duration(stat.runtime ? stat.runtime.p99 : null);
      case "rate": return rate(stat.throughput || 0);
      default: return num(stat[key] || 0);
    }
  }

  /* sparklines: a queue's processed jobs/s per minute over the last 30 minutes, from
     /api/history, fetched for a row when it scrolls into view and again every minute */
  var SPARK_MINUTES = 30;
  var SVG = "http://www.w3.org/2000/svg";

  function drawSpark(cell, rates) {
    var svg = cell.querySelector("svg");
    if (!svg) {
      svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 " + (SPARK_MINUTES - 1) + " 20");
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("class", "spark");
      svg.setAttribute("role", "img");
      svg.appendChild(document.createElementNS(SVG, "title"));
      svg.appendChild(document.createElementNS(SVG, "polyline"));
      cell.appendChild(svg);
    }
    var max = Math.max.apply(null, rates.concat([1e-9]));
    var pts = rates.map(function (r, i) { return i + "," + (19 - (r / max) * 18).toFixed(1); });
    svg.lastChild.setAttribute("points", pts.join(" "));
    svg.firstChild.textContent = "processed jobs/s per minute, last " + SPARK_MINUTES +
      " minutes: peak " + rate(max > 1e-6 ? max : 0) + ", latest " + rate(rates[rates.length - 1]);
  }

  function loadSpark(url, queue, cell) {
    var u = new URL(url, window.location.href); // may already carry ?host= (the hub)
    u.searchParams.set("queue", queue);
    u.searchParams.set("resolution", "minute");
    return fetch(u.href, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (doc) {
        if (!doc) return;
        var end = Math.floor(Date.now() / 60000) * 60 - 60; // the last finished minute
        var rates = [];
        var byT = {};
        doc.points.forEach(function (p) { byT[p.t] = p.processed / 60; });
        for (var t = end - (SPARK_MINUTES - 1) * 60; t <= end; t += 60) rates.push(byT[t] || 0);
        drawSpark(cell, rates);
      })
      .catch(function () { /* the table still has its numbers */ });
  }

  function setupSparks() {
    var table = document.getElementById("queues");
    var url = table && table.getAttribute("data-history");
    if (!url || !window.IntersectionObserver) return;
    var ov = overviewTable(table);
    if (ov.spark < 0) return;
    var shown = new Map(); // cell -> queue, while visible
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        var queue = e.target.getAttribute("data-spark-queue");
        if (e.isIntersecting) {
          if (!shown.has(e.target)) loadSpark(url, queue, e.target);
          shown.set(e.target, queue);
        } else {
          shown.delete(e.target);
        }
      });
    });
    Object.keys(ov.rows).forEach(function (q) {
      var cell = ov.rows[q].children[ov.spark];
      if (!cell) return;
      cell.setAttribute("data-spark-queue", q);
      io.observe(cell);
    });
    window.setInterval(function () {
      shown.forEach(function (queue, cell) { loadSpark(url, queue, cell); });
    }, 60000);
  }

  function updateCells(container, stat) {
    var cells = container.querySelectorAll("[data-k]");
    for (var i = 0; i < cells.length; i++) {
      setText(cells[i], value(stat, cells[i].getAttribute("data-k")));
    }
  }

  /* overview: the column keys come from the header cells (data-k), rows are found by the
     data-queue of their link */
  var overview = null;
  function overviewTable(table) {
    if (overview) return overview;
    var keys = [];
    var heads = table.querySelectorAll("thead th");
    for (var i = 0; i < heads.length; i++) keys.push(heads[i].getAttribute("data-k"));
    var rows = {};
    var links = table.querySelectorAll("tbody a[data-queue]");
    for (var j = 0; j < links.length; j++) {
      rows[links[j].getAttribute("data-queue")] = links[j].closest("tr");
    }
    overview = { keys: keys, rows: rows, spark: keys.indexOf("spark") };
    return overview;
  }

  function updateRow(tr, keys, stat) {
    var cells = tr.children;
    for (var i = 0; i < keys.length && i < cells.length; i++) {
      if (keys[i] && keys[i] !== "spark") setText(cells[i], value(stat, keys[i]));
    }
  }

  function onStats(doc) {
    var table = document.getElementById("queues");
    if (table) {
      var ov = overviewTable(table);
      var unknown = 0;
      doc.queues.forEach(function (q) {
        var tr = ov.rows[q.queue];
        if (!tr) { unknown++; return; }
        updateRow(tr, ov.keys, q);
      });
      var foot = table.querySelector("tfoot tr");
      if (foot) {
        var t = Object.assign({}, doc.totals);
        t.throughput = doc.queues.reduce(function (a, q) { return a + (q.throughput || 0); }, 0);
        updateRow(foot, ov.keys, t);
      }
      var note = document.getElementById("new-queues");
      if (note) {
        note.hidden = unknown === 0;
        var n = note.querySelector("[data-count]");
        if (n) n.textContent = num(unknown) + (unknown === 1 ? " new queue" : " new queues");
      }
    }
    var one = document.querySelector("[data-queue-page]");
    if (one) {
      var name = one.getAttribute("data-queue-page");
      doc.queues.forEach(function (q) { if (q.queue === name) updateCells(one, q); });
    }
    var stamp = document.getElementById("live-at");
    if (stamp) {
      stamp.textContent = "live, updated " + new Date().toLocaleTimeString();
      stamp.setAttribute("data-state", "live");
    }
  }

  function onFailed(doc) {
    var link = document.querySelector(".topbar nav a[data-nav=failed]");
    if (!link) return;
    var badge = link.querySelector(".badge");
    if (!doc.count) { if (badge) badge.remove(); return; }
    if (!badge) {
      badge = document.createElement("span");
      badge.className = "badge";
      link.appendChild(document.createTextNode(" "));
      link.appendChild(badge);
    }
    badge.textContent = num(doc.count);
    document.dispatchEvent(new CustomEvent("qdash:failed", { detail: doc }));
  }

  document.addEventListener("htmx:sseMessage", function (e) {
    var m = e.detail;
    if (!m || typeof m.data !== "string") return;
    var doc;
    try { doc = JSON.parse(m.data); } catch (err) { return; }
    if (m.type === "stats") onStats(doc);
    else if (m.type === "failed") onFailed(doc);
  });
  document.addEventListener("htmx:sseError", function () {
    var stamp = document.getElementById("live-at");
    if (stamp) { stamp.textContent = "reconnecting\u2026"; stamp.setAttribute("data-state", "down"); }
  });

  /* -- "since" cells ---------------------------------------------------------------------- */
  function tickSince() {
    var now = Date.now() / 1000;
    var cells = document.querySelectorAll("[data-since]");
    for (var i = 0; i < cells.length; i++) {
      var t = parseFloat(cells[i].getAttribute("data-since"));
      if (!isNaN(t)) cells[i].textContent = duration(Math.max(0, now - t));
    }
  }

  function start() {
    setupTheme();
    setupSparks();
    if (document.querySelector("[data-since]")) { tickSince(); }
    window.setInterval(tickSince, 1000);
    document.addEventListener("htmx:afterSwap", function () { overview = null; tickSince(); });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
