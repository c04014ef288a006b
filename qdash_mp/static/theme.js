/* qdash: apply the stored light/dark choice before the first paint (loaded in <head>).
   No choice stored: the page follows the system (prefers-color-scheme, in qdash.css). */
(function () {
  "use strict";
  try {
    var t = window.localStorage.getItem("qdash-theme");
    if (t === "light" || t === "dark") document.documentElement.setAttribute("data-theme", t);
  } catch (e) { /* storage disabled: follow the system */ }
})();
