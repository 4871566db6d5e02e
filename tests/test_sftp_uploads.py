"""Upload patterns (prep-cut-v1 §1, §4–§5) through the real OpenSSH sftp client.

Every cut reaches the drop folder through ``sftp -b BATCH -D "sftp-server -d
INBOX"``, and the agent is ``prep-agent run`` in its own process with its
inotify watcher, stopped by SIGTERM (exit 0). Publications are observed from
outside only: the journal, ``prep-agent status --json`` and ``ROOT/current``.

The rescan interval is set far above the waiting deadlines, so a cut that is
published in time was found through file events, as in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.kit import Institute, csv_bytes, make_config, minute_ago
from tests.sftpkit import AgentProcess, Batch, Cut, Sftp, cut_times, kill_mid_transfer, make_cut
from tests.sftpkit import verify_with_ssh_keygen as ssh_keygen_verify

RESCAN = 30
"""rescan_interval: longer than any wait below, so publication must follow events."""
PUBLISH_WITHIN = 15.0
BIG = 32 * 1024 * 1024
"""A large file, uploaded at LIMIT_KBIT so that it can be killed mid-transfer."""
LIMIT_KBIT = 40_000
"""sftp -l: 5 MB/s, about 6 s for BIG (the client is killed after ~2 MB)."""
KILL_AT = 2 * 1024 * 1024
BIG_PATH = "datos/fotos/actas.bin"


class Rig:
    """One agent root, its drop folder, a running daemon and an sftp uploader."""

    def __init__(self, tmp_path: Path, institute: Institute, **settings: Any) -> None:
        settings.setdefault("rescan_interval", RESCAN)
        settings.setdefault("settle_timeout", 20)
        self.institute = institute
        self.config = make_config(tmp_path, institute, **settings)
        self.agent = AgentProcess(tmp_path / "prep-agent.conf")
        self.sftp = Sftp(self.config.inbox, tmp_path / "batches")
        self.outbox = tmp_path / "outbox"
        self.times = cut_times(minute_ago(20), 12)

    def start(self) -> None:
        started = self.agent.start().started
        assert started["watcher"] == "inotify", started

    def cut(self, sequence: int, files: dict[str, bytes] | None = None) -> Cut:
        """A signed cut staged locally (default files: the kit's page, CSV and logo)."""
        return make_cut(self.institute, self.outbox, sequence, self.times[sequence - 1], files)

    def default_files(self, sequence: int) -> dict[str, bytes]:
        return self.institute.files(self.times[sequence - 1], sequence)

    def mark(self) -> int:
        """Journal position, to look only at later events."""
        return len(self.agent.journal())

    def since(self, mark: int, name: str) -> list[dict[str, Any]]:
        return [e for e in self.agent.journal()[mark:] if e["event"] == name]

    def wait_since(
        self, mark: int, name: str, timeout: float = PUBLISH_WITHIN, reason: str | None = None
    ) -> dict[str, Any]:
        """Wait for a ``name`` event (with that ``reason``, if given) after ``mark``."""

        def match(event: dict[str, Any]) -> bool:
            return event["event"] == name and reason in (None, event.get("reason"))

        return self.agent.wait_event(match, timeout, f"{name} {reason or ''}", mark)

    def publish(self, cut: Cut, batch: Batch) -> dict[str, Any]:
        """Upload ``batch``, wait for ``cut`` to be published; check what is served."""
        self.sftp.run(batch)
        event = self.agent.wait_published(cut.sequence, PUBLISH_WITHIN)
        self.agent.assert_current(cut)
        return event

    def assert_quiet(self, mark: int, seconds: float) -> None:
        """Nothing is published or rejected for ``seconds`` (the agent keeps running)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            decided = self.since(mark, "cut-published") + self.since(mark, "cut-rejected")
            assert not decided, decided
            assert self.agent.proc is not None and self.agent.proc.poll() is None
            time.sleep(0.05)

    def finish(self, published: list[int], rejected: tuple[str, ...] = ()) -> None:
        """Stop the daemon (exit 0) and check the whole journal of the test."""
        status = self.agent.status()
        code = self.agent.stop()
        assert code == 0, f"agent exited {code}\n{self.agent.describe()}"
        assert self.agent.published() == published, self.agent.describe()
        reasons = tuple(e["reason"] for e in self.agent.events("cut-rejected"))
        assert reasons == rejected, self.agent.describe()
        if not rejected:
            assert status["last_rejection"] is None
        assert self.agent.journal()[-1]["event"] == "agent-stopped"
        ssh_keygen_verify(self.institute, self.config.current)
        # §1.4: the drop folder is the uploader's; nothing is hard-linked or made read-only.
        for path in self.config.inbox.rglob("*"):
            st = path.lstat()
            if path.is_file():
                assert st.st_nlink == 1, f"{path} is hard-linked"
            assert st.st_mode & 0o200, f"{path} lost its write permission"


@pytest.fixture
def rig(tmp_path: Path, institute: Institute) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def factory(**settings: Any) -> Rig:
        made.append(Rig(tmp_path, institute, **settings))
        made[-1].start()
        return made[-1]

    yield factory
    for r in made:  # after a failure: still never leave a daemon behind
        if r.agent.proc is not None and r.agent.proc.poll() is None:
            r.agent.stop()


def _time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


def _changed(old: Cut, new: Cut) -> list[str]:
    return sorted(p for p, data in new.files.items() if old.files.get(p) != data)


# 1 ----------------------------------------------------------------------------------------


def test_direct_put_in_normal_order(rig: Callable[..., Rig]) -> None:
    """put every file, then prep-manifest.json, then prep-manifest.json.sig last."""
    r = rig()
    c1, c2 = r.cut(1), r.cut(2)
    first = r.publish(c1, Batch().cut(c1))
    assert first["bytes_copied"] == first["bytes"] == sum(map(len, c1.files.values()))
    # Cut 2 overwrites cut 1's files in place (open with O_TRUNC, then write).
    r.publish(c2, Batch().cut(c2))
    r.finish(published=[1, 2])


# 2 ----------------------------------------------------------------------------------------


def test_temp_name_then_rename(rig: Callable[..., Rig]) -> None:
    """Each file (signature included) put as .name.part, then renamed into place."""
    r = rig()
    c1, c2 = r.cut(1), r.cut(2)
    batch = Batch().cut(c1, temp=True)
    assert any(line.startswith('rename "datos/.COAH') for line in batch.lines)
    assert batch.lines[-1] == 'rename ".prep-manifest.json.sig.part" "prep-manifest.json.sig"'
    r.publish(c1, batch)
    r.publish(c2, Batch().cut(c2, temp=True))  # renames replace cut 1's files
    r.finish(published=[1, 2])


# 3 ----------------------------------------------------------------------------------------


def test_upload_killed_mid_file_then_resumed_with_reput(
    rig: Callable[..., Rig], tmp_path: Path
) -> None:
    """The client dies inside a large file; nothing is published until reput finishes it."""
    r = rig()
    files = {**r.default_files(1), BIG_PATH: os.urandom(BIG)}
    c1 = r.cut(1, files)
    order = sorted(files)
    assert order.index(BIG_PATH) < len(order) - 1  # files remain after the big one
    mark = r.mark()
    proc = r.sftp.start(Batch().cut(c1), limit_kbit=LIMIT_KBIT)
    left = kill_mid_transfer(proc, r.config.inbox / BIG_PATH, KILL_AT, BIG)
    assert not (r.config.inbox / "prep-manifest.json.sig").exists()
    r.assert_quiet(mark, 1.0)
    assert not r.config.current.is_symlink()
    assert r.agent.status()["sequence"] is None

    rest = order[order.index(BIG_PATH) + 1 :]
    resumed = time.time()
    event = r.publish(
        c1, Batch().reput(c1.path(BIG_PATH), BIG_PATH).data(c1, rest).manifest(c1).signature(c1)
    )
    assert _time(event) >= resumed
    assert event["bytes_copied"] == sum(map(len, files.values()))
    assert left < BIG
    r.finish(published=[1])


def test_signature_first_then_data_killed_and_resumed(rig: Callable[..., Rig]) -> None:
    """The new cut's signature is already there when its upload dies mid-file."""
    r = rig(settle_timeout=20)
    c1 = r.cut(1)
    r.publish(c1, Batch().cut(c1))
    files = {**r.default_files(2), BIG_PATH: os.urandom(BIG)}
    c2 = r.cut(2, files)
    mark = r.mark()
    r.sftp.run(Batch().signature(c2).manifest(c2))
    r.wait_since(mark, "cut-waiting")
    proc = r.sftp.start(Batch().data(c2), limit_kbit=LIMIT_KBIT)
    kill_mid_transfer(proc, r.config.inbox / BIG_PATH, KILL_AT, BIG)
    r.assert_quiet(mark, 1.0)
    r.agent.assert_current(c1)  # the previous cut stays published
    assert r.agent.status()["last_rejection"] is None

    rest = [p for p in sorted(files) if p > BIG_PATH]
    resumed = time.time()
    r.sftp.run(Batch().reput(c2.path(BIG_PATH), BIG_PATH).data(c2, rest))
    event = r.agent.wait_published(2)
    r.agent.assert_current(c2)
    assert _time(event) >= resumed
    assert event["bytes_copied"] == sum(len(files[p]) for p in _changed(c1, c2))
    r.finish(published=[1, 2])


# 4 ----------------------------------------------------------------------------------------


def test_signature_and_manifest_before_data(rig: Callable[..., Rig]) -> None:
    """Signature (and manifest) first: the agent waits and publishes once data is complete."""
    r = rig(settle_timeout=20)
    for seq in (1, 2):  # into an empty drop folder, then over the previous cut's files
        cut = r.cut(seq)
        mark = r.mark()
        r.sftp.run(Batch().signature(cut).manifest(cut))
        # Signature verified, now waiting for the data (missing, or cut 1's bytes).
        r.wait_since(mark, "cut-waiting", reason="incomplete" if seq == 1 else "file-mismatch")
        r.assert_quiet(mark, 0.5)
        status = r.agent.status()
        assert status["sequence"] == (seq - 1 or None)
        assert status["last_rejection"] is None
        data_started = time.time()
        r.sftp.run(Batch().data(cut))
        event = r.agent.wait_published(seq)
        assert _time(event) >= data_started, "published before its data was uploaded"
        r.agent.assert_current(cut)
    r.finish(published=[1, 2])


def test_agent_restarted_while_a_cut_is_settling(rig: Callable[..., Rig]) -> None:
    """SIGTERM while waiting for data exits 0; after a restart the cut is still published."""
    r = rig(settle_timeout=20)
    c1 = r.cut(1)
    mark = r.mark()
    r.sftp.run(Batch().signature(c1).manifest(c1).data(c1, ["img/logo.svg"]))
    r.wait_since(mark, "cut-waiting")
    assert r.agent.stop() == 0, r.agent.describe()
    r.start()
    r.publish(c1, Batch().data(c1, [p for p in sorted(c1.files) if p != "img/logo.svg"]))
    r.finish(published=[1])


# 5 ----------------------------------------------------------------------------------------


def test_files_in_new_subdirectories(rig: Callable[..., Rig]) -> None:
    """Nested paths created with sftp mkdir, new folders appearing in a later cut."""
    r = rig()

    def files(seq: int, towns: list[str]) -> dict[str, bytes]:
        out = r.default_files(seq)
        for town in towns:
            out[f"municipios/{town}/resultados.html"] = f"<p>{town} {seq}</p>".encode()
            out[f"municipios/{town}/casillas/{town.upper()}.csv"] = csv_bytes(
                r.times[seq - 1], seq + len(town)
            )
        return out

    c1 = r.cut(1, files(1, ["saltillo", "torreon"]))
    batch = Batch().cut(c1)
    assert '-mkdir "municipios/saltillo/casillas"' in batch.lines
    r.publish(c1, batch)
    deep = "municipios/monclova/distritos/d01/secciones/0001/resultados.html"
    c2 = r.cut(2, {**files(2, ["saltillo", "torreon", "monclova"]), deep: b"<p>0001</p>"})
    r.publish(c2, Batch().cut(c2, temp=True))
    assert (r.config.current / deep).read_bytes() == b"<p>0001</p>"
    r.finish(published=[1, 2])


# 6 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("unchanged", ["left-in-drop-folder", "deleted-from-drop-folder"])
def test_delta_upload(rig: Callable[..., Rig], unchanged: str) -> None:
    """Cut 2 uploads only its changed files; unchanged ones are reused, not copied."""
    r = rig()
    c1 = r.cut(1)
    r.publish(c1, Batch().cut(c1))
    c2 = r.cut(2)
    changed = _changed(c1, c2)
    kept = sorted(set(c2.files) - set(changed))
    assert changed and kept == ["img/logo.svg"]
    batch = Batch()
    if unchanged == "deleted-from-drop-folder":
        for rel in kept:
            batch.rm(rel)
    event = r.publish(c2, batch.cut(c2, changed))
    if unchanged == "deleted-from-drop-folder":
        assert not (r.config.inbox / "img/logo.svg").exists()
    assert event["bytes"] == sum(map(len, c2.files.values()))
    assert event["bytes_copied"] == sum(len(c2.files[p]) for p in changed)
    r.finish(published=[1, 2])


# 7 ----------------------------------------------------------------------------------------


def test_two_cuts_back_to_back(rig: Callable[..., Rig]) -> None:
    """Cut N+1 uploaded right after cut N: N+1 ends current; N may be superseded.

    Twice in one sftp session each (direct puts, then temp names), then once with
    cut N certainly still settling when N+1 arrives.
    """
    r = rig(settle_timeout=20)
    c1 = r.cut(1)
    r.publish(c1, Batch().cut(c1))
    for n, temp in ((2, False), (4, True)):
        older, newer = r.cut(n), r.cut(n + 1)
        r.publish(newer, Batch().cut(older, temp=temp).cut(newer, temp=temp))
    # Cut 6 is still settling (signature first, data missing) when cut 7 arrives complete.
    c6, c7 = r.cut(6), r.cut(7)
    mark = r.mark()
    r.sftp.run(Batch().signature(c6).manifest(c6))
    r.wait_since(mark, "cut-waiting")
    r.publish(c7, Batch().cut(c7))  # c6's data never comes: c7's overwrites it
    assert r.since(mark, "cut-superseded")
    seen = r.agent.published()
    assert seen == sorted(set(seen)), f"published out of order: {seen}"
    assert seen[0] == 1 and 3 in seen and 5 in seen and seen[-1] == 7
    assert set(seen) <= {1, 2, 3, 4, 5, 7}
    r.finish(published=seen)


def test_run_of_cuts_one_after_another(rig: Callable[..., Rig]) -> None:
    """Five cuts, each uploaded as soon as the previous one is published (pruned by
    count: keep_replaced_seconds = 0)."""
    r = rig(keep_releases=2, keep_replaced_seconds=0)
    cuts = [r.cut(seq) for seq in range(1, 6)]
    previous: Cut | None = None
    for cut in cuts:
        paths = None if previous is None else _changed(previous, cut)
        r.publish(cut, Batch().cut(cut, paths, temp=cut.sequence % 2 == 0))
        previous = cut
    status = r.agent.status()
    assert len(status["releases"]) == 2
    r.finish(published=[1, 2, 3, 4, 5])


# settle timeout -----------------------------------------------------------------------------


def test_incomplete_upload_rejected_only_after_settle_timeout(rig: Callable[..., Rig]) -> None:
    """Signature uploaded, then the upload stops for good: rejected after settle_timeout."""
    settle = 2.0
    r = rig(settle_timeout=settle)
    c1 = r.cut(1)
    r.publish(c1, Batch().cut(c1))
    never = "municipios/saltillo/resultados.html"
    c2 = r.cut(2, {**r.default_files(2), never: b"<p>saltillo</p>"})
    mark = r.mark()
    before = time.time()
    r.sftp.run(Batch().signature(c2).manifest(c2).data(c2, [p for p in c2.files if p != never]))
    rejected = r.wait_since(mark, "cut-rejected", timeout=settle + 10)
    before_rejection = r.agent.journal()[mark:]
    before_rejection = before_rejection[: before_rejection.index(rejected)]
    seen = [e for e in before_rejection if e["event"] == "cut-seen"][-1]
    waiting = [e for e in before_rejection if e["event"] == "cut-waiting"]
    assert rejected["reason"] == "incomplete" and rejected["sequence"] == 2
    assert never in rejected["detail"]
    assert waiting and waiting[-1]["reason"] == "incomplete"
    assert _time(rejected) - _time(seen) >= settle - 0.01
    assert _time(rejected) - before >= settle - 0.01
    assert not r.since(mark, "cut-published")
    r.agent.assert_current(c1)  # the previous cut is still current
    status = r.agent.status()
    assert status["last_rejection"]["reason"] == "incomplete"
    assert status["last_rejection"]["sequence"] == 2
    # The next complete cut is published normally.
    c3 = r.cut(3)
    r.publish(c3, Batch().cut(c3))
    r.finish(published=[1, 3], rejected=("incomplete",))
