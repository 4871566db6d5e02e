"""Real packaging tools for tests: build the .deb and .rpm, install the .deb, and run
what it installed (agent, sshd, nginx) the way the system would.

Nothing here is mocked: ``dpkg-buildpackage``, ``rpmbuild``, ``apt-get``, the
installed ``prep-agent`` under ``setpriv`` as its service user, the real ``sshd``
with the installed ``sshd_config.d`` snippet, the real ``sftp`` client and a real
nginx whose workers run as ``www-data``. Only what needs a running systemd is
emulated: the unit's ``ExecStart``, ``User=``, ``UMask=``, ``NoNewPrivileges=``,
the empty capability set, ``MemoryDenyWriteExecute=`` (``PR_SET_MDWE``, the same
W^X rule) and ``$NOTIFY_SOCKET`` are reproduced; the namespaces and the seccomp
filter are not (``systemd-analyze security`` checks those on the unit file).
"""

from __future__ import annotations

import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kit import free_port, stop_process, wait_for, wait_port

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
"""Debian's own tools first: pyenv or a venv on PATH must not build or run the package."""
SYSTEM_ENV = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}

TOOLS = {
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "dh_python3": "dh-python",
    "pybuild": "dh-python",
    "lintian": "lintian",
    "rpmbuild": "rpm",
    "rpmlint": "rpmlint",
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
    "sshd": "openssh-server",
    "sftp": "openssh-client",
    "nginx": "nginx",
    "fail2ban-client": "fail2ban",
    "logrotate": "logrotate",
    "setpriv": "util-linux",
}
"""Command -> the Debian package that provides it (scripts/install-deps installs them)."""


def require_tools() -> None:
    """Fail (never skip) when a packaging tool is missing, naming the packages."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if not _which(cmd)})
    if not Path("/usr/share/dh-python/dhpython/build/plugin_pyproject.py").is_file():
        missing.append("pybuild-plugin-pyproject")
    if missing:
        pytest.fail(f"packaging tools missing: apt-get install {' '.join(missing)}")


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=SYSTEM_PATH)


def run(cmd: list[str], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a system tool with Debian's PATH; capture its output as text."""
    kwargs.setdefault("env", SYSTEM_ENV)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
    )


def check(cmd: list[str], timeout: float = 300, **kwargs: Any) -> str:
    """Run a system tool; fail with its output unless it exits 0; return stdout."""
    proc = run(cmd, timeout, **kwargs)
    assert (
        proc.returncode == 0
    ), f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def version() -> str:
    """The upstream version (prep_agent.__version__)."""
    text = (ROOT / "prep_agent" / "__init__.py").read_text()
    found = re.search(r'__version__ = "([^"]+)"', text)
    assert found
    return found.group(1)


_BUILT: dict[str, tuple[list[Path], float]] = {}
"""The artifacts of each target built in this test run, and the build's seconds."""


def build(target: str) -> tuple[list[Path], float]:
    """``make deb`` / ``make rpm`` (the scripts behind them); return (artifacts, seconds).

    Built once per test run (the tree does not change during it): later calls
    return the same artifacts and seconds while every artifact is still there.
    Raises AssertionError, with the build's output, if the build fails.
    """
    built = _BUILT.get(target)
    if built is not None and all(p.is_file() for p in built[0]):
        return list(built[0]), built[1]
    started = time.monotonic()
    out = check([str(ROOT / "packaging" / f"build-{target}")], timeout=480)
    paths = [Path(line) if Path(line).is_absolute() else ROOT / line for line in out.split()]
    assert paths and all(p.is_file() for p in paths), out
    _BUILT[target] = (paths, time.monotonic() - started)
    return list(paths), _BUILT[target][1]


def unit_settings(path: Path, section: str = "Service") -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit section, values in file order."""
    settings: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# --- the installed package -------------------------------------------------------------

PACKAGE = "prep-agent"
USERS = ("prep-agent", "prep-upload")
STATE_DIRS = (Path("/var/lib/prep-agent"), Path("/var/lib/prep-upload"))
LOG_DIR = Path("/var/log/nginx/prep-agent")
ETC = Path("/etc/prep-agent")


def installed() -> bool:
    """Whether dpkg knows the package (installed or with its conffiles left)."""
    proc = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE])
    return proc.returncode == 0 and "not-installed" not in proc.stdout


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def assert_machine_clean() -> None:
    """The install test owns these names: refuse to run over a real installation."""
    leftovers = [PACKAGE] if installed() else []
    leftovers += [u for u in USERS if user_exists(u)]
    leftovers += [str(p) for p in (*STATE_DIRS, LOG_DIR, ETC) if p.exists()]
    if leftovers:
        pytest.fail(
            "this machine already has prep-agent installed or left over "
            f"({', '.join(leftovers)}); the install test installs and purges it"
        )


def install_deb(deb: Path) -> str:
    """``apt-get install ./deb``: apt resolves its dependencies against Debian 12."""
    env = {**SYSTEM_ENV, "DEBIAN_FRONTEND": "noninteractive"}
    return check(["apt-get", "install", "-y", "-q", str(deb)], timeout=300, env=env)


def purge_deb() -> None:
    """Purge the package, then remove what a purge keeps on purpose (data, users)."""
    env = {**SYSTEM_ENV, "DEBIAN_FRONTEND": "noninteractive"}
    if installed():
        check(["apt-get", "purge", "-y", "-q", PACKAGE], timeout=300, env=env)
    for path in (*STATE_DIRS, LOG_DIR, ETC):
        shutil.rmtree(path, ignore_errors=True)
    for user in USERS:
        if user_exists(user):
            check(["userdel", user])
    for group in USERS:
        if run(["getent", "group", group]).returncode == 0:
            check(["groupdel", group])


# --- processes --------------------------------------------------------------------------


def shared_dir(prefix: str) -> Path:
    """A fresh folder that the service users may enter (pytest's tmp is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class NotifySocket:
    """The ``$NOTIFY_SOCKET`` systemd gives a ``Type=notify`` service, collecting messages."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.path.chmod(0o666)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def receive(self) -> list[str]:
        """Every message received so far (one ``KEY=value`` per line)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.extend(data.decode().splitlines())

    def wait(self, message: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
        """Wait for ``message``; fail if ``proc`` (the service) exits first."""
        wait_for(
            lambda: message in self.receive(),
            timeout,
            message,
            alive=proc,
            context=lambda: f"received: {self.messages}",
        )

    def close(self) -> None:
        self.sock.close()


MDWE_WRAPPER = (
    "import ctypes, os, sys; "
    "assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE'; "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
"""Sets PR_SET_MDWE (no writable+executable memory, kept across exec: the rule of
MemoryDenyWriteExecute=), then execs its arguments."""


def service_command(unit: Path) -> tuple[list[str], dict[str, str], int]:
    """The unit's ExecStart as its User= would run it: (argv, environment, umask).

    ``setpriv`` switches to User=/Group= with the user's groups, sets
    NoNewPrivileges and drops every capability (CapabilityBoundingSet= empty);
    the MDWE wrapper runs first, as root, so the agent inherits it.
    """
    service = unit_settings(unit)
    (user,) = service["User"]
    (group,) = service["Group"]
    (execstart,) = service["ExecStart"]
    assert service["NoNewPrivileges"] == ["yes"] and service["CapabilityBoundingSet"] == [""]
    assert service["MemoryDenyWriteExecute"] == ["yes"]
    entry = pwd.getpwnam(user)
    argv = [
        "/usr/bin/python3",
        "-c",
        MDWE_WRAPPER,
        "setpriv",
        f"--reuid={user}",
        f"--regid={group}",
        "--init-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        *shlex.split(execstart),
    ]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": entry.pw_dir,
        "USER": user,
        "LOGNAME": user,
        "SHELL": entry.pw_shell,
    }
    (umask,) = service["UMask"]
    return argv, env, int(umask, 8)


def as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (and its groups), without privileges."""
    return run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv], 30)


# --- sshd with the installed snippet ----------------------------------------------------

SNIPPET = Path("/etc/ssh/sshd_config.d/prep-agent-upload.conf")


class Sshd:
    """The real sshd on 127.0.0.1:port: Debian's defaults that matter plus the
    installed snippet (as Debian's sshd_config includes sshd_config.d/*.conf first)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.host_key = folder / "ssh_host_ed25519_key"
        check(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)])
        self.config = folder / "sshd_config"
        self.config.write_text(
            f"Include {SNIPPET}\n"
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {folder}/sshd.pid\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM yes\n"
            "X11Forwarding yes\n"
            "PrintMotd no\n"
            "AcceptEnv LANG LC_*\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"
            "LogLevel VERBOSE\n"
        )
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.made_run_dir = False

    def effective(self, user: str) -> dict[str, str]:
        """``sshd -T`` for a connection of ``user`` from 127.0.0.1 (lowercase keys)."""
        spec = f"user={user},host=localhost,addr=127.0.0.1,laddr=127.0.0.1,lport={self.port}"
        out = check(["/usr/sbin/sshd", "-T", "-f", str(self.config), "-C", spec])
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def start(self) -> None:
        run_dir = Path("/run/sshd")  # privilege separation folder (the unit creates it)
        if not run_dir.exists():
            run_dir.mkdir(mode=0o755)
            self.made_run_dir = True
        check(["/usr/sbin/sshd", "-t", "-f", str(self.config)])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=SYSTEM_ENV,
            )
        wait_port(self.port, what="sshd", alive=self.proc)

    def known_hosts(self) -> Path:
        path = self.folder / "known_hosts"
        key = Path(f"{self.host_key}.pub").read_text().split()
        path.write_text(f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n")
        return path

    def stop(self) -> None:
        stop_process(self.proc)
        if self.made_run_dir:
            shutil.rmtree("/run/sshd", ignore_errors=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Uploader:
    """The institute: the real ``sftp`` client, key authentication, as prep-upload."""

    def __init__(self, sshd: Sshd, folder: Path, user: str = "prep-upload") -> None:
        self.sshd = sshd
        self.folder = folder
        self.user = user
        self.key = folder / "institute_upload"
        check(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "instituto", "-f", str(self.key)]
        )
        self.public = Path(f"{self.key}.pub").read_text().strip()
        self.known_hosts = sshd.known_hosts()
        self._count = 0

    def ssh_options(self) -> list[str]:
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
        ]

    def sftp(self, lines: list[str]) -> subprocess.CompletedProcess[str]:
        """Run one batch (it stops at the first failing command); return the result."""
        self._count += 1
        batch = self.folder / f"batch-{self._count}.txt"
        batch.write_text("\n".join(lines) + "\n")
        cmd = ["sftp", *self.ssh_options(), "-P", str(self.sshd.port), "-b", str(batch)]
        return run([*cmd, f"{self.user}@127.0.0.1"], 60)

    def ok(self, lines: list[str]) -> str:
        proc = self.sftp(lines)
        assert (
            proc.returncode == 0
        ), f"sftp failed:\n{proc.stdout}{proc.stderr}\nsshd:\n{self.sshd.log_text()[-3000:]}"
        return proc.stdout

    def refused(self, line: str) -> str:
        """Run one command that must fail; return the client's error output."""
        proc = self.sftp([line])
        assert proc.returncode != 0, f"sftp allowed {line!r}:\n{proc.stdout}{proc.stderr}"
        assert "Connection closed" not in proc.stderr, proc.stderr
        return proc.stderr


# --- nginx with the installed site ------------------------------------------------------

SITE = Path("/etc/nginx/sites-available/prep-agent.conf")


def nginx_conf(folder: Path, port: int, agent: str) -> Path:
    """A main nginx.conf whose workers run as www-data, including the installed site
    with only its listen address and agent address changed (the site's documented
    per-installation strings); everything else is read from where the package put it."""
    site = SITE.read_text()
    for old in ("listen 80;", "listen [::]:80;", "127.0.0.1:8080"):
        assert old in site, f"{SITE} no longer contains {old!r}"
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    site = site.replace("listen [::]:80;", "").replace("127.0.0.1:8080", agent)
    (folder / "site.conf").write_text(site)
    temp = folder / "temp"
    temp.mkdir()
    conf = folder / "nginx.conf"
    conf.write_text(
        f"""user www-data;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/main-error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {folder}/site.conf;
}}
"""
    )
    return conf


def start_nginx(conf: Path, port: int) -> subprocess.Popen[bytes]:
    check(["nginx", "-t", "-c", str(conf)])
    with open(conf.parent / "nginx.stderr", "ab") as log:
        proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=SYSTEM_ENV,
        )
    wait_port(port, what="nginx", alive=proc)
    return proc
