"""The HA edge stand of tests/test_edge_ha.py and benchmarks/edge.py, built from
the shipped configs (packaging/ha, packaging/nginx) inside network namespaces.

Nodes on one private switch (tests/kit/netns.py): two origins (real
``prep-agent run`` + the packaged nginx site), two balancers (Varnish with xkey
in front of HAProxy, keepalived with unicast VRRP sharing ``VIP``), and a
client. The institute (tests/kit Institute) writes every cut into each
origin's drop folder on its own, after a random delay per origin, as a
distribution to several origins would. Every process is stopped and every
namespace removed by ``Stand.close()``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prep_agent.rehearsal.edge import (
    haproxy_config,
    keepalived_config,
    varnish_config,
)
from prep_agent.rehearsal.edge import (
    substitute as substitute,  # re-exported for the edge drills
)
from tests.kit import PREP_AGENT, Institute, make_config, stop_process, wait_for
from tests.kit.netns import Network, Node
from tests.nginxkit import NGINX, instantiate

ROOT = Path(__file__).resolve().parents[1]
HA = ROOT / "packaging" / "ha"
PREFIX = "198.18.0"
VIP = f"{PREFIX}.100"
BALANCERS = {"lb1": 2, "lb2": 3}
ORIGINS = {"o1": 11, "o2": 12}
CLIENT = 50
PERIOD = 60
"""period_seconds of the stand's cuts (the protocol's minimum)."""
AGE = 160
"""Each cut is signed with a cut_time this many seconds old, so that time runs
compressed: three periods (the interruption notice) end ``3 * PERIOD - AGE`` =
20 s after the last cut, while the institute sends one every ``EVERY`` s."""
EVERY = 6.0
"""Seconds between the stand's cuts (each reaches an origin 0-5 s late)."""
LAG = 114
"""The pointer backend's /readyz?lag=: an origin whose newest cut was published
more than PERIOD + LAG - AGE = 14 s ago is behind (in steady state an origin's
newest cut is at most EVERY + 5 = 11 s old)."""
POLL = 1
"""[frame] poll_seconds of the origins (the floor): the drill's viewer must see
every cut, each the newest at the floating address for at least HOLD s."""
HOLD = 1.5
"""Seconds each cut of the steady drill stays the newest at the floating address
(served there, on both origins) before the institute sends the next: the frame's
poll (POLL) plus the check and load of the cut's entry page. The drill sends the
next cut sooner once the viewer (Chromium) has shown this one."""
MIDDLE = timezone(timedelta(hours=-6))
ENGINES = ("haproxy", "varnishd", "keepalived", "nginx", "curl")


def missing_engines() -> list[str]:
    """The stand's programs that are not installed."""
    return [e for e in ENGINES if shutil.which(e) is None and not Path(f"/usr/sbin/{e}").exists()]


class Proc:
    """A process in a namespace, its output in a log file."""

    def __init__(self, node: Node, argv: Sequence[str], log: Path) -> None:
        self.node = node
        self.argv = list(argv)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as log:
            self.proc = self.node.popen(self.argv, log)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)


class Origin:
    """prep-agent + the packaged nginx site in one namespace."""

    def __init__(self, node: Node, folder: Path, institute: Institute, purge: str) -> None:
        self.node = node
        self.folder = folder
        self.config = make_config(
            folder,
            institute,
            listen="127.0.0.1:8080",
            stamp_check="off",
            rescan_interval=0.5,
            poll_seconds=POLL,
            nodes=purge,
        )
        self.inbox = self.config.inbox
        self.agent = Proc(
            node,
            [PREP_AGENT, "run", "--config", str(folder / "prep-agent.conf")],
            folder / "agent.log",
        )
        # The balancers (health checks) and the benchmark's client are exempt from
        # the site's per-address limits.
        exempt = ("127.0.0.1", *(f"{PREFIX}.{h}" for h in (*BALANCERS.values(), CLIENT)))
        conf = instantiate(folder / "nginx", self.config.root, "127.0.0.1:8080", 80, exempt)
        site = folder / "nginx" / "prep-agent.conf"
        site.write_text(
            site.read_text().replace("listen 127.0.0.1:80;", f"listen {node.address}:80;")
        )
        argv = [NGINX, "-c", str(conf), "-p", f"{conf.parent}/", "-g", "daemon off;"]
        self.nginx = Proc(node, argv, folder / "nginx" / "logs" / "stderr.log")

    def start(self) -> None:
        """Start the agent, then nginx (the site includes the agent's header snippets)."""
        self.agent.start()
        wait_for(lambda: self.curl("http://127.0.0.1:8080/livez") == 200, 20, "agent /livez")
        self.nginx.start()
        wait_for(lambda: self.curl(f"http://{self.node.address}/livez") == 200, 20, "nginx")

    def kill(self) -> None:
        self.nginx.kill()
        self.agent.kill()

    def stop(self) -> None:
        self.nginx.stop()
        self.agent.stop()

    def curl(self, url: str) -> int:
        """The HTTP status of ``url`` from inside this origin (0: no answer)."""
        out = self.node.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url],
            check=False,
        )
        return int(out or 0)

    def metrics(self) -> str:
        return self.node.run(["curl", "-s", "--max-time", "2", "http://127.0.0.1:8080/metrics"])

    def access_log(self) -> str:
        path = self.folder / "nginx" / "logs" / "access.log"
        return path.read_text() if path.exists() else ""


class Balancer:
    """Varnish :80 in front of HAProxy 127.0.0.1:8081, and keepalived, in one namespace."""

    def __init__(
        self, node: Node, folder: Path, origins: dict[str, str], peer: str, priority: int
    ) -> None:
        self.node = node
        folder.mkdir(parents=True)
        self.folder = folder
        (folder / "haproxy.cfg").write_text(haproxy_config(origins))
        (folder / "default.vcl").write_text(varnish_config())
        name = node.name
        (folder / "keepalived.conf").write_text(
            keepalived_config(name, node.address, peer, priority)
        )
        self.haproxy = Proc(
            node, ["haproxy", "-db", "-f", str(folder / "haproxy.cfg")], folder / "haproxy.log"
        )
        self.varnish = Proc(
            node,
            [
                "varnishd", "-F", "-j", "none", "-a", ":80", "-f", str(folder / "default.vcl"),
                "-n", str(folder / "varnish"), "-s", "malloc,128m", "-T", "none",
            ],
            folder / "varnish.log",
        )  # fmt: skip
        self.keepalived = Proc(
            node,
            [
                "keepalived", "-n", "-l", "-D", "-P", "-f", str(folder / "keepalived.conf"),
                f"--pid={folder}/keepalived.pid", f"--vrrp_pid={folder}/vrrp.pid",
            ],
            folder / "keepalived.log",
        )  # fmt: skip

    def start(self) -> None:
        self.haproxy.start()
        self.varnish.start()
        wait_for(lambda: self.curl("http://127.0.0.1/edge-health") == 200, 30, "varnish")
        self.keepalived.start()

    def curl(self, url: str) -> int:
        out = self.node.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url],
            check=False,
        )
        return int(out or 0)

    def holds_vip(self) -> bool:
        return f" {VIP}/" in self.node.run(["ip", "-4", "addr", "show", "dev", "eth0"])

    def lose(self) -> None:
        """The machine gone: its link down first (no goodbye advertisement leaves;
        a killed keepalived's VRRP child would otherwise announce priority 0),
        then every process SIGKILLed."""
        self.node.run(["ip", "link", "set", "eth0", "down"])
        self.kill()

    def kill(self) -> None:
        """Every process of the balancer, SIGKILL (keepalived, Varnish, HAProxy)."""
        for p in (self.keepalived, self.varnish, self.haproxy):
            p.kill()

    def stop(self) -> None:
        for p in (self.keepalived, self.varnish, self.haproxy):
            p.stop()


class Stand:
    """The whole edge; ``deliver`` sends cuts to each origin after its own delay."""

    def __init__(self, folder: Path, extra: dict[str, bytes] | None = None) -> None:
        self.folder = folder
        self.extra = dict(extra or {})
        """Files added to every cut (the benchmark's 100 KB CSV)."""
        self.net = Network(PREFIX)
        self.institute = Institute(folder / "institute")
        self.sequence = 0
        self.held: set[str] = set()
        """Origins whose deliveries are held back (the lag drill)."""
        self.missed: dict[str, tuple[int, dict[str, bytes], bytes]] = {}
        """The newest cut each held origin missed."""
        self.delivered: dict[str, int] = {}
        self.published_at: dict[int, float] = {}
        """When each cut was handed to the deliveries (time.time())."""
        self.cut_times: dict[int, str] = {}
        self.rng = random.Random(13)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        try:
            nodes = {r: self.net.add(r, h) for r, h in {**BALANCERS, **ORIGINS}.items()}
            self.client = self.net.add("client", CLIENT)
            addresses = {r: nodes[r].address for r in ORIGINS}
            purge = " ".join(f"http://{nodes[b].address}:80" for b in BALANCERS)
            self.origins = {r: Origin(nodes[r], folder / r, self.institute, purge) for r in ORIGINS}
            b1, b2 = nodes["lb1"], nodes["lb2"]
            self.balancers = {
                "lb1": Balancer(b1, folder / "lb1", addresses, b2.address, 150),
                "lb2": Balancer(b2, folder / "lb2", addresses, b1.address, 100),
            }
        except BaseException:
            self.net.close()
            raise

    def start(self) -> None:
        """Start every origin with cut 1, then the balancers; wait for the floating address."""
        for origin in self.origins.values():
            origin.start()
        self.publish(spread=0.0)
        self.wait_everywhere(self.sequence)
        for balancer in self.balancers.values():
            balancer.start()
        wait_for(lambda: self.balancers["lb1"].holds_vip(), 20, "lb1 holds the floating address")
        wait_for(lambda: self.client_status(VIP) == 200, 20, "the floating address answers")

    def client_status(self, host: str, path: str = "/status.json") -> int:
        out = self.client.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                f"http://{host}{path}",
            ],
            check=False,
        )
        return int(out or 0)

    def client_get(self, path: str) -> tuple[dict[str, str], str]:
        """GET ``path`` on the floating address from the client: headers (lowercase), body."""
        out = self.client.run(["curl", "-s", "-i", "--max-time", "3", f"http://{VIP}{path}"])
        head, _, body = out.partition("\n\n")  # run() reads text: CRLF became LF
        headers = {}
        for line in head.splitlines()[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return headers, body

    def cut_files(self, sequence: int) -> tuple[dict[str, bytes], dict[str, Any]]:
        when = (datetime.now(MIDDLE) - timedelta(seconds=AGE)).replace(microsecond=0)
        files = {**self.institute.files(when, sequence), **self.extra}
        return files, self.institute.manifest(files, sequence, when, period_seconds=PERIOD)

    def publish(self, spread: float = 5.0) -> int:
        """The institute's next cut, to each origin after a random 0..``spread`` s delay."""
        self.sequence += 1
        files, doc = self.cut_files(self.sequence)
        self.published_at[self.sequence] = time.time()
        self.cut_times[self.sequence] = str(doc["cut_time"])
        data = json.dumps(doc, indent=1).encode()
        for name, origin in self.origins.items():
            delay = self.rng.uniform(0, spread)
            thread = threading.Thread(
                target=self._deliver,
                args=(name, origin, self.sequence, files, data, delay),
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self.sequence

    def _deliver(
        self,
        name: str,
        origin: Origin,
        sequence: int,
        files: dict[str, bytes],
        data: bytes,
        delay: float,
    ) -> None:
        time.sleep(delay)
        with self._lock:
            if name in self.held:
                if sequence > self.missed.get(name, (0, {}, b""))[0]:
                    self.missed[name] = (sequence, files, data)
                return
            if sequence > self.delivered.get(name, 0):
                # One upload at a time per origin, never an older one after a newer.
                self.delivered[name] = sequence
                self.institute.deliver(origin.inbox, files, raw=data)

    def hold(self, name: str) -> None:
        """Stop delivering cuts to origin ``name``."""
        with self._lock:
            self.held.add(name)

    def release(self, name: str) -> None:
        """Deliver again to ``name``, starting with the newest cut it missed."""
        with self._lock:
            self.held.discard(name)
            missed = self.missed.pop(name, None)
            if missed is not None and missed[0] > self.delivered.get(name, 0):
                self.delivered[name] = missed[0]
                self.institute.deliver(self.origins[name].inbox, missed[1], raw=missed[2])

    def published(self, name: str) -> int:
        """The sequence origin ``name`` has published (0: none)."""
        try:
            doc = json.loads((self.origins[name].config.public / "status.json").read_text())
        except (OSError, ValueError):
            return 0
        return int(doc.get("sequence") or 0)

    def wait_everywhere(self, sequence: int, timeout: float = 20) -> None:
        for name in self.origins:
            wait_for(
                lambda n=name: self.published(n) >= sequence,  # type: ignore[misc]
                timeout,
                f"{name} at cut {sequence}",
            )

    def checker(
        self, seconds: float, workers: int = 4, rate: float = 10.0
    ) -> subprocess.Popen[str]:
        """Start tests/edgecheck.py in the client's namespace against the floating address."""
        argv = [
            sys.executable,
            "-m",
            "tests.edgecheck",
            VIP,
            "--seconds",
            str(seconds),
            "--workers",
            str(workers),
            "--rate",
            str(rate),
        ]
        return subprocess.Popen(
            self.client.command(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        )

    def close(self) -> None:
        """Stop every process, remove every namespace."""
        for t in self._threads:
            t.join(timeout=10)
        for balancer in getattr(self, "balancers", {}).values():
            balancer.stop()
        for origin in getattr(self, "origins", {}).values():
            origin.stop()
        self.net.close()


def summary(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The checker's JSON summary (AssertionError with its stderr if it failed)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    doc: dict[str, Any] = json.loads(out)
    return doc


def stop_checker(proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    """End a checker before its ``--seconds`` (SIGTERM) and return its summary."""
    proc.terminate()
    return summary(proc, timeout)
