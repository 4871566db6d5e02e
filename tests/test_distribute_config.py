"""The institute config's distribution keys: [difusor:ID] targets and [distribute]."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep_agent import cli
from prep_agent.core.errors import ConfigError
from prep_agent.institute.collector.config import SftpTarget, load_collector

pytestmark = pytest.mark.core

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOGpRZgXyC7Qn3qFJxq6Jp1uIqgkJmk6d6kz0Xw0p9Xy"


def write(tmp: Path, difusor: str, distribute: str = "") -> Path:
    conf = tmp / "institute.conf"
    conf.write_text(
        "[collector]\ntrust = difusores_allowed_signers\n\n"
        f"[difusor:diario-a]\nname = Diario A\n{difusor}\n{distribute}"
    )
    return conf


def test_difusor_target_keys(tmp_path: Path) -> None:
    conf = write(
        tmp_path,
        "sftp = prep-upload@prep.diario-a.mx:2222:/srv/prep-agent/inbox\n"
        f"host_key = [prep.diario-a.mx]:2222 {KEY} root@host\n"
        "identity = keys/upload\ncontact = Ana Pérez, 844 123 4567\n"
        "health_url = https://prep.diario-a.mx/health\n",
        "[distribute]\nallowed_signers = institute_allowed_signers\nelection = coah-ayun-2021\n"
        "workers = 3\nretry_for = 20\n",
    )
    config = load_collector(conf)
    entry = config.difusores[0]
    assert entry.sftp == SftpTarget(
        "prep-upload", "prep.diario-a.mx", 2222, "/srv/prep-agent/inbox"
    )
    assert entry.host_key == KEY
    assert entry.identity == (tmp_path / "keys/upload").resolve()
    assert entry.status_url == "https://prep.diario-a.mx/status.json"
    assert entry.contact == "Ana Pérez, 844 123 4567"
    assert entry.enabled
    settings = config.distribute
    assert settings.election == "coah-ayun-2021"
    assert settings.signers == (tmp_path / "institute_allowed_signers").resolve()
    assert (settings.workers, settings.retry_for) == (3, 20.0)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("sftp = u@h:/x\nhost_key = " + KEY, "USER@HOST:PORT:/PATH"),
        ("sftp = u@h:22:/x", "host_key"),
        ("sftp = u@h:22:/x\nhost_key = h not-a-key", "known_hosts line"),
        ("enabled = maybe", "yes or no"),
        ("status_url = ftp://x/status.json", "http(s) URL"),
    ],
)
def test_bad_target_keys(tmp_path: Path, lines: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_collector(write(tmp_path, lines))


def test_example_documents_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["collector", "--example"]) == 0
    out = capsys.readouterr().out
    for key in ("sftp =", "host_key =", "identity =", "status_url =", "contact =", "enabled ="):
        assert f"# {key}" in out, key
    assert "[distribute]" in out
