// Relais ops dashboard: refresh the figures in place, without reloading the page.
// The page is complete without this script; it only fetches the same figures again (/tableau-de-bord/chiffres),
// never while the keyboard focus is inside them, and can be paused (WCAG 2.2.2).
(function () {
  "use strict";
  var region = document.getElementById("chiffres");
  var bar = document.getElementById("actualisation");
  if (!region || !bar || !window.fetch) { return; }
  var seconds = Math.max(5, Number(region.getAttribute("data-refresh")) || 30);
  var source = region.getAttribute("data-source");
  var paused = false;
  var timer = null;

  var button = document.createElement("button");
  button.type = "button";
  button.className = "secondary small";
  var note = document.createElement("span");
  note.className = "meta";
  note.setAttribute("role", "status");
  bar.appendChild(document.createTextNode(" "));
  bar.appendChild(button);
  bar.appendChild(document.createTextNode(" "));
  bar.appendChild(note);

  function label() {
    button.textContent = paused ? "Reprendre la mise à jour automatique" : "Suspendre la mise à jour automatique";
    button.setAttribute("aria-pressed", paused ? "true" : "false");
  }

  function schedule() {
    window.clearTimeout(timer);
    if (!paused) { timer = window.setTimeout(refresh, seconds * 1000); }
  }

  function refresh() {
    if (region.contains(document.activeElement)) { schedule(); return Promise.resolve(false); }
    return fetch(source, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (answer) {
        if (!answer.ok) { throw new Error(String(answer.status)); }
        return answer.text();
      })
      .then(function (html) {
        region.innerHTML = html;
        note.textContent = "";
        region.setAttribute("data-refreshed", String(Date.now()));
        return true;
      })
      .catch(function (error) {
        note.textContent = "Mise à jour impossible (" + error.message + ") : nouvel essai dans " + seconds + " s.";
        return false;
      })
      .then(function (done) { schedule(); return done; });
  }

  button.addEventListener("click", function () {
    paused = !paused;
    label();
    if (paused) { window.clearTimeout(timer); } else { refresh(); }
  });
  window.relaisDashboardRefresh = refresh;  // for the browser tests: refresh now, without waiting
  label();
  schedule();
})();
