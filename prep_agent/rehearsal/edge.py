"""The shipped HA edge configs (packaging/ha) made concrete for one stand: the
rehearsal's HA pair and the tests' edge stand (tests/edgekit.py) build their
balancers from the same files, changing only the per-installation strings the
files document.
"""

from __future__ import annotations

from pathlib import Path

from prep_agent.core.errors import Error

HA_DIRS = (
    Path(__file__).resolve().parents[2] / "packaging" / "ha",
    Path("/usr/share/prep-agent/examples/ha"),
)
"""Where the shipped configs are read from: this source tree's ``packaging/ha``,
else the copies the package installs (``packaging/install-files``)."""
DEFAULT_LAG = 114
"""The pointer backend's ``/readyz?lag=`` of the tests' edge stand."""
DEFAULT_NETWORK = "198.18.0"
"""The tests' edge stand's /24 prefix."""


def shipped(name: str) -> str:
    """The text of the shipped HA config ``name`` (``haproxy.cfg``, ...).

    Raises Error when no copy can be read.
    """
    for folder in HA_DIRS:
        path = folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise Error(f"the shipped HA config {name} is in none of {', '.join(map(str, HA_DIRS))}")


def substitute(text: str, subs: dict[str, str]) -> str:
    """Replace each documented per-installation string of a shipped config.

    Raises Error naming a string the config no longer contains.
    """
    for old, new in subs.items():
        if old not in text:
            raise Error(f"packaging/ha no longer contains {old!r}")
        text = text.replace(old, new)
    return text


def haproxy_config(origins: dict[str, str], lag: int = DEFAULT_LAG, port: int = 80) -> str:
    """packaging/ha/haproxy.cfg for ``origins`` (name -> address, served on ``port``).

    Raises Error when the shipped file lost a string it documents.
    """
    servers = "".join(f"    server {n} {a}:{port} check\n" for n, a in origins.items())
    return substitute(
        shipped("haproxy.cfg"),
        {
            "    server o1 10.0.0.11:80 check\n    server o2 10.0.0.12:80 check\n": servers,
            "/readyz?lag=30": f"/readyz?lag={lag}",
            "    log /dev/log local0\n": "",
        },
    )


def varnish_config(network: str = DEFAULT_NETWORK) -> str:
    """packaging/ha/default.vcl with ``network``.0/24 allowed to soft-purge.

    Raises Error when the shipped file lost a string it documents.
    """
    return substitute(shipped("default.vcl"), {'"10.0.0.0"/24': f'"{network}.0"/24'})


def keepalived_config(
    name: str, own: str, peer: str, priority: int, vip: str = f"{DEFAULT_NETWORK}.100"
) -> str:
    """packaging/ha/keepalived.conf for balancer ``name`` at ``own`` sharing ``vip``.

    Raises Error when the shipped file lost a string it documents.
    """
    return substitute(
        shipped("keepalived.conf"),
        {
            "router_id lb1": f"router_id {name}",
            "10.0.0.100/24": f"{vip}/24",
            "unicast_src_ip 10.0.0.2": f"unicast_src_ip {own}",
            "        10.0.0.3\n": f"        {peer}\n",
            "priority 150": f"priority {priority}",
        },
    )
