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
  var poll = Math.max(5, Number(document.body.getAttribute("data-poll")) || 15) * 1000;

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
    var cut = Date.parse(s.cut_time);
    return serverNow() > cut + s.stale_periods * s.period_seconds * 1000;
  }

  function render(s) {
    var hasCut = s.sequence !== null;
    var state = !hasCut ? "no-cut" : s.final ? "final" : isStale(s) ? "stale" : "current";
    document.body.setAttribute("data-state", state);
    document.body.setAttribute("data-sequence", hasCut ? String(s.sequence) : "");
    el("cut").hidden = !hasCut;
    if (hasCut) {
      var t = el("cut-time");
      t.textContent = formatCut(s.cut_time);
      t.setAttribute("datetime", s.cut_time);
    }
    el("opening").hidden = hasCut;
    el("stale-notice").hidden = state !== "stale";
    el("final-notice").hidden = state !== "final";
    var notice = el("institute-notice");
    notice.hidden = !(s.notice && s.notice.text);
    notice.className = "notice " + (s.notice && s.notice.level === "interrupted" ? "interrupted" : "info");
    notice.textContent = s.notice ? s.notice.text : "";
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

  function check() {
    var req = new XMLHttpRequest();
    req.open("GET", "status.json", true);
    req.setRequestHeader("Cache-Control", "no-cache");
    req.onload = function () {
      var date = Date.parse(req.getResponseHeader("Date") || "");
      var age = Number(req.getResponseHeader("Age")) || 0;
      if (!isNaN(date)) { skewMs = date + age * 1000 - Date.now(); }
      var s = null;
      if (req.status === 200) {
        try { s = JSON.parse(req.responseText); } catch (e) { s = null; }
      }
      if (s && s.release !== latest.release) {
        latest = s;
        swapTo(s);
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
