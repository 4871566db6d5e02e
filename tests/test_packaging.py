"""The .deb built, checked by lintian, installed with apt, and run as the system would.

``make deb`` builds the package from this tree; apt installs it with real
dependency resolution; the agent runs as its service user exactly as the unit's
ExecStart says (no systemd here: see tests/packagingkit.py for what is emulated);
the institute pushes a signed cut with the real ``sftp`` client through the real
sshd and the installed snippet; the real nginx serves it with the installed site.
The machine is left as it was: the package is purged, its users and folders
removed, every process stopped.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from prep_agent.agent.config import render_template
from tests.kit import ELECTION, Institute, free_port, minute_ago, stop_process
from tests.nginxkit import wait_published
from tests.packagingkit import (
    DIST,
    ROOT,
    NotifySocket,
    Sshd,
    Uploader,
    as_user,
    assert_machine_clean,
    build,
    check,
    install_deb,
    nginx_conf,
    purge_deb,
    require_tools,
    run,
    service_command,
    shared_dir,
    start_nginx,
    unit_settings,
    version,
)
from tests.sftpkit import Batch, Cut, make_cut

pytestmark = [pytest.mark.timeout(600), pytest.mark.packaging]

UNIT = ROOT / "packaging" / "systemd" / "prep-agent.service"
MAX_EXPOSURE = 2.0
PORTAL = "https://portal.example.mx"
AGENT_ROOT = Path("/var/lib/prep-agent")
INBOX = Path("/var/lib/prep-upload/inbox")
CONF = Path("/etc/prep-agent/prep-agent.conf")


@pytest.fixture(scope="module")
def deb() -> Path:
    require_tools()
    paths, seconds = build("deb")
    print(f"make deb: {seconds:.1f} s")
    (path,) = (p for p in paths if p.name.startswith("prep-agent_"))  # and prep-agent-report
    assert path.name == f"prep-agent_{version()}-1_all.deb"
    return path


# --- the package and its files ----------------------------------------------------------


def test_lintian_has_no_errors_or_warnings(deb: Path) -> None:
    changes = DIST.parent / "build" / "deb" / f"prep-agent_{version()}-1_amd64.changes"
    proc = run(["lintian", "--fail-on", "error,warning", "--pedantic", str(deb), str(changes)])
    tags = [ln for ln in proc.stdout.splitlines() if re.match(r"^[EWIPX]: ", ln)]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_unit_exposure_is_at_most_2() -> None:
    proc = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)])
    found = re.search(r"Overall exposure level for prep-agent\.service: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout
    threshold = f"--threshold={int(MAX_EXPOSURE * 10)}"
    assert (
        run(["systemd-analyze", "security", "--offline=true", threshold, str(UNIT)]).returncode == 0
    )


def test_unit_is_notify_with_watchdog_and_own_user() -> None:
    service = unit_settings(UNIT)
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [
        "/usr/bin/prep-agent run --config /etc/prep-agent/prep-agent.conf"
    ]
    assert service["User"] == ["prep-agent"] and service["Group"] == ["prep-agent"]
    watchdog = int(service["WatchdogSec"][0].rstrip("s"))
    assert watchdog >= 6 * 5, "the agent pings every rescan_interval (5 s): leave a margin"
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/var/lib/prep-agent"]
    assert unit_settings(UNIT, "Unit")["Before"] == ["nginx.service"]
    proc = run(["systemd-analyze", "verify", "--man=no", str(UNIT)])
    unknown = [ln for ln in proc.stderr.splitlines() if "Unknown" in ln or "Invalid" in ln]
    assert not unknown, proc.stderr


@pytest.mark.core
def test_packaged_config_is_the_commented_template() -> None:
    """/etc/prep-agent/prep-agent.conf is `prep-agent init`'s template for the package
    layout, with a header: every setting documented the same way."""
    text = (ROOT / "packaging" / "etc" / "prep-agent.conf").read_text()
    body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("# Installed") and ln)
    expected = render_template(
        election="",
        root="/var/lib/prep-agent",
        inbox="/var/lib/prep-upload/inbox",
        trust="/etc/prep-agent/allowed_signers",
        threshold=1,
        listen="127.0.0.1:8080",
    )
    expected_lines = [ln.rstrip() for ln in expected.splitlines() if ln]
    assert body.splitlines()[-len(expected_lines) :] == expected_lines


def test_installed_site_is_the_tested_site_with_its_own_log_folder(tmp_path: Path) -> None:
    """install-files changes only the site's two log paths (documented per-installation
    strings of packaging/nginx), so tests/test_nginx.py tests what is installed."""
    check([str(ROOT / "packaging" / "install-files"), str(tmp_path), "el"])
    logs = {
        "/var/log/nginx/prep-agent.access.log": "/var/log/nginx/prep-agent/access.log",
        "/var/log/nginx/prep-agent.error.log": "/var/log/nginx/prep-agent/error.log",
    }
    for source, target in (
        ("prep-agent.conf", "etc/nginx/sites-available/prep-agent.conf"),
        ("prep-agent-site.conf", "etc/nginx/snippets/prep-agent-site.conf"),
    ):
        text = (ROOT / "packaging" / "nginx" / source).read_text()
        for old, new in logs.items():
            text = text.replace(old, new)
        assert (tmp_path / target).read_text() == text
    assert (
        tmp_path / "usr/lib/systemd/system/prep-agent.service"
    ).read_bytes() == UNIT.read_bytes()


@pytest.mark.core
def test_versions_agree() -> None:
    changelog = (ROOT / "deb" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"prep-agent ({version()}-")
    spec = (ROOT / "rpm" / "prep-agent.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version())}$", spec, re.M)


# --- installed: agent, sshd, sftp, nginx ------------------------------------------------


@dataclass
class Stack:
    """The installed package running: agent, sshd and nginx, and the institute."""

    agent: subprocess.Popen[bytes]
    notify: NotifySocket
    sshd: Sshd
    uploader: Uploader
    nginx: subprocess.Popen[bytes]
    url: str
    cut: Cut
    release: str


def configure(institute: Institute, uploader: Uploader, listen: str) -> None:
    """What the install guide asks of the administrator."""
    text = CONF.read_text()
    text = text.replace("\nelection =\n", f"\nelection = {ELECTION}\n")
    text = text.replace("\nlisten = 127.0.0.1:8080\n", f"\nlisten = {listen}\n")
    text = text.replace("\nframe_ancestors = 'self'\n", f"\nframe_ancestors = {PORTAL}\n")
    CONF.write_text(text)
    trust = Path("/etc/prep-agent/allowed_signers")
    trust.write_bytes(institute.allowed_signers.read_bytes())
    trust.chmod(0o644)
    keys = Path("/etc/prep-agent/upload_authorized_keys")
    with keys.open("a") as fh:
        fh.write(f'from="127.0.0.1",restrict {uploader.public}\n')


def diagnostics(work: Path) -> str:
    """The agent's output and journal, for a failure message."""
    journal = AGENT_ROOT / "journal.jsonl"
    tail = journal.read_text()[-3000:] if journal.exists() else "(no journal)"
    return f"agent log:\n{(work / 'agent.log').read_text()[-3000:]}\njournal:\n{tail}"


@pytest.fixture(scope="module")
def stack(
    deb: Path, institute: Institute, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    assert os.geteuid() == 0, "the install test needs root (apt-get, sshd, setpriv)"
    assert_machine_clean()
    work = shared_dir("prep-agent-pkg-")
    procs: list[subprocess.Popen[bytes]] = []
    sshd: Sshd | None = None
    notify: NotifySocket | None = None
    try:
        install_deb(deb)
        sshd = Sshd(work)
        uploader = Uploader(sshd, work)
        agent_port = free_port()
        configure(institute, uploader, f"127.0.0.1:{agent_port}")

        notify = NotifySocket(work)
        argv, env, umask = service_command(Path("/lib/systemd/system/prep-agent.service"))
        with open(work / "agent.log", "ab") as log:
            agent = subprocess.Popen(
                argv,
                env={**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "60000000"},
                umask=umask,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
        procs.append(agent)
        notify.wait("READY=1", agent)

        sshd.start()
        nginx_port = free_port()
        nginx = start_nginx(nginx_conf(work, nginx_port, f"127.0.0.1:{agent_port}"), nginx_port)
        procs.append(nginx)

        outbox = tmp_path_factory.mktemp("outbox")
        cut = make_cut(institute, outbox, 1, minute_ago(5))
        uploader.ok(Batch().cut(cut, temp=True).lines)
        try:
            status = wait_published(AGENT_ROOT / "public", 1, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{diagnostics(work)}") from None
        yield Stack(
            agent,
            notify,
            sshd,
            uploader,
            nginx,
            f"http://127.0.0.1:{nginx_port}",
            cut,
            status["release"],
        )
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        if sshd is not None:
            sshd.stop()
        if notify is not None:
            notify.close()
        purge_deb()
        check(["rm", "-rf", str(work)])


def test_installed_layout(stack: Stack) -> None:
    def owner(path: Path) -> tuple[str, str, int]:
        st = path.stat()
        return (
            pwd.getpwuid(st.st_uid).pw_name,
            grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode),
        )

    assert owner(AGENT_ROOT) == ("prep-agent", "prep-agent", 0o751)
    assert owner(INBOX.parent) == ("root", "root", 0o755)
    assert owner(INBOX) == ("prep-upload", "prep-agent", 0o2750)
    assert owner(AGENT_ROOT / "journal.jsonl")[:2] == ("prep-agent", "prep-agent")
    # Uploaded files: the institute's, readable by the agent's group only.
    assert owner(INBOX / "prep-manifest.json.sig") == ("prep-upload", "prep-agent", 0o640)
    assert owner(INBOX / "datos") == ("prep-upload", "prep-agent", 0o2750)
    assert Path("/usr/bin/prep-agent").is_file()
    assert "prep-agent.conf" in check(["dpkg-query", "-L", "prep-agent"])
    conffiles = check(["dpkg-query", "-W", "-f=${Conffiles}", "prep-agent"])
    for path in (
        "/etc/prep-agent/prep-agent.conf",
        "/etc/ssh/sshd_config.d/prep-agent-upload.conf",
        "/etc/nginx/sites-available/prep-agent.conf",
        "/etc/logrotate.d/prep-agent",
        "/etc/fail2ban/jail.d/prep-agent.conf",
    ):
        assert f" {path} " in conffiles


def test_cut_published_and_served_by_nginx(stack: Stack) -> None:
    status = requests.get(f"{stack.url}/status.json", timeout=5)
    assert status.status_code == 200 and status.json()["sequence"] == 1
    page = requests.get(f"{stack.url}/cortes/{stack.release}/index.html", timeout=5)
    assert page.status_code == 200 and page.content == stack.cut.files["index.html"]
    frame = requests.get(f"{stack.url}/", timeout=5)
    assert frame.status_code == 200
    assert PORTAL in frame.headers["Content-Security-Policy"]
    health = requests.get(f"{stack.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "pass"
    # The operator's view, as the service user.
    out = as_user("prep-agent", ["prep-agent", "status", "--config", str(CONF), "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sequence"] == 1
    log = Path("/var/log/nginx/prep-agent/access.log")
    assert log.exists(), "the site logs where logrotate.d/prep-agent keeps it"


def test_agent_notifies_ready_and_watchdog(stack: Stack) -> None:
    assert "READY=1" in stack.notify.receive()
    stack.notify.wait("WATCHDOG=1", stack.agent, timeout=20)


def test_upload_account_cannot_link_copy_or_chmod(stack: Stack) -> None:
    up = stack.uploader
    for line in (
        "symlink prep-manifest.json link",
        "ln -s /var/lib/prep-agent/releases releases",
        "ln prep-manifest.json hard",
        "cp prep-manifest.json copy",
        "chmod 600 prep-manifest.json",
    ):
        up.refused(line)
    assert not any(os.path.lexists(INBOX / n) for n in ("link", "releases", "hard", "copy"))
    assert stat.S_IMODE((INBOX / "prep-manifest.json").stat().st_mode) == 0o640


def test_upload_account_is_chrooted(stack: Stack) -> None:
    up = stack.uploader
    listing = up.ok(["pwd", "cd ..", "pwd", "ls -1a /"])
    assert re.findall(r"^Remote working directory: (.*)$", listing, re.M) == ["/inbox", "/"]
    names = listing.split("sftp> ls -1a /\n", 1)[1].split()
    assert sorted(names) == ["/.", "/..", "/inbox"], listing
    for line in (
        "get /etc/passwd",
        "get ../../../etc/passwd",
        f"put {up.key}.pub /escaped",
        f"put {up.key}.pub ../escaped",
        "mkdir /var",
        f"put {up.key}.pub /var/lib/prep-agent/releases/x",
    ):
        up.refused(line)
    assert not Path("/var/lib/prep-upload/escaped").exists()
    # No shell, and no forwarding: a remote forward is refused by the server.
    proc = run(
        [
            "ssh",
            *up.ssh_options(),
            "-p",
            str(stack.sshd.port),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "0:127.0.0.1:9",
            "prep-upload@127.0.0.1",
        ],
        30,
    )
    assert proc.returncode != 0 and "forwarding failed" in proc.stderr, proc.stderr


def test_sshd_applies_the_snippet_to_the_upload_account(stack: Stack) -> None:
    effective = stack.sshd.effective("prep-upload")
    assert effective["chrootdirectory"] == "/var/lib/prep-upload"
    assert effective["forcecommand"].startswith("internal-sftp -d /inbox -u 0027 -P ")
    denied = effective["forcecommand"].split("-P ", 1)[1].split(",")
    assert {"symlink", "hardlink", "copy-data"} <= set(denied)
    assert "posix-rename" not in denied
    assert effective["authorizedkeysfile"] == "/etc/prep-agent/upload_authorized_keys"
    assert effective["authenticationmethods"] == "publickey"
    for key in (
        "passwordauthentication",
        "kbdinteractiveauthentication",
        "allowtcpforwarding",
        "x11forwarding",
        "allowagentforwarding",
        "permittty",
        "permittunnel",
        "allowstreamlocalforwarding",
    ):
        assert effective[key] == "no", key
    # Other accounts keep the server's own settings.
    assert "forcecommand" not in stack.sshd.effective("root") or (
        stack.sshd.effective("root")["forcecommand"] == "none"
    )


def test_only_the_agent_writes_releases(stack: Stack) -> None:
    release = AGENT_ROOT / "releases" / stack.release
    for user in ("prep-upload", "www-data"):
        for target in (release / "x", AGENT_ROOT / "releases" / "x", AGENT_ROOT / "public" / "x"):
            proc = as_user(user, ["touch", str(target)])
            assert proc.returncode != 0, f"{user} could write {target}"
        proc = as_user(user, ["sh", "-c", f"echo x >> {release / 'index.html'}"])
        assert proc.returncode != 0, f"{user} could append to a release"
    # The web server reads releases and the public folder, and nothing else.
    assert as_user("www-data", ["cat", str(release / "index.html")]).returncode == 0
    assert as_user("www-data", ["cat", str(AGENT_ROOT / "public" / "status.json")]).returncode == 0
    assert as_user("www-data", ["ls", str(AGENT_ROOT)]).returncode != 0
    assert as_user("www-data", ["ls", str(INBOX)]).returncode != 0


def test_logrotate_accepts_the_packaged_rules(stack: Stack, tmp_path: Path) -> None:
    main = tmp_path / "logrotate.conf"
    includes = [
        p for p in ("/etc/logrotate.d/nginx", "/etc/logrotate.d/prep-agent") if Path(p).exists()
    ]
    main.write_text("".join(f"include {p}\n" for p in includes))
    proc = run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(main)])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 0 and not errors, proc.stderr
    assert "/var/lib/prep-agent/journal.jsonl" in proc.stderr
    assert "/var/log/nginx/prep-agent/*.log" in proc.stderr


def test_fail2ban_jails_ignore_the_institute(stack: Stack) -> None:
    institute = Path("/etc/prep-agent/fail2ban-institute.conf")
    institute.write_text(
        institute.read_text().replace("institute =", "institute = 192.0.2.10 198.51.100.0/28")
    )
    out = check(["fail2ban-client", "-d"])
    for jail in ("sshd", "nginx-limit-req"):
        line = next(ln for ln in out.splitlines() if f"'{jail}', 'addignoreip'" in ln)
        assert "'192.0.2.10', '198.51.100.0/28'" in line, line
    assert "'nginx-limit-req', 'addlogpath', '/var/log/nginx/prep-agent/error.log'" in out


def test_agent_stops_cleanly(stack: Stack) -> None:
    assert stop_process(stack.agent) == 0
    assert "STOPPING=1" in stack.notify.receive()


# --- the rpm ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpms() -> dict[str, Path]:
    require_tools()
    paths, seconds = build("rpm")
    print(f"make rpm: {seconds:.1f} s")
    kinds = {"src": ".src.rpm", "report": "prep-agent-report-", "bin": "prep-agent-"}
    found = {next(k for k, v in kinds.items() if v in p.name): p for p in paths}
    assert found["bin"].name == f"prep-agent-{version()}-1.noarch.rpm"
    assert found["src"].name == f"prep-agent-{version()}-1.src.rpm"
    return found


def rpm_query(path: Path, *args: str) -> str:
    return check(["rpm", "-qp", *args, str(path)])


def test_rpmlint_has_no_errors(rpms: dict[str, Path]) -> None:
    config = ROOT / "rpm" / "rpmlint.toml"
    proc = run(["rpmlint", "-c", str(config), str(rpms["bin"]), str(rpms["src"])])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b0 errors, 0 warnings\b", proc.stdout), proc.stdout


def test_rpm_files(rpms: dict[str, Path]) -> None:
    files = set(rpm_query(rpms["bin"], "-l").split())
    for path in (
        "/usr/bin/prep-agent",
        "/usr/lib/systemd/system/prep-agent.service",
        "/usr/lib/sysusers.d/prep-agent.conf",
        "/usr/lib/tmpfiles.d/prep-agent.conf",
        "/usr/share/man/man1/prep-agent.1.gz",
        "/usr/share/doc/prep-agent/README.md",
        "/usr/share/licenses/prep-agent/LICENSE",
        "/var/lib/prep-agent",
        "/var/lib/prep-upload/inbox",
    ):
        assert path in files, path
    assert any(f.endswith("/site-packages/prep_agent/cli/main.py") for f in files)
    assert any(f.endswith("/site-packages/prep_agent/web/static/frame.js") for f in files)
    unit = check(
        [
            "sh",
            "-c",
            f"rpm2cpio {rpms['bin']} | cpio -i --quiet --to-stdout "
            "./usr/lib/systemd/system/prep-agent.service",
        ]
    )
    assert unit == UNIT.read_text(), "the rpm ships the tested unit"
    # Owners and modes of the state folders, as tmpfiles.d creates them.
    listing = rpm_query(
        rpms["bin"], "--qf", "[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME}\n]"
    )
    modes = {ln.split()[0]: tuple(ln.split()[1:]) for ln in listing.splitlines()}
    assert modes["/var/lib/prep-agent"] == ("drwxr-x--x", "prep-agent", "prep-agent")
    assert modes["/var/lib/prep-upload"] == ("drwxr-xr-x", "root", "root")
    assert modes["/var/lib/prep-upload/inbox"] == ("drwxr-s---", "prep-upload", "prep-agent")


def test_rpm_config_files_are_noreplace(rpms: dict[str, Path]) -> None:
    configs = set(rpm_query(rpms["bin"], "--configfiles").split())
    expected = {
        "/etc/prep-agent/prep-agent.conf",
        "/etc/prep-agent/upload_authorized_keys",
        "/etc/prep-agent/nginx-institute.conf",
        "/etc/prep-agent/fail2ban-institute.conf",
        "/etc/ssh/sshd_config.d/prep-agent-upload.conf",
        "/etc/nginx/sites-available/prep-agent.conf",
        "/etc/nginx/snippets/prep-agent-site.conf",
        "/etc/logrotate.d/prep-agent",
        "/etc/fail2ban/jail.d/prep-agent.conf",
    }
    assert configs == expected
    flags = rpm_query(rpms["bin"], "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]")
    for line in flags.splitlines():
        name, _, flag = line.partition(" ")
        if name in expected:
            assert flag == "cn", f"{name} is not %config(noreplace): {flag}"


def test_rpm_scriptlets(rpms: dict[str, Path]) -> None:
    scripts = rpm_query(rpms["bin"], "--scripts")
    pre = scripts.split("preinstall scriptlet", 1)[1].split("postinstall scriptlet", 1)[0]
    # Users before files: sysusers in %pre, with the shipped sysusers.d content.
    assert "systemd-sysusers" in pre
    sysusers = (ROOT / "packaging" / "sysusers" / "prep-agent.conf").read_text()
    for line in (ln for ln in sysusers.splitlines() if ln.startswith("u ")):
        assert line in pre, line
    post = scripts.split("postinstall scriptlet", 1)[1].split("preuninstall scriptlet", 1)[0]
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/prep-agent.conf" in post
    assert "systemctl enable" not in post, "the administrator enables it, once configured"
    assert "disable --now prep-agent.service" in scripts.split("preuninstall scriptlet", 1)[1]
    assert "try-restart prep-agent.service" in scripts.split("postuninstall scriptlet", 1)[1]
    requires = rpm_query(rpms["bin"], "-R")
    for dist in ("cryptography", "flask", "psutil", "requests", "waitress", "watchdog"):
        assert f"python3dist({dist})" in requires, dist
