"""systemd readiness and watchdog notifications (sd_notify protocol), no dependency.

Sends datagrams to ``$NOTIFY_SOCKET`` when systemd started the agent with
``Type=notify``; does nothing otherwise.
"""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True
