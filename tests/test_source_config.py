"""``[source]`` of the agent config and ``prep-agent init --source-url``."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from prep_agent import cli
from prep_agent.agent.config import load
from prep_agent.agent.fetch import settings_of
from prep_agent.core.errors import ConfigError
from tests.kit import free_port

URL = "https://prep.ieec.org.mx/paquetes/"


@pytest.fixture
def trust(tmp_path: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = tmp_path / "allowed_signers"
    path.write_text(f'iec namespaces="prep-cut,prep-package" {line.decode()}\n')
    return path


def init(tmp_path: Path, trust: Path, *extra: str) -> int:
    argv = ["init", "--root", str(tmp_path / "srv"), "--election", "camp-2021"]
    return cli.main([*argv, "--trust", str(trust), *extra])


@pytest.mark.core
def test_init_with_source_url_writes_an_https_package_source(
    tmp_path: Path, trust: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert init(tmp_path, trust, "--source-url", URL, "--ca-file", str(ca)) == 0
    assert capsys.readouterr().out.strip().endswith(f"source {URL}")
    config = load(tmp_path / "srv" / "prep-agent.conf")
    source = config.source
    assert (source.type, source.url, source.ca_file) == ("https-package", URL, ca)
    assert (source.require_signature, source.poll_seconds, source.pins) == (False, 30, frozenset())
    fetch = settings_of(source)
    assert (fetch.url, fetch.ca_file, fetch.max_bytes) == (URL, str(ca), 256 * 1024**2)


@pytest.mark.core
def test_default_source_is_the_drop_folder(tmp_path: Path, trust: Path) -> None:
    assert init(tmp_path, trust) == 0
    text = (tmp_path / "srv" / "prep-agent.conf").read_text()
    assert "\n[source]\n" in text and "\ntype = drop-folder\n" in text
    assert load(tmp_path / "srv" / "prep-agent.conf").source.type == "drop-folder"


@pytest.mark.core
def test_ca_file_needs_source_url(
    tmp_path: Path, trust: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert init(tmp_path, trust, "--ca-file", str(trust)) == 2
    assert "--ca-file goes with --source-url" in capsys.readouterr().err


def write(tmp_path: Path, trust: Path, source: str) -> Path:
    path = tmp_path / "agent.conf"
    agent = f"[agent]\nelection = e\nroot = {tmp_path / 'srv'}\ntrust = {trust}\n"
    path.write_text(agent + "[source]\n" + source)
    return path


@pytest.mark.core
def test_pins_in_hex_base64_and_curl_spelling(tmp_path: Path, trust: Path) -> None:
    digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    pins = [
        digests[0].hex(),
        base64.b64encode(digests[1]).decode(),
        "sha256//" + base64.b64encode(digests[2]).decode(),
    ]
    text = f"type = https-package\nurl = {URL}\npin_sha256 = {' '.join(pins)}\n"
    config = load(write(tmp_path, trust, text))
    assert config.source.pins == frozenset(digests)
    assert config.inbox == tmp_path / "srv" / "inbox"  # no drop folder needed


@pytest.mark.core
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type = ftp\n", "[source] type must be one of drop-folder, https-package"),
        ("type = https-package\n", "[source] url is required when type is https-package"),
        ("type = https-package\nurl = http://x.mx/a.zip\n", "is not an https:// URL"),
        (f"type = https-package\nurl = {URL}\nca_file = nada.pem\n", "nada.pem does not exist"),
        (f"url = {URL}\nrequire_signature = quizá\n", "must be true or false"),
        (f"url = {URL}\npoll_seconds = 0\n", "[source] poll_seconds must be at least 1"),
        (f"url = {URL}\npin_sha256 = abcd\n", "is not a SHA-256 digest"),
        (f"url = {URL}\nmax_package_bytes = mucho\n", "must be an integer"),
        (f"url = {URL}\ncut_period_seconds = 30\n", "between 60 and 3600"),
    ],
)
def test_invalid_source_settings_are_one_line_errors(
    tmp_path: Path, trust: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, trust, text))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.core
def test_run_once_polls_the_https_package_source(
    tmp_path: Path, trust: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run --once polls the https-package URL once (it no longer refuses the source):
    with nothing listening there it says why in one line and exits 2, nothing decided."""
    port = free_port()
    assert init(tmp_path, trust, "--source-url", f"https://127.0.0.1:{port}/paquetes/") == 0
    capsys.readouterr()
    assert cli.main(["run", "--once", "--config", str(tmp_path / "srv" / "prep-agent.conf")]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("source-error: source-unreachable: ") and "\n" not in out
