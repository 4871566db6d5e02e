"""The rehearsal's HA pair (namespace mode only): one more difusor, ``h``, made of
two origins behind two balancers running the SHIPPED packaging/ha configs.

Each origin (``h1``, ``h2``) is a difusor of its own to the institute: its own
namespace, sshd upload account and ``prep-agent run``, listed in the
institute's config, so ``distribute`` delivers every cut to each one
independently and the collector polls and receives each one's health (the HA
README: "monitor each origin directly"); there is no replication of our own.
The stand uses no nginx, so the origins serve with the agent's own server.
Each balancer (``lb1``, ``lb2``) runs Varnish with xkey on port 80 in front of
HAProxy on 127.0.0.1:8081 and keepalived (unicast VRRP) sharing a floating
address on the readers' switch; the origins soft-purge both Varnish nodes
after each cut (``[purge] nodes``). Readers (the HTTP viewer and Chromium) load
the pair's frame through the floating address.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prep_agent.core.errors import Error
from prep_agent.rehearsal.edge import haproxy_config, keepalived_config, varnish_config
from prep_agent.rehearsal.netns import Network, Node
from prep_agent.rehearsal.stand import Proc, answers, descendants, wait

if TYPE_CHECKING:
    from prep_agent.rehearsal.inject import Injection
    from prep_agent.rehearsal.stand import Difusor

NAME = "h"
"""The pair's service id in the report (its origins are ``h1`` and ``h2``)."""
ORIGINS = ("h1", "h2")
BALANCERS = {"lb1": (2, 150), "lb2": (3, 100)}
"""Balancer → (host number on the readers' switch, VRRP priority)."""
VIP_HOST = 100
ENGINES = ("haproxy", "varnishd", "keepalived", "curl")


def missing() -> list[str]:
    """The balancers' programs that are not installed."""
    return [e for e in ENGINES if not any(Path(d, e).exists() for d in ("/usr/sbin", "/usr/bin"))]


def behind_lag(period: float, period_seconds: int, cut_age: float) -> int:
    """HAProxy's ``/readyz?lag=`` so an origin counts as behind three compressed periods
    after its newest cut was signed (cuts are signed ``cut_age`` s old), one before the
    interruption notice. With two, on a loaded machine both origins were behind at
    once, HAProxy sent pointers to any ready origin (the shipped fallback), and one
    just restarted with an old cut made the pair's viewer see a cut time go back."""
    return max(0, round(cut_age + 3 * period - period_seconds))


@dataclass
class Balancer:
    """Varnish :80 → HAProxy 127.0.0.1:8081, and keepalived, in one namespace."""

    name: str
    node: Node
    procs: list[Proc] = field(default_factory=list)

    def holds(self, vip: str) -> bool:
        """Whether this balancer holds the floating address now."""
        return f" {vip}/" in self.node.run(["ip", "-4", "addr", "show", "dev", "eth0"], check=False)

    def kill(self) -> None:
        """SIGKILL keepalived, Varnish and HAProxy and every process below them,
        children first: keepalived's VRRP child is told of its parent's death
        (SIGTERM) and would send a goodbye advertisement, which a crash does not.
        Each parent is stopped (SIGSTOP) first and killed while stopped (no
        SIGCONT): a running keepalived respawned the killed child, which then
        outlived it (found after a run)."""
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal(signal.SIGSTOP)
                for pid in reversed(descendants(proc.proc.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.signal(signal.SIGKILL)
                proc.proc.wait(timeout=10)


@dataclass
class Pair:
    """The pair's origins, balancers and floating address."""

    vip: str
    network: Network
    origins: list[Difusor] = field(default_factory=list)
    balancers: list[Balancer] = field(default_factory=list)
    ready_at: float | None = None
    """When the floating address first served a cut (before, no origin was ready)."""

    @property
    def url(self) -> str:
        return f"http://{self.vip}"

    def active(self) -> Balancer | None:
        """The balancer holding the floating address (None: neither)."""
        return next((b for b in self.balancers if b.holds(self.vip)), None)

    def haproxy_logs(self) -> dict[Path, int]:
        """Each balancer's HAProxy log → its size now."""
        logs = [p.log for b in self.balancers for p in b.procs if p.name.startswith("haproxy")]
        return {log: log.stat().st_size if log.exists() else 0 for log in logs}

    def marked_down(self, origin: str, since: dict[Path, int]) -> bool:
        """Whether an HAProxy logged ``origin`` DOWN (its health checks failed) after
        the log sizes ``since``."""
        pattern = re.compile(rf"Server be_\w+/{re.escape(origin)} is DOWN")
        for log, size in since.items():
            with open(log, "rb") as f:
                f.seek(size)
                if pattern.search(f.read().decode(errors="replace")):
                    return True
        return False


def edge_health(node: Node) -> bool:
    """Whether the Varnish in ``node`` answers its own ``/edge-health``."""
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1"]
    return node.run([*curl, "http://127.0.0.1/edge-health"], check=False) == "200"


def purge_nodes(network: Network) -> str:
    """The origins' ``[purge] nodes``: both Varnish nodes."""
    return " ".join(f"http://{network.prefix}.{host}:80" for host, _ in BALANCERS.values())


def start(folder: Path, network: Network, origins: list[Difusor], lag: int) -> Pair:
    """Start both balancers in front of ``origins`` (already serving) and wait until
    one holds the floating address.

    Raises Error when a balancer's program is missing, a config does not check, or
    nothing holds the address within 30 s.
    """
    absent = missing()
    if absent:
        raise Error(f"the HA pair needs {', '.join(absent)}")
    pair = Pair(f"{network.prefix}.{VIP_HOST}", network, list(origins))
    servers = {d.service_id: d.public_host for d in origins}
    port = origins[0].web_port
    for name, (host, priority) in BALANCERS.items():
        node = network.add(name, host)
        peer = next(f"{network.prefix}.{h}" for n, (h, _) in BALANCERS.items() if n != name)
        home = folder / name
        home.mkdir(parents=True)
        (home / "haproxy.cfg").write_text(haproxy_config(servers, lag, port), encoding="utf-8")
        (home / "default.vcl").write_text(varnish_config(network.prefix), encoding="utf-8")
        (home / "keepalived.conf").write_text(
            keepalived_config(name, node.address, peer, priority, pair.vip), encoding="utf-8"
        )
        balancer = Balancer(name, node)
        pair.balancers.append(balancer)
        argv = {
            "haproxy": ["haproxy", "-db", "-f", str(home / "haproxy.cfg")],
            "varnish": ["varnishd", "-F", "-j", "none", "-a", ":80", "-f",
                        str(home / "default.vcl"), "-n", str(home / "varnish"),
                        "-s", "malloc,64m", "-T", "none"],
            "keepalived": ["keepalived", "-n", "-l", "-D", "-P", "-f",
                           str(home / "keepalived.conf"), f"--pid={home}/keepalived.pid",
                           f"--vrrp_pid={home}/vrrp.pid"],
        }  # fmt: skip
        for what, args in argv.items():
            proc = Proc(f"{what} {name}", node.command(args), home / f"{what}.log")
            balancer.procs.append(proc)
            proc.start()
            if what == "varnish":
                wait(lambda n=node: edge_health(n), 30, f"Varnish of {name}", proc)  # type: ignore[misc]
    wait(lambda: pair.active() is not None, 30, "a balancer holding the floating address")
    return pair


def wait_ready(pair: Pair, timeout: float) -> bool:
    """Wait until the floating address serves ``status.json`` (an origin holds a cut)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(pair.url + "/status.json"):
            pair.ready_at = time.time()
            return True
        time.sleep(0.2)
    return False


def stop(pair: Pair) -> None:
    """Stop every balancer process (best effort)."""
    for balancer in pair.balancers:
        for proc in reversed(balancer.procs):
            proc.stop()


EXPECTED = {
    "balancer-kill": (
        "the other balancer's keepalived takes the floating address; readers of the pair see "
        "no error after the failover window (measured)"
    ),
    "origin-stop": (
        "HAProxy takes the stopped origin out (health checks) and the collector's polls of it "
        "fail; readers of the pair see no error; restarted, it publishes the newest cut"
    ),
}


def balancer_kill(inj: Injection) -> None:
    """kill -9 keepalived, Varnish and HAProxy of the balancer holding the floating
    address (no goodbye advertisement leaves); measure until the address answers
    again from the other balancer. The killed balancer stays down."""
    pair = inj.stand.pair
    assert pair is not None
    inj.record["difusor"] = NAME
    inj.record["strict_window"] = True  # readers' errors are excused only in the window
    active = pair.active()
    if active is None:
        inj.record["detail"] = "no balancer held the floating address"
        return
    active.kill()
    when = inj._inject(f"SIGKILL of keepalived, Varnish and HAProxy on {active.name}")
    took: float | None = None
    answered: float | None = None
    deadline = time.monotonic() + 30 + 4 * inj.period
    while time.monotonic() < deadline and not inj.stop.is_set():
        if took is None and any(b.holds(pair.vip) for b in pair.balancers if b is not active):
            took = time.time()
        if took is not None and answers(pair.url + "/status.json", timeout=0.5):
            answered = time.time()
            break
        time.sleep(0.1)
    inj.record["window"] = [when, answered or time.time()]
    inj.record["failover_seconds"] = None if answered is None else round(answered - when, 3)
    if took is not None and answered is not None:
        other = next(b.name for b in pair.balancers if b is not active)
        inj._detected(took, f"keepalived on {other} (took the floating address)")
    else:
        inj.record["detail"] += "; the floating address did not answer from the other balancer"


def origin_stop(inj: Injection) -> None:
    """Stop the first origin's agent (the one HAProxy's ``balance first`` serves the
    pointers from) for three periods at least and until both HAProxy and the
    collector noticed, then start it again and wait until it publishes the newest cut."""
    from prep_agent.rehearsal.inject import api_rows, published, until

    pair = inj.stand.pair
    assert pair is not None
    d, other = pair.origins[0], pair.origins[1]
    sid = d.service_id
    inj.record["difusor"] = sid
    inj.busy.add(sid)
    try:
        assert d.agent is not None
        logs = pair.haproxy_logs()
        when = inj._inject(f"agent of origin {sid} stopped (SIGTERM); {other.service_id} serves")
        d.agent.stop()
        seen: dict[str, float] = {}

        def noticed() -> bool:
            if "haproxy" not in seen and pair.marked_down(sid, logs):
                seen["haproxy"] = time.time()
            if "collector" not in seen and api_rows(inj.stand).get(sid, {}).get("poll_error"):
                seen["collector"] = time.time()
            return len(seen) == 2 and time.time() >= when + 3 * inj.period

        until(noticed, 6 * inj.period + 20, inj.stop)
        inj.record["noticed_by"] = {k: round(v - when, 3) for k, v in sorted(seen.items())}
        if len(seen) == 2:
            inj._detected(max(seen.values()), "HAProxy (origin DOWN) and collector (poll failed)")
        else:
            missing = {"haproxy", "collector"} - set(seen)
            inj.record["detail"] += f"; not noticed by {', '.join(sorted(missing))}"
        d.start_agent()
        newest = max(inj.placed)
        back = until(lambda: [s for s in published(d, when) if s >= newest],
                     6 * inj.period + 30, inj.stop)  # fmt: skip
        inj.record["caught_up_at"] = time.time() if back else None
        if not back:
            inj.record["detail"] += f"; cut {newest} not published after the restart"
            inj.record["detected_at"] = None
        inj.record["window"] = [when, time.time()]
    finally:
        inj.busy.discard(sid)
