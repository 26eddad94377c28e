// Relais ops dashboard: refresh the figures in place, without reloading the page, and draw the charts.
// The page is complete without this script; it only fetches the same figures again (its data-source: .../chiffres),
// never while the keyboard focus is inside them, and can be paused (WCAG 2.2.2).
// Charts: each <figure data-chart> holds its bars as JSON and as a table (open by default: without JavaScript the
// table is the chart). When uPlot (/static/vendor/uplot) is there, its bars are drawn in the figure's aria-hidden
// box and the table folds away; they are drawn again after each refresh and when the window changes width.
(function () {
  "use strict";
  var region = document.getElementById("chiffres");
  var bar = document.getElementById("actualisation");
  if (!region) { return; }

  // --- charts ---

  var plots = [];  // {plot, box} of the charts drawn in the figures shown now
  var measure = document.createElement("canvas").getContext("2d");

  function niceStep(value) {  // 1, 2, 5, 10, 20, 50... at or above value, never below 1: counts have no halves
    if (value <= 1) { return 1; }
    var magnitude = Math.pow(10, Math.floor(Math.log(value) / Math.LN10));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * magnitude >= value) { return steps[i] * magnitude; }
    }
    return 10 * magnitude;
  }

  function heightFor(width) { return Math.round(Math.min(260, Math.max(190, width * 0.34))); }

  function options(chart, width, style) {
    var n = chart.counts.length;
    var highest = Math.max.apply(null, chart.counts.concat([0]));
    var step = niceStep(highest / 4);
    var top = Math.max(step, Math.ceil(highest / step) * step);
    var yTicks = [];
    for (var v = 0; v <= top; v += step) { yTicks.push(v); }
    var xTicks = chart.labels.map(function (_, i) { return i; });
    var size = 13;
    var font = size + "px " + style.font;
    measure.font = font;
    var widest = Math.max.apply(null, chart.labels.map(function (l) { return measure.measureText(l).width; }));
    function fits(u) {  // every label side by side, under its bar?
      return u.bbox.width / (window.devicePixelRatio || 1) / Math.max(1, n) >= widest + 8;
    }
    // Labels that do not fit side by side: a few buckets (each one matters) are slanted; many hours are thinned out.
    function slanted(u) { return n <= 12 && !fits(u); }
    var axis = {stroke: style.ink, font: font, labelFont: "bold " + font, labelSize: size + 8, labelGap: 0,
                ticks: {stroke: style.grid, width: 1, size: 4}, gap: 4};
    return {
      width: width,
      height: heightFor(width),
      legend: {show: false},
      cursor: {show: false},
      select: {show: false},
      scales: {x: {time: false, range: [-0.5, n - 0.5]}, y: {range: [0, top]}},
      series: [{}, {label: chart.y, fill: style.bar, stroke: style.bar, width: 0, points: {show: false},
                    paths: uPlot.paths.bars({size: [0.7, 60], align: 0})}],
      axes: [
        Object.assign({}, axis, {
          label: chart.x, grid: {show: false}, splits: function () { return xTicks; },
          values: function (u, splits) {
            var every = fits(u) || slanted(u) ? 1 : Math.ceil((widest + 8) * n * (window.devicePixelRatio || 1) /
                                                             Math.max(1, u.bbox.width));
            return splits.map(function (i) { return i % every === 0 ? chart.labels[i] : ""; });
          },
          rotate: function (u) { return slanted(u) ? 45 : 0; },
          size: function (u) { return 4 + 4 + Math.ceil(slanted(u) ? (widest + size) * 0.71 : size * 1.4); }
        }),
        Object.assign({}, axis, {
          label: chart.y, size: 44, grid: {stroke: style.grid, width: 1},
          splits: function () { return yTicks; },
          values: function (u, splits) { return splits.map(function (s) { return s.toLocaleString("fr-FR"); }); }
        })
      ]
    };
  }

  function drawCharts(opened) {
    plots.forEach(function (p) { p.plot.destroy(); });
    plots = [];
    if (!window.uPlot) { return; }  // no chart library: the tables stay open, they are the charts
    var css = window.getComputedStyle(region);
    var style = {bar: css.getPropertyValue("--chart-bar").trim() || "#1d3f7a",
                 ink: css.getPropertyValue("--chart-ink").trim() || "#4a4a4a",
                 grid: css.getPropertyValue("--chart-grid").trim() || "#c4c7cc",
                 font: window.getComputedStyle(document.body).fontFamily || "sans-serif"};
    Array.prototype.forEach.call(region.querySelectorAll("figure[data-chart]"), function (figure) {
      var box = figure.querySelector(".chart-plot");
      var chart;
      try { chart = JSON.parse(figure.getAttribute("data-chart")); } catch (error) { return; }
      if (!box || !chart || !chart.counts || !chart.counts.length) { return; }
      var xs = chart.counts.map(function (_, i) { return i; });
      try {
        plots.push({plot: new uPlot(options(chart, box.clientWidth || 320, style), [xs, chart.counts], box), box: box});
      } catch (error) {  // the table stays open: it is the chart
        box.textContent = "";
        if (window.console) { window.console.error(error); }
        return;
      }
      figure.classList.add("chart-drawn");
      var details = figure.querySelector("details");
      if (details) { details.open = Boolean(opened && opened[figure.id]); }  // kept open if the reader opened it
    });
  }

  function openedTables() {  // the drawn charts whose table the reader opened, to keep it open after a refresh
    var opened = {};
    Array.prototype.forEach.call(region.querySelectorAll("figure.chart-drawn details[open]"), function (details) {
      opened[details.parentNode.id] = true;
    });
    return opened;
  }

  var resizing = false;
  window.addEventListener("resize", function () {
    if (resizing) { return; }
    resizing = true;
    window.requestAnimationFrame(function () {
      resizing = false;
      plots.forEach(function (p) {
        var width = p.box.clientWidth;
        if (width && width !== p.plot.width) { p.plot.setSize({width: width, height: heightFor(width)}); }
      });
    });
  });

  drawCharts();
  window.relaisDashboardCharts = function () { return plots.length; };  // for the browser tests

  // --- refresh ---

  if (!bar || !window.fetch) { return; }
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
        var opened = openedTables();
        region.innerHTML = html;
        drawCharts(opened);
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
