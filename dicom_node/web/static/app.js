// Live parts of the pages, without a front-end build: an element with data-refresh-url is
// replaced every data-refresh-seconds (default 5) by the HTML fragment the server renders
// at that URL; forms with data-confirm ask before they submit. No inline scripts (CSP).
(function () {
  "use strict";

  function refresh(element) {
    var url = element.getAttribute("data-refresh-url");
    if (!url || document.hidden) { return; }
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401 || response.redirected) { window.location.reload(); return null; }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          element.innerHTML = html;
          element.setAttribute("data-refreshed-at", new Date().toISOString());
        }
      })
      .catch(function () { element.classList.add("stale"); });
  }

  function start() {
    document.querySelectorAll("[data-refresh-url]").forEach(function (element) {
      var seconds = parseFloat(element.getAttribute("data-refresh-seconds") || "5");
      window.setInterval(function () { refresh(element); }, Math.max(1, seconds) * 1000);
    });
    // Delegated, so that forms inside refreshed fragments ask too.
    document.addEventListener("submit", function (event) {
      var form = event.target;
      if (form.matches && form.matches("form[data-confirm]") && !window.confirm(form.getAttribute("data-confirm"))) {
        event.preventDefault();
      }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();

// (area: users) A button with data-copy="element-id" copies that field's value (the new API token page).
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy]") : null;
    if (!button) { return; }
    var field = document.getElementById(button.getAttribute("data-copy"));
    if (!field) { return; }
    field.select();
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(field.value).then(done, function () { document.execCommand("copy"); done(); });
    } else {
      document.execCommand("copy");
      done();
    }
  });
})();
