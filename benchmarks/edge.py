"""HA edge benchmark: one origin's nginx alone vs the full stand (packaging/ha).

One stand (tests/edgekit.py: two origins with real ``prep-agent run`` + the
packaged nginx site, two balancers with Varnish (xkey) in front of HAProxy and
keepalived, a client namespace), same files for both targets. Every cut carries
a ~100 KB CSV (``datos/grande.csv``) besides the kit's page and small CSV.

1. Throughput: ``wrk --latency`` from the client namespace, each path against
   (a) origin o1's packaged nginx site directly (the client's address exempt
   from its per-address limits, as an institute's would be) and (b) the
   floating address (Varnish hit path). Paths: the frame ``/``,
   ``/status.json``, the release's ``index.html`` and the 100 KB CSV. req/s and
   p50/p99. All processes share the machine's cores with wrk.
2. Origin offload: for ``--offload-seconds`` (60) one wrk per path runs on the
   floating address while the institute publishes a cut every 10 s (each origin
   0-5 s late). The share of client requests that reached any origin (from
   the origins' nginx access logs, health checks excluded) and the bytes the
   origins sent per client request.
3. ``--drill``: the steady drill with the issue's 30 cuts (one every 6 s) and the
   checker of tests/edgecheck.py; prints its summary.

Needs root (network namespaces), haproxy, varnish + varnish-modules, keepalived,
nginx, curl, wrk. Usage:

    python -m benchmarks.edge [--seconds 10] [--offload-seconds 60] [--drill] [--out FILE]

(``--seconds 0`` / ``--offload-seconds 0`` leave those parts out.)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.edgekit import EVERY, VIP, Stand, summary

BIG_CSV = ("CLAVE,ESTADO,TIPO,VOTOS\r\n" + "0123,05,AYUNTAMIENTO,98765\r\n" * 3600).encode()
BIG_CSV = BIG_CSV[:100_000]
LOG_LINE = re.compile(r'"(?:GET|HEAD) (\S+) [^"]*" (\d{3}) (\d+)')
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(stand: Stand, url: str, seconds: float, connections: int = 32) -> dict[str, float]:
    """One wrk run from the client's namespace: req/s, p50 and p99 (ms), requests."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", url]
    out = stand.client.run(argv, timeout=seconds + 60)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", out)
        latency[pct] = float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")
    return {
        "rate": rate,
        "p50": latency["50"],
        "p99": latency["99"],
        "requests": count,
        "non2xx": int(errors.group(1)) if errors else 0,
    }


def origin_traffic(stand: Stand) -> tuple[int, int, dict[str, int]]:
    """Requests and body bytes in the origins' access logs (health paths excluded),
    and the requests per kind (pointer, release, other)."""
    requests = sent = 0
    kinds = {"pointer": 0, "release": 0, "other": 0}
    for origin in stand.origins.values():
        for m in LOG_LINE.finditer(origin.access_log()):
            path = m.group(1)
            if path.startswith(("/readyz", "/health", "/livez", "/metrics")):
                continue
            requests += 1
            sent += int(m.group(3))
            bare = path.split("?", 1)[0]
            kind = "pointer" if bare in ("/", "/index.html", "/status.json") else "other"
            kinds["release" if bare.startswith("/cortes/") else kind] += 1
    return requests, sent, kinds


def paths(stand: Stand) -> dict[str, str]:
    status = stand.client_get("/status.json")[1]
    entry = re.search(r'"entry":\s*"([^"]+)"', status).group(1)  # type: ignore[union-attr]
    folder = entry.rsplit("/", 1)[0]
    return {
        "frame /": "/",
        "status.json": "/status.json",
        "release index.html": f"/{entry}",
        "100 KB CSV": f"/{folder}/datos/grande.csv",
    }


def throughput(stand: Stand, seconds: float) -> list[str]:
    origin = stand.origins["o1"].node.address
    lines = [
        "| path | target | req/s | p50 ms | p99 ms | non-2xx |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, path in paths(stand).items():
        for target, host in (("o1 nginx alone", origin), ("stand (VIP)", VIP)):
            r = wrk(stand, f"http://{host}{path}", seconds)
            lines.append(
                f"| {name} | {target} | {r['rate']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
                f"| {r['non2xx']:.0f} |"
            )
            print(lines[-1], flush=True)
    return lines


def offload(stand: Stand, seconds: float) -> list[str]:
    before, sent_before, kinds_before = origin_traffic(stand)
    procs = []
    for path in paths(stand).values():
        argv = ["wrk", "-t1", "-c8", f"-d{seconds:.0f}s", f"http://{VIP}{path}"]
        procs.append(
            subprocess.Popen(stand.client.command(argv), stdout=subprocess.PIPE, text=True)
        )
    # A crowd following the cuts like the frame, so each new release is fetched too.
    crowd = stand.checker(seconds)
    started = time.monotonic()
    cuts = 0
    while time.monotonic() - started < seconds - 10:
        time.sleep(10)
        stand.publish()
        cuts += 1
    client = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        client += int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    followed = summary(crowd, 60)
    client += int(followed["requests"])
    time.sleep(2)  # nginx flushes its access log buffer every second
    after, sent_after, kinds_after = origin_traffic(stand)
    reached = after - before
    share = reached / client if client else float("nan")
    kinds = {k: kinds_after[k] - kinds_before[k] for k in kinds_after}
    return [
        f"- {seconds:.0f} s, one wrk (1 thread, 8 connections) per path on the floating "
        f"address (a fixed release), plus tests/edgecheck.py's crowd (4 x 10 req/s, "
        f"following each new cut's page and CSV: {followed['errors']} errors); "
        f"{cuts} cuts published meanwhile (every 10 s, each origin 0-5 s late)",
        f"- client requests: {client:,}; requests that reached an origin: {reached:,} "
        f"({kinds['pointer']} pointers, {kinds['release']} release files, "
        f"{kinds['other']} other): offload {100 * (1 - share):.3f} %",
        f"- bytes sent by the origins: {sent_after - sent_before:,} "
        f"({(sent_after - sent_before) / max(client, 1):.2f} per client request)",
    ]


def drill(stand: Stand, cuts: int) -> list[str]:
    checker = stand.checker(cuts * EVERY + 6)
    first = stand.sequence + 1
    for _ in range(cuts):
        stand.publish()
        time.sleep(EVERY)
    doc: dict[str, Any] = summary(checker, 120)
    wanted = list(range(first, first + cuts))
    missed = [sorted(set(wanted) - set(seq)) for seq in doc["sequences"]]
    ordered = all(seq == sorted(set(seq)) for seq in doc["sequences"])
    return [
        f"- {cuts} cuts, one every {EVERY:.0f} s, each origin 0-5 s late; 4 checker workers "
        f"at 10 req/s: {doc['requests']} requests, {doc['errors']} errors, {doc['mixed']} mixed, "
        f"{doc['backward']} backward steps, {doc['missing_release']} missing releases, "
        f"{doc['pointer_regressions']} older status.json answers ignored; "
        f"shown in order by every worker: {ordered}; cuts a worker never saw: {missed}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Build the stand, run the measurements, print (and append to ``--out``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--offload-seconds", type=float, default=60.0)
    parser.add_argument("--drill", action="store_true", help="also the 30-cut steady drill")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="prep-edge-bench-"))
    stand = Stand(folder, extra={"datos/grande.csv": BIG_CSV})
    report = ["## HA edge (`benchmarks/edge.py`)", ""]
    try:
        stand.start()
        if args.seconds > 0:
            report += ["### Throughput", "", *throughput(stand, args.seconds), ""]
        if args.offload_seconds > 0:
            report += ["### Origin offload", "", *offload(stand, args.offload_seconds), ""]
        if args.drill:
            report += ["### 30-cut steady drill", "", *drill(stand, 30), ""]
    finally:
        stand.close()
        shutil.rmtree(folder, ignore_errors=True)
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
