"""The simulated institute publishing PREP packages over HTTPS (``simulate --serve-https``).

Most institutes publish each cut as a zip for difusores to download. Here each
cut's delivery zip (``datos/YYYYMMDD_HHMM_PREP_AYUN_COAH.zip``) is wrapped,
as in the real Campeche 2021 delivery, in the package
``YYYYMMDD_HHMM_PREP_COAH.zip`` (a zip of the per-election inner zips),
written to ``OUT/paquetes/`` with its signature ``.sig`` (SSHSIG, namespace
``prep-package``; written first, so a listed package is always signed) and
named in ``index.json``. Python's HTTP server serves the folder over TLS on
loopback: ``/paquetes/`` is an autoindex page, ``/paquetes/index.json`` the
JSON list, and ``/paquetes/latest.zip`` redirects to the newest package. The
certificate comes from a test CA made at start (``OUT/tls/ca.pem``, the
difusor's ``ca_file``).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import ssl
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prep_agent.core import sshkeys, sshsig
from prep_agent.core.errors import Error
from prep_agent.core.protocol import NAMESPACE_PACKAGE
from prep_agent.institute.simulation.testca import issue, make_ca, write_server_files

FOLDER = "paquetes"
"""The folder of the packages under the output folder (and in the URLs)."""
KEEP_PACKAGES = 50
"""Packages kept in the folder (the oldest go first)."""
_INNER = re.compile(r"(\d{8}_\d{4})_PREP_[A-Z_]+\.zip")


def package_bytes(folder: Path) -> tuple[str, bytes]:
    """The package of one simulated cut folder: its name and its zip bytes.

    Raises ``Error`` if the folder holds no delivery zip.
    """
    inner = sorted(p for p in (folder / "datos").glob("*.zip") if _INNER.fullmatch(p.name))
    if not inner:
        raise Error(f"{folder}: no delivery zip in datos/")
    stamp = _INNER.fullmatch(inner[0].name).group(1)  # type: ignore[union-attr]
    when = (int(stamp[:4]), int(stamp[4:6]), int(stamp[6:8]), int(stamp[9:11]), int(stamp[11:]), 0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in inner:
            info = zipfile.ZipInfo(path.name, date_time=when)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    return f"{stamp}_PREP_COAH.zip", buffer.getvalue()


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if not path.startswith(f"/{FOLDER}/") or "/." in path:  # never tls/ or the cuts
            self.send_error(404)
            return
        if path == f"/{FOLDER}/latest.zip":
            newest = self.server.publisher.newest()
            if newest is None:
                self.send_error(404, "todavía no hay paquetes")
                return
            self.send_response(302)
            self.send_header("Location", f"/{FOLDER}/{newest}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def guess_type(self, path: Any) -> str:
        if str(path).endswith(".zip"):
            return "application/zip"
        return str(super().guess_type(path))

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    publisher: PackagePublisher


class PackagePublisher:
    """Serves ``OUT/paquetes`` over HTTPS; called with each cut folder, publishes it."""

    def __init__(self, outdir: Path, key: sshkeys.PrivateKey, host: str, port: int) -> None:
        self.outdir = outdir
        self.folder = outdir / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        ca = make_ca()
        leaf = issue(ca, tuple(dict.fromkeys(("localhost", "127.0.0.1", host))))
        self.ca_file, cert, private = write_server_files(outdir / "tls", ca, leaf)
        self.pin = base64.b64encode(leaf.spki_sha256).decode()
        handler = functools.partial(_Handler, directory=str(outdir))
        try:
            self.server = _Server((host, port), handler)
        except OSError as exc:
            raise Error(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.server.publisher = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, private)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.host = host
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The folder URL difusores poll (``[source] url``)."""
        return f"https://{self.host}:{self.port}/{FOLDER}/"

    def packages(self) -> list[str]:
        """The published package names, oldest first."""
        return sorted(p.name for p in self.folder.glob("*_PREP_*.zip"))

    def newest(self) -> str | None:
        """The newest package's name, or None before the first."""
        names = self.packages()
        return names[-1] if names else None

    def __call__(self, folder: Path) -> None:
        """Publish the package of a cut folder: signature, zip, then the JSON index.

        Raises ``Error`` or OSError.
        """
        name, data = package_bytes(folder)
        if (self.folder / name).exists() and (self.folder / name).read_bytes() != data:
            print(f"institute: {name} is already published, not replaced", flush=True)
            return
        signature = sshsig.armor(sshsig.sign(self.key, data, NAMESPACE_PACKAGE))
        _write(self.folder / f"{name}.sig", signature)
        _write(self.folder / name, data)
        names = self.packages()
        for old in names[:-KEEP_PACKAGES]:
            for path in (self.folder / old, self.folder / f"{old}.sig"):
                path.unlink(missing_ok=True)
        index = json.dumps(names[-KEEP_PACKAGES:], indent=1).encode() + b"\n"
        _write(self.folder / "index.json", index)
        print(f"institute: published {self.url}{name}", flush=True)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (temporary file, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)
