"""Network namespaces for tests: the product's ``prep_agent.rehearsal.netns`` (one
copy, shared with ``prep-agent rehearse``'s root mode)."""

from __future__ import annotations

from prep_agent.rehearsal.netns import IP, RELAY, Network, Node, Tunnel, available, ip

__all__ = ["IP", "RELAY", "Network", "Node", "Tunnel", "available", "ip"]
