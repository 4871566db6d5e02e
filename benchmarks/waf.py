#!/usr/bin/env python3
"""Cost of the opt-in firewall: the shipped nginx site with and without ModSecurity + CRS.

One agent daemon publishes one cut (an ~8 KB entry page, a ~100 KB CSV). Two
nginx servers run side by side on it, both the shipped site instantiated by
``tests/nginxkit.py`` (127.0.0.1 exempt from the rate limits, as in
benchmarks/serve.py) and the same main config with the ModSecurity module
loaded; the second has the shipped snippet, rules and exclusions enabled
(``tests/tlskit.enable_waf``). wrk (``-t1 -c64``, a browser's request headers)
measures ``/``, ``/status.json``, the release's index.html and CSV, the two
servers in turn within each round (order alternating); reported: the median
over rounds of the per-round ratio WAF/plain of req/s, and each server's CPU
time per response (master + worker). A blocked request (SQL injection in the
query) is measured on the WAF server alone, then the WAF server's CPU per
``/status.json`` response with parts of the Core Rule Set (``BREAKDOWN``).

Usage: .venv/bin/python -m benchmarks.waf [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.serve import CSV_PATH, SUMMARY_LUA, cut_files, run_wrk
from tests.kit import OFFSET, AgentDaemon, Institute, free_port, make_config
from tests.nginxkit import NGINX, Nginx, instantiate, wait_published
from tests.wafkit import MODSECURITY_MODULE, enable_waf

HEADERS = (
    "User-Agent: Mozilla/5.0 (Linux; Android 13; SM-A145M) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language: es-MX,es-419;q=0.9,es;q=0.8",
    "Referer: https://www.portal.example.mx/elecciones/2021/resultados",
)


def server(folder: Path, root: Path, agent: str, waf: bool) -> Nginx:
    """The shipped site on a free port; the module loaded in both, enabled in one."""
    port = free_port()
    conf = instantiate(folder, root, agent, port)
    if waf:
        enable_waf(conf)
    else:
        conf.write_text(f"load_module {MODSECURITY_MODULE};\n{conf.read_text()}")
    nginx = Nginx(conf, port)
    nginx.start()
    return nginx


def measure(seconds: int, rounds: int, out: Path | None) -> str:
    """Run the comparison; return the Markdown report (also written to ``out``)."""
    work = Path(tempfile.mkdtemp(prefix="prep-waf-bench-"))
    institute = Institute(work / "institute")
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(work, institute, listen=listen)
    agent = AgentDaemon(work / "prep-agent.conf")
    servers: list[Nginx] = []
    script = work / "summary.lua"
    script.write_text(SUMMARY_LUA)
    started = datetime.now(OFFSET)
    try:
        agent.start()
        when = started.replace(second=0, microsecond=0) - timedelta(minutes=5)
        files = cut_files(1, when)
        institute.deliver(config.inbox, files, institute.manifest(files, 1, when))
        release = wait_published(config.public, 1)["release"]
        plain = server(work / "plain", config.root, listen, waf=False)
        servers.append(plain)
        waf = server(work / "waf", config.root, listen, waf=True)
        servers.append(waf)
        paths = {
            "frame /": "/",
            "/status.json": "/status.json",
            "release index.html (8 KB)": f"/cortes/{release}/index.html",
            "release CSV (100 KB)": f"/cortes/{release}/{CSV_PATH}",
        }
        rows: list[str] = []
        for name, path in paths.items():
            ratios: list[float] = []
            got: dict[str, list[dict[str, Any]]] = {"plain": [], "waf": []}
            for r in range(rounds):
                order = [("plain", plain), ("waf", waf)]
                if r % 2:
                    order.reverse()
                runs = {}
                for label, nginx in order:
                    url = nginx.url + path
                    run_wrk(url, 1, script, HEADERS)  # warm-up
                    assert nginx.proc is not None
                    runs[label] = run_wrk(url, seconds, script, HEADERS, pid=nginx.proc.pid)
                    got[label].append(runs[label])
                ratios.append(runs["waf"]["rps"] / runs["plain"]["rps"])
            rows.append(_row(name, got, ratios))
        attack = run_wrk(
            waf.url + "/static/frame.js?id=1%27%20OR%20%271%27%3D%271",
            seconds,
            script,
            HEADERS,
            pid=waf.proc.pid if waf.proc else None,
        )
        errors = waf.errors().count("Access denied")
        breakdown = rule_breakdown(waf, script, seconds)
    finally:
        for nginx in servers:
            nginx.stop()
        agent.stop()
    ended = datetime.now(OFFSET)
    text = _report(seconds, rounds, started, ended, rows, attack, errors)
    text += (
        "\nWhere the CPU goes (`/status.json`, one run of each variant of the rules file: "
        "the CRS's files included, in order; the rest of the rules file unchanged):\n\n"
        "| rules | req/s | CPU/resp (µs) |\n|---|---:|---:|\n"
        + "".join(f"| {name} | {rps:,.0f} | {cpu:.1f} |\n" for name, rps, cpu in breakdown)
    )
    if out is not None:
        out.write_text(text)
    return text


CRS_RULES = Path("/usr/share/modsecurity-crs/rules")
BREAKDOWN = {
    "engine Off (module loaded, no rule runs)": None,
    "901 + 949 (initialisation, blocking evaluation)": ("901", "949"),
    "901 + 920 + 949 (protocol enforcement)": ("901", "920", "949"),
    "901 + 930-934 + 949 (LFI, RFI, RCE, PHP, Node.js)": ("901", "93", "949"),
    "901 + 941 + 949 (XSS)": ("901", "941", "949"),
    "901 + 942 + 949 (SQLi)": ("901", "942", "949"),
    "every REQUEST-* file": ("REQUEST",),
    "every file (shipped)": ("",),
}
"""Variants of the rules file: which CRS files are included (by name part)."""


def rule_breakdown(waf: Nginx, script: Path, seconds: int) -> list[tuple[str, float, float]]:
    """CPU per /status.json response for each variant of BREAKDOWN (reload between)."""
    rules = waf.folder / "modsecurity" / "prep-agent.conf"
    shipped = rules.read_text()
    include = f"Include {CRS_RULES}/*.conf"
    assert include in shipped, "the rules file no longer includes the CRS"
    files = sorted(CRS_RULES.glob("*.conf"))
    out = []
    try:
        for name, parts in BREAKDOWN.items():
            if parts is None:
                text = shipped.replace("SecRuleEngine On", "SecRuleEngine Off")
            else:
                chosen = [f for f in files if any(part in f.name for part in parts)]
                text = shipped.replace(include, "\n".join(f"Include {f}" for f in chosen))
            rules.write_text(text)
            reload_nginx(waf)
            run_wrk(waf.url + "/status.json", 1, script, HEADERS)
            assert waf.proc is not None
            got = run_wrk(waf.url + "/status.json", seconds, script, HEADERS, pid=waf.proc.pid)
            out.append((name, got["rps"], got["cpu_us"]))
    finally:
        rules.write_text(shipped)
    return out


def reload_nginx(nginx: Nginx) -> None:
    """``nginx -s reload`` and a moment for the old worker to leave."""
    subprocess.run(
        [NGINX, "-c", str(nginx.conf), "-p", f"{nginx.folder}/", "-s", "reload"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    time.sleep(1.5)


def _row(name: str, got: dict[str, list[dict[str, Any]]], ratios: list[float]) -> str:
    def med(label: str, key: str) -> float:
        return float(statistics.median(r[key] for r in got[label]))

    non2xx = sum(r["status"] + r["errors"] for runs in got.values() for r in runs)
    return (
        f"| {name} | {med('plain', 'rps'):,.0f} | {med('waf', 'rps'):,.0f} "
        f"| **{statistics.median(ratios):.2f}** "
        f"| {med('plain', 'cpu_us'):.1f} / {med('waf', 'cpu_us'):.1f} "
        f"| {med('waf', 'cpu_us') - med('plain', 'cpu_us'):.1f} "
        f"| {med('plain', 'p99_us') / 1000:.1f} / {med('waf', 'p99_us') / 1000:.1f} "
        f"| {non2xx} |"
    )


def _report(
    seconds: int,
    rounds: int,
    started: datetime,
    ended: datetime,
    rows: list[str],
    attack: dict[str, Any],
    denials: int,
) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# WAF cost (`benchmarks/waf.py`)",
        "",
        f"Command: `.venv/bin/python -m benchmarks.waf{' --quick' if rounds == 1 else ''}`",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M}–{ended:%H:%M} (UTC-6); "
        f"Python {platform.python_version()}",
        f"- {rounds} rounds of {seconds} s wrk runs per path and server (`-t1 -c64`, browser "
        "headers), after a 1 s warm-up each; both servers: the shipped site, module loaded, "
        "`worker_processes 1`; load average at the end: " + load,
        "",
        "| path | plain req/s | WAF req/s | WAF/plain (median of rounds) "
        "| CPU/resp plain / WAF (µs) | WAF CPU added (µs) | p99 plain / WAF (ms) "
        "| errors + non-2xx |",
        "|---|---:|---:|---:|---|---:|---|---:|",
        *rows,
        "",
        "Blocked request (SQL injection in the query of /static/frame.js, WAF server): "
        f"{attack['rps']:,.0f} req/s, "
        f"CPU/resp {attack.get('cpu_us', 0):.1f} µs, p99 {attack['p99_us'] / 1000:.1f} ms, "
        f"non-2xx {attack['status']} of {attack['requests']}; 'Access denied' lines: {denials}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s runs")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    seconds, rounds = (1, 1) if args.quick else (2, 5)
    t0 = time.monotonic()
    print(measure(seconds, rounds, args.out))
    print(f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
