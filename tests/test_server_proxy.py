"""Whose X-Forwarded-For the embedded server believes (issue 11, finding 13).

Behind a reverse proxy on the same host the agent takes the client address from
the proxy's X-Forwarded-For, so ``[health] allow`` applies to the real client. The
trusted address was 127.0.0.1 whatever ``listen`` said: an agent on ``[::1]:8080``
behind nginx saw every client as ::1, an allowed address, and served the full
/health and /metrics to all. The trusted proxy now follows the family of
``listen`` and can be set with ``[server] trusted_proxy``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prep_agent.core.errors import ConfigError
from prep_agent.web.server import trusted_proxy
from tests.kit import AgentDaemon, Institute, free_port, make_config

pytestmark = pytest.mark.timeout(60)

PUBLIC_KEYS = {"status", "serviceId", "time", "checks"}
OUTSIDER = "203.0.113.7"
"""A client address on no allow list (TEST-NET-3)."""


@contextlib.contextmanager
def running_agent(tmp: Path, institute: Institute, listen: str, **settings: str) -> Iterator[str]:
    """``prep-agent run`` listening on ``listen``; yields the HOST:PORT it serves on."""
    make_config(tmp, institute, listen=listen, **settings)
    daemon = AgentDaemon(tmp / "prep-agent.conf").start()
    try:
        assert daemon.address is not None
        yield daemon.address
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()


def get(address: str, path: str, source: str, forwarded: str | None = None) -> tuple[int, Any]:
    """GET ``path`` from ``source`` (with an X-Forwarded-For if given): status and body
    (parsed when JSON)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(
        host.strip("[]"), int(port), timeout=5, source_address=(source, 0)
    )
    try:
        headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.getheader("Content-Type", "").endswith("json"):
        return response.status, json.loads(body)
    return response.status, body


def full(doc: dict[str, Any]) -> bool:
    """Whether a /health document is the full view (host checks, version)."""
    if set(doc) == PUBLIC_KEYS:
        return False
    assert "version" in doc and "disk:utilization" in doc["checks"], sorted(doc)
    return True


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_behind_a_proxy_on_ipv6_loopback_the_client_is_the_forwarded_one(
    tmp_path: Path, institute: Institute
) -> None:
    """Listening on [::1], nginx connects from ::1: its X-Forwarded-For names the client."""
    assert ipv6_loopback(), "this machine has no ::1"
    with running_agent(tmp_path, institute, "[::1]:0") as address:
        assert address.startswith("[::1]:")
        status, doc = get(address, "/health", "::1", forwarded=OUTSIDER)
        assert status == 200 and not full(doc), "an outside client saw the full /health"
        assert get(address, "/metrics", "::1", forwarded=OUTSIDER)[0] == 403
        for allowed in ("::1", "127.0.0.1"):
            status, doc = get(address, "/health", "::1", forwarded=allowed)
            assert status == 200 and full(doc), allowed
            status, text = get(address, "/metrics", "::1", forwarded=allowed)
            assert status == 200 and b"prep_cut_sequence " in text, allowed
        # The operator on the host itself, with no proxy in between.
        assert full(get(address, "/health", "::1")[1])


def test_the_trusted_proxy_can_be_set(tmp_path: Path, institute: Institute) -> None:
    """``trusted_proxy = 127.0.0.2``: its header is believed, 127.0.0.1's no longer is."""
    listen = f"127.0.0.1:{free_port()}"
    with running_agent(tmp_path, institute, listen, trusted_proxy="127.0.0.2") as address:
        assert not full(get(address, "/health", "127.0.0.2", forwarded=OUTSIDER)[1])
        assert get(address, "/metrics", "127.0.0.2", forwarded=OUTSIDER)[0] == 403
        assert full(get(address, "/health", "127.0.0.2", forwarded="127.0.0.1")[1])
        # 127.0.0.1 is allowed but no longer the proxy: its header is dropped.
        assert full(get(address, "/health", "127.0.0.1", forwarded=OUTSIDER)[1])
        assert not full(get(address, "/health", "127.0.0.2")[1])


def test_the_trusted_proxy_follows_listen_unless_set(tmp_path: Path, institute: Institute) -> None:
    for listen, proxy, expected in (
        ("127.0.0.1:8080", "", "127.0.0.1"),
        ("0.0.0.0:8080", "", "127.0.0.1"),
        ("[::1]:8080", "", "::1"),
        ("[::]:8080", "", "::1"),
        ("[2001:db8::5]:8080", "", "::1"),
        ("localhost:8080", "", "127.0.0.1"),
        ("[::1]:8080", "0:0:0:0:0:0:0:1", "::1"),
        ("127.0.0.1:8080", "10.0.0.5", "10.0.0.5"),
        ("[::1]:8080", "none", None),
    ):
        config = make_config(tmp_path, institute, listen=listen, trusted_proxy=proxy)
        assert trusted_proxy(config) == expected, (listen, proxy)
    for wrong in ("*", "localhost", "127.0.0.0/8", "::1 127.0.0.1"):
        with pytest.raises(ConfigError) as caught:
            make_config(tmp_path, institute, trusted_proxy=wrong)
        assert str(caught.value) == (
            f"[server] trusted_proxy: {wrong!r} is not an IP address (or none)"
        )
