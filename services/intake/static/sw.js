/* The desk's service worker (docs/offline.md). It keeps a copy of the pages a desk needs with no network (the need
   form, the recent list without names, their styles and scripts) in one cache per signed-in session, and answers
   from it only when the network does not: online, every page comes from the server as usual.

   The page tells it the session ("session" message, with the session's tag from /hors-ligne/cle): the copies of any
   other session are deleted then, and when the desk signs out or lands on the sign-in page. Needs kept offline are
   not here: hors-ligne.js seals them in IndexedDB. */
"use strict";

var PREFIX = "relais-accueil-";
var SHELL = [
  "/nouvelle",
  "/demandes/recentes",
  "/static/relais.css",
  "/scripts/accueil.css",
  "/scripts/nouvelle.js",
  "/scripts/suivi.js",
  "/scripts/hors-ligne.js",
  "/manifest.webmanifest",
  "/scripts/icone-192.png"
];

self.addEventListener("install", function () { self.skipWaiting(); });
self.addEventListener("activate", function (event) { event.waitUntil(self.clients.claim()); });

function ours() {
  return caches.keys().then(function (keys) {
    return keys.filter(function (k) { return k.indexOf(PREFIX) === 0; });
  });
}

function forget(except) {
  return ours().then(function (keys) {
    return Promise.all(keys.filter(function (k) { return k !== except; }).map(function (k) { return caches.delete(k); }));
  });
}

var LIST = "/demandes/recentes";
var LIST_FRESH_MS = 5 * 60 * 1000;

/* The session's copy of each page and file, fetched with the session's cookie when missing (and the recent list when
   older than a few minutes; the pages visited online refresh their own copy); a page that is not the signed-in page
   itself (a redirect to the sign-in page) is not kept. */
function keep(name, paths) {
  return caches.open(name).then(function (cache) {
    return Promise.all(paths.map(function (path) {
      return cache.match(path).then(function (found) {
        var age = found ? Date.now() - Date.parse(found.headers.get("date") || "") : Infinity;
        if (found && (path !== LIST || age < LIST_FRESH_MS)) { return null; }
        return fetch(path, { credentials: "same-origin", cache: "no-store" }).then(function (response) {
          if (!response.ok || response.redirected) { throw new Error("not kept: " + path); }
          return cache.put(path, response);
        });
      });
    }));
  });
}

self.addEventListener("message", function (event) {
  var data = event.data || {};
  var reply = event.ports && event.ports[0];
  var done;
  if (data.type === "session" && /^[0-9a-f]{8,64}$/.test(data.tag || "")) {
    var name = PREFIX + data.tag;
    var extra = (data.files || []).filter(function (p) { return typeof p === "string" && p.charAt(0) === "/"; });
    done = forget(name).then(function () {
      return keep(name, SHELL.concat(extra));
    }).then(function () { return "ready"; });
  } else if (data.type === "end") {
    done = forget(null).then(function () { return "ended"; });
  } else {
    return;
  }
  event.waitUntil(done.then(
    function (state) { if (reply) { reply.postMessage(state); } },
    function () { if (reply) { reply.postMessage("failed"); } }
  ));
});

/* Offline, a page of the desk opens from the session's copy: the form for the form, the recent list for the lists
   and a need's page. */
function copyFor(url, navigate) {
  var path = url.pathname;
  if (!navigate) { return SHELL.indexOf(path) >= 0 || path.indexOf("/static/") === 0 ? path : null; }
  if (path === "/" || path === "/nouvelle") { return "/nouvelle"; }
  if (path === "/demandes" || path.indexOf("/demandes/") === 0) { return "/demandes/recentes"; }
  return null;
}

self.addEventListener("fetch", function (event) {
  var request = event.request;
  var url = new URL(request.url);
  if (request.method !== "GET" || url.origin !== self.location.origin) { return; }
  var navigate = request.mode === "navigate";
  if (navigate && url.pathname.indexOf("/connexion") === 0) {
    event.waitUntil(forget(null));  // signed out, or about to sign in as someone else
    return;
  }
  var copy = copyFor(url, navigate);
  if (copy === null) { return; }
  event.respondWith(fetch(request).then(function (response) {
    if (response.redirected && new URL(response.url).pathname.indexOf("/connexion") === 0) {
      event.waitUntil(forget(null));  // the session ended: its copies go with it
    } else if (response.ok && !response.redirected && url.search === "" && SHELL.indexOf(url.pathname) >= 0) {
      var fresh = response.clone();
      event.waitUntil(ours().then(function (keys) {
        return keys.length === 1 ? caches.open(keys[0]).then(function (c) { return c.put(url.pathname, fresh); }) : null;
      }));
    }
    return response;
  }, function () {
    return ours().then(function (keys) {
      if (keys.length !== 1) { return Response.error(); }
      return caches.open(keys[0]).then(function (cache) { return cache.match(copy); }).then(function (found) {
        return found || Response.error();
      });
    });
  }));
});
