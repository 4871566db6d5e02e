"""``prep-agent simulate --serve-https``: the institute's side of the https-package model,
polled by the agent's fetcher as a difusor would (a real process, real TLS on loopback)."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import requests  # type: ignore[import-untyped]

from prep_agent.agent.fetch import Fetcher, Settings
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.package import package_stamp
from tests.kit import Daemon, free_port, keygen, wait_for


def test_simulated_institute_serves_signed_packages_over_https(tmp_path: Path) -> None:
    key = tmp_path / "instituto"
    public = keygen(key)
    out, port = tmp_path / "out", free_port()
    argv = ["simulate", "--key", str(key), "--out", str(out), "--cuts", "2", "--interval", "0.2"]
    argv += ["--serve-https", f"127.0.0.1:{port}", "--keep-serving"]
    index = out / "paquetes" / "index.json"

    def two_packages() -> bool:
        return index.is_file() and len(json.loads(index.read_text())) == 2

    institute = Daemon(argv, tmp_path / "institute.log")
    institute.livez = None
    institute.start()
    try:
        wait_for(two_packages, 30, "two packages", alive=institute.proc)
        names = json.loads(index.read_text())
        base = f"https://127.0.0.1:{port}/paquetes/"
        signers = parse_allowed_signers(f'iec namespaces="prep-package" {public}\n')
        found = {}
        for url in (base, base + "index.json", base + "latest.zip"):
            settings = Settings(url, ca_file=str(out / "tls" / "ca.pem"), require_signature=True)
            fetcher = Fetcher(settings, signers)
            package = fetcher.poll(datetime.now(timezone.utc))
            assert package is not None and package.signed_by, url
            found[url] = (package.url, package.file_name, package.data)
        assert len(set(found.values())) == 1  # folder, JSON index and latest.zip agree
        url, name, data = found[base]
        assert name == names[-1] and url == base + name
        stamp = package_stamp(name)
        assert stamp is not None and name == f"{stamp[:8]}_{stamp[8:]}_PREP_COAH.zip"
        with zipfile.ZipFile(io.BytesIO(data)) as package_zip:
            inner_name = f"{stamp[:8]}_{stamp[8:]}_PREP_AYUN_COAH.zip"
            assert package_zip.namelist() == [inner_name]
            with zipfile.ZipFile(io.BytesIO(package_zip.read(inner_name))) as inner:
                csv = next(n for n in inner.namelist() if n.endswith(".csv"))
                line2 = inner.read(csv).decode("utf-8-sig").splitlines()[1]
        day, minute = stamp[:8], stamp[8:]
        assert line2.startswith(f"{day[6:]}/{day[4:6]}/{day[:4]} {minute[:2]}:{minute[2:]}")
        # The server keeps its key and the cut folders to itself.
        answer = requests.get(
            f"https://127.0.0.1:{port}/tls/server.key", verify=str(out / "tls" / "ca.pem")
        )
        assert answer.status_code == 404
    finally:
        assert institute.stop() in (0, -15), institute.output()
