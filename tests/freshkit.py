"""A fresh minimal Debian 12, made with mmdebstrap, to install the packages into.

``base_tarball`` makes ``mmdebstrap --variant=apt bookworm`` (Essential packages
and apt, nothing else: what the issue's new difusor started from) from this
machine's own apt sources, once a day: it is cached as
``/var/cache/prep-agent-tests/bookworm-apt-YYYYMMDD.tar``. ``FreshSystem``
unpacks it into a folder and runs commands in it with ``chroot``, inside a
private mount namespace (``unshare --mount``) where ``/proc`` is mounted: the
mount ends with the command, nothing stays mounted on the host. A
``policy-rc.d`` that forbids starting services keeps the packages' scripts from
starting nginx or sshd on the host's network.
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

CACHE = Path("/var/cache/prep-agent-tests")
"""Where the day's base system tarball is kept (and older ones removed)."""
SUITE = "bookworm"
SOURCES = (Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*")))
"""This machine's apt sources: the fresh system uses the same mirrors."""
ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}
POLICY_RC = "#!/bin/sh\n# Test system: packages install, services never start.\nexit 101\n"
COMPILERS = ("cc", "c++", "gcc", "g++", "cpp", "clang", "ld", "as", "x86_64-linux-gnu-gcc-12")
"""Commands of a C/C++ toolchain; none may exist on the agent's server."""


def require_mmdebstrap() -> None:
    """Fail (never skip) when mmdebstrap or unshare is missing, naming the package."""
    missing = [
        p
        for c, p in (("mmdebstrap", "mmdebstrap"), ("unshare", "util-linux"))
        if not shutil.which(c, path=ENV["PATH"])
    ]
    if missing:
        pytest.fail(f"fresh-system tools missing: apt-get install {' '.join(missing)}")


def mirror_files() -> list[str]:
    """This machine's apt source files for the suite (one-line or deb822 format)."""
    found = []
    for path in SOURCES:
        if not path.is_file() or not (
            path.name == "sources.list" or path.suffix in (".list", ".sources")
        ):
            continue
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if any(SUITE in ln for ln in lines if not ln.lstrip().startswith("#")):
            found.append(str(path))
    assert found, f"no apt source of {SUITE} on this machine ({[str(s) for s in SOURCES]})"
    return found


def base_tarball(today: datetime.date | None = None) -> tuple[Path, float]:
    """Today's base system tarball, made if missing; return (path, seconds it took).

    Made with ``--skip=cleanup/apt/lists`` so the system can install without an
    ``apt-get update``; written under a temporary name, then renamed.
    """
    day = today or datetime.datetime.now(datetime.timezone.utc).date()
    path = CACHE / f"{SUITE}-apt-{day:%Y%m%d}.tar"
    if path.is_file():
        return path, 0.0
    CACHE.mkdir(parents=True, exist_ok=True)
    # mmdebstrap picks the format from the name: the partial file ends in .tar too.
    partial = path.with_name(f".{path.stem}.{os.getpid()}.tar")
    started = time.monotonic()
    argv = ["mmdebstrap", "--variant=apt", "--skip=cleanup/apt/lists", SUITE, str(partial)]
    proc = subprocess.run(
        [*argv, *mirror_files()], capture_output=True, text=True, env=ENV, timeout=600, check=False
    )
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise AssertionError(f"{shlex.join(argv)} failed:\n{proc.stderr[-3000:]}")
    partial.replace(path)
    for old in CACHE.glob(f"{SUITE}-apt-*.tar"):
        if old != path:
            old.unlink()
    return path, time.monotonic() - started


class FreshSystem:
    """A Debian system unpacked in a folder; commands run chrooted into it."""

    def __init__(self, tarball: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="prep-agent-fresh-", dir="/var/tmp"))
        try:
            subprocess.run(
                ["tar", "-C", str(self.root), "-xf", str(tarball)], check=True, timeout=300
            )
        except BaseException:
            shutil.rmtree(self.root)
            raise
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC)
        policy.chmod(0o755)

    def path(self, inside: str | Path) -> Path:
        """The host path of a path inside the system."""
        return self.root / str(inside).lstrip("/")

    def run(
        self, argv: list[str], *, user: str | None = None, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the system (as ``user``, by its ids there, or root)."""
        spec = []
        if user is not None:
            uid, gid = self.ids(user)
            spec = [f"--userspec={uid}:{gid}", f"--groups={gid}"]
        script = 'mount -t proc proc "$1/proc" && shift && exec chroot "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]
        cmd += [str(self.root), *spec, str(self.root), *argv]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=ENV, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check:
            assert proc.returncode == 0, (
                f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        return proc

    def ids(self, user: str) -> tuple[int, int]:
        """``user``'s uid and gid in the system's own /etc/passwd."""
        for line in self.path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise AssertionError(f"no user {user} in the fresh system")

    def install(self, *debs: Path, names: tuple[str, ...] = ()) -> str:
        """``apt-get install --no-install-recommends`` of local .debs and packages."""
        copies = []
        for deb in debs:
            shutil.copy(deb, self.path("/tmp") / deb.name)
            copies.append(f"/tmp/{deb.name}")
        try:
            out = self.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *copies, *names],
                timeout=600,
            ).stdout
        finally:
            for copy in copies:
                self.path(copy).unlink(missing_ok=True)
        self.run(["apt-get", "clean"])
        return out

    def packages(self) -> dict[str, int]:
        """Installed packages and their Installed-Size in KiB (dpkg's figure)."""
        out = self.run(
            ["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Package} ${Installed-Size}\n"]
        ).stdout
        return {
            f[1]: int(f[2] or 0)
            for f in (ln.split() for ln in out.splitlines())
            if f[0] == "ii" and len(f) == 3
        }

    def size(self, inside: str = "/") -> int:
        """Bytes on disk under ``inside`` (``du``, one file system)."""
        out = subprocess.run(
            ["du", "-sxB1", str(self.path(inside))], capture_output=True, text=True, check=True
        ).stdout
        return int(out.split()[0])

    def stat(self, inside: str) -> str:
        """``owner:group mode`` of a path, as the system's own users name them."""
        return self.run(["stat", "-c", "%U:%G %a", inside]).stdout.strip()

    def remove(self) -> None:
        """Delete the system (refused if something is still mounted in it)."""
        mounted = [p for p in ("proc", "sys", "dev") if os.path.ismount(self.root / p)]
        assert not mounted, f"{self.root}: {mounted} still mounted, not removing"
        shutil.rmtree(self.root)


def megabytes(size: float) -> str:
    """``12.3 MB (11.7 MiB)``."""
    return f"{size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)"


def closure(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The packages an installation added."""
    return sorted(set(after) - set(before))
