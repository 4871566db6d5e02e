"""Soft purge of the pointers on the difusor's own Varnish nodes (``[purge]``).

With an HA edge (packaging/ha) every response carries tag headers (``xkey``,
``Surrogate-Key``, ``Cache-Tag``, ``Edge-Cache-Tag``). After each swap the agent
may ask every configured Varnish node to soft-purge the pointer objects (the
frame and ``status.json``, tag ``POINTER_TAG``): ``PURGE /`` with the header
``xkey-softpurge: prep-pointer``, which the shipped VCL accepts from its ACL only.
A soft purge keeps the old copy servable while the origins are down (a hard
purge would turn the next request into a 503), and the next request fetches
the new cut at once instead of after the pointer's max-age.

Purge is an accelerator, never a dependency: publication only calls
``notify()``, which sets an event and returns; one background thread per node
sends the request ``delay`` seconds later (nginx may serve the previous
pointer for up to 1 s after the swap) with short timeouts; a failure is logged and counted
(``prep_purge_total{result="failed"}`` in /metrics) and never retried: the
pointer's own max-age (5 s) bounds what a missed purge costs.
"""

from __future__ import annotations

import http.client
import logging
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from prep_agent.web.health import Metrics

log = logging.getLogger(__name__)

POINTER_TAG = "prep-pointer"
"""Tag of the frame (``/``, ``/index.html``) and ``status.json``."""
RELEASE_TAG = "prep-release"
"""Tag of every release file (immutable: never purged by the agent)."""
STATIC_TAG = "prep-static"
"""Tag of the frame's own assets (``/static/``)."""
TAG_HEADERS = ("xkey", "Surrogate-Key", "Cache-Tag", "Edge-Cache-Tag")
"""Response headers naming an object's tag, one per cache: Varnish xkey, Fastly,
Cloudflare, Akamai (one tag each, so space or comma separation does not matter)."""
SOFTPURGE_HEADER = "xkey-softpurge"
"""Request header the shipped VCL reads the tags to soft-purge from."""


def tag_headers(tag: str) -> list[tuple[str, str]]:
    """The tag headers of a response whose object is tagged ``tag``."""
    return [(name, tag) for name in TAG_HEADERS]


def send_softpurge(node: str, tag: str, timeout: float) -> int:
    """Send one ``PURGE /`` with ``xkey-softpurge: tag`` to ``node`` (``http://host:port``).

    Returns the HTTP status; raises ``OSError`` (connection refused, timeout...)
    or ``http.client.HTTPException`` if no answer came.
    """
    parts = urlsplit(node)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        conn.request("PURGE", "/", headers={SOFTPURGE_HEADER: tag, "Content-Length": "0"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Purger:
    """One background thread per Varnish node, soft-purging ``POINTER_TAG`` on ``notify()``."""

    def __init__(
        self, nodes: Sequence[str], metrics: Metrics, timeout: float = 2.0, delay: float = 1.5
    ) -> None:
        self.nodes = tuple(nodes)
        self.metrics = metrics
        self.timeout = timeout
        self.delay = delay
        self._events = [threading.Event() for _ in self.nodes]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the node threads (daemon threads: they never hold the agent up)."""
        for node, event in zip(self.nodes, self._events):
            thread = threading.Thread(
                target=self._loop, args=(node, event), name=f"purge {node}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """Ask every node to soft-purge the pointers now; returns at once."""
        for event in self._events:
            event.set()

    def stop(self) -> None:
        """Stop the threads; waits at most ``timeout`` (+1 s) for a purge in flight."""
        self._stop.set()
        for event in self._events:
            event.set()
        for thread in self._threads:
            thread.join(self.timeout + 1.0)

    def _loop(self, node: str, event: threading.Event) -> None:
        while True:
            event.wait()
            if self._stop.is_set():
                return
            event.clear()
            # After the swap, nginx may serve the previous status.json for up to
            # its open_file_cache_valid (1 s, packaging/nginx): a purge before
            # that would make the cache fetch the old pointer again and keep it
            # for a whole max-age. Wait longer than that first.
            if self._stop.wait(self.delay):
                return
            self.purge_once(node)

    def purge_once(self, node: str) -> bool:
        """Soft-purge the pointers on ``node`` now; True if it answered 200.

        Never raises: a failure is logged and counted in the metrics.
        """
        try:
            status = send_softpurge(node, POINTER_TAG, self.timeout)
        except (OSError, http.client.HTTPException) as exc:
            reason = str(exc) or type(exc).__name__
        else:
            if status == 200:
                self.metrics.count_purge(node, ok=True)
                return True
            reason = f"HTTP {status}"
        log.warning("soft purge of %s at %s failed: %s", POINTER_TAG, node, reason)
        self.metrics.count_purge(node, ok=False)
        return False
