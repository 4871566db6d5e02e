"""Several agents on one host: the template unit prep-agent@NAME and ``init --instance``.

The files ``init --instance`` writes are rendered here for two instances and
read back: every path, account, address and nginx name is the instance's own,
the sshd snippet and the nginx site are the packaged ones with only those
strings changed, and the template unit is the packaged service with only its
config and writable folder changed. ``tests/test_fresh_system.py`` runs the
real command as root on a fresh Debian and checks the result with sshd, nginx
and systemd-analyze.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from prep_agent import cli
from prep_agent.agent import instance as instances
from prep_agent.agent.config import load
from prep_agent.agent.instance import Instance, Settings
from prep_agent.core.errors import ConfigError
from tests.kit import ELECTION, AgentDaemon, Institute, make_config
from tests.packagingkit import run, unit_settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "prep-agent.service"
TEMPLATE = PACKAGING / "systemd" / "prep-agent@.service"
NAMES = ("federal", "coah-2024")


def settings(name: str, port: int) -> Settings:
    return Settings(
        election=f"{name}-2024",
        threshold=1,
        listen=f"127.0.0.1:{port}",
        server_name=f"prep-{name}.example.mx",
        service_id=name,
    )


def rendered(tmp_path: Path) -> dict[str, dict[Path, str]]:
    """The files of two instances, and each config also written under ``tmp_path``."""
    out = {}
    for port, name in enumerate(NAMES, 8081):
        files = instances.render(Instance(name), settings(name, port), PACKAGING)
        out[name] = files
        (tmp_path / f"{name}.conf").write_text(files[Instance(name).config])
    return out


def directives(text: str) -> list[str]:
    """The lines of a config file that are not comments or blank."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.mark.core
def test_template_unit_is_the_service_with_the_instance_paths() -> None:
    instance = Instance("federal")
    for section in ("Unit", "Service", "Install"):
        single, template = unit_settings(UNIT, section), unit_settings(TEMPLATE, section)
        changed = {k for k in single.keys() | template.keys() if single.get(k) != template.get(k)}
        expected = {"Unit": {"Description"}, "Service": {"ExecStart", "ReadWritePaths"}}
        assert changed == expected.get(section, set()), section
    service = unit_settings(TEMPLATE)
    (execstart,) = service["ExecStart"]
    assert execstart == "/usr/bin/prep-agent run --config /etc/prep-agent/%i.conf"
    assert execstart.split()[-1].replace("%i", instance.name) == str(instance.config)
    assert service["ReadWritePaths"] == ["/var/lib/prep-agent-%i"]
    assert service["ReadWritePaths"][0].replace("%i", instance.name) == str(instance.root)


@pytest.mark.core
def test_two_instances_share_no_path(tmp_path: Path) -> None:
    files = rendered(tmp_path)
    assert not set(files["federal"]) & set(files["coah-2024"])
    seen: dict[str, str] = {}
    single = {
        "/var/lib/prep-agent",
        "/var/lib/prep-upload/inbox",
        "/etc/prep-agent/allowed_signers",
    }
    for port, name in enumerate(NAMES, 8081):
        instance = Instance(name)
        config = load(tmp_path / f"{name}.conf")
        assert config.root == instance.root == Path(f"/var/lib/prep-agent-{name}")
        assert config.inbox == instance.inbox == Path(f"/var/lib/prep-upload-{name}/inbox")
        assert config.trust == instance.trust == Path(f"/etc/prep-agent/{name}/allowed_signers")
        assert config.election == f"{name}-2024" and config.listen == f"127.0.0.1:{port}"
        assert config.service_id == name and config.instance == name
        owned = {
            "root": str(config.root),
            "inbox": str(config.inbox),
            "lock": str(config.layout.lock_file),
            "state": str(config.layout.state_file),
            "journal": str(config.layout.journal_file),
            "trust": str(config.trust),
            "listen": config.listen,
            "service id": config.service_id,
            "upload account": instance.upload_user,
            "chroot": str(instance.chroot),
            "access log": str(instance.access_log),
            "error log": str(instance.error_log),
        }
        for what, value in owned.items():
            assert value not in seen, f"{name}'s {what} {value} is also {seen[value]}'s"
            assert value not in single, f"{name}'s {what} is the single agent's"
            seen[value] = name


@pytest.mark.core
def test_sshd_snippet_is_the_packaged_one_for_the_instance_account(tmp_path: Path) -> None:
    instance = Instance("federal")
    text = rendered(tmp_path)["federal"][instance.sshd]
    packaged = (PACKAGING / "ssh" / "prep-agent-upload.conf").read_text()
    expected = [
        ln.replace("Match User prep-upload", "Match User prep-upload-federal")
        .replace("/var/lib/prep-upload", "/var/lib/prep-upload-federal")
        .replace(
            "/etc/prep-agent/upload_authorized_keys",
            "/etc/prep-agent/federal/upload_authorized_keys",
        )
        for ln in directives(packaged)
    ]
    assert directives(text) == expected
    assert "ForceCommand internal-sftp -d /inbox -u 0027 -P " in text
    assert not re.search(r"prep-upload(?!-federal)", text), "a line still names prep-upload"


@pytest.mark.core
def test_nginx_sites_have_their_own_names_paths_and_agent(tmp_path: Path) -> None:
    files = rendered(tmp_path)
    names = {}
    for port, name in enumerate(NAMES, 8081):
        instance = Instance(name)
        site, snippet = files[name][instance.site], files[name][instance.snippet]
        both = site + snippet
        prefix = instance.nginx_prefix
        code = "\n".join(directives(site))
        defined = set(re.findall(r"(?:log_format|upstream|geo|map \S+) \$?(\w+)", code))
        defined |= set(re.findall(r"zone=(\w+):", code))
        assert len(defined) == 10, defined  # 1 log format, 3 zones, 5 variables, 1 upstream
        assert defined and all(n.startswith(prefix) for n in defined), defined
        assert "prep_agent_" not in both.replace(prefix, "")
        names[name] = defined
        assert f"server_name prep-{name}.example.mx;" in site and "server_name _;" not in site
        assert f"server 127.0.0.1:{port};" in site and "127.0.0.1:8080" not in both
        assert f"root {instance.root}/public;" in snippet
        assert f"proxy_pass http://{prefix}backend;" in snippet
        assert "include /etc/prep-agent/nginx-institute.conf;" in site  # shared: both institutes
        # Only names and paths change: every other directive is the packaged one.
        subs = {
            "/var/lib/prep-agent": str(instance.root),
            "127.0.0.1:8080": f"127.0.0.1:{port}",
            "server_name _;": f"server_name prep-{name}.example.mx;",
            "/etc/nginx/snippets/prep-agent-site.conf": str(instance.snippet),
            "/var/log/nginx/prep-agent.access.log": str(instance.access_log),
            "/var/log/nginx/prep-agent.error.log": str(instance.error_log),
            "prep_agent_": prefix,
        }
        for ours, source in ((site, "prep-agent.conf"), (snippet, "prep-agent-site.conf")):
            expected = directives((PACKAGING / "nginx" / source).read_text())
            for old, new in subs.items():
                expected = [ln.replace(old, new) for ln in expected]
            assert directives(ours) == expected, source
    assert not names["federal"] & names["coah-2024"]


@pytest.mark.core
def test_tmpfiles_give_the_package_modes_and_owners(tmp_path: Path) -> None:
    instance = Instance("federal")
    lines = directives(rendered(tmp_path)["federal"][instance.tmpfiles])
    ours = {ln.split()[1]: ln.split()[2:5] for ln in lines}
    packaged = {
        ln.split()[1]: ln.split()[2:5]
        for ln in directives((PACKAGING / "tmpfiles" / "prep-agent.conf").read_text())
    }
    assert ours == {
        str(instance.root): packaged["/var/lib/prep-agent"],
        str(instance.chroot): packaged["/var/lib/prep-upload"],
        str(instance.inbox): ["2750", "prep-upload-federal", "prep-agent"],
        str(instance.error_log): packaged["/var/log/nginx/prep-agent/error.log"],
    }
    assert packaged["/var/lib/prep-upload/inbox"] == ["2750", "prep-upload", "prep-agent"]
    sysusers = directives(rendered(tmp_path)["federal"][instance.sysusers])
    assert sysusers == ['u prep-upload-federal - "prep-agent SFTP upload account (federal)"']


@pytest.mark.core
@pytest.mark.parametrize("name", ["Federal", "1st", "a_b", "a--b", "-a", "a-", "x" * 21, ""])
def test_bad_instance_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="instance name"):
        Instance(name)
    conf = tmp_path / "x.conf"
    conf.write_text(f"[agent]\nelection = e\nroot = r\ninbox = i\ntrust = t\ninstance = {name}\n")
    if name:
        with pytest.raises(ConfigError, match=r"\[agent\] instance"):
            load(conf)
    else:
        assert load(conf).instance == ""


@pytest.mark.core
def test_free_listen_skips_the_addresses_other_configs_use(tmp_path: Path) -> None:
    for name, port in (("prep-agent", 8080), ("federal", 8081), ("estatal", 8083)):
        (tmp_path / f"{name}.conf").write_text(f"[agent]\nlisten = 127.0.0.1:{port}\n")
    assert instances.free_listen(tmp_path) == "127.0.0.1:8082"
    (tmp_path / "otro.conf").write_text("[agent]\nlisten = 127.0.0.1:8082\n")
    assert instances.free_listen(tmp_path) == "127.0.0.1:8084"
    assert instances.listen_addresses(tmp_path)["127.0.0.1:8083"] == tmp_path / "estatal.conf"


@pytest.mark.core
def test_a_template_without_a_string_to_replace_is_an_error(tmp_path: Path) -> None:
    for sub in ("ssh", "nginx"):
        (tmp_path / sub).mkdir()
    for rel in ("ssh/prep-agent-upload.conf", "nginx/prep-agent-site.conf"):
        (tmp_path / rel).write_text((PACKAGING / rel).read_text())
    site = (PACKAGING / "nginx" / "prep-agent.conf").read_text()
    (tmp_path / "nginx" / "prep-agent.conf").write_text(site.replace("server_name _;", ""))
    with pytest.raises(Exception, match="no longer contains 'server_name _;'"):
        instances.render(Instance("federal"), settings("federal", 8081), tmp_path)
    bad = Settings("e", 1, "127.0.0.1:8081", "x y;", "federal")
    with pytest.raises(ConfigError, match="is not a host name"):
        instances.render(Instance("federal"), bad, PACKAGING)
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        instances.render(Instance("federal"), Settings("e", 1, "8081", "x.mx", "f"), PACKAGING)


@pytest.mark.core
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--root is required (or --instance NAME)"),
        (["--root", "r", "--server-name", "x.mx"], "--server-name goes with --instance"),
        (["--instance", "federal", "--root", "r", "--server-name", "x.mx"], "drop --root"),
        (["--instance", "federal"], "--instance needs --server-name"),
        (["--instance", "Federal", "--server-name", "x.mx"], "instance name 'Federal'"),
    ],
)
def test_init_instance_refuses_bad_options(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All refused before anything is written (these run as root in CI)."""
    trust = tmp_path / "allowed_signers"
    trust.write_text("")
    argv = ["init", "--election", ELECTION, "--trust", str(trust), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_template_instance_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = tmp_path / "prep-agent@federal.service"
    unit.write_text(TEMPLATE.read_text())
    proc = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)])
    found = re.search(
        r"Overall exposure level for prep-agent@federal\.service: ([0-9.]+)", proc.stdout
    )
    assert found and float(found.group(1)) <= 2.0, proc.stdout + proc.stderr


def test_instance_metrics_carry_its_label(tmp_path: Path, institute: Institute) -> None:
    config = make_config(tmp_path, institute, instance="federal")
    assert config.instance == "federal"
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    try:
        text = requests.get(f"http://{agent.address}/metrics", timeout=5).text
    finally:
        agent.stop()
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert samples and all('{prep_instance="federal"' in ln for ln in samples), text
    assert 'prep_cut_sequence{prep_instance="federal"} 0' in samples
    assert 'prep_publish_duration_seconds_bucket{prep_instance="federal",le="+Inf"} 0' in samples
