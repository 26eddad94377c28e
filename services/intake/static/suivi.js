/* Live regions of the desk's pages. An element with data-live="URL" is fetched again every
   data-live-every seconds; its content is replaced when the answer's version differs, and polling stops
   when the answer says nothing more will change (or when the session has ended). The pages work without
   this script: the confirmation page then refreshes itself, the others on reload. */
(function () {
  "use strict";

  function follow(region) {
    var url = region.getAttribute("data-live");
    var every = 1000 * (parseFloat(region.getAttribute("data-live-every")) || 10);
    var version = region.getAttribute("data-live-version");

    function later() { window.setTimeout(tick, every); }

    function tick() {
      var focused = document.activeElement;
      if (focused && focused !== document.body && region.contains(focused)) {
        later();  // never pull the content from under the keyboard focus
        return;
      }
      fetch(url, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (!response.ok || response.headers.get("X-Relais-Partiel") !== "1") {
            throw new Error("stopped");  // signed out, or the need is gone: the page stays as it is
          }
          return response.text().then(function (html) {
            var next = response.headers.get("X-Relais-Version");
            if (next !== version) {
              version = next;
              region.innerHTML = html;
              region.setAttribute("data-live-version", next);
            }
            if (response.headers.get("X-Relais-Final") === "1") {
              region.setAttribute("data-live-final", "");
            } else {
              later();
            }
          });
        })
        .catch(function (error) {
          if (error && error.message !== "stopped") { later(); }  // a network hiccup: try again
        });
    }

    if (!region.hasAttribute("data-live-final")) { later(); }
  }

  document.querySelectorAll("[data-live]").forEach(follow);
}());

/* A "print" button, shown only when this script runs (the page says how to print without it). */
(function () {
  "use strict";
  document.querySelectorAll("button[data-print]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () { window.print(); });
  });
}());
