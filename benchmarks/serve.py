#!/usr/bin/env python3
"""Serving benchmark: the packaged nginx site, the embedded server, and swaps under load.

One run, one agent daemon (``prep-agent run``, waitress) on a fresh root:

1. nginx. The packaged site (``packaging/nginx``, instantiated with
   ``tests/nginxkit.py`` for a temporary root and port, 127.0.0.1 listed in the
   institute include so ``limit_req``/``limit_conn`` exempt the benchmark client)
   against raw nginx serving the same files with a minimal config (root + alias,
   sendfile, a types block, no access log). A third server, raw nginx plus the
   descriptor cache the shipped site uses (``open_file_cache``), shows what the
   shipped site's own work (access log, limits, headers, gzip, method check) costs
   apart from that cache (no target). All use the same main nginx.conf (nginxkit's:
   ``worker_processes 1``) and run side by side; wrk measures the frame ``/``,
   ``/status.json``, the release's ``index.html`` (~8 KB) and a ~100 KB CSV, the
   servers in turn, several rounds; the median per path is compared (target:
   shipped >= 0.9x raw). Rows with ``Accept-Encoding: gzip`` (browsers
   send it; wrk does not by default) show the shipped site's on-the-fly gzip cost.
2. The embedded server: the same paths against the agent's own listen address
   (req/s and p99; target >= 2,500 req/s for ``status.json``).
3. Swap under load: >= 100 publications (the fake institute of tests/kit.py signs
   each cut with ssh-keygen and delivers it into the drop folder; the next one is
   delivered once the server under test serves it in ``status.json``: nginx caches
   that file's descriptor for 1 s, the embedded server re-checks it every 0.5 s, so
   every cut is on show for a while) while wrk requests
   ``/status.json``, ``/`` and the entry of the latest status it saw, checking every
   body in Lua, and a separate checker process follows the chain a browser follows:
   ``status.json``, then the ``entry`` it names (must be that sequence's page), the
   frame now and then, and each entry URL again after holding it for a while (must
   be the same bytes: releases are immutable and retained, keep_releases 10 and
   keep_replaced_seconds 60).
   Once through the packaged nginx, once through the embedded server.

Every throughput figure is also checked: a Python client fetches each URL once
(200, the body on disk) and wrk's bytes per response must match that response.

Usage: .venv/bin/python -m benchmarks.serve [--quick] [--out FILE] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil

from tests.kit import OFFSET, AgentDaemon, Institute, csv_bytes, free_port, make_config
from tests.nginxkit import Nginx, instantiate, main_conf

WRK = shutil.which("wrk") or "/usr/bin/wrk"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
THREADS = 1
CONNECTIONS = 64
CSV_PATH = "datos/COAH_AYUN_2021.csv"
CSV_ROWS = 4200  # ~100 KB
PAD = 8000  # index.html ~8 KB


@dataclass
class Scale:
    """Durations and counts of one run."""

    seconds: int  # per measured wrk run
    rounds: int  # turns of the three nginx servers per path
    embedded_seconds: int
    gzip_seconds: int
    publications: int  # per swap run
    hold: int  # cuts the checker holds an entry URL for before fetching it again


FULL = Scale(seconds=2, rounds=9, embedded_seconds=8, gzip_seconds=3, publications=110, hold=5)
QUICK = Scale(seconds=1, rounds=1, embedded_seconds=2, gzip_seconds=1, publications=12, hold=5)

# --------------------------------------------------------------------------- wrk scripts

SUMMARY_LUA = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""

SWAP_LUA = r"""
-- Load of a page's life during swaps: status.json, the frame, and the entry named by
-- the newest status.json this thread saw. Every body is checked.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  ok = 0
  non2xx = 0
  codes = ""
  statuses = 0
  frames = 0
  contents = 0
  mixed = 0
  unknown = 0
  sample = ""
  maxseq = -1
  requested = {}
  entry_req = nil
  status_req = wrk.format("GET", "/status.json")
  frame_req = wrk.format("GET", "/")
end

function request()
  n = n + 1
  local k = n % 3
  if k == 0 and entry_req ~= nil then
    return entry_req
  elseif k == 1 then
    return frame_req
  end
  return status_req
end

local function bad(why)
  mixed = mixed + 1
  if #sample < 400 then
    sample = sample .. why .. "; "
  end
end

local function release_ok(rel, seq)
  return rel:sub(1, 17) == string.format("%016d-", seq)
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if #codes < 200 then
      codes = codes .. status .. " "
    end
    return
  end
  ok = ok + 1
  if body:sub(1, 1) == "{" then
    statuses = statuses + 1
    local seq = tonumber(body:match('"sequence": (%d+)'))
    local rel = body:match('"release": "([^"]+)"')
    local ent = body:match('"entry": "([^"]+)"')
    if seq == nil or rel == nil or ent == nil then
      return bad("status.json without sequence/release/entry")
    end
    if not release_ok(rel, seq) or ent ~= "cortes/" .. rel .. "/index.html" then
      return bad("status.json " .. seq .. " names " .. ent)
    end
    if seq > maxseq then
      maxseq = seq
      requested[seq] = true
      entry_req = wrk.format("GET", "/" .. ent)
    end
  elseif body:find('id="initial-status"', 1, true) then
    frames = frames + 1
    local dseq = tonumber(body:match('data%-sequence="(%d+)"'))
    local jseq = tonumber(body:match('"sequence": (%d+)'))
    local src = body:match('<iframe id="publication"[^>]* src="([^"]+)"')
    local rel = src and src:match("^cortes/([^/]+)/index%.html$")
    if dseq == nil or jseq ~= dseq or rel == nil or not release_ok(rel, dseq) then
      return bad("frame " .. tostring(dseq) .. "/" .. tostring(jseq) .. " src " .. tostring(src))
    end
  else
    local c = tonumber(body:match("<h1>Corte (%d+)</h1>"))
    if c == nil then
      unknown = unknown + 1
      return bad("unknown body " .. body:sub(1, 40))
    end
    contents = contents + 1
    if not requested[c] then
      return bad("content of cut " .. c .. " never requested")
    end
  end
end

function done(summary, latency, requests)
  local t = {ok = 0, non2xx = 0, statuses = 0, frames = 0, contents = 0, mixed = 0}
  local codes_all, samples = "", ""
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do
      t[k] = t[k] + thread:get(k)
    end
    codes_all = codes_all .. thread:get("codes")
    samples = samples .. thread:get("sample")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,'
    .. '"ok":%d,"non2xx":%d,"statuses":%d,"frames":%d,"contents":%d,"mixed":%d,'
    .. '"codes":"%s","samples":"%s"}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max,
    t.ok, t.non2xx, t.statuses, t.frames, t.contents, t.mixed,
    codes_all:gsub('"', "'"), samples:gsub('[\\"]', "'")))
end
"""


def wrk_command(url: str, seconds: int, script: Path, headers: tuple[str, ...] = ()) -> list[str]:
    cmd = [WRK, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(script)]
    for h in headers:
        cmd += ["-H", h]
    return [*cmd, url]


def parse_wrk(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            res: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
            res["errors"] = sum(res[k] for k in ("connect", "read", "write", "timeout"))
            return res
    raise SystemExit(f"wrk printed no summary:\n{out}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (nginx: master + worker)."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def run_wrk(
    url: str, seconds: int, script: Path, headers: tuple[str, ...] = (), pid: int | None = None
) -> dict[str, Any]:
    """One wrk run; with ``pid``, also the server's CPU time per response."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    proc = subprocess.run(
        wrk_command(url, seconds, script, headers),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stderr}")
    res = parse_wrk(proc.stdout)
    if pid:
        res["cpu_us"] = (cpu_seconds(pid) - cpu0) / max(1, res["requests"]) * 1e6
    return res


# --------------------------------------------------------------------------- cuts


def cut_files(sequence: int, cut_time: datetime) -> dict[str, bytes]:
    """A small publication: an ~8 KB entry page naming the cut, a ~100 KB stamped CSV."""
    page = f"<!doctype html><title>Corte {sequence}</title><h1>Corte {sequence}</h1>\n"
    return {
        "index.html": (page + "<!--" + "x" * PAD + "-->\n").encode(),
        CSV_PATH: csv_bytes(cut_time, CSV_ROWS),
        "img/logo.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    }


class Publisher:
    """Signs and delivers cuts into the agent's drop folder; waits for each to appear."""

    def __init__(self, institute: Institute, inbox: Path, public: Path) -> None:
        self.institute = institute
        self.inbox = inbox
        self.public = public
        # Cut times hours in the past, 4 cuts per minute (equal cut times are allowed),
        # one hour periods: the page stays "current" during the whole run.
        now = datetime.now(OFFSET).replace(second=0, microsecond=0)
        self.base = now - timedelta(hours=2)
        self.latencies: list[float] = []

    def cut_time(self, sequence: int) -> datetime:
        return self.base + timedelta(minutes=sequence // 4)

    def publish(self, sequence: int, timeout: float = 30.0) -> dict[str, Any]:
        when = self.cut_time(sequence)
        files = cut_files(sequence, when)
        doc = self.institute.manifest(files, sequence, when, period_seconds=3600)
        t0 = time.monotonic()
        self.institute.deliver(self.inbox, files, doc)
        deadline = t0 + timeout
        while True:
            try:
                status: dict[str, Any] = json.loads((self.public / "status.json").read_bytes())
                if status.get("sequence") == sequence:
                    self.latencies.append(time.monotonic() - t0)
                    return status
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"cut {sequence} was not published in {timeout} s")
            time.sleep(0.002)


def wait_served(port: int, sequence: int, timeout: float = 10.0) -> float:
    """Seconds until the server on ``port`` answers ``status.json`` with ``sequence``."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        while True:
            status, body = http_get(conn, "/status.json")
            if status == 200 and json.loads(body).get("sequence") == sequence:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"cut {sequence} not served on port {port} in {timeout} s")
            time.sleep(0.005)
    finally:
        conn.close()


# --------------------------------------------------------------------------- checking


def http_get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def raw_response_size(port: int, path: str, headers: tuple[str, ...] = ()) -> tuple[int, bytes]:
    """Size of the whole response wrk would get (its request, keep-alive) and the body."""
    extra = "".join(f"{h}\r\n" for h in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v)
            for k, _, v in (ln.partition(b":") for ln in lines[1:])
            if k.strip().lower() == b"content-length"
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    if status != 200:
        raise SystemExit(f"GET {path} on port {port}: {status}")
    return len(head) + 4 + length, body


@dataclass
class CheckResult:
    """What the chain checker saw."""

    chains: int = 0
    requests: int = 0
    non2xx: Counter[int] = field(default_factory=Counter)
    mixed: int = 0
    frames: int = 0
    refetches: int = 0
    backwards: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    sequences: set[int] = field(default_factory=set)


def check_chain(port: int, hold: int, stop: Any, results: Any) -> None:
    """A browser's chain: status.json, then its entry; the frame; held entries refetched."""
    res = CheckResult()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    held: deque[tuple[int, str, bytes]] = deque()
    last_seq = -1

    def bad(why: str) -> None:
        res.mixed += 1
        if len(res.samples) < 10:
            res.samples.append(why)

    def get(path: str) -> tuple[int, bytes] | None:
        nonlocal conn
        res.requests += 1
        try:
            status, body = http_get(conn, path)
        except (OSError, http.client.HTTPException) as exc:
            res.errors += 1
            if len(res.samples) < 10:
                res.samples.append(f"{path}: {exc!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            return None
        if not 200 <= status <= 299:
            res.non2xx[status] += 1
            if len(res.samples) < 10:
                res.samples.append(f"{path}: {status}")
            return None
        return status, body

    while not stop.is_set():
        got = get("/status.json")
        if got is None:
            continue
        try:
            doc = json.loads(got[1])
            seq, rel, entry = int(doc["sequence"]), str(doc["release"]), str(doc["entry"])
        except (ValueError, KeyError, TypeError):
            bad(f"status.json unreadable: {got[1][:60]!r}")
            continue
        res.chains += 1
        res.sequences.add(seq)
        if seq < last_seq:
            res.backwards += 1
        last_seq = max(last_seq, seq)
        if not rel.startswith(f"{seq:016d}-") or entry != f"cortes/{rel}/index.html":
            bad(f"status.json {seq}: release {rel} entry {entry}")
            continue
        page = get("/" + entry)
        if page is not None:
            if f"<h1>Corte {seq}</h1>".encode() not in page[1]:
                bad(f"{entry} (cut {seq}) served {page[1][:60]!r}")
            held.append((seq, entry, page[1]))
        if res.chains % 8 == 0:
            frame = get("/")
            if frame is not None:
                res.frames += 1
                text = frame[1].decode()
                fseq = text.partition('data-sequence="')[2].partition('"')[0]
                src = text.partition('<iframe id="publication" title=')[2]
                src = src.partition(' src="')[2].partition('"')[0]
                if not fseq.isdigit() or not src.startswith(f"cortes/{int(fseq):016d}-"):
                    bad(f"frame {fseq} with src {src}")
        if res.chains % 16 == 0:
            csv = get(f"/cortes/{rel}/{CSV_PATH}")
            when = datetime.fromisoformat(doc["cut_time"])
            if csv is not None and csv[1] != csv_bytes(when, CSV_ROWS):
                bad(f"CSV of {rel} is not cut {seq}'s")
        # A page holds its entry URL while newer cuts appear; within keep_releases the
        # URL must still give the same bytes.
        while held and held[0][0] <= last_seq - hold:
            _, url, body = held.popleft()
            again = get("/" + url)
            res.refetches += 1
            if again is not None and again[1] != body:
                bad(f"{url} changed {hold} cuts later")
    conn.close()
    out = res.__dict__ | {"non2xx": dict(res.non2xx), "sequences": len(res.sequences)}
    results.put(out)


@contextlib.contextmanager
def swap_load(url: str, port: int, work: Path, hold: int) -> Iterator[dict[str, Any]]:
    """wrk (swap.lua) and the chain checker running for the duration of the block."""
    script = work / "swap.lua"
    script.write_text(SWAP_LUA)
    ctx = multiprocessing.get_context("fork")
    stop, results = ctx.Event(), ctx.Queue()
    checker = ctx.Process(target=check_chain, args=(port, hold, stop, results), daemon=True)
    out = work / f"swap-{port}.out"
    with open(out, "w") as fh:
        wrk = subprocess.Popen(wrk_command(url, 600, script), stdout=fh, stderr=subprocess.STDOUT)
    checker.start()
    time.sleep(1.0)  # wrk and the checker have seen the current cut
    found: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        yield found
    finally:
        found["seconds"] = time.monotonic() - t0
        time.sleep(1.0)  # and the last one
        stop.set()
        wrk.send_signal(signal.SIGINT)
        try:
            wrk.wait(timeout=20)
        except subprocess.TimeoutExpired:
            wrk.kill()
            wrk.wait()
        found["checker"] = results.get(timeout=30)
        checker.join(timeout=10)
        found["wrk"] = parse_wrk(out.read_text())


# --------------------------------------------------------------------------- nginx


RAW_SITE = """\
server {{
    listen 127.0.0.1:{port};
    access_log off;
    sendfile on;
    tcp_nopush on;
    types {{
        text/html html;
        text/css css;
        text/javascript js;
        application/json json;
        text/csv csv;
        image/svg+xml svg;
    }}
    root {root}/public;
    location /cortes/ {{
        alias {root}/releases/;
    }}
}}
"""


# Raw nginx plus the shipped site's descriptor cache (the shipped site: 1 s on the
# frame and status.json, 60 s on releases; here 1 s on all, the stricter).
RAW_CACHE = """\
    open_file_cache max=20000 inactive=60s;
    open_file_cache_valid 1s;
"""


def raw_nginx(folder: Path, root: Path, cache: bool = False) -> Nginx:
    """nginx with a minimal config serving the same public/ and releases/."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    site = folder / "raw.conf"
    text = RAW_SITE.format(port=port, root=root)
    if cache:
        text = text.replace("    sendfile on;\n", "    sendfile on;\n" + RAW_CACHE)
    site.write_text(text)
    return Nginx(main_conf(folder, site), port)


# --------------------------------------------------------------------------- the run


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return (proc.stdout + proc.stderr).strip().splitlines()[0]

    from importlib.metadata import version

    cpu = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return {
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem} MiB RAM; kernel {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "agent": f"prep-agent {version('prep-agent')}, waitress {version('waitress')}",
        "nginx": first_line([NGINX, "-v"]),
        "wrk": first_line([WRK, "-v"]).split(" Copyright")[0],
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def expected_sizes(port: int, paths: dict[str, str], root: Path) -> dict[str, int]:
    """Response sizes on ``port``, after checking each body against the file on disk."""
    sizes = {}
    for name, path in paths.items():
        size, body = raw_response_size(port, path)
        disk = root / "public" / "index.html" if path == "/" else None
        if path.startswith("/cortes/"):
            disk = root / "releases" / path[len("/cortes/") :]
        elif path != "/":
            disk = root / "public" / path.lstrip("/")
        assert disk is not None
        if body != disk.read_bytes():
            raise SystemExit(f"{name} on port {port} is not {disk}")
        sizes[name] = size
    return sizes


def size_ok(res: dict[str, Any], expected: int) -> bool:
    """wrk's bytes per response match the checked response (within 1 %)."""
    per = res["bytes"] / max(1, res["requests"])
    return bool(abs(per - expected) <= 0.01 * expected)


def nginx_errors(server: Nginx) -> list[str]:
    """[error] and worse lines of the site's error log."""
    path = server.folder / "logs" / "error.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [ln for ln in text.splitlines() if any(f"[{w}]" in ln for w in ("error", "crit"))]


def run(scale: Scale, work: Path) -> dict[str, Any]:
    institute = Institute(work / "institute")
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(work, institute, listen=listen)
    agent = AgentDaemon(work / "prep-agent.conf")
    agent_port = int(listen.rsplit(":", 1)[1])
    publisher = Publisher(institute, config.inbox, config.public)
    summary_lua = work / "summary.lua"
    summary_lua.write_text(SUMMARY_LUA)
    res: dict[str, Any] = {"versions": versions(), "load_start": os.getloadavg()}
    shipped = raw = cached = None
    try:
        agent.start()
        status = publisher.publish(1)
        release = status["release"]
        port = free_port()
        shipped = Nginx(instantiate(work / "nginx", config.root, listen, port), port)
        shipped.start()
        raw = raw_nginx(work / "raw", config.root)
        raw.start()
        cached = raw_nginx(work / "raw-cache", config.root, cache=True)
        cached.start()
        paths = {
            "frame /": "/",
            "/status.json": "/status.json",
            "release index.html (8 KB)": f"/cortes/{release}/index.html",
            "release CSV (100 KB)": f"/cortes/{release}/{CSV_PATH}",
        }
        servers = {"raw": raw, "shipped": shipped, "raw+cache": cached}
        sizes = {k: expected_sizes(s.port, paths, config.root) for k, s in servers.items()}
        sizes["embedded"] = expected_sizes(agent_port, paths, config.root)
        res["paths"] = paths
        res["file_sizes"] = {
            name: len(
                (config.public / "index.html").read_bytes()
                if path == "/"
                else (
                    (config.releases / path[len("/cortes/") :]).read_bytes()
                    if path.startswith("/cortes/")
                    else (config.public / path.lstrip("/")).read_bytes()
                )
            )
            for name, path in paths.items()
        }

        # 1. nginx: shipped vs raw (and raw+cache), in turns, median of the rounds.
        print("1. nginx: shipped site vs raw nginx")
        nginx_runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            name: {kind: [] for kind in servers} for name in paths
        }
        for name, path in paths.items():
            for server in servers.values():
                run_wrk(server.url + path, 1, summary_lua)  # warm-up
            pids = {kind: server.proc.pid for kind, server in servers.items() if server.proc}
            for r in range(scale.rounds):
                # raw and shipped back to back (their ratio per round is the figure),
                # which one first alternating; raw+cache before or after the pair.
                pair = ["raw", "shipped"] if r % 2 == 0 else ["shipped", "raw"]
                order = [*pair, "raw+cache"] if r % 4 < 2 else ["raw+cache", *pair]
                for kind in order:
                    out = run_wrk(
                        servers[kind].url + path, scale.seconds, summary_lua, pid=pids[kind]
                    )
                    out["size_ok"] = size_ok(out, sizes[kind][name])
                    nginx_runs[name][kind].append(out)
                    print(
                        f"   {name:28} {kind:9} {out['rps']:9.0f} req/s, "
                        f"{out['cpu_us']:5.1f} us CPU/response"
                    )
        res["nginx"] = nginx_runs
        gzip_runs: dict[str, dict[str, Any]] = {}
        for name, path in paths.items():
            for kind in ("raw", "shipped"):
                out = run_wrk(
                    servers[kind].url + path,
                    scale.gzip_seconds,
                    summary_lua,
                    ("Accept-Encoding: gzip",),
                    pid=pids[kind],
                )
                gzip_runs[f"{name}|{kind}"] = out
                print(
                    f"   {name:28} {kind:8} {out['rps']:9.0f} req/s, "
                    f"{out['cpu_us']:7.1f} us CPU/response (Accept-Encoding: gzip)"
                )
        res["gzip"] = gzip_runs

        # 2. The embedded server.
        print("2. embedded server (waitress)")
        embedded: dict[str, dict[str, Any]] = {}
        agent_url = f"http://{listen}"
        assert agent.proc is not None
        agent_pid = agent.proc.pid
        for name, path in paths.items():
            run_wrk(agent_url + path, 1, summary_lua)
            out = run_wrk(agent_url + path, scale.embedded_seconds, summary_lua, pid=agent_pid)
            out["size_ok"] = size_ok(out, sizes["embedded"][name])
            embedded[name] = out
            print(
                f"   {name:28} {out['rps']:9.0f} req/s, p99 {out['p99_us'] / 1000:.1f} ms, "
                f"{out['cpu_us']:5.0f} us CPU/response"
            )
        res["embedded"] = embedded

        # 3. Swaps under load.
        seq = 1
        res["swap"] = {}
        for label, url, target_port in (
            ("nginx (shipped site)", shipped.url, shipped.port),
            ("embedded (waitress)", agent_url, agent_port),
        ):
            print(f"3. swap under load through {label}: {scale.publications} publications")
            errors_before = nginx_errors(shipped)
            publisher.latencies = []
            lags: list[float] = []
            with swap_load(url, target_port, work, scale.hold) as found:
                for _ in range(scale.publications):
                    seq += 1
                    publisher.publish(seq)
                    lags.append(wait_served(target_port, seq))
            found["publications"] = len(publisher.latencies)
            found["publish_p50_ms"] = median(publisher.latencies) * 1000
            found["publish_max_ms"] = max(publisher.latencies) * 1000
            found["served_p50_ms"] = median(lags) * 1000
            found["served_max_ms"] = max(lags) * 1000
            found["last_sequence"] = seq
            found["nginx_error_lines"] = nginx_errors(shipped)[len(errors_before) :]
            w, c = found["wrk"], found["checker"]
            print(
                f"   {found['seconds']:.0f} s; wrk {w['rps']:.0f} req/s, {w['non2xx']} non-2xx, "
                f"{w['mixed']} mixed; checker {c['chains']} chains, {c['mixed']} mixed, "
                f"{sum(c['non2xx'].values())} non-2xx"
            )
            res["swap"][label] = found
        res["load_end"] = os.getloadavg()
        res["releases_kept"] = len(list(config.releases.iterdir()))
        res["keep_releases"] = config.keep_releases
        res["keep_replaced_seconds"] = config.keep_replaced_seconds
    finally:
        for nginx in (shipped, raw, cached):
            if nginx is not None:
                nginx.stop()
        res["agent_exit"] = agent.stop()
    return res


# --------------------------------------------------------------------------- report


def fmt_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def report(res: dict[str, Any], scale: Scale, command: str, took: float) -> str:
    v = res["versions"]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sizes = res["file_sizes"]
    lines = [
        "# Serving benchmark (`benchmarks/serve.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"- Date: {date}",
        f"- Machine: {v['machine']}",
        f"- Software: {v['python']}; {v['agent']}; {v['nginx']}; {v['wrk']}",
        f"- Load: `wrk -t{THREADS} -c{CONNECTIONS}` on 127.0.0.1, sharing the 2 cores with "
        "the server; no `Accept-Encoding` unless said (identity bodies).",
        "- nginx: nginxkit's main nginx.conf for both (`worker_processes 1`, "
        "`worker_connections 1024`); the shipped site instantiated by "
        "`tests/nginxkit.instantiate` with **127.0.0.1 listed in the institute include** "
        "(exempt from `limit_req`/`limit_conn`; the limits themselves unchanged) and its "
        "buffered access log on; raw = `root`/`alias`, `sendfile on`, `tcp_nopush on`, a "
        "`types` block, no access log, nothing else; raw+cache = raw plus "
        "`open_file_cache max=20000 inactive=60s; open_file_cache_valid 1s;` (the shipped "
        "site caches descriptors too: 1 s for the frame and status.json, 60 s for "
        "releases), so shipped/raw+cache is the cost of the shipped site's own work "
        "(access log, limits, method check, headers, charset) alone.",
        "- Embedded: `prep-agent run` (waitress, 8 threads) on its own listen address.",
        f"- Files: frame {sizes['frame /']} B, status.json {sizes['/status.json']} B, "
        f"release index.html {sizes['release index.html (8 KB)']} B, "
        f"CSV {sizes['release CSV (100 KB)']} B.",
        f"- nginx figures: {scale.rounds} rounds of {scale.seconds} s runs per path, raw and "
        "shipped back to back in each round (which first alternating), raw+cache before or "
        "after the pair, after a 1 s warm-up each. **shipped/raw** (judged) = the median "
        "over rounds of shipped/raw within the round: this machine's speed drifts by tens of "
        "percent within a minute (the same server's CPU per response moves between 9 and "
        "15 µs), which a ratio of medians taken from different moments does not cancel; "
        "the ratio of medians is shown beside it. Embedded: one "
        f"{scale.embedded_seconds} s run per path after a 1 s warm-up. `bytes ok` = wrk's "
        "bytes per response equal (±1 %) a response checked once for status 200 and the "
        "body on disk. `CPU/resp` = the server's user+system CPU time (nginx: master and "
        "worker; embedded: the agent process) over the run divided by the responses.",
        f"- Load average (1, 5, 15 min) at the start: {fmt_load(res['load_start'])}; at the "
        f"end: {fmt_load(res['load_end'])} (other work on the machine during the run shows "
        "here).",
        "",
        "## 1. Shipped nginx site vs raw nginx (req/s)",
        "",
        "| path | raw | shipped | shipped/raw (median of rounds) | ratio of medians | runs raw "
        "/ shipped | CPU/resp raw / shipped (µs) | raw/shipped CPU (median of rounds) | p99 "
        "raw / shipped (ms) | errors, non-2xx | bytes ok | raw+cache | shipped/raw+cache | "
        "CPU/resp raw+cache (µs) |",
        "|---|---:|---:|---:|---:|---|---|---:|---|---|---|---:|---:|---:|",
    ]
    verdicts: list[tuple[str, bool, str]] = []
    for name, runs in res["nginx"].items():
        raw = median([r["rps"] for r in runs["raw"]])
        ship = median([r["rps"] for r in runs["shipped"]])
        # The machine's speed drifts by tens of percent within a minute: the figure
        # judged is the median over rounds of shipped/raw measured back to back.
        paired = median([s["rps"] / r["rps"] for r, s in zip(runs["raw"], runs["shipped"])])
        paired_cpu = median(
            [r["cpu_us"] / s["cpu_us"] for r, s in zip(runs["raw"], runs["shipped"])]
        )
        rawc = median([r["rps"] for r in runs["raw+cache"]])
        cpu_c = median([r["cpu_us"] for r in runs["raw+cache"]])
        every = runs["raw"] + runs["shipped"] + runs["raw+cache"]
        errs = sum(r["errors"] for r in every)
        non2xx = sum(r["status"] for r in every)
        ok = all(r["size_ok"] for r in every)
        p99r = median([r["p99_us"] for r in runs["raw"]]) / 1000
        p99s = median([r["p99_us"] for r in runs["shipped"]]) / 1000
        each_raw = " ".join(f"{r['rps']:.0f}" for r in runs["raw"])
        each_ship = " ".join(f"{r['rps']:.0f}" for r in runs["shipped"])
        cpu_r = median([r["cpu_us"] for r in runs["raw"]])
        cpu_s = median([r["cpu_us"] for r in runs["shipped"]])
        lines.append(
            f"| {name} | {raw:,.0f} | {ship:,.0f} | **{paired:.2f}** | {ship / raw:.2f} | "
            f"{each_raw} / {each_ship} | {cpu_r:.1f} / {cpu_s:.1f} | {paired_cpu:.2f} | "
            f"{p99r:.1f} / {p99s:.1f} | {errs}, {non2xx} | {'yes' if ok else 'NO'} | "
            f"{rawc:,.0f} | {ship / rawc:.2f} | {cpu_c:.1f} |"
        )
        verdicts.append(
            (
                f"nginx {name}: shipped >= 0.9x raw",
                paired >= 0.9 and ok and errs == 0 and non2xx == 0,
                f"median of {len(runs['raw'])} back-to-back ratios {paired:.2f}x "
                f"(ratio of medians {ship:,.0f} / {raw:,.0f} = {ship / raw:.2f}x)",
            )
        )
    lines += [
        "",
        f"With `Accept-Encoding: gzip` (one {scale.gzip_seconds} s run each; raw has no gzip "
        "and sends identity, the shipped site compresses text on the fly, `gzip_comp_level 1`; "
        "no target):",
        "",
        "| path | raw (identity) | shipped (gzip) | shipped/raw | CPU/resp raw / shipped (µs) "
        "| bytes/response shipped |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name in res["nginx"]:
        raw_g = res["gzip"][f"{name}|raw"]
        ship_g = res["gzip"][f"{name}|shipped"]
        lines.append(
            f"| {name} | {raw_g['rps']:,.0f} | {ship_g['rps']:,.0f} | "
            f"{ship_g['rps'] / raw_g['rps']:.2f} | "
            f"{raw_g['cpu_us']:.1f} / {ship_g['cpu_us']:.1f} | "
            f"{ship_g['bytes'] / max(1, ship_g['requests']):,.0f} |"
        )
    lines += [
        "",
        "## 2. Embedded server (`prep-agent run`, waitress)",
        "",
        "| path | req/s | p50 (ms) | p99 (ms) | max (ms) | CPU/resp (µs) | errors, non-2xx "
        "| bytes ok |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in res["embedded"].items():
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} "
            f"| {r['max_us'] / 1000:.1f} | {r['cpu_us']:.0f} | {r['errors']}, {r['status']} | "
            f"{'yes' if r['size_ok'] else 'NO'} |"
        )
    st = res["embedded"]["/status.json"]
    verdicts.append(
        (
            "embedded /status.json >= 2,500 req/s",
            st["rps"] >= 2500 and st["errors"] == 0 and st["status"] == 0 and st["size_ok"],
            f"{st['rps']:,.0f} req/s, p99 {st['p99_us'] / 1000:.1f} ms",
        )
    )
    lines += [
        "",
        "## 3. Swap under load",
        "",
        f"wrk (`-t{THREADS} -c{CONNECTIONS}`, swap.lua: `/status.json`, `/` and the entry of "
        "the newest status.json seen, in turn; every body checked: status.json's "
        "`sequence`/`release`/`entry` agree, the frame's `data-sequence`, embedded status and "
        "iframe `src` agree, an entry page is a cut that was requested) plus a checker process "
        "(status.json -> its `entry` must be that sequence's page; the frame every 8th chain; "
        "the release's CSV every 16th, compared byte for byte with that cut's; every entry "
        f"fetched again once the checker has seen a status.json {scale.hold} cuts newer, "
        "must be the same bytes). Cuts: "
        "8 KB index.html 'Corte N', 100 KB stamped CSV, an SVG; each delivered (signed with "
        "ssh-keygen) once the server under test serves the previous one in status.json; "
        "`served after` = from status.json on disk to the server answering it; keep_releases "
        f"{res['keep_releases']} and keep_replaced_seconds {res['keep_replaced_seconds']:g} "
        f"(a replaced release stays while its successor is younger than that; releases "
        f"on disk at the end: {res['releases_kept']}).",
        "",
        "| through | publications | seconds | publish p50 / max (ms) | served after p50 / max "
        "(ms) | wrk req/s | wrk responses (status / frame / entry) | wrk non-2xx, socket errors "
        "| wrk mixed | checker chains / frames / refetches | checker non-2xx, errors | checker "
        "mixed | cuts seen by checker | nginx [error] lines |",
        "|---|---:|---:|---|---|---:|---|---|---:|---|---|---:|---:|---:|",
    ]
    for label, f in res["swap"].items():
        w, c = f["wrk"], f["checker"]
        c_non2xx = sum(c["non2xx"].values())
        nginx_lines = len(f["nginx_error_lines"]) if label.startswith("nginx") else "-"
        lines.append(
            f"| {label} | {f['publications']} | {f['seconds']:.0f} | "
            f"{f['publish_p50_ms']:.0f} / {f['publish_max_ms']:.0f} | "
            f"{f['served_p50_ms']:.0f} / {f['served_max_ms']:.0f} | {w['rps']:,.0f} | "
            f"{w['statuses']:,} / {w['frames']:,} / {w['contents']:,} | "
            f"{w['non2xx']}, {w['errors']} | {w['mixed']} | "
            f"{c['chains']:,} / {c['frames']:,} / {c['refetches']:,} | {c_non2xx}, "
            f"{c['errors']} | {c['mixed']} | {c['sequences']} | {nginx_lines} |"
        )
        clean = (
            f["publications"] >= 100
            and w["non2xx"] == 0
            and w["errors"] == 0
            and c_non2xx == 0
            and c["errors"] == 0
        )
        verdicts.append(
            (
                f"swap via {label}: >= 100 publications, zero non-2xx",
                clean,
                f"{f['publications']} publications; non-2xx wrk {w['non2xx']} / checker "
                f"{c_non2xx}; socket errors {w['errors']} / {c['errors']}",
            )
        )
        verdicts.append(
            (
                f"swap via {label}: zero mixed-cut responses",
                w["mixed"] == 0 and c["mixed"] == 0,
                f"wrk {w['mixed']} of {w['ok']:,} bodies; checker {c['mixed']} of "
                f"{c['requests']:,} requests",
            )
        )
    for label, f in res["swap"].items():
        samples = f["wrk"]["samples"] or ""
        if samples or f["checker"]["samples"] or f["wrk"]["codes"]:
            lines.append("")
            lines.append(
                f"Samples ({label}): wrk codes `{f['wrk']['codes']}` `{samples[:300]}`; "
                f"checker `{'; '.join(f['checker']['samples'])[:300]}`"
            )
        if f["nginx_error_lines"] and label.startswith("nginx"):
            lines.append(f"nginx error log ({label}): `{f['nginx_error_lines'][0][:200]}`")
    lines += ["", "## Targets", "", "| target | verdict | figures |", "|---|---|---|"]
    lines += [f"| {n} | {'PASS' if ok else 'FAIL'} | {fig} |" for n, ok, fig in verdicts]
    lines += ["", f"Full run took {took:.0f} s; agent exit status {res['agent_exit']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (12 publications)")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="append the report here (default: benchmarks/RESULTS.md; --quick appends "
        "only with --out)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    for tool in (WRK, NGINX):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} is not installed")
    scale = QUICK if args.quick else FULL
    out = (
        Path(args.out)
        if args.out
        else (None if args.quick else Path(__file__).with_name("RESULTS.md"))
    )
    command = " ".join(
        shlex.quote(a) for a in [".venv/bin/python", "-m", "benchmarks.serve", *argv]
    )
    work = Path(tempfile.mkdtemp(prefix="prep-serve-bench-"))
    print(f"work folder {work}")
    started = time.monotonic()
    try:
        res = run(scale, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(res, scale, command, time.monotonic() - started)
    print()
    print(text)
    if out is not None:
        previous = out.read_text() if out.exists() else ""
        with open(out, "a", encoding="utf-8") as fh:
            if previous and not previous.endswith("\n\n"):
                fh.write("\n" if previous.endswith("\n") else "\n\n")
            fh.write(text)
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
