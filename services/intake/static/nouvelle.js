/* The need form, with JavaScript: "Qui recevra la demande ?" follows the category and postal code as the desk types
   (the "Vérifier" button does the same without it), and a "Vouliez-vous dire" suggestion fills the field in place
   instead of sending the form again. */
(function () {
  "use strict";
  var region = document.getElementById("apercu");
  var category = document.getElementById("category");
  var postalCode = document.getElementById("postal_code");
  if (!region || !category || !postalCode) { return; }
  var url = region.getAttribute("data-preview");
  var timer = null;
  var asked = "";

  function refresh() {
    var query = "thematique=" + encodeURIComponent(category.value) +
      "&code_postal=" + encodeURIComponent(postalCode.value);
    if (query === asked) { return; }
    asked = query;
    fetch(url + "?" + query, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("stopped"); }
        return response.text();
      })
      .then(function (html) {
        if (query === asked) { region.innerHTML = html; }
      })
      .catch(function () { asked = ""; });
  }

  function soon() {
    window.clearTimeout(timer);
    timer = window.setTimeout(refresh, 400);
  }

  category.addEventListener("input", soon);
  category.addEventListener("change", refresh);
  postalCode.addEventListener("input", soon);
  postalCode.addEventListener("change", refresh);

  document.querySelectorAll("input[data-fills]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      event.preventDefault();
      var field = document.getElementById(button.getAttribute("data-fills"));
      field.value = button.value;
      field.focus();
      refresh();
    });
  });
}());
