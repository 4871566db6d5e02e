"""Which folders ``prep-agent distribute`` makes on a target (real sshd/sftp).

Every ``-mkdir`` of a batch is one more round trip through sftp, ssh and
sshd; a target that acknowledged a cut holds that cut's folders (the agent
never deletes in its drop folder), so a later cut makes only the folders it
adds. A target whose folder went missing anyway gets it made on the retry.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from prep_agent.institute.delivery import batch_lines, folders_of
from tests.distkit import Sshd, Target, distribute, write_config
from tests.kit import OFFSET, Institute, keygen
from tests.sftpkit import make_cut

T0 = datetime.now(OFFSET).replace(microsecond=0) - timedelta(hours=1)


@pytest.mark.core
def test_a_folder_of_several_files_is_entered_to_send_them_by_name() -> None:
    send = ["a/1", "a/2", "a/3", "b/c/1", "b/c/2", "b/c/3", "d/1", "top"]
    lines = batch_lines(Path("/c"), "in", send, existing={"a", "b"}, view=Path("/v"))
    assert lines == [
        'cd "in"',
        '-mkdir "b/c"',
        '-mkdir "d"',
        'put "/c/d/1" "d/1"',
        'put "/v/top"',
        'cd "a"',
        *[f'put "/v/a/{i}"' for i in (1, 2, 3)],
        'cd "../b/c"',
        *[f'put "/v/b/c/{i}"' for i in (1, 2, 3)],
        'cd "../.."',
        'put "/c/prep-manifest.json" "prep-manifest.json"',
        'put "/c/prep-manifest.json.sig" ".prep-manifest.json.sig.part"',
        'rename ".prep-manifest.json.sig.part" "prep-manifest.json.sig"',
    ]


@pytest.mark.core
def test_a_batch_makes_only_the_folders_not_held() -> None:
    held = folders_of(["actas/00/a.txt", "index.html"])
    assert held == {"actas", "actas/00"}
    lines = batch_lines(
        Path("/c"), "", ["actas/00/b.txt", "actas/01/c.txt"], signed=False, existing=held
    )
    assert lines == [
        '-mkdir "actas/01"',
        'put "/c/actas/00/b.txt" "actas/00/b.txt"',
        'put "/c/actas/01/c.txt" "actas/01/c.txt"',
    ]


def files(institute: Institute, sequence: int, extra: dict[str, bytes]) -> dict[str, bytes]:
    when = T0 + timedelta(minutes=sequence)
    return {**institute.files(when, sequence), **extra}


def made(requests: Path, inbox: Path) -> list[str]:
    """The folders sftp-server was asked to make under ``inbox`` (its log)."""
    text = requests.read_text(errors="replace")
    prefix = re.escape(str(inbox) + "/")
    return re.findall(rf'mkdir name "{prefix}([^"]+)"', text)


def stats(requests: Path, path: Path) -> int:
    """How many times sftp-server was asked to stat ``path``."""
    return requests.read_text(errors="replace").count(f'stat name "{path}"')


def test_a_later_cut_makes_only_new_folders_and_a_lost_one_on_the_retry(
    tmp_path: Path,
) -> None:
    upload_key = tmp_path / "institute_upload"
    server = Sshd(tmp_path / "sshd", [keygen(upload_key)])
    config = server.config.read_text()
    requests = tmp_path / "sftp-server.log"  # its requests (the subsystem runs in a shell)
    server_log = f"/usr/lib/openssh/sftp-server -e -l VERBOSE 2>>{requests}\n"
    server.config.write_text(config.replace("internal-sftp\n", server_log))
    institute = Institute(tmp_path / "institute")
    targets = []
    for sid in ("intacto", "sin-carpeta"):
        inbox = tmp_path / "targets" / sid
        inbox.mkdir(parents=True)
        key = server.known_hosts_line()
        targets.append(Target(sid, inbox, port=server.port, host_key=key, identity=upload_key))
    conf = write_config(
        tmp_path / "institute.conf", institute.allowed_signers, targets, backoff_max=0.2
    )
    out = tmp_path / "out"
    group = {f"actas/02/{name}.txt": name.encode() for name in ("x", "y", "z")}
    first = {"actas/00/a.txt": b"a 1\n", "actas/01/b.txt": b"b 1\n", **group}
    second = {"actas/00/a.txt": b"a 2\n", "actas/01/b.txt": b"b 2\n", "nuevo/sub/c.txt": b"c\n"}
    server.start()
    try:
        cut1 = make_cut(institute, out, 1, T0 + timedelta(minutes=1), files(institute, 1, first))
        proc = distribute(conf, "--no-confirm", str(cut1.local))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        intact, lost = (t.inbox for t in targets)
        folders = ["actas", "actas/00", "actas/01", "actas/02", "datos", "img"]
        assert sorted(made(requests, intact)) == folders
        # 3 files of one folder went by their own names after a cd: no stat of each.
        for rel, data in group.items():
            assert (intact / rel).read_bytes() == data
            assert stats(requests, intact / rel) == 0, rel
        assert stats(requests, intact / "actas/00/a.txt") == 1  # alone in its folder
        shutil.rmtree(lost / "actas")  # someone else removed it: the record cannot know
        before = {t.service_id: len(made(requests, t.inbox)) for t in targets}
        cut2 = make_cut(institute, out, 2, T0 + timedelta(minutes=2), files(institute, 2, second))
        proc = distribute(conf, "--no-confirm", str(cut2.local))
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The changed files of actas/ and datos/ went into folders the target held.
    assert made(requests, intact)[before["intacto"] :] == ["nuevo", "nuevo/sub"]
    for target in targets:
        for rel, data in cut2.files.items():
            assert (target.inbox / rel).read_bytes() == data, (target.service_id, rel)
    with sqlite3.connect(tmp_path / "collector.sqlite") as db:
        query = "SELECT result, error FROM delivery_attempt WHERE difusor = ? AND sequence = 2"
        rows = list(db.execute(query + " ORDER BY id", ("sin-carpeta",)))
    assert rows == [("failed", "remote folder missing"), ("delivered", None)]
    # The first attempt made the new folders, then failed; the retry made them all.
    retried = made(requests, lost)[before["sin-carpeta"] :]
    assert retried[:2] == ["nuevo", "nuevo/sub"]
    assert sorted(retried[2:]) == ["actas", "actas/00", "actas/01", "datos", "nuevo", "nuevo/sub"]
