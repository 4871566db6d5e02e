"""The https-package source soft-purges the caches after a swap, as the drop folder does.

A real ``prep-agent run`` polls a real HTTPS site on loopback; a real HTTP server
stands where a Varnish node would and records each PURGE.
"""

from __future__ import annotations

import socket
import time

from prep_agent.web.purge import POINTER_TAG
from tests.kit import AgentDaemon, wait_for
from tests.test_ha_origin import Node, nodes  # noqa: F401  # the fixture
from tests.test_package_checks import CUT_STAMPS, cut_package
from tests.test_package_publish import Env, ca, env  # noqa: F401  # the fixtures


def test_a_published_package_soft_purges_the_pointers(
    env: Env,  # noqa: F811
    nodes: tuple[Node, str, str, socket.socket],  # noqa: F811
) -> None:
    node, refused, _, _ = nodes
    text = env.conf.read_text()
    purge = text.index("[purge]")
    text = text[:purge] + text[purge:].replace(
        "nodes =\n", f"nodes = {node.url} {refused}\n", 1
    ).replace("poll_seconds = 30", "poll_seconds = 1")
    env.conf.write_text(text)
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    agent = AgentDaemon(env.conf).start(timeout=30)
    try:
        wait_for(lambda: agent.status()["sequence"] == 202106062240, 30, "the first cut")
        wait_for(lambda: len(node.purges) >= 1, 10, "purge 1 received")
        assert node.purges[0][:2] == ("/", POINTER_TAG)
        newer_name, newer = cut_package(CUT_STAMPS[1])
        env.offer(newer_name, newer)
        wait_for(lambda: agent.status()["sequence"] == 202106062320, 30, "the newer cut")
        wait_for(lambda: len(node.purges) >= 2, 10, "purge 2 received")
        time.sleep(2.5)  # an idle poll (the same package again) purges nothing
        assert len(node.purges) == 2, node.purges
    finally:
        assert agent.stop() == 0
