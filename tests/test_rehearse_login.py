"""The rehearsal's stand logs in to each difusor's sshd before the night: an
account the sshd refuses stops ``rehearse`` at once with ssh's reason, instead
of a night of failed deliveries and a failing verdict minutes later.

Real sshd (the stand's own ``_sshd``), real sftp client.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from prep_agent.core.errors import Error
from prep_agent.rehearsal import stand as stand_mod


def _one_difusor(tmp_path: Path) -> tuple[stand_mod.Stand, stand_mod.Difusor]:
    stand = stand_mod.Stand(tmp_path, period=2.0)
    stand_mod._institute(stand)
    d = stand_mod.Difusor(
        "a", tmp_path / "difusores" / "a", stand_mod.free_port(), stand_mod.free_port()
    )
    d.home.mkdir(parents=True)
    stand.difusores.append(d)
    try:
        stand_mod._sshd(stand, d)
    except BaseException:
        stand.close()  # an sshd that started but did not answer is stopped
        raise
    return stand, d


def test_the_upload_key_logs_in(tmp_path: Path) -> None:
    stand, d = _one_difusor(tmp_path)
    try:
        stand_mod.check_login(stand, d)
    finally:
        stand.close()


def test_a_refused_login_stops_the_stand_at_once(tmp_path: Path) -> None:
    stand, d = _one_difusor(tmp_path)
    try:
        # sshd now knows only the rogue key: the institute's upload key is refused.
        rogue = Path(f"{stand.rogue_key}.pub").read_text(encoding="ascii")
        (d.home / "sshd" / "authorized_keys").write_text(rogue, encoding="ascii")
        start = time.monotonic()
        with pytest.raises(Error, match=r"sftp login as \S+ to the sshd of a failed: .*denied"):
            stand_mod.check_login(stand, d)
        assert time.monotonic() - start < 10
    finally:
        stand.close()


def test_a_wrong_host_key_is_refused(tmp_path: Path) -> None:
    stand, d = _one_difusor(tmp_path)
    try:
        d.host_public = Path(f"{stand.rogue_key}.pub").read_text(encoding="ascii").strip()
        with pytest.raises(Error, match="sshd of a failed: .*[Hh]ost key verification failed"):
            stand_mod.check_login(stand, d)
    finally:
        stand.close()
