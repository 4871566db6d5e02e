"""Private keys of a type that never counts (prep-cut-v1 §3) are refused from the
public part of the key file, before ``cryptography`` loads them: from cryptography
40 on, loading a DSA key also printed a deprecation warning beside the refusal."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest

from prep_agent.core.errors import SignatureFormatError
from prep_agent.core.sshkeys import load_private_key
from tests.kit import ELECTION, PREP_AGENT, keygen


@pytest.fixture(scope="module")
def dsa_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("dsa") / "institute_dsa"
    keygen(key, "dsa")
    return key


def test_dsa_private_key_is_refused_without_loading_it(dsa_key: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SignatureFormatError, match="^DSA keys are not allowed$"):
            load_private_key(dsa_key.read_bytes())


def test_sign_with_a_dsa_key_says_one_line(dsa_key: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "index.html").write_text("<h1>Corte 1</h1>")
    argv = [PREP_AGENT, "sign", "--key", str(dsa_key), "--election", ELECTION]
    argv += ["--sequence", "1", "--cut-time", "2021-06-06T20:30:00-06:00", str(cut)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, "prep-agent: DSA keys are not allowed\n")
    assert not (cut / "prep-manifest.json.sig").exists()
