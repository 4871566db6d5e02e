"""Network namespaces for the rehearsal (root mode) and the tests' HA edge stand:
a private switch (a bridge) and nodes on it.

``Network`` creates one namespace per node plus one holding the bridge; each node
gets a veth pair whose far end is on the bridge, a private address
(198.18.0.0/15, RFC 2544's benchmarking range, never routed) and its own
loopback; a node may join several switches (``join``), and this host's own
namespace may be attached to one (``attach_host``). Names carry a per-run tag,
so parallel runs never collide, and ``close()`` removes every namespace it
created (which removes their links, the host's included, and kills nothing:
stop your processes first). Needs root. Moved here from ``tests/kit/netns.py``
(which re-exports it) so the product's rehearsal and the tests share one copy.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prep_agent.core.errors import Error

IP = shutil.which("ip") or "/usr/sbin/ip"


def ip(*args: str) -> str:
    """Run ``ip ARGS``; return its output. Raises Error with its message."""
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise Error(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def free_prefix(first: str = "198.19") -> str:
    """A ``first.N`` /24 prefix no address of this host's namespace is in (for a
    switch this host attaches to; parallel runs pick different ones)."""
    taken = ip("-o", "-4", "addr", "show")
    choices = list(range(1, 255))
    random.shuffle(choices)
    for n in choices:
        if f" {first}.{n}." not in taken:
            return f"{first}.{n}"
    raise Error(f"no free {first}.N.0/24 prefix on this host")


def available() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.access(IP, os.X_OK):
        return "iproute2 (ip) missing"
    return None


@dataclass(frozen=True)
class Node:
    """One namespace on the switch."""

    name: str
    """The namespace's name (unique per run)."""
    address: str
    """Its address on the switch, without prefix length."""
    interface: str = "eth0"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to run inside this namespace (``ip netns exec`` execs it: same PID)."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 20, check: bool = True) -> str:
        """Run ``argv`` inside the namespace; return its output.

        Raises Error when it fails and ``check``.
        """
        proc = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise Error(f"{self.name}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def popen(self, argv: Sequence[str], log: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace, its output to the open file ``log``."""
        return subprocess.Popen(
            self.command(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **kwargs,
        )


class Network:
    """A bridge in a namespace of its own and nodes on it, all removed by ``close()``."""

    def __init__(self, prefix: str = "198.18.0", length: int = 24) -> None:
        self.tag = secrets.token_hex(3)
        self.prefix = prefix
        self.length = length
        self.switch = f"sw{self.tag}"
        self.nodes: dict[str, Node] = {}
        self._made: list[str] = []
        self._links = 0
        self._add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add(self, role: str, host: int) -> Node:
        """A node ``role`` at ``PREFIX.host`` on the switch (its ``eth0``)."""
        node = Node(f"{role}{self.tag}", f"{self.prefix}.{host}")
        self._add_namespace(node.name)
        self._veth(node.name, "eth0", host)
        self.nodes[role] = node
        return node

    def join(self, node: Node, host: int, interface: str) -> str:
        """Link ``node`` (a namespace made elsewhere) to this switch too, as
        ``interface`` at ``PREFIX.host``; return that address."""
        self._veth(node.name, interface, host)
        return f"{self.prefix}.{host}"

    def attach_host(self, host: int) -> str:
        """Link this host's own namespace to the switch at ``PREFIX.host`` (the link
        goes away with the switch); return that address."""
        near = f"h{self.tag}"
        self._veth(None, near, host)
        return f"{self.prefix}.{host}"

    def _veth(self, namespace: str | None, interface: str, host: int) -> None:
        far = f"v{self.tag}{self._links}"
        self._links += 1
        into = ["netns", namespace] if namespace else []
        ip("link", "add", far, "netns", self.switch, "type", "veth", "peer", "name", interface,
           *into)  # fmt: skip
        ip("-n", self.switch, "link", "set", far, "master", "br0", "up")
        inside = ["-n", namespace] if namespace else []
        ip(*inside, "addr", "add", f"{self.prefix}.{host}/{self.length}", "dev", interface)
        ip(*inside, "link", "set", interface, "up")

    @property
    def names(self) -> list[str]:
        """The namespaces made (and not yet removed)."""
        return list(self._made)

    def close(self) -> None:
        """Remove every namespace made (and with them their links)."""
        for name in reversed(self._made):
            subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=20)
        self._made.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RELAY = """
import socket, sys, threading
def address(spec):
    kind, _, rest = spec.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, rest
    host, _, port = rest.rpartition(":")
    return socket.AF_INET, (host, int(port))
def pipe(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
family, where = address(sys.argv[1])
server = socket.socket(family)
server.bind(where)
server.listen(64)
target = address(sys.argv[2])
while True:
    client, _ = server.accept()
    upstream = socket.socket(target[0])
    try:
        upstream.connect(target[1])
    except OSError:
        client.close()
        continue
    threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
"""
"""A byte relay: listens on argv[1], connects each client to argv[2]
(``unix:PATH`` or ``tcp:HOST:PORT``)."""


class Tunnel:
    """127.0.0.1:``port`` on this host's loopback relayed to ``host``:``target_port``
    as seen from inside ``node``, through a Unix socket (no link between the
    namespaces): two relay processes, one on each side. For programs that cannot
    run in the namespace themselves (a browser driven by its driver over loopback).
    """

    def __init__(self, node: Node, host: str, target_port: int, folder: str, port: int) -> None:
        self.port = port
        path = os.path.join(folder, f"tunnel-{node.name}.sock")
        inside = [sys.executable, "-c", RELAY, f"unix:{path}", f"tcp:{host}:{target_port}"]
        self.inside = node.popen(inside, subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        outside = [sys.executable, "-c", RELAY, f"tcp:127.0.0.1:{port}", f"unix:{path}"]
        self.outside = subprocess.Popen(outside, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        """Stop both relay processes."""
        for proc in (self.outside, self.inside):
            proc.kill()
            proc.wait(timeout=10)
