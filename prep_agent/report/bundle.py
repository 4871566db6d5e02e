"""The report's deliverables beyond the HTML: the PDF, the log archive, the checksums."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from prep_agent.core.errors import Error

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
"""Headless browsers tried, in order, for ``--pdf``."""

PDF_TIMEOUT = 180
"""Seconds the browser may take to print the report."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def render_pdf(html_path: Path, pdf_path: Path) -> None:
    """Print the HTML report to PDF with headless Chromium.

    Raises Error if no browser is installed or printing fails.
    """
    browser = next((b for b in map(shutil.which, CHROMIUM) if b), None)
    if browser is None:
        raise Error("--pdf needs Chromium (Debian package chromium)")
    with tempfile.TemporaryDirectory(prefix="prep-report-chromium-") as profile:
        argv = [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--print-to-pdf={pdf_path}",
            "--no-pdf-header-footer",
            html_path.resolve().as_uri(),
        ]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=PDF_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            raise Error(f"Chromium did not print the PDF within {PDF_TIMEOUT} s") from exc
    if proc.returncode != 0 or not pdf_path.is_file() or pdf_path.stat().st_size == 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise Error(f"Chromium failed to print the PDF (exit {proc.returncode}): {' '.join(tail)}")


def archive_names(paths: list[Path]) -> list[str]:
    """Names inside the archive: the base name, prefixed by the parent folder on a clash."""
    names = [p.name for p in paths]
    out = []
    for p, name in zip(paths, names):
        if names.count(name) > 1:
            name = f"{p.parent.name}_{name}"
        while name in out:
            name = "_" + name
        out.append(name)
    return out


def write_archive(paths: list[Path], tar_path: Path) -> list[tuple[str, str]]:
    """Bundle the raw logs, byte for byte, with ``SHA256SUMS`` into an uncompressed tar.

    Returns ``(sha256, name)`` per log. Raises OSError if a log cannot be read.
    """
    sums = []
    partial = tar_path.with_name(tar_path.name + ".part")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in zip(paths, archive_names(paths)):
            sums.append((sha256_file(path), name))
            tar.add(path, arcname=f"bitacoras/{name}", recursive=False)
        listing = "".join(f"{digest}  {name}\n" for digest, name in sums).encode()
        with tempfile.NamedTemporaryFile() as fh:
            fh.write(listing)
            fh.flush()
            tar.add(fh.name, arcname="bitacoras/SHA256SUMS")
    partial.replace(tar_path)
    return sums


def write_checksums(out: Path, names: list[str]) -> None:
    """Write ``out/SHA256SUMS`` for the report's files (``sha256sum -c`` format)."""
    lines = [f"{sha256_file(out / n)}  {n}\n" for n in sorted(names)]
    (out / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")
