// prep-agent frame: follows status.json, swaps cuts without reloading the page,
// and decides the interruption notice from the server's clock (Date + Age
// headers) and the signed cut time, so the notice appears even if the agent
// is down while the web server still answers (prep-cut-v1 §6).
"use strict";
(function () {
  var initial = JSON.parse(document.getElementById("initial-status").textContent);
  var shown = initial;       // the status whose cut is on screen
  var latest = initial;      // the newest status received
  var skewMs = 0;            // server clock minus this browser's clock
  var skewKnown = false;     // until the server's clock is known, trust the server's page
  var pending = null;        // release whose entry page is being checked
  var retryTimer = null;     // a pointer retry after a missing release
  // [frame] poll_seconds: at least 1 s (agent/config.py rejects less; a lower
  // number is raised to 1), 15 s when missing or not a positive number.
  var pollSetting = Number(document.body.getAttribute("data-poll"));
  var poll = (pollSetting > 0 ? Math.max(1, Math.floor(pollSetting)) : 15) * 1000;

  function el(id) { return document.getElementById(id); }

  // "2021-06-06T20:30:00-05:00" -> "06/06/2021 20:30 h (UTC-5)", in the cut's own offset.
  function formatCut(text) {
    var m = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2})(?::\d{2}(?:\.\d+)?)?(Z|z|[+-]\d{2}:\d{2})$/.exec(text || "");
    if (!m) { return text || ""; }
    var off = "UTC";
    if (m[6] !== "Z" && m[6] !== "z") {
      var h = Number(m[6].slice(1, 3)), mm = m[6].slice(4, 6);
      off = "UTC" + m[6][0] + h + (mm !== "00" ? ":" + mm : "");
      if (h === 0 && mm === "00") { off = "UTC"; }
    }
    return m[3] + "/" + m[2] + "/" + m[1] + " " + m[4] + ":" + m[5] + " h (" + off + ")";
  }

  function serverNow() { return Date.now() + skewMs; }

  function isStale(s) {
    if (!s || s.sequence === null || s.final) { return false; }
    if (!skewKnown) { return s.state === "stale"; }  // never the reader's own clock (§6)
    var cut = Date.parse(s.cut_time);
    return serverNow() > cut + s.stale_periods * s.period_seconds * 1000;
  }

  // Change the DOM only when a value changes: the notices sit in an aria-live
  // region, and rewriting them every second would make screen readers repeat them.
  function setText(node, text) { if (node.textContent !== text) { node.textContent = text; } }
  function setHidden(node, hidden) { if (node.hidden !== hidden) { node.hidden = hidden; } }
  function setAttr(node, name, value) {
    if (node.getAttribute(name) !== value) { node.setAttribute(name, value); }
  }

  function render(s) {
    var hasCut = s.sequence !== null;
    var state = !hasCut ? "no-cut" : s.final ? "final" : isStale(s) ? "stale" : "current";
    setAttr(document.body, "data-state", state);
    setAttr(document.body, "data-sequence", hasCut ? String(s.sequence) : "");
    setHidden(el("cut"), !hasCut);
    if (hasCut) {
      var t = el("cut-time");
      setText(t, formatCut(s.cut_time));
      setAttr(t, "datetime", s.cut_time);
    }
    var source = el("source");
    if (source) {
      var line = hasCut && s.source && s.source.text ? s.source.text : "";
      setHidden(source, !line);
      setText(source, line);
    }
    setHidden(el("opening"), hasCut);
    setHidden(el("stale-notice"), state !== "stale");
    setHidden(el("final-notice"), state !== "final");
    var notice = el("institute-notice");
    setHidden(notice, !(s.notice && s.notice.text));
    setAttr(notice, "class", "notice " + (s.notice && s.notice.level === "interrupted" ? "interrupted" : "info"));
    setText(notice, s.notice ? s.notice.text : "");
  }

  // Load the new cut in a hidden iframe; show it and its time together.
  function swapTo(s) {
    var main = document.querySelector("main");
    var old = el("publication");
    if (!s.entry || (old && old.getAttribute("src") === s.entry)) { shown = s; render(s); return; }
    var next = document.createElement("iframe");
    next.className = "loading";
    next.title = old ? old.title : "Resultados Electorales Preliminares";
    next.addEventListener("load", function () {
      if (latest !== s) { main.removeChild(next); return; }  // a newer cut won the race
      next.className = "";
      next.id = "publication";
      if (old && old.parentNode) { old.parentNode.removeChild(old); }
      shown = s;
      render(s);
    });
    next.setAttribute("src", s.entry);
    main.appendChild(next);
  }

  // Swap only once the new cut's entry page answers: an origin that published it
  // may have answered status.json while the one asked next does not hold it yet.
  // If it is missing, ask for status.json again a little later (never a 404 page).
  function confirm(s) {
    var req = new XMLHttpRequest();
    req.open("GET", s.entry, true);
    req.onload = function () {
      pending = null;
      if (req.status < 200 || req.status > 299) { retrySoon(); return; }
      if (latest.sequence !== null && s.sequence < latest.sequence) { return; }
      latest = s;
      swapTo(s);
    };
    req.onerror = function () { pending = null; retrySoon(); };
    req.send();
  }

  function retrySoon() {
    if (retryTimer === null) {
      retryTimer = setTimeout(function () { retryTimer = null; check(); }, 2000);
    }
  }

  function check() {
    var req = new XMLHttpRequest();
    req.open("GET", "status.json", true);
    req.setRequestHeader("Cache-Control", "no-cache");
    req.onload = function () {
      var date = Date.parse(req.getResponseHeader("Date") || "");
      var age = Number(req.getResponseHeader("Age")) || 0;
      if (!isNaN(date)) { skewMs = date + age * 1000 - Date.now(); skewKnown = true; }
      var s = null;
      if (req.status === 200) {
        try { s = JSON.parse(req.responseText); } catch (e) { s = null; }
      }
      // Never step back: behind a balancer, origins switch cuts at slightly
      // different moments, and one that has not switched yet may answer next.
      if (s && latest.sequence !== null && (s.sequence === null || s.sequence < latest.sequence)) {
        s = null;
      }
      if (s && s.release !== latest.release) {
        if (pending !== s.release) { pending = s.release; confirm(s); }
      } else if (s && s.release === shown.release) {
        latest = s;
        shown = s;
      }
      render(shown);
    };
    req.onerror = function () { render(shown); };
    req.send();
  }

  render(shown);
  check();
  setInterval(check, poll);
  setInterval(function () { render(shown); }, 1000);
})();
