"""The store of verified bytes ``prep-agent distribute`` sends from: each file
kept once by SHA-256, copied while it is hashed, pruned to what the cuts in use
list, and never pruned while another distribute process sends from it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from prep_agent.core.errors import Rejection
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME
from prep_agent.core.verify import Policy
from prep_agent.institute.collector.deliveries import DistributedCut
from prep_agent.institute.distribution.local import check_cut, load_signers
from prep_agent.institute.distribution.snapshot import Snapshots
from tests.kit import ELECTION, Institute
from tests.sftpkit import make_cut
from tests.test_distribute import T0


def test_the_store_keeps_each_verified_file_once_and_only_what_is_needed(tmp_path: Path) -> None:
    institute = Institute(tmp_path / "institute")
    policy = Policy(ELECTION, tuple(load_signers(institute.allowed_signers)), 1)
    store = Snapshots(tmp_path / "state" / "cuts")
    store.open()
    first = make_cut(institute, tmp_path / "out", 1, T0 + timedelta(minutes=1))
    one = check_cut(first.local, policy, None, datetime.now(timezone.utc), 0.0, store)
    assert one.folder == first.local
    for rel, data in {**first.files, MANIFEST_NAME: first.manifest}.items():
        assert one.local(rel).read_bytes() == data and one.local(rel).parent == store.root
    assert one.local(SIGNATURE_NAME).read_bytes() == first.signature
    at = T0 + timedelta(minutes=2)
    second = make_cut(institute, tmp_path / "out", 2, at, institute.files(at, 2))
    last = DistributedCut(1, one.manifest_sha256, one.manifest.cut_time_text, 0.0)
    kept = {p.name: p.stat().st_ino for p in store.root.iterdir()}
    two = check_cut(second.local, policy, last, datetime.now(timezone.utc), 0.0, store)
    logo = two.local("img/logo.svg")  # the same bytes in both cuts: kept once, not rewritten
    assert logo == one.local("img/logo.svg") and logo.stat().st_ino == kept[logo.name]
    assert two.local("index.html").read_bytes() == second.files["index.html"]
    store.prune(two.hashes())
    kept_now = sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))
    assert kept_now == sorted(two.hashes())
    assert not one.local("index.html").exists()
    store.close()
    # a source that no longer matches its manifest leaves no unverified bytes behind
    (second.local / "index.html").write_bytes(b"<h1>otro</h1>")
    other = Snapshots(tmp_path / "other")
    with pytest.raises(Rejection, match="index.html differs"):
        check_cut(second.local, policy, None, datetime.now(timezone.utc), 0.0, other)
    for path in other.root.iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


@pytest.mark.core
def test_the_store_is_not_pruned_while_another_run_sends_from_it(tmp_path: Path) -> None:
    store = Snapshots(tmp_path / "cuts")
    store.open()
    kept = store.keep_bytes(b"bytes a --watch run is still sending")
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path\n"
            "from prep_agent.institute.distribution.snapshot import Snapshots\n"
            "Snapshots(Path(sys.argv[1])).open(); print('open', flush=True); sys.stdin.read()",
            str(store.root),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "open\n"
        store.prune([])  # another process holds the store: nothing goes
        assert store.holds(kept)
    finally:
        other.communicate(timeout=30)
    store.prune([])
    assert not store.holds(kept)
    store.close()
