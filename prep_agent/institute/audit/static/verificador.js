// The institute's verifier page: checks a difusor's public copy in the browser,
// the way `prep-agent audit` does (prep_agent/institute/audit/check.py):
// status.json -> the release's manifest and its SSHSIG signature, verified with
// WebCrypto against the institute's allowed_signers before anything of the
// manifest is used -> every listed file, its size and SHA-256. Needs the
// difusor's CORS header on its public files (Access-Control-Allow-Origin: *).
"use strict";

(function () {
  var NAMESPACE = "prep-cut";
  var RELEASES = "cortes/";
  var WELL_KNOWN = ".well-known/prep-cut/";
  var WORKERS = 6;
  var FRAME_SETTLE = 1500;  // ms before the frame is read again (as the CLI waits)
  var RELEASE_NAME = /^[0-9A-Za-z_-][0-9A-Za-z._-]*$/;
  var WAIT = 10;  // seconds per GET, headers and body (the CLI's --timeout default)
  var MIN_RSA_BITS = 3072;
  var VERDICTS = {
    intact: "Copia íntegra: el difusor publica exactamente el corte firmado por el Instituto.",
    altered: "Copia alterada: lo publicado no coincide con lo firmado por el Instituto.",
    stale: "Desactualizada: la copia es íntegra pero de un corte anterior al más reciente.",
    unreachable: "Sin respuesta: algunos archivos no pudieron leerse."
  };
  var CURVES = {
    "ecdsa-sha2-nistp256": ["P-256", "SHA-256", 32],
    "ecdsa-sha2-nistp384": ["P-384", "SHA-384", 48],
    "ecdsa-sha2-nistp521": ["P-521", "SHA-512", 66]
  };
  var encoder = new TextEncoder();
  var decoder = new TextDecoder();

  function fail(message) { throw new Error(message); }

  function Reader(bytes) { this.b = bytes; this.p = 0; }
  Reader.prototype.take = function (n) {
    if (this.p + n > this.b.length) { fail("datos truncados"); }
    var out = this.b.subarray(this.p, this.p + n);
    this.p += n;
    return out;
  };
  Reader.prototype.u32 = function () {
    var v = this.take(4);
    return ((v[0] << 24) >>> 0) + (v[1] << 16) + (v[2] << 8) + v[3];
  };
  Reader.prototype.string = function () { return this.take(this.u32()); };
  Reader.prototype.text = function () { return decoder.decode(this.string()); };
  Reader.prototype.end = function () { if (this.p !== this.b.length) { fail("datos sobrantes"); } };

  function concat(parts) {
    var size = parts.reduce(function (n, p) { return n + p.length; }, 0);
    var out = new Uint8Array(size);
    var at = 0;
    parts.forEach(function (p) { out.set(p, at); at += p.length; });
    return out;
  }

  function sshString(bytes) {
    var out = new Uint8Array(4 + bytes.length);
    new DataView(out.buffer).setUint32(0, bytes.length);
    out.set(bytes, 4);
    return out;
  }

  function equal(a, b) {
    if (a.length !== b.length) { return false; }
    for (var i = 0; i < a.length; i++) { if (a[i] !== b[i]) { return false; } }
    return true;
  }

  function base64(text) {
    var bin = atob(text.replace(/\s+/g, ""));
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { out[i] = bin.charCodeAt(i); }
    return out;
  }

  function base64url(bytes) {
    var bin = "";
    bytes.forEach(function (b) { bin += String.fromCharCode(b); });
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function hex(buffer) {
    return Array.from(new Uint8Array(buffer)).map(function (b) {
      return b.toString(16).padStart(2, "0");
    }).join("");
  }

  function unsigned(mpint) {  // an SSH mpint as big-endian magnitude (no sign byte)
    var i = 0;
    while (i < mpint.length - 1 && mpint[i] === 0) { i++; }
    return mpint.subarray(i);
  }

  function fixed(mpint, size) {
    var v = unsigned(mpint);
    if (v.length > size) { fail("entero de firma demasiado largo"); }
    var out = new Uint8Array(size);
    out.set(v, size - v.length);
    return out;
  }

  // --- allowed_signers (OpenSSH): principals [options] keytype base64 [comment] ---

  function glob(pattern, value) {
    var re = "^" + pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$";
    return new RegExp(re).test(value);
  }

  function patternList(list, value) {
    var found = false;
    list.split(",").forEach(function (p) {
      if (p.charAt(0) === "!") { if (glob(p.slice(1), value)) { found = null; } }
      else if (found !== null && glob(p, value)) { found = true; }
    });
    return found === true;
  }

  function signerTime(text) {
    var m = /^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z?)$/i.exec(text);
    if (!m) { fail("fecha inválida en allowed_signers: " + text); }
    var parts = [+m[1], +m[2] - 1, +m[3], +(m[4] || 0), +(m[5] || 0), +(m[6] || 0)];
    return m[7] ? Date.UTC.apply(null, parts) : new Date(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5]).getTime();
  }

  function parseOptions(text) {
    var options = {};
    var re = /([A-Za-z-]+)(?:="([^"]*)")?(?:,|$)/g;
    var m;
    while ((m = re.exec(text)) !== null && m[0] !== "") { options[m[1].toLowerCase()] = m[2] === undefined ? true : m[2]; }
    return options;
  }

  function parseAllowedSigners(text) {
    var signers = [];
    text.split(/\r?\n/).forEach(function (raw) {
      var line = raw.trim();
      if (!line || line.charAt(0) === "#") { return; }
      var tokens = line.match(/(?:[^\s"]+|"[^"]*")+/g) || [];
      var at = tokens.findIndex(function (t, i) { return i > 0 && /^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa)$/.test(t); });
      if (at < 1 || at + 1 >= tokens.length) { return; }
      var options = at > 1 ? parseOptions(tokens.slice(1, at).join(" ")) : {};
      if (options["cert-authority"]) { return; }
      signers.push({ blob: base64(tokens[at + 1]), options: options, principals: tokens[0] });
    });
    return signers;
  }

  function trustedNow(signer, now) {
    var o = signer.options;
    if (typeof o.namespaces === "string" && !patternList(o.namespaces, NAMESPACE)) { return false; }
    if (typeof o["valid-after"] === "string" && now < signerTime(o["valid-after"])) { return false; }
    if (typeof o["valid-before"] === "string" && now > signerTime(o["valid-before"])) { return false; }
    return true;
  }

  // --- SSHSIG (PROTOCOL.sshsig), prep-cut-v1 §3 ---

  function parseArmored(text) {
    var re = /-----BEGIN SSH SIGNATURE-----([\s\S]*?)-----END SSH SIGNATURE-----/g;
    var blocks = [];
    var m;
    while ((m = re.exec(text)) !== null) { blocks.push(base64(m[1])); }
    if (!blocks.length || text.replace(re, "").trim() !== "") { fail("archivo de firma mal formado"); }
    return blocks.map(function (blob) {
      var r = new Reader(blob);
      if (decoder.decode(r.take(6)) !== "SSHSIG" || r.u32() !== 1) { fail("no es una firma SSHSIG versión 1"); }
      var sig = { publicKey: r.string(), namespace: r.text(), reserved: r.string(), hash: r.text(), signature: r.string() };
      r.end();
      return sig;
    });
  }

  async function verifyBlock(sig, message) {
    if (sig.namespace !== NAMESPACE) { fail("espacio de nombres " + sig.namespace); }
    var hash = { sha256: "SHA-256", sha512: "SHA-512" }[sig.hash];
    if (!hash) { fail("algoritmo de huella " + sig.hash); }
    var digest = new Uint8Array(await crypto.subtle.digest(hash, message));
    var signed = concat([encoder.encode("SSHSIG"), sshString(encoder.encode(NAMESPACE)),
      sshString(sig.reserved), sshString(encoder.encode(sig.hash)), sshString(digest)]);
    var key = new Reader(sig.publicKey);
    var type = key.text();
    var s = new Reader(sig.signature);
    var sigType = s.text();
    var value = s.string();
    s.end();
    if (type === "ssh-ed25519" && sigType === type) {
      var raw = key.string();
      key.end();
      var ed = await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
      return crypto.subtle.verify({ name: "Ed25519" }, ed, value, signed);
    }
    if (CURVES[type] && sigType === type) {
      var curve = CURVES[type];
      if (key.text() !== type.slice(11)) { fail("curva inconsistente"); }
      var point = key.string();
      key.end();
      var rs = new Reader(value);
      var plain = concat([fixed(rs.string(), curve[2]), fixed(rs.string(), curve[2])]);
      rs.end();
      var ec = await crypto.subtle.importKey("raw", point, { name: "ECDSA", namedCurve: curve[0] }, false, ["verify"]);
      return crypto.subtle.verify({ name: "ECDSA", hash: curve[1] }, ec, plain, signed);
    }
    var rsaHash = { "rsa-sha2-256": "SHA-256", "rsa-sha2-512": "SHA-512" }[sigType];
    if (type === "ssh-rsa" && rsaHash) {
      var e = unsigned(key.string());
      var n = unsigned(key.string());
      key.end();
      var bits = n.length * 8 - Math.clz32(n[0]) + 24;
      if (bits < MIN_RSA_BITS) { fail("llave RSA de " + bits + " bits"); }
      var jwk = { kty: "RSA", n: base64url(n), e: base64url(e), ext: true };
      var rsa = await crypto.subtle.importKey("jwk", jwk, { name: "RSASSA-PKCS1-v1_5", hash: rsaHash }, false, ["verify"]);
      return crypto.subtle.verify({ name: "RSASSA-PKCS1-v1_5" }, rsa, value, signed);
    }
    fail("tipo de llave o de firma no admitido: " + type + " / " + sigType);
  }

  // Distinct trusted keys with a valid signature (prep-cut-v1 §3; threshold 1).
  async function trustedSigners(sigText, message, signers, now) {
    var keys = [];
    var reasons = [];
    var blocks = parseArmored(sigText);
    for (var i = 0; i < blocks.length; i++) {
      var sig = blocks[i];
      var trusted = signers.some(function (t) { return equal(t.blob, sig.publicKey) && trustedNow(t, now); });
      if (!trusted) { reasons.push("llave no confiable"); continue; }
      try {
        if (await verifyBlock(sig, message)) {
          if (!keys.some(function (k) { return equal(k, sig.publicKey); })) { keys.push(sig.publicKey); }
        } else { reasons.push("la firma no corresponde al manifiesto"); }
      } catch (err) { reasons.push(err.message); }
    }
    return { count: keys.length, reasons: reasons };
  }

  // --- bounded reads ---
  // Every GET has one deadline for the whole exchange (headers and body): an
  // AbortController aborts it, which also ends a body still arriving. A body is
  // read through a stream reader and never past `limit` bytes (a listed file's
  // signed size): a huge or endless answer is cut short, not read whole.

  function quotePath(path) { return path.split("/").map(encodeURIComponent).join("/"); }

  async function readAtMost(response, limit) {
    var declared = response.headers.get("Content-Length");
    if (declared !== null && +declared > limit) { return { tooLarge: declared + " bytes (Content-Length)" }; }
    var reader = response.body.getReader();
    var chunks = [];
    var size = 0;
    for (;;) {
      var step = await reader.read();
      if (step.done) { break; }
      size += step.value.length;
      if (size > limit) { reader.cancel().catch(function () {}); return { tooLarge: "más de " + limit + " bytes" }; }
      chunks.push(step.value);
    }
    return { bytes: concat(chunks) };
  }

  // {status, type, bytes} or {tooLarge} (an answer, not the one asked for), or
  // {error, timeout} (no answer: network, CORS, deadline) or {status, error} (not 200).
  async function get(url, limit, wait) {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, wait * 1000);
    try {
      var response = await fetch(url, { cache: "no-store", credentials: "omit", redirect: "error", signal: controller.signal });
      if (response.status !== 200) { return { status: response.status, error: "HTTP " + response.status }; }
      var read = await readAtMost(response, limit);
      read.status = 200;
      read.type = response.headers.get("Content-Type") || "sin tipo";
      return read;
    } catch (err) {
      if (controller.signal.aborted) { return { timeout: true, error: "sin respuesta en " + wait + " s" }; }
      return { error: "no se pudo leer (red o CORS)" };
    } finally {
      clearTimeout(timer);
      controller.abort();  // whatever was not read of the body is not downloaded
    }
  }

  function isHtml(got) {
    if (/^\s*text\/html/i.test(got.type || "")) { return true; }
    var head = decoder.decode(got.bytes.subarray(0, 256)).trim().toLowerCase();
    return head.indexOf("<!doctype html") === 0 || head.indexOf("<html") === 0;
  }

  function describe(got) {  // what an answer that is not the expected one was
    var what = isHtml(got) ? "una página HTML" : "otro contenido";
    return what + " (" + got.type + ", " + got.bytes.length + " bytes)";
  }

  // A GET that brought no usable answer, as `prep-agent audit` classifies it:
  // 4xx but 429 and a body over its limit are an altered copy; the rest, no answer.
  function failure(report, path, expected, got) {
    if (got.tooLarge) { report.add("altered", path, expected, got.tooLarge); return; }
    var missing = got.status >= 400 && got.status < 500 && got.status !== 429;
    report.add(missing ? "altered" : "unreachable", path, "200 OK", got.error);
  }

  // --- the audit ---

  function Report(base) {
    this.base = base;
    this.findings = [];
    this.files = [];
  }
  Report.prototype.add = function (kind, path, expected, got) {
    this.findings.push({ kind: kind, path: path, expected: expected, got: got });
  };
  Report.prototype.verdict = function () {
    var kinds = this.findings.map(function (f) { return f.kind; });
    var order = ["altered", "unreachable", "stale"];
    for (var i = 0; i < order.length; i++) { if (kinds.indexOf(order[i]) >= 0) { return order[i]; } }
    return "intact";
  };

  async function checkFile(report, folder, entry) {
    var path = folder + entry.path;
    var got = await get(report.base + folder + quotePath(entry.path), entry.size, report.wait);
    var row = { path: entry.path, size: entry.size, result: "ok", text: "coincide" };
    if (got.error || got.tooLarge) {
      failure(report, path, entry.size + " bytes", got);
      var missing = got.status >= 400 && got.status < 500 && got.status !== 429;
      row.result = got.tooLarge ? "alterado" : missing ? "falta" : "error";
      row.text = got.tooLarge ? "respuesta de " + got.tooLarge + " en vez de " + entry.size : got.error;
    } else {
      var sha = hex(await crypto.subtle.digest("SHA-256", got.bytes));
      var htmlInstead = isHtml(got) && !/\.html?$/i.test(entry.path);
      if (got.bytes.length !== entry.size) {
        row.result = "alterado";
        row.text = got.bytes.length + " bytes en vez de " + entry.size;
        report.add("altered", path, entry.size + " bytes", got.bytes.length + " bytes");
      } else if (sha !== entry.sha256) {
        row.result = "alterado";
        row.text = "SHA-256 distinta: " + sha;
        report.add("altered", path, "sha256 " + entry.sha256, "sha256 " + sha);
      }
      if (row.result === "alterado" && htmlInstead) {
        row.text = "el difusor respondió " + describe(got) + " en lugar del archivo";
      }
    }
    report.files.push(row);
  }

  // The cut time the frame shows ({shown: text or null}), or {failed: answer}.
  async function frameTime(base, wait) {
    var frame = await get(base, 1024 * 1024, wait);
    if (!frame.bytes) { return { failed: frame }; }
    var shown = /<time id="cut-time" datetime="([^"]*)"/.exec(decoder.decode(frame.bytes));
    return { shown: shown ? shown[1] : null };
  }

  // Whether status.json, read again, names a newer cut signed by the Institute
  // whose cut time the frame shows: a publication during the audit, not an
  // alteration (as the CLI decides). The audited release stays the first one.
  async function publishedMeanwhile(base, m, shown, signers, wait, audited) {
    if (shown === null) { return false; }
    var status = await get(base + "status.json", 65536, wait);
    if (!status.bytes) { return false; }
    var doc = null;
    try { doc = JSON.parse(decoder.decode(status.bytes)); } catch (err) { return false; }
    if (!doc || typeof doc.release !== "string" || doc.release === audited || !RELEASE_NAME.test(doc.release)) { return false; }
    var path = RELEASES + doc.release + "/" + WELL_KNOWN + "manifest.json";
    var manifest = await get(base + path, 32 * 1024 * 1024, wait);
    var sig = await get(base + path + ".sig", 1024 * 1024, wait);
    if (!manifest.bytes || !sig.bytes) { return false; }
    var signed;
    try { signed = await trustedSigners(decoder.decode(sig.bytes), manifest.bytes, signers, Date.now()); }
    catch (err) { return false; }
    if (signed.count < 1) { return false; }
    var newer = JSON.parse(decoder.decode(manifest.bytes));
    return newer.sequence > m.sequence && newer.cut_time === shown;
  }

  async function audit(base, signers, expectSequence, wait) {
    var report = new Report(base);
    report.wait = wait;
    var status = await get(base + "status.json", 65536, wait);
    if (!status.bytes) {
      failure(report, "status.json", "un documento prep-status/1", status);
      return report;
    }
    var doc = null;
    try { doc = JSON.parse(decoder.decode(status.bytes)); } catch (err) { doc = null; }
    if (!doc || doc.format !== "prep-status/1") {
      report.add("altered", "status.json", "un documento prep-status/1", describe(status));
      return report;
    }
    if (typeof doc.release !== "string" || !RELEASE_NAME.test(doc.release)) {
      report.add("altered", "status.json", "un corte publicado", String(doc.release).slice(0, 80));
      return report;
    }
    var folder = RELEASES + doc.release + "/";
    var manifestPath = folder + WELL_KNOWN + "manifest.json";
    var manifest = await get(base + manifestPath, 32 * 1024 * 1024, wait);
    var sig = await get(base + manifestPath + ".sig", 1024 * 1024, wait);
    if (!manifest.bytes) { failure(report, manifestPath, "el manifiesto", manifest); }
    if (!sig.bytes) { failure(report, manifestPath + ".sig", "la firma", sig); }
    if (!manifest.bytes || !sig.bytes) { return report; }
    var signed;
    try { signed = await trustedSigners(decoder.decode(sig.bytes), manifest.bytes, signers, Date.now()); }
    catch (err) { signed = { count: 0, reasons: [err.message] }; }
    if (signed.count < 1) {
      report.add("altered", folder + WELL_KNOWN + "manifest.json.sig", "la firma del Instituto", "firmado por 0/1 llaves confiables (" + signed.reasons.join("; ") + ")");
      return report;
    }
    var m = JSON.parse(decoder.decode(manifest.bytes));  // authentic from here on
    report.sequence = m.sequence;
    report.cutTime = m.cut_time;
    if (doc.sequence !== m.sequence) { report.add("altered", "status.json sequence", String(m.sequence), String(doc.sequence)); }
    if (doc.cut_time !== m.cut_time) { report.add("altered", "status.json cut_time", m.cut_time, String(doc.cut_time)); }
    if (expectSequence && m.sequence < expectSequence) {
      report.add("stale", "status.json", "secuencia " + expectSequence + " o posterior", "secuencia " + m.sequence);
    }
    var frame = await frameTime(base, wait);
    if (frame.shown !== undefined && frame.shown !== m.cut_time) {
      // Servers read the frame apart from status.json: look again once.
      await new Promise(function (done) { setTimeout(done, FRAME_SETTLE); });
      frame = await frameTime(base, wait);
    }
    if (frame.failed) { failure(report, "/ (marco)", "el marco", frame.failed); }
    else if (frame.shown !== m.cut_time && !(await publishedMeanwhile(base, m, frame.shown, signers, wait, doc.release))) {
      report.add("altered", "/ (marco)", "corte " + m.cut_time, frame.shown === null ? "sin hora de corte" : frame.shown);
    }
    var queue = m.files.slice();
    async function worker() {
      while (queue.length) { await checkFile(report, folder, queue.shift()); }
    }
    var workers = [];
    for (var i = 0; i < WORKERS; i++) { workers.push(worker()); }
    await Promise.all(workers);
    report.files.sort(function (a, b) { return a.path < b.path ? -1 : a.path > b.path ? 1 : 0; });
    return report;
  }

  // --- the page ---

  function show(report) {
    var result = document.getElementById("resultado");
    var verdict = report.verdict();
    result.dataset.verdict = verdict;
    result.textContent = VERDICTS[verdict] + (report.sequence ? " Corte " + report.sequence + " (" + report.cutTime + ")." : "");
    var list = document.getElementById("hallazgos");
    list.textContent = "";
    report.findings.forEach(function (f) {
      var li = document.createElement("li");
      li.dataset.path = f.path;
      li.textContent = f.path + ": se esperaba " + f.expected + ", se obtuvo " + f.got;
      list.appendChild(li);
    });
    var table = document.getElementById("archivos");
    var body = table.querySelector("tbody");
    body.textContent = "";
    report.files.forEach(function (row) {
      var tr = document.createElement("tr");
      tr.dataset.path = row.path;
      tr.dataset.result = row.result;
      [row.path, row.size + " bytes", row.text].forEach(function (text) {
        var td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    table.hidden = report.files.length === 0;
  }

  async function run() {
    var result = document.getElementById("resultado");
    var url = document.getElementById("difusor").value.trim();
    if (!/^https?:\/\//.test(url)) { result.textContent = "Escriba la dirección completa del difusor (https://…)."; return; }
    var base = url.replace(/[?#].*$/, "").replace(/\/?$/, "/");
    var expect = parseInt(document.getElementById("secuencia").value, 10) || null;
    var wait = Math.min(Math.max(parseInt(document.getElementById("espera").value, 10) || WAIT, 1), 600);
    result.dataset.verdict = "";
    result.textContent = "Verificando…";
    try {
      var signers = parseAllowedSigners(document.getElementById("llaves").value);
      show(await audit(base, signers, expect, wait));
    } catch (err) {
      result.dataset.verdict = "error";
      result.textContent = "No se pudo verificar: " + err.message;
    }
  }

  async function start() {
    var keys = document.getElementById("llaves");
    try {
      var answer = await fetch("allowed_signers", { cache: "no-store" });
      if (answer.ok && !keys.value) { keys.value = await answer.text(); }
    } catch (err) { /* the keys may be pasted by hand */ }
    document.getElementById("formulario").addEventListener("submit", function (event) {
      event.preventDefault();
      run();
    });
    var params = new URLSearchParams(location.search);
    if (params.get("secuencia")) { document.getElementById("secuencia").value = params.get("secuencia"); }
    if (params.get("espera")) { document.getElementById("espera").value = params.get("espera"); }
    if (params.get("difusor")) {
      document.getElementById("difusor").value = params.get("difusor");
      run();
    }
  }

  start();
}());
