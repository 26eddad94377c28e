/* The desk with no network (docs/offline.md).

   - Registers the service worker (/sw.js) and tells it the session, so that the need form and the recent list
     open offline.
   - Offline, "Enregistrer la demande" keeps the need on this computer instead: its fields, with an idempotency key
     of its own, sealed (ECDH P-256 + AES-GCM, WebCrypto) to the session's public key from /hors-ligne/cle, whose
     private half only the server holds, and only while the session lives. IndexedDB holds the sealed bytes, the
     date they were typed and their state; nothing readable.
   - When the network is back (and on every page opened online), each kept need is sent to /hors-ligne/envoyer:
     recorded once (the key), or refused with the form's own messages: then "à corriger", with a button that opens
     it on the form. The menu says "En attente d'envoi (N)".
   The pages work without this script, online. */
(function () {
  "use strict";
  if (!window.indexedDB || !window.crypto || !window.crypto.subtle || !window.fetch) { return; }
  var subtle = window.crypto.subtle;
  var signOut = document.querySelector("form[action='/deconnexion'] input[name='csrf']");
  if (!signOut) { return; }  // not signed in
  var csrf = signOut.value;
  var DB = "relais-accueil";
  var status = document.getElementById("hors-ligne-etat");
  var menu = document.getElementById("en-attente-menu");
  var list = document.getElementById("en-attente");

  // --- the browser's store: "kept" (the sealed needs) and "state" (the session's public key)

  function open() {
    return new Promise(function (resolve, reject) {
      var request = indexedDB.open(DB, 1);
      request.onupgradeneeded = function () {
        request.result.createObjectStore("kept", { keyPath: "id" });
        request.result.createObjectStore("state", { keyPath: "name" });
      };
      request.onsuccess = function () { resolve(request.result); };
      request.onerror = function () { reject(request.error); };
    });
  }

  function run(store, mode, work) {
    return open().then(function (db) {
      return new Promise(function (resolve, reject) {
        var tx = db.transaction(store, mode);
        var result = work(tx.objectStore(store));
        tx.oncomplete = function () { db.close(); resolve(result && "result" in result ? result.result : undefined); };
        tx.onerror = function () { db.close(); reject(tx.error); };
      });
    });
  }

  function allKept() {
    return run("kept", "readonly", function (s) { return s.getAll(); }).then(function (rows) {
      return (rows || []).sort(function (a, b) { return a.created - b.created; });
    });
  }
  function put(row) { return run("kept", "readwrite", function (s) { s.put(row); }); }
  function remove(id) { return run("kept", "readwrite", function (s) { s["delete"](id); }); }

  // --- the session's key: from the server while online, else as last seen

  var asked = null;  // one request for the key per page while online
  var signedOut = false;

  function sessionKey() {
    var stored = run("state", "readonly", function (s) { return s.get("key"); });
    if (!navigator.onLine) { return stored; }
    if (asked) { return asked; }
    asked = fetch("/hors-ligne/cle", { credentials: "same-origin", cache: "no-store" }).then(function (response) {
      if (response.status === 401) {  // the session ended (signed out elsewhere, revoked, expired)
        signedOut = true;
        return null;
      }
      if (!response.ok) { throw new Error("key"); }
      return response.json().then(function (key) {
        var row = { name: "key", tag: key.tag, public_key: key.public_key };
        return run("state", "readwrite", function (s) { s.put(row); }).then(function () { return row; });
      });
    })["catch"](function () {
      asked = null;
      return stored;
    });
    return asked;
  }

  function b64(bytes) {
    var text = "";
    new Uint8Array(bytes).forEach(function (b) { text += String.fromCharCode(b); });
    return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function unb64(text) {
    var raw = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
    return Uint8Array.from(raw, function (c) { return c.charCodeAt(0); });
  }

  function seal(key, fields) {
    var encoder = new TextEncoder();
    var curve = { name: "ECDH", namedCurve: "P-256" };
    var iv = window.crypto.getRandomValues(new Uint8Array(12));
    return Promise.all([
      subtle.importKey("raw", unb64(key.public_key), curve, false, []),
      subtle.generateKey(curve, false, ["deriveKey"])
    ]).then(function (keys) {
      var own = keys[1];
      return subtle.deriveKey({ name: "ECDH", "public": keys[0] }, own.privateKey, { name: "AES-GCM", length: 256 },
        false, ["encrypt"]).then(function (aes) {
        return Promise.all([
          subtle.encrypt({ name: "AES-GCM", iv: iv, additionalData: encoder.encode(key.tag) }, aes,
            encoder.encode(JSON.stringify(fields))),
          subtle.exportKey("raw", own.publicKey)
        ]);
      });
    }).then(function (parts) {
      return { tag: key.tag, epk: b64(parts[1]), iv: b64(iv), ct: b64(parts[0]) };
    });
  }

  // --- what the page shows

  function say(text, links, warn) {
    if (!status) { return; }
    status.textContent = "";
    var p = document.createElement("p");
    p.textContent = text;
    (links || []).forEach(function (link, i) {
      var a = document.createElement("a");
      a.href = link.url;
      a.textContent = link.text;
      p.appendChild(document.createTextNode(i ? ", " : " "));
      p.appendChild(a);
    });
    status.appendChild(p);
    status.className = "notice" + (navigator.onLine && !warn ? " notice-ok" : " notice-warn");
  }

  // "mardi 1 décembre à 10 h 15" in the library's time zone, as the server words dates.
  function when(ms) {
    var parts = {};
    var zone = (list && list.getAttribute("data-timezone")) || undefined;
    new Intl.DateTimeFormat("fr-FR", { timeZone: zone, weekday: "long", day: "numeric", month: "long",
      hour: "numeric", minute: "2-digit", hourCycle: "h23" }).formatToParts(new Date(ms)).forEach(function (p) {
      parts[p.type] = p.value;
    });
    return parts.weekday + " " + parts.day + " " + parts.month + " à " + Number(parts.hour) + " h" +
      (parts.minute !== "00" ? " " + parts.minute : "");
  }

  function fixButton(row) {
    var form = document.createElement("form");
    form.method = "post";
    form.action = "/hors-ligne/corriger";
    [["csrf", csrf], ["tag", row.sealed.tag], ["epk", row.sealed.epk], ["iv", row.sealed.iv], ["ct", row.sealed.ct]]
      .forEach(function (pair) {
        var input = document.createElement("input");
        input.type = "hidden";
        input.name = pair[0];
        input.value = pair[1];
        form.appendChild(input);
      });
    var button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Corriger cette demande";
    button.disabled = !navigator.onLine;
    form.appendChild(button);
    return form;
  }

  function dropButton(row) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = "Supprimer cette demande de l'ordinateur";
    button.addEventListener("click", function () { remove(row.id).then(show); });
    return button;
  }

  var keptCount = 0;

  function show() {
    return allKept().then(function (rows) {
      keptCount = rows.length;
      if (menu) {
        menu.hidden = rows.length === 0;
        menu.querySelector("[data-count]").textContent = String(rows.length);
      }
      if (!list) { return; }
      list.textContent = "";
      var heading = document.getElementById("en-attente-titre");
      if (heading) { heading.textContent = "En attente d'envoi (" + rows.length + ")"; }
      if (!rows.length) {
        var none = document.createElement("p");
        none.textContent = "Aucune demande n'attend d'être envoyée depuis cet ordinateur.";
        list.appendChild(none);
        return;
      }
      var ol = document.createElement("ol");
      ol.className = "cards";
      rows.forEach(function (row) {
        var li = document.createElement("li");
        li.setAttribute("data-state", row.state);
        var title = document.createElement("h3");
        title.textContent = "Demande saisie le " + when(row.created);
        li.appendChild(title);
        var p = document.createElement("p");
        if (row.state === "to_fix") {
          p.innerHTML = "<span class=\"badge badge-late\">À corriger</span> ";
          p.appendChild(document.createTextNode("Relais l'a refusée ; elle n'est pas enregistrée :"));
          li.appendChild(p);
          var ul = document.createElement("ul");
          (row.messages || []).forEach(function (m) {
            var item = document.createElement("li");
            item.textContent = m;
            ul.appendChild(item);
          });
          li.appendChild(ul);
          li.appendChild(fixButton(row));
        } else if (row.state === "unreadable") {
          p.innerHTML = "<span class=\"badge badge-late\">Illisible</span> ";
          p.appendChild(document.createTextNode("Saisie pendant une session terminée (déconnexion ou fin de " +
            "journée) : Relais ne peut plus la lire ni l'envoyer. Saisissez-la de nouveau, puis supprimez-la d'ici."));
          li.appendChild(p);
          li.appendChild(dropButton(row));
        } else {
          p.innerHTML = "<span class=\"badge\">En attente d'envoi</span> ";
          p.appendChild(document.createTextNode("Elle sera envoyée dès le retour du réseau ; le délai de réponse " +
            "commencera quand Relais l'enregistrera."));
          li.appendChild(p);
        }
        ol.appendChild(li);
      });
      list.appendChild(ol);
    });
  }

  // --- keeping a need typed offline

  var form = document.querySelector("form.need-form");
  var keeping = false;
  if (form) {
    form.addEventListener("submit", function (event) {
      if (navigator.onLine) { return; }  // online: the form posts as usual
      event.preventDefault();
      if (event.submitter && event.submitter.name) {  // "Vérifier", a suggestion: they need the server
        say("Hors connexion : Relais ne peut pas vérifier qui recevra la demande. Vous pouvez l'enregistrer quand même : " +
          "elle sera envoyée dès le retour du réseau.", [], true);
        return;
      }
      if (keeping) { return; }  // a double click keeps one need
      var fields = {};
      new FormData(form).forEach(function (value, name) {
        if (name !== "csrf" && typeof value === "string") { fields[name] = value; }
      });
      if (!(fields.category || "").trim() && !(fields.summary || "").trim()) {
        say("Hors connexion : le formulaire est vide, rien n'a été gardé.", [], true);
        return;
      }
      fields.idempotency_key = "hl-" + window.crypto.randomUUID();
      keeping = true;
      sessionKey().then(function (key) {
        if (!key) { throw new Error("no key"); }
        return seal(key, fields);
      }).then(function (sealed) {
        return put({ id: window.crypto.randomUUID(), created: Date.now(), state: "pending", sealed: sealed });
      }).then(function () {
        form.reset();
        say("Hors connexion : la demande est gardée sur cet ordinateur (chiffrée) et sera envoyée dès le retour du " +
          "réseau. Le délai de réponse commencera quand Relais l'enregistrera.");
        status.focus();
        keeping = false;
        return show();
      })["catch"](function () {
        keeping = false;
        say("Hors connexion : la demande n'a pas pu être gardée sur cet ordinateur. Notez-la sur papier et " +
          "saisissez-la au retour du réseau.", [], true);
        status.focus();
      });
    });
  }

  // --- sending what was kept, once the network is back

  var sending = false;

  function send() {
    if (sending || !navigator.onLine) { return Promise.resolve(); }
    sending = true;
    var sent = [];
    var stopped = false;
    var root = document.documentElement;
    root.setAttribute("data-sending", "running");  // for whoever watches (the browser tests)
    return Promise.all([sessionKey(), allKept()]).then(function (found) {
      var key = found[0];
      var rows = found[1].filter(function (r) { return r.state !== "unreadable"; });
      if (!key) {
        stopped = true;
        if (signedOut && found[1].length) {
          say("Votre session est terminée : Relais ne peut plus lire les demandes gardées sur cet ordinateur pendant " +
            "cette session. Reconnectez-vous, puis saisissez-les de nouveau.", [{ url: "/connexion", text: "Se reconnecter" }],
            true);
        }
        return;
      }
      return rows.reduce(function (previous, row) {
        return previous.then(function (go) {
          if (go === false) { return false; }
          if (row.sealed.tag !== key.tag) {
            row.state = "unreadable";
            return put(row);
          }
          return fetch("/hors-ligne/envoyer", {
            method: "POST",
            credentials: "same-origin",
            cache: "no-store",
            headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
            body: JSON.stringify(row.sealed)
          }).then(function (response) {
            return response.json().then(function (answer) {
              if (answer.state === "recorded_before") { return remove(row.id); }  // fixed and recorded on the form
              if (answer.state === "recorded") {
                sent.push({ url: answer.url, text: answer.reference || "la demande" });
                return remove(row.id);
              }
              if (answer.state === "to_fix") {
                row.state = "to_fix";
                row.messages = answer.messages;
                return put(row);
              }
              if (answer.state === "unreadable") {
                row.state = "unreadable";
                return put(row);
              }
              stopped = true;
              return false;  // signed out, or Relais unavailable: try again later
            });
          }, function () {  // the network went away (the server may have recorded it: the key makes a retry safe)
            stopped = true;
            return false;
          });
        });
      }, Promise.resolve(true));
    }).then(function () {
      if (sent.length) {
        say((sent.length === 1 ? "Une demande gardée hors connexion a été envoyée et enregistrée maintenant " :
          sent.length + " demandes gardées hors connexion ont été envoyées et enregistrées maintenant ") +
          "(le délai de réponse part de maintenant) :", sent);
      }
    }, function () { stopped = true; }).then(function () {
      return show();
    }).then(function () {
      sending = false;
      root.setAttribute("data-sending", stopped ? "stopped" : "done");
    });
  }

  function offlineNotice() {
    var preview = document.getElementById("apercu");
    if (!navigator.onLine && preview) {
      preview.textContent = "";
      var line = document.createElement("p");
      line.textContent = "Hors connexion : Relais choisira le partenaire quand il recevra la demande, et le délai " +
        "de réponse commencera à ce moment-là.";
      preview.appendChild(line);
    }
    if (!navigator.onLine) {
      say("Hors connexion : vous pouvez enregistrer des demandes ; elles sont gardées sur cet ordinateur (chiffrées) " +
        "et envoyées dès le retour du réseau.");
    }
  }

  window.addEventListener("online", function () {
    if (status) { status.textContent = ""; status.className = ""; }
    send();
  });
  window.addEventListener("offline", offlineNotice);

  // --- the service worker: the session's copy of the pages

  function register(key) {
    if (!("serviceWorker" in navigator) || !key || !navigator.onLine) { return; }
    navigator.serviceWorker.register("/sw.js").then(function () {
      return navigator.serviceWorker.ready;
    }).then(function (registration) {
      var files = [];
      document.querySelectorAll("link[rel='stylesheet'], script[src]").forEach(function (el) {
        var url = new URL(el.href || el.src, window.location.href);
        if (url.origin === window.location.origin) { files.push(url.pathname); }
      });
      var channel = new MessageChannel();
      channel.port1.onmessage = function (event) {
        document.documentElement.setAttribute("data-hors-ligne", event.data);
      };
      registration.active.postMessage({ type: "session", tag: key.tag, files: files }, [channel.port2]);
    })["catch"](function () { return null; });
  }

  // Signing out ends the session: what it sealed can no longer be read, and the pages' copies go.
  signOut.form.addEventListener("submit", function (event) {
    if (keptCount && !window.confirm(keptCount + (keptCount === 1 ? " demande n'est pas encore envoyée" :
        " demandes ne sont pas encore envoyées") + " : après la déconnexion, Relais ne pourra plus les lire. " +
        "Se déconnecter quand même ?")) {
      event.preventDefault();
      return;
    }
    if (navigator.serviceWorker && navigator.serviceWorker.controller) {
      navigator.serviceWorker.controller.postMessage({ type: "end" });
    }
  });

  offlineNotice();
  show();
  sessionKey().then(function (key) {
    register(key);
    return send();
  });
}());
