"""One deadline for a whole HTTP exchange: shut its sockets down when it passes.

A read timeout bounds each wait for bytes, not the exchange: a server that
sends one byte per second never trips it. ``SocketDeadline`` is told every
socket an exchange opens and shuts them all down once its time is up, so the
blocked read returns and the caller reports a timeout (``expired``).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class SocketDeadline:
    """Shuts down every socket it watches once ``seconds`` have passed since ``start``."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        """Start counting."""
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """Watch ``sock`` through a duplicate of its descriptor: TLS takes over the
        original's, and shutting down either ends the one connection."""
        copy = sock.dup()
        with self._lock:
            self._sockets.append(copy)
            expired = self.expired
        if expired:
            shut(copy)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            shut(sock)

    def close(self) -> None:
        """Stop the timer and close the duplicates."""
        self._timer.cancel()
        if self._timer.ident is not None:  # started
            self._timer.join()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def shut(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways; a socket the other side closed already is fine."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
