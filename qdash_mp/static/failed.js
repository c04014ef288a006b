// qdash failed jobs: select-all, the "N new failures" notice, the payload copy button.
// Loaded with script-src 'self' (no inline code, no eval); the pages work without it.
(function () {
  "use strict";

  function selectAll() {
    var all = document.getElementById("select-all");
    if (!all) return;
    var boxes = document.querySelectorAll('input[type="checkbox"][name="ids"]');
    all.hidden = false;
    all.addEventListener("change", function () {
      for (var i = 0; i < boxes.length; i++) boxes[i].checked = all.checked;
    });
  }

  // The list stays as it was shown (it is taken at a snapshot); new failures are counted
  // against that snapshot whenever the shared SSE stream says the failed list changed.
  function newFailures() {
    var note = document.getElementById("new-failures");
    if (!note || !window.EventSource) return;
    var sinceUrl = note.getAttribute("data-since-url");
    var eventsUrl = note.getAttribute("data-events-url");
    if (!sinceUrl || !eventsUrl) return;
    var count = note.querySelector(".count");
    var busy = false;
    var again = false;
    function check() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(sinceUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) {
          if (!r.ok) return;
          var n = parseInt(r.headers.get("X-Total-Count") || "0", 10);
          if (n > 0) {
            count.textContent = String(n);
            note.hidden = false;
          }
        })
        .catch(function () { /* the next event tries again */ })
        .then(function () {
          busy = false;
          if (again) { again = false; check(); }
        });
    }
    var source = new EventSource(eventsUrl);
    source.addEventListener("failed", check);
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function copyButtons() {
    var buttons = document.querySelectorAll(".copy-button[data-copy]");
    for (var i = 0; i < buttons.length; i++) {
      (function (button) {
        var target = document.getElementById(button.getAttribute("data-copy"));
        if (!target) return;
        button.hidden = false;
        button.addEventListener("click", function () {
          var text = target.textContent;
          var done = function () {
            button.textContent = "Copied";
            setTimeout(function () { button.textContent = "Copy"; }, 1500);
          };
          if (navigator.clipboard && navigator.clipboard.writeText) {
            navigator.clipboard.writeText(text).then(done, function () { fallback(target); done(); });
          } else {
            fallback(target);
            done();
          }
        });
      })(buttons[i]);
    }
  }

  function fallback(target) {
    var range = document.createRange();
    range.selectNodeContents(target);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    try { document.execCommand("copy"); } catch (e) { /* selected: the user can copy */ }
  }

  selectAll();
  newFailures();
  copyButtons();
})();
