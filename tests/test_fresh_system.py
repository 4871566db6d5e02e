"""A new difusor's install, checked on a fresh minimal Debian 12.

``mmdebstrap --variant=apt bookworm`` (tests/freshkit.py), then what the
install guide says: ``apt-get install --no-install-recommends
./prep-agent_*.deb``. No compiler and no -dev package may come with it, and
everything it adds must stay under 100 MB over the minimal base. In that
system: ``prep-agent --help``, ``init`` and ``run --once`` on a signed cut;
``prep-agent report`` names its package; two instances of ``prep-agent@``
(``init --instance``) get distinct paths, read back from their configs and
checked with ``systemd-analyze verify``, run their cuts as the service user,
and pass ``sshd -T`` and ``nginx -t`` with both sites enabled; then
prep-agent-report installs and writes a report. The figures are printed and
written to ``test-artifacts/fresh-system.json`` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prep_agent.agent.config import load
from tests import reportkit
from tests.freshkit import (
    COMPILERS,
    FreshSystem,
    base_tarball,
    closure,
    megabytes,
    require_mmdebstrap,
)
from tests.kit import Institute, minute_ago
from tests.packagingkit import ROOT, build, require_tools, unit_settings

# packaging: the agent under test runs on the fresh system's Debian packages, not on
# this venv's releases (the newest-PyPI leg leaves it out).
pytestmark = [pytest.mark.timeout(900), pytest.mark.packaging]

MAX_AGENT_BYTES = 100 * 10**6
"""The agent's whole installation over the minimal base: under 100 MB."""
TOOLCHAIN = re.compile(
    r"(gcc|g\+\+|cpp|clang|llvm|binutils)(-[0-9.]+)?(-x86-64-linux-gnu)?|binutils-.*"
    r"|.*-dev|build-essential|python3-(matplotlib|numpy|scipy|sympy)"
)
"""Package names of a compiler, a -dev package or the plotting stack."""
INSTANCES = ("federal", "coah-2024")
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class Fresh:
    """The fresh system with the agent installed, and the measured figures."""

    system: FreshSystem
    debs: dict[str, Path]
    base: dict[str, int]
    agent: dict[str, int]
    figures: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def fresh() -> Iterator[Fresh]:
    assert os.geteuid() == 0, "the fresh-system test needs root (mmdebstrap, chroot)"
    require_tools()
    require_mmdebstrap()
    paths, _ = build("deb")
    debs = {("report" if p.name.startswith("prep-agent-report_") else "agent"): p for p in paths}
    tarball, cold = base_tarball()
    system = FreshSystem(tarball)
    figures: dict[str, Any] = {"base_tarball": str(tarball), "mmdebstrap_seconds": round(cold, 1)}
    try:
        base = system.packages()
        sizes = {"/": system.size(), "/usr": system.size("/usr")}
        started = time.monotonic()
        system.install(debs["agent"])
        figures["agent_install_seconds"] = round(time.monotonic() - started, 1)
        agent = system.packages()
        added = closure(base, agent)
        figures.update(
            base_packages=len(base),
            base_bytes=sizes["/"],
            base_usr_bytes=sizes["/usr"],
            agent_packages=len(added),
            agent_bytes=system.size() - sizes["/"],
            agent_usr_bytes=system.size("/usr") - sizes["/usr"],
            agent_installed_size_kib=sum(agent[p] for p in added),
            agent_closure=added,
        )
        yield Fresh(system, debs, base, agent, figures)
    finally:
        system.remove()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "fresh-system.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(
            "\nfresh Debian 12: agent +{} in {} packages (/usr +{}); report +{}; "
            "then systemd +{}, nginx and openssh-server +{}".format(
                megabytes(figures.get("agent_bytes", 0)),
                figures.get("agent_packages"),
                megabytes(figures.get("agent_usr_bytes", 0)),
                megabytes(figures.get("report_bytes", 0)),
                megabytes(figures.get("systemd_bytes", 0)),
                megabytes(figures.get("servers_bytes", 0)),
            )
        )


def test_no_compiler_and_no_dev_package(fresh: Fresh) -> None:
    added = closure(fresh.base, fresh.agent)
    assert "prep-agent" in added and "python3-flask" in added
    assert not [p for p in added if TOOLCHAIN.fullmatch(p)], added
    assert not [p for p in fresh.agent if TOOLCHAIN.fullmatch(p)]
    found = [c for c in COMPILERS if fresh.system.path(f"/usr/bin/{c}").exists()]
    assert not found, f"a toolchain on the agent's server: {found}"


def test_the_agent_takes_under_100_mb(fresh: Fresh) -> None:
    added = fresh.figures["agent_bytes"]
    assert 0 < added < MAX_AGENT_BYTES, megabytes(added)


def test_users_and_folders_without_systemd(fresh: Fresh) -> None:
    """No systemd in this system: the postinst made the users with adduser and the
    folders from the package's tmpfiles.d lines, as systemd would."""
    system = fresh.system
    assert "systemd" not in fresh.agent
    passwd = {
        ln.split(":")[0]: ln.split(":")
        for ln in system.path("/etc/passwd").read_text().splitlines()
    }
    assert passwd["prep-agent"][5] == "/var/lib/prep-agent"
    assert passwd["prep-agent"][6] == passwd["prep-upload"][6] == "/usr/sbin/nologin"
    groups = system.path("/etc/group").read_text()
    assert re.search(r"^prep-agent:", groups, re.M) and re.search(r"^prep-upload:", groups, re.M)
    for path, expected in (
        ("/var/lib/prep-agent", "prep-agent:prep-agent 751"),
        ("/var/lib/prep-upload", "root:root 755"),
        ("/var/lib/prep-upload/inbox", "prep-upload:prep-agent 2750"),
        ("/var/log/nginx/prep-agent", "root:adm 750"),
        ("/var/log/nginx/prep-agent/error.log", "root:adm 640"),
    ):
        assert system.stat(path) == expected, path


@pytest.fixture(scope="module")
def cut_source(tmp_path_factory: pytest.TempPathFactory) -> Institute:
    return Institute(tmp_path_factory.mktemp("fresh-institute"))


def test_help_init_and_run_once(fresh: Fresh, cut_source: Institute) -> None:
    system = fresh.system
    assert "usage: prep-agent" in system.run(["prep-agent", "--help"]).stdout
    trust = system.path("/root/allowed_signers")
    trust.write_bytes(cut_source.allowed_signers.read_bytes())
    init = ["prep-agent", "init", "--root", "/srv/prep", "--election", "coah-ayun-2021"]
    system.run([*init, "--trust", "/root/allowed_signers"])
    cut_source.cut(system.path("/srv/prep/inbox"), 1, cut_time=minute_ago(5))
    out = system.run(["prep-agent", "run", "--once", "--config", "/srv/prep/prep-agent.conf"])
    assert out.stdout.startswith("published: sequence 1"), out.stdout
    status = system.run(["prep-agent", "status", "--json", "--config", "/srv/prep/prep-agent.conf"])
    assert json.loads(status.stdout)["sequence"] == 1


def test_report_names_its_package(fresh: Fresh) -> None:
    argv = ["prep-agent", "report", "--access-log", "/var/log/x.log", "--out", "/tmp/r"]
    argv += ["--from", "2021-06-06T00:00:00-05:00", "--to", "2021-06-07T00:00:00-05:00"]
    argv += ["--baseline-from", "2021-06-05T00:00:00-05:00"]
    argv += ["--baseline-to", "2021-06-06T00:00:00-05:00"]
    proc = fresh.system.run(argv, check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        "prep-agent: the memoria técnica is in the package prep-agent-report: "
        "apt install prep-agent-report (EL9: dnf install prep-agent-report)\n"
    )


@pytest.fixture(scope="module")
def with_systemd(fresh: Fresh) -> None:
    """systemd, the init of any real server (the template unit's instances need it)."""
    system = fresh.system
    before, size = system.packages(), system.size()
    system.install(names=("systemd",))
    fresh.figures.update(
        systemd_bytes=system.size() - size, systemd_packages=len(closure(before, system.packages()))
    )


@pytest.fixture(scope="module")
def instances(fresh: Fresh, with_systemd: None, cut_source: Institute) -> dict[str, str]:
    """Two instances made by ``init --instance``; each runs its own cut once, as the
    template unit's ExecStart, as the service user. Returns init's output by name."""
    system = fresh.system
    system.path("/root/allowed_signers").write_bytes(cut_source.allowed_signers.read_bytes())
    unit = unit_settings(system.path("/lib/systemd/system/prep-agent@.service"))
    outputs = {}
    for name in INSTANCES:
        outputs[name] = system.run(
            [
                *("prep-agent", "init", "--instance", name, "--election", f"{name}-2024"),
                *("--trust", "/root/allowed_signers", "--server-name", f"prep-{name}.example.mx"),
            ]
        ).stdout
        inbox = f"/var/lib/prep-upload-{name}/inbox"
        # As the institute's upload leaves it: its account's files, group prep-agent.
        cut_source.cut(system.path(inbox), 1, cut_time=minute_ago(5), election=f"{name}-2024")
        system.run(["chown", "-R", f"prep-upload-{name}:prep-agent", inbox])
        system.run(
            ["find", inbox, "-mindepth", "1", "-type", "d", "-exec", "chmod", "2750", "{}", "+"]
        )
        system.run(["find", inbox, "-type", "f", "-exec", "chmod", "0640", "{}", "+"])
        (execstart,) = unit["ExecStart"]
        argv = [*shlex.split(execstart.replace("%i", name)), "--once"]
        out = system.run(argv, user="prep-agent")
        assert out.stdout.startswith("published: sequence 1"), out.stdout + out.stderr
    return outputs


def test_two_instances_have_distinct_paths(fresh: Fresh, instances: dict[str, str]) -> None:
    system = fresh.system
    seen: dict[str, str] = {}
    for port, name in enumerate(INSTANCES, 8081):
        assert f"upload account prep-upload-{name}" in instances[name]
        config = load(system.path(f"/etc/prep-agent/{name}.conf"))
        assert str(config.root) == f"/var/lib/prep-agent-{name}"
        assert str(config.inbox) == f"/var/lib/prep-upload-{name}/inbox"
        assert str(config.trust) == f"/etc/prep-agent/{name}/allowed_signers"
        assert config.listen == f"127.0.0.1:{port}"  # the first free ports
        assert config.election == f"{name}-2024"
        assert config.service_id == name and config.instance == name
        for value in (
            str(config.root),
            str(config.inbox),
            str(config.layout.lock_file),
            str(config.layout.state_file),
            str(config.layout.journal_file),
            config.listen,
            config.service_id,
        ):
            assert value not in seen, f"{name} shares {value} with {seen[value]}"
            seen[value] = name
        assert system.stat(str(config.root)) == "prep-agent:prep-agent 751"
        assert system.stat(f"/var/lib/prep-upload-{name}") == "root:root 755"
        assert system.stat(str(config.inbox)) == f"prep-upload-{name}:prep-agent 2750"
        assert system.path(f"/var/lib/prep-agent-{name}/current").is_symlink()
        journal = system.path(str(config.layout.journal_file)).read_text().splitlines()
        assert [json.loads(ln)["sequence"] for ln in journal if "cut-published" in ln] == [1]
        status = system.run(
            ["prep-agent", "status", "--json", "--config", f"/etc/prep-agent/{name}.conf"],
            user="prep-agent",
        )
        assert json.loads(status.stdout)["election"] == f"{name}-2024"
    units = [f"prep-agent@{name}.service" for name in INSTANCES]
    verify = system.run(["systemd-analyze", "verify", "--man=no", *units], check=False)
    ours = [ln for ln in verify.stderr.splitlines() if "prep-agent" in ln]
    assert verify.returncode == 0 and not ours, verify.stderr


def test_init_instance_again(fresh: Fresh, instances: dict[str, str]) -> None:
    """Refused without --force; with it, the address and the upload keys are kept."""
    system = fresh.system
    keys = system.path("/etc/prep-agent/federal/upload_authorized_keys")
    line = 'from="192.0.2.10",restrict ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE instituto\n'
    keys.write_text(keys.read_text() + line)
    argv = ["prep-agent", "init", "--instance", "federal", "--election", "federal-2024"]
    argv += ["--trust", "/root/allowed_signers", "--server-name", "prep-federal.example.mx"]
    again = system.run(argv, check=False)
    assert again.returncode == 2 and "exists (use --force" in again.stderr, again.stderr
    system.run([*argv, "--force"])
    assert load(system.path("/etc/prep-agent/federal.conf")).listen == "127.0.0.1:8081"
    assert keys.read_text().endswith(line)


@pytest.fixture(scope="module")
def report_installed(fresh: Fresh) -> dict[str, int]:
    system = fresh.system
    before, size = system.packages(), system.size()
    system.install(fresh.debs["report"])
    after = system.packages()
    fresh.figures.update(
        report_packages=len(closure(before, after)),
        report_bytes=system.size() - size,
        report_closure=closure(before, after),
    )
    return after


def test_report_package_installs_alone_and_writes_a_report(
    fresh: Fresh, report_installed: dict[str, int], tmp_path: Path
) -> None:
    assert fresh.figures["report_closure"] == ["prep-agent-report"]
    assert fresh.figures["report_bytes"] < 1_000_000
    system = fresh.system
    reportkit.generate(system.path("/root/access.log"), 3000, seed=3)
    argv = ["prep-agent", "report", "--access-log", "/root/access.log", "--out", "/root/memoria"]
    argv += ["--from", "2021-06-06T00:00:00-05:00", "--to", "2021-06-08T00:00:00-05:00"]
    argv += ["--baseline-from", "2021-06-04T00:00:00-05:00"]
    argv += ["--baseline-to", "2021-06-06T00:00:00-05:00", "--no-progress"]
    system.run(argv)
    page = system.path("/root/memoria/memoria-tecnica.html").read_text()
    assert page.count("<svg") == 3 and "Memoria técnica del difusor del PREP" in page
    assert json.loads(system.path("/root/memoria/summary.json").read_text())["operation"]["days"]


@pytest.fixture(scope="module")
def servers(fresh: Fresh, instances: dict[str, str]) -> None:
    """nginx and openssh-server, as the agent's Recommends (not started: policy-rc.d)."""
    system = fresh.system
    before, size = system.packages(), system.size()
    system.install(names=("nginx", "openssh-server"))
    fresh.figures.update(
        servers_bytes=system.size() - size, servers_packages=len(closure(before, system.packages()))
    )


def test_instances_pass_sshd_and_nginx(fresh: Fresh, servers: None) -> None:
    system = fresh.system
    system.path("/run/sshd").mkdir(exist_ok=True)
    system.run(["sshd", "-t"])
    accounts = {"prep-upload": ("/var/lib/prep-upload", "/etc/prep-agent/upload_authorized_keys")}
    for name in INSTANCES:
        accounts[f"prep-upload-{name}"] = (
            f"/var/lib/prep-upload-{name}",
            f"/etc/prep-agent/{name}/upload_authorized_keys",
        )
    for user, (chroot, keys) in accounts.items():
        spec = f"user={user},host=institute,addr=192.0.2.10"
        out = system.run(["sshd", "-T", "-C", spec]).stdout
        effective = dict(ln.split(" ", 1) for ln in out.splitlines() if " " in ln)
        assert effective["chrootdirectory"] == chroot, user
        assert effective["authorizedkeysfile"] == keys, user
        assert effective["forcecommand"].startswith("internal-sftp -d /inbox -u 0027 -P "), user
    for name in INSTANCES:
        site = f"/etc/nginx/sites-available/prep-agent-{name}.conf"
        system.path(f"/etc/nginx/sites-enabled/prep-agent-{name}.conf").symlink_to(site)
    proc = system.run(["nginx", "-t"], check=False)
    assert proc.returncode == 0 and "test is successful" in proc.stderr, proc.stderr
