"""The stand of a rehearsal: keys, one sshd and one agent per difusor, the
collector and ``distribute --watch``, each a real process.

On loopback (any user), or as root in network namespaces (``netns``): each
difusor's sshd and agent run in a namespace of their own, linked to two private
switches, the institute's (sftp, health, pushes) and the readers' (viewers,
browser); this host's namespace, where the institute, the collector and the
viewers run, is attached to both. A network cut is then a real link down.

Every command is ``python -m prep_agent.cli`` of the running interpreter, so
the rehearsal tests the code it ships with. Processes log to files under the
rehearsal's folder; each is stopped with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from prep_agent.agent.layout import Layout
from prep_agent.core.errors import Error
from prep_agent.rehearsal.netns import Network, Node, free_prefix, ip

if TYPE_CHECKING:
    from prep_agent.rehearsal.pair import Pair

ELECTION = "coah-ayun-2021"
COMMAND = (sys.executable, "-m", "prep_agent.cli")
"""``prep-agent`` as this interpreter runs it."""
SSHD = "/usr/sbin/sshd"
TMPFS_BYTES = 160 * 1024 * 1024
"""Size of the storage of a difusor whose disk is filled (root only): a 60-cut night at a
2 s period retains ~30 releases of the simulated publication, ~50 MB."""

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run(args: Sequence[str], what: str, timeout: float = 60) -> str:
    """Run a command to completion; return its output.

    Raises Error with its last error line when it fails or times out.
    """
    try:
        done = subprocess.run(
            list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Error(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise Error(f"{what} failed ({done.returncode}): {lines[-1]}")
    return done.stdout


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of ``url`` answers 200."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return int(response.status) == 200
    except Exception:
        return False


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host``:``port``."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def keygen(path: Path, comment: str) -> str:
    """An ed25519 key pair made by ssh-keygen; return the public line.

    Raises Error when ssh-keygen fails.
    """
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        "ssh-keygen",
    )
    return Path(f"{path}.pub").read_text(encoding="ascii").strip()


@dataclass
class Proc:
    """One long-running process, its output in ``log``."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (without waiting)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        """Whether it was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` if it runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (a stopped process is continued first), SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, size: int = 600) -> str:
        """The end of its log, on one line."""
        try:
            return " ".join(self.log.read_text(errors="replace")[-size:].split())
        except OSError:
            return ""


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, grandchildren...), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_tree(proc: Proc, sig: int) -> None:
    """Send ``sig`` to ``proc`` and every process below it (sshd's sessions)."""
    if proc.proc is None or proc.proc.poll() is not None:
        return
    for pid in [proc.proc.pid, *descendants(proc.proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait(probe: Callable[[], object], timeout: float, what: str, proc: Proc | None = None) -> None:
    """Call ``probe()`` every 0.1 s until true.

    Raises Error after ``timeout`` seconds or when ``proc`` exits first.
    """
    deadline = time.monotonic() + timeout
    while not probe():
        if proc is not None and not proc.alive():
            raise Error(f"{proc.name} exited while waiting for {what}: {proc.tail()}")
        if time.monotonic() > deadline:
            raise Error(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def set_values(path: Path, values: dict[str, dict[str, object]]) -> None:
    """Set ``key = value`` lines of an INI file, per section (the file keeps its comments)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    section = ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            continue
        key = stripped.split("=", 1)[0].strip()
        if "=" in stripped and not stripped.startswith("#") and key in values.get(section, {}):
            lines[i] = f"{key} = {values[section][key]}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Difusor:
    """One difusor: its sshd, its agent, its storage."""

    service_id: str
    home: Path
    web_port: int
    ssh_port: int
    tmpfs: bool = False
    stale_periods: int = 3
    """The agent's ``stale_periods`` (1000 for a ``notice-off`` defect)."""
    node: Node | None = None
    """Its namespace (root mode), else None: loopback."""
    public_host: str = "127.0.0.1"
    """Where readers reach its agent."""
    institute_host: str = "127.0.0.1"
    """Where the institute reaches its sshd and agent (its ``inst0`` link in a namespace)."""
    sshd: Proc | None = None
    agent: Proc | None = None
    host_public: str = ""
    allowed_line: str = ""

    @property
    def root(self) -> Path:
        return self.home / "root"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def conf(self) -> Path:
        return self.home / "prep-agent.conf"

    @property
    def url(self) -> str:
        return f"http://{self.public_host}:{self.web_port}"

    @property
    def institute_url(self) -> str:
        return f"http://{self.institute_host}:{self.web_port}"

    @property
    def host_key_line(self) -> str:
        """Its sshd's pinned key as a known_hosts line (the institute config's ``host_key``)."""
        return f"[{self.institute_host}]:{self.ssh_port} {self.host_public}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run where the difusor lives (inside its namespace, if any)."""
        return self.node.command(argv) if self.node is not None else list(argv)

    def set_link(self, up: bool) -> None:
        """Bring its institute link down or up (root mode only).

        Raises Error when ``ip`` fails.
        """
        assert self.node is not None
        ip("-n", self.node.name, "link", "set", INSTITUTE_LINK, "up" if up else "down")

    @property
    def journal(self) -> Path:
        return Layout(self.root).journal_file

    def start_agent(self, timeout: float = 30, wrapper: Sequence[str] = ()) -> None:
        """Start ``prep-agent run`` (behind ``wrapper``, e.g. ``env LD_PRELOAD=...``)
        and wait until ``/livez`` answers.

        Raises Error when it exits or does not answer in time.
        """
        self.agent = Proc(
            f"agent {self.service_id}",
            self.command([*wrapper, *COMMAND, "run", "--config", str(self.conf)]),
            self.home / "agent.log",
        )
        self.agent.start()
        wait(lambda: answers(self.url + "/livez"), timeout, f"agent {self.service_id}", self.agent)


@dataclass
class Stand:
    """Everything a rehearsal runs, and how to stop it."""

    out: Path
    period: float
    difusores: list[Difusor] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    collector_port: int = 0
    portal_port: int = 0
    """Where the browser viewer's portal page is served (allowed to frame the difusores)."""
    collector_host: str = "127.0.0.1"
    networks: list[Network] = field(default_factory=list)
    """The switches of root mode (empty on loopback)."""
    key: Path = Path()
    rogue_key: Path = Path()
    identity: Path = Path()
    allowed_signers: Path = Path()
    conf: Path = Path()
    watch: Path = Path()
    pair: Pair | None = None
    """The HA pair (namespace mode, when asked for)."""
    pair_unavailable: str = "the HA pair runs only in network namespaces (root)"
    """Why there is no pair (English, for the JSON)."""

    @property
    def collector_url(self) -> str:
        return f"http://{self.collector_host}:{self.collector_port}"

    @property
    def mode(self) -> str:
        return "netns" if self.networks else "loopback"

    def close(self) -> None:
        """Stop every process and unmount every tmpfs (best effort, never raises)."""
        for d in self.difusores:
            for proc in (d.agent, d.sshd):
                if proc is not None:
                    proc.stop()
        for proc in reversed(self.procs):
            proc.stop()
        if self.pair is not None:
            from prep_agent.rehearsal.pair import stop

            stop(self.pair)
        for mount in self.mounts:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        for network in self.networks:
            network.close()


def _institute(stand: Stand) -> None:
    home = stand.out / "institute"
    home.mkdir(parents=True)
    stand.key = home / "institute_key"
    public = keygen(stand.key, "iec")
    stand.allowed_signers = home / "allowed_signers"
    stand.allowed_signers.write_text(f'iec namespaces="prep-cut" {public}\n', encoding="ascii")
    stand.rogue_key = home / "rogue_key"
    keygen(stand.rogue_key, "rogue")
    stand.identity = home / "upload_key"
    keygen(stand.identity, "institute-upload")
    stand.watch = home / "cortes"
    stand.watch.mkdir()


def _sshd(stand: Stand, d: Difusor) -> None:
    folder = d.home / "sshd"
    folder.mkdir()
    d.host_public = keygen(folder / "host_key", f"host-{d.service_id}")
    upload = Path(f"{stand.identity}.pub").read_text(encoding="ascii")
    (folder / "authorized_keys").write_text(upload, encoding="ascii")
    config = folder / "sshd_config"
    # Not root, sshd serves only the user running it; without PAM it judges that
    # account by its password field and refuses a locked one (nobody's is "!*"),
    # key or not. With PAM the account stack decides, as with Debian's own sshd.
    config.write_text(
        f"Port {d.ssh_port}\nListenAddress {d.institute_host}\nHostKey {folder / 'host_key'}\n"
        f"PidFile {folder / 'sshd.pid'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"UsePAM {'no' if is_root() else 'yes'}\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\n"
        "MaxStartups 50:30:100\nLogLevel VERBOSE\n",
        encoding="ascii",
    )
    if is_root():  # sshd's privilege separation folder (a user's own sshd does without)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    run([SSHD, "-t", "-f", str(config)], f"sshd -t of {d.service_id}")
    argv = d.command([SSHD, "-D", "-e", "-f", str(config)])
    d.sshd = Proc(f"sshd {d.service_id}", argv, folder / "log")
    d.sshd.start()
    wait(lambda: accepts(d.ssh_port, d.institute_host), 15, f"sshd of {d.service_id}", d.sshd)


def upload_user() -> str:
    """The account every rehearsal sshd accepts: the effective uid's, not $USER
    (a privilege drop by setpriv or su without a login keeps root's)."""
    return pwd.getpwuid(os.geteuid()).pw_name


def check_login(stand: Stand, d: Difusor, timeout: float = 15) -> None:
    """Log in to ``d``'s sshd as the institute will (upload key, pinned host key,
    sftp), so that an account sshd refuses stops the rehearsal at its start rather
    than as a night of failed deliveries.

    Raises Error with ssh's reason when the login fails.
    """
    known = d.home / "sshd" / "known_hosts"
    known.write_text(d.host_key_line + "\n", encoding="ascii")
    options = {
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
        "IdentityFile": str(stand.identity),
        "UserKnownHostsFile": str(known),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "ConnectTimeout": str(round(timeout)),
        "LogLevel": "ERROR",
    }
    argv = ["sftp", "-b", "-", "-P", str(d.ssh_port)]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    user = upload_user()
    argv.append(f"{user}@{d.institute_host}")
    try:
        done = subprocess.run(
            argv, input="pwd\n", capture_output=True, text=True, timeout=timeout + 5
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Error(f"sftp login to the sshd of {d.service_id} failed: {exc}") from None
    if done.returncode != 0:
        # ssh's reason is its last line; sftp's own "Connection closed" follows it.
        lines = [x for x in done.stderr.strip().splitlines() if x != "Connection closed"]
        line = (lines or ["no output"])[-1]
        raise Error(
            f"sftp login as {user} to the sshd of {d.service_id} failed: {line} "
            "(the rehearsal's sshd accepts only the account running it, by key)"
        )


def _agent(stand: Stand, d: Difusor) -> None:
    d.root.mkdir(parents=True)
    if d.tmpfs:
        run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(d.root)], "mount")
        stand.mounts.append(d.root)
    init = [*COMMAND, "init", "--root", str(d.root), "--election", ELECTION]
    listen = "0.0.0.0" if d.node is not None else "127.0.0.1"  # both links in a namespace
    init += ["--trust", str(stand.allowed_signers), "--listen", f"{listen}:{d.web_port}"]
    run([*init, "--config", str(d.conf), "--service-id", d.service_id], "prep-agent init")
    key = d.home / "report_key"
    d.allowed_line = run(
        [*COMMAND, "keygen", "--key", str(key), "--service-id", d.service_id], "prep-agent keygen"
    ).strip()
    (d.home / "token").write_text(f"token-{d.service_id}\n", encoding="ascii")
    set_values(
        d.conf,
        {
            "agent": {
                "rescan_interval": 1,
                "settle_timeout": max(10, int(4 * stand.period)),
                "stale_periods": d.stale_periods,
            },
            "frame": {
                "difusor_name": f"Diario {d.service_id.upper()}",
                "poll_seconds": 5,  # a viewer every 5 s (the floor is 1)
                "frame_ancestors": f"'self' http://127.0.0.1:{stand.portal_port}",
            },
            "health": {"token_file": d.home / "token"},
            "push": {
                "urls": f"{stand.collector_url}/reports",
                "key": key,
                "period_seconds": 1,
                "connect_timeout": 1,
                "read_timeout": 2,
            },
        },
    )


def _collector_conf(stand: Stand) -> None:
    home = stand.out / "institute"
    trust = home / "difusores_allowed_signers"
    trust.write_text("".join(f"{d.allowed_line}\n" for d in stand.difusores), encoding="ascii")
    period = max(1, round(stand.period))
    text = (
        f"[collector]\nlisten = {stand.collector_host}:{stand.collector_port}\n"
        f"database = {home / 'collector.sqlite'}\ntrust = {trust}\nmanifests = {stand.watch}\n"
        "report_period = 1\nsilent_after = 3\npoll_interval = 1\nconnect_timeout = 1\n"
        f"read_timeout = 2\nperiod_seconds = {period}\nunlink_periods = 3\nrefresh_seconds = 2\n"
        f"dashboard_allow = 127.0.0.1/32 {stand.collector_host}/32\n\n"
        f"[distribute]\nallowed_signers = {stand.allowed_signers}\nelection = {ELECTION}\n"
        f"workers = 8\nconnect_timeout = 2\ntransfer_timeout = 20\nretry_for = {max(3, period)}\n"
        f"backoff_max = 1\nconfirm_timeout = {max(5, 3 * period)}\n\n"
        "[audit]\nenabled = yes\nsample = 5\nfull_every = 3\nafter = 2\ntimeout = 3\n"
        "concurrency = 4\nworkers = 4\n"
    )
    user = upload_user()
    for d in stand.difusores:
        text += (
            f"\n[difusor:{d.service_id}]\nname = Diario {d.service_id.upper()}\n"
            f"contact = Mesa de {d.service_id}, 844 000 0000\n"
            f"health_url = {d.institute_url}/health\ntoken_file = {d.home / 'token'}\n"
            f"sftp = {user}@{d.institute_host}:{d.ssh_port}:{d.inbox}\n"
            f"host_key = {d.host_key_line}\n"
            f"identity = {stand.identity}\nstatus_url = {d.institute_url}/status.json\n"
        )
    stand.conf = home / "institute.conf"
    stand.conf.write_text(text, encoding="utf-8")


def build(
    out: Path,
    period: float,
    names: Sequence[str],
    tmpfs: Sequence[str],
    quiet: Sequence[str] = (),
    netns: bool = False,
    pair_lag: int | None = None,
) -> Stand:
    """Make and start the stand: difusores ``names`` (those in ``tmpfs`` on a small
    tmpfs, those in ``quiet`` with ``stale_periods = 1000``; with ``netns``, each in
    a namespace of its own), the collector and ``distribute --watch``; with
    ``netns`` and ``pair_lag``, the HA pair too (``pair.py``; HAProxy's
    ``/readyz?lag=pair_lag``).

    Raises Error when a part does not start; what started is stopped then.
    """
    stand = Stand(out, period)
    try:
        _institute(stand)
        stand.collector_port, stand.portal_port = free_port(), free_port()
        if netns:
            _switches(stand)
        from prep_agent.rehearsal import pair

        with_pair = netns and pair_lag is not None
        origin_port = free_port()  # one port on both origins: HAProxy's server lines share it
        for i, name in enumerate([*names, *(pair.ORIGINS if with_pair else ())]):
            d = Difusor(name, out / "difusores" / name, free_port(), free_port(), name in tmpfs)
            d.stale_periods = 1000 if name in quiet else d.stale_periods
            if netns:
                _namespace(stand, d, 10 + i)
            if name in pair.ORIGINS:
                d.web_port = origin_port
            d.home.mkdir(parents=True)
            stand.difusores.append(d)
            _agent(stand, d)  # first: a tmpfs root is mounted before sshd's namespace is made
            if name in pair.ORIGINS:
                set_values(d.conf, {"purge": {"nodes": pair.purge_nodes(stand.networks[1])}})
            _sshd(stand, d)
            check_login(stand, d)
        _collector_conf(stand)
        home = out / "institute"
        collector = Proc("collector", [*COMMAND, "collector", "--config", str(stand.conf)],
                         home / "collector.log")  # fmt: skip
        stand.procs.append(collector)
        collector.start()
        wait(lambda: answers(stand.collector_url + "/livez"), 30, "the collector", collector)
        for d in stand.difusores:
            d.start_agent()
        if with_pair and pair_lag is not None:
            origins = [d for d in stand.difusores if d.service_id in pair.ORIGINS]
            stand.pair = pair.start(out / "balanceadores", stand.networks[1], origins, pair_lag)
        watch = [*COMMAND, "distribute", "--config", str(stand.conf), "--watch", str(stand.watch)]
        distribute = Proc("distribute", watch, home / "distribute.log")
        stand.procs.append(distribute)
        distribute.start()
    except BaseException:
        stand.close()
        raise
    return stand


INSTITUTE_LINK = "inst0"
"""A difusor namespace's link to the institute's switch (the readers' is ``eth0``)."""


def _switches(stand: Stand) -> None:
    """The institute's and the readers' switches, this host attached to both."""
    for _ in range(2):
        network = Network(prefix=free_prefix())
        stand.networks.append(network)
        host = network.attach_host(1)
        if len(stand.networks) == 1:
            stand.collector_host = host


def _namespace(stand: Stand, d: Difusor, host: int) -> None:
    institute, readers = stand.networks
    d.node = readers.add(f"d{d.service_id}", host)
    d.public_host = d.node.address
    d.institute_host = institute.join(d.node, host, INSTITUTE_LINK)


def is_root() -> bool:
    """Whether this process may mount a tmpfs."""
    return os.geteuid() == 0
