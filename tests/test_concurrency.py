"""Readers during swaps (prep-cut-v1 §5): "No reader ever sees a partial cut or a mix of two cuts."

Every file of cut ``s`` names its cut and path (``cut=s path=p``, repeated to a
length that depends on both), the file set changes from cut to cut (files come
and go) and one file, the logo, is the same in every cut (hard-linked from the
previous release). The agent publishes >= 100 cuts in a thread while readers walk
the published tree:

(a) *snapshot* readers resolve ``os.path.realpath(current)`` once per walk, as a
    server that pins a release per request would. Guaranteed: the walk sees
    exactly the files of one cut, complete, with their listed bytes, even while
    old releases are pruned (a release is only deleted ``keep_releases``
    publications after it was current).
(b) *per-file* readers go through ``current/`` for every file, as a web server
    serving one request per file does. Guaranteed only per file: each file is
    whole and from one cut, never older than the manifest read before it nor
    newer than the one read after it. Across files a walk may legitimately mix
    cuts, and a file listed by the manifest read at the start may be missing
    when a later cut dropped it; both are counted, and a missing file is only
    allowed once ``current`` has moved past the manifest's cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prep_agent.daemon import Agent
from tests.crashkit import MANIFEST, SIGNATURE, walk_files
from tests.kit import Institute, make_config, minute_ago

CUTS = 120
LOGO = b"<svg xmlns='http://www.w3.org/2000/svg'><title>logo</title></svg>\n"
DEADLINE = 50.0
"""Seconds the publisher may take for all its cuts (the test stays under 60 s)."""


def body(seq: int, path: str) -> bytes:
    """The bytes of ``path`` in cut ``seq``: they name both, at a varying length."""
    line = f"cut={seq} path={path}\n"
    return (line * (1 + (seq * 7 + zlib.crc32(path.encode())) % 60)).encode()


def cut_files(seq: int) -> dict[str, bytes]:
    """Cut ``seq``: 15 of 20 rotating files, one moving folder, a page and the logo."""
    paths = ["index.html"] + [f"a/f{j:02d}.txt" for j in range(20) if (j + seq) % 4]
    paths.append(f"b/s{seq % 5}/x.txt")
    files = {p: body(seq, p) for p in paths}
    files["static/logo.svg"] = LOGO
    return files


def cut_of(path: str, data: bytes) -> int:
    """The cut a whole file belongs to; raises ValueError if torn or misplaced."""
    if data == LOGO:
        return -1  # shared by every cut
    head = data.split(b"\n", 1)[0].decode()
    seq_text, _, named = head.partition(" path=")
    if not seq_text.startswith("cut=") or named != path:
        raise ValueError(f"{path}: bytes of another file: {head!r}")
    seq = int(seq_text[4:])
    if data != body(seq, path):
        raise ValueError(f"{path}: torn or altered bytes of cut {seq}")
    return seq


@dataclass
class Tally:
    """What one reader saw."""

    walks: int = 0
    files: int = 0
    overlapped: int = 0  # walks during which current changed
    mixed: int = 0  # per-file walks that read files of two or more cuts
    missing: int = 0  # per-file opens of a listed path that was gone (current moved on)
    max_swaps_in_walk: int = 0
    violations: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        if len(self.violations) < 20:
            self.violations.append(text)


def _sequence_of(manifest: bytes) -> int:
    value: int = json.loads(manifest)["sequence"]
    return value


def _current_sequence(current: Path) -> int:
    return _sequence_of((current / MANIFEST).read_bytes())


def snapshot_walk(current: Path, tally: Tally) -> None:
    """(a) One walk of the release ``current`` resolved to once."""
    release = Path(os.path.realpath(current))
    before = _current_sequence(current)
    try:
        manifest = (release / MANIFEST).read_bytes()
        seq = _sequence_of(manifest)
        listed = {e["path"]: e for e in json.loads(manifest)["files"]}
        found = walk_files(release)
        if not (release / SIGNATURE).is_file():
            tally.fail(f"cut {seq}: no signature in {release.name}")
        found.pop(MANIFEST, None)
        found.pop(SIGNATURE, None)
        if set(found) != set(listed):
            missing = sorted(set(listed) - set(found))[:3]
            extra = sorted(set(found) - set(listed))[:3]
            tally.fail(f"cut {seq}: tree differs from its manifest: -{missing} +{extra}")
        for path, entry in listed.items():
            data = (release / path).read_bytes()
            tally.files += 1
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                tally.fail(f"cut {seq}: {path} differs from the manifest")
            if cut_of(path, data) not in (seq, -1):
                tally.fail(f"cut {seq}: {path} holds cut {cut_of(path, data)}")
    except FileNotFoundError as exc:
        pruned = "" if release.exists() else " (the release was pruned under the reader)"
        tally.fail(f"snapshot of {release.name}: {exc.filename} vanished{pruned}")
    except ValueError as exc:
        tally.fail(f"snapshot of {release.name}: {exc}")
    after = _current_sequence(current)
    tally.walks += 1
    tally.overlapped += after != before
    tally.max_swaps_in_walk = max(tally.max_swaps_in_walk, after - before)


def per_file_walk(current: Path, tally: Tally) -> None:
    """(b) One walk opening every listed file through ``current/`` (one request each)."""
    start = _current_sequence(current)
    listed = [e["path"] for e in json.loads((current / MANIFEST).read_bytes())["files"]]
    cuts = set()
    for path in listed:
        try:
            data = (current / path).read_bytes()
        except FileNotFoundError:
            now = _current_sequence(current)
            tally.missing += 1
            if now <= start:
                tally.fail(f"{path} of cut {start} missing while current is cut {now}")
            continue
        after = _current_sequence(current)
        tally.files += 1
        try:
            seq = cut_of(path, data)
        except ValueError as exc:
            tally.fail(f"through current/: {exc}")
            continue
        if seq != -1:
            cuts.add(seq)
            if not start <= seq <= after:
                tally.fail(f"{path}: cut {seq} outside [{start}, {after}] around the read")
    end = _current_sequence(current)
    tally.walks += 1
    tally.overlapped += end != start
    tally.mixed += len(cuts) > 1
    tally.max_swaps_in_walk = max(tally.max_swaps_in_walk, end - start)


def reader(
    walk: Callable[[Path, Tally], None], current: Path, tally: Tally, stop: threading.Event
) -> None:
    last = 0
    while not stop.is_set():
        try:
            seq = _current_sequence(current)
            if seq < last:
                tally.fail(f"current went back from cut {last} to {seq}")
            last = seq
            walk(current, tally)
        except Exception as exc:  # a reader must never crash: record why
            tally.fail(f"reader error: {exc!r}")


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every 0.1 ms so readers interleave with the agent finely."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    yield
    sys.setswitchinterval(previous)


def publish(agent: Agent, inst: Institute, inbox: Path, seqs: range, errors: list[str]) -> None:
    when = minute_ago(5)
    try:
        for seq in seqs:
            files = cut_files(seq)
            inst.deliver(inbox, files, inst.manifest(files, seq, when))
            outcome = agent.step()
            if outcome.status != "published":
                errors.append(f"cut {seq}: {outcome}")
                return
    except Exception as exc:
        errors.append(f"publisher: {exc!r}")


def test_readers_never_see_a_partial_or_mixed_cut(
    tmp_path: Path, institute: Institute, fast_switching: None
) -> None:
    # keep_releases = 10 (default); pruning by count alone, so releases are deleted
    # while the readers walk them (the 60 s window would keep all of them).
    config = make_config(tmp_path, institute, keep_replaced_seconds=0)
    agent = Agent(config)
    errors: list[str] = []
    publish(agent, institute, config.inbox, range(1, 2), errors)  # readers need a current
    assert not errors, errors
    current = config.current
    stop = threading.Event()
    tallies = {
        "snapshot-1": Tally(),
        "snapshot-2": Tally(),
        "per-file-1": Tally(),
        "per-file-2": Tally(),
    }
    readers = [
        threading.Thread(
            target=reader,
            args=(snapshot_walk if name.startswith("snapshot") else per_file_walk, current),
            kwargs={"tally": tally, "stop": stop},
            name=f"reader-{name}",
        )
        for name, tally in tallies.items()
    ]
    publisher = threading.Thread(
        target=publish,
        args=(agent, institute, config.inbox, range(2, CUTS + 1), errors),
        name="publisher",
    )
    began = time.monotonic()
    for t in readers:
        t.start()
    publisher.start()
    publisher.join(timeout=DEADLINE)
    stop.set()
    for t in readers:
        t.join(timeout=10)
    elapsed = time.monotonic() - began
    assert not publisher.is_alive(), f"the publisher did not finish in {DEADLINE} s"
    swaps = CUTS - 1
    for name, t in tallies.items():
        print(
            f"{name}: {t.walks} walks, {t.files} files, {t.overlapped} walks across a swap, "
            f"max {t.max_swaps_in_walk} swaps in one walk, {t.mixed} mixed, {t.missing} missing"
        )
    print(f"{swaps} swaps in {elapsed:.1f} s; releases kept: {len(os.listdir(config.releases))}")
    assert not errors, errors
    assert _current_sequence(current) == CUTS
    for name, t in tallies.items():
        assert not t.violations, f"{name}: {t.violations}"
        assert t.walks >= 50, f"{name}: only {t.walks} walks"
    # The walks did race the swaps, else nothing was tested.
    assert sum(t.overlapped for t in tallies.values()) >= 20, tallies
    # ... and the per-file checks can tell cuts apart (they do see cuts mix).
    assert sum(t.mixed + t.missing for t in tallies.values()) >= 1, tallies
    assert len(os.listdir(config.releases)) == config.keep_releases


def test_pinned_release_survives_until_pruned(tmp_path: Path, institute: Institute) -> None:
    """A reader pinned to a release keeps a complete tree for keep_releases - 1 more cuts.

    That is the bound on a slow reader of (a) by count (keep_replaced_seconds = 0):
    its release is deleted by the ``keep_releases``-th publication after it (no
    deletion waits for readers).
    """
    config = make_config(tmp_path, institute, keep_releases=4, keep_replaced_seconds=0)
    agent = Agent(config)
    errors: list[str] = []
    publish(agent, institute, config.inbox, range(1, 2), errors)
    pinned = Path(os.path.realpath(config.current))
    doc = json.loads((pinned / MANIFEST).read_bytes())
    listed = {e["path"] for e in doc["files"]} | {MANIFEST, SIGNATURE}
    for seq in range(2, config.keep_releases + 1):
        publish(agent, institute, config.inbox, range(seq, seq + 1), errors)
        assert set(walk_files(pinned)) == listed, f"pinned release changed after cut {seq}"
    last = config.keep_releases + 1
    publish(agent, institute, config.inbox, range(last, last + 1), errors)
    assert not errors, errors
    assert not pinned.exists(), "the release is kept longer than keep_releases"


def test_replaced_release_kept_for_keep_replaced_seconds(
    tmp_path: Path, institute: Institute
) -> None:
    """Cuts faster than keep_replaced_seconds: a replaced release outlives keep_releases.

    A status.json naming it may still be cached (nginx 1 s, a CDN, a browser), so it
    stays until the release that replaced it is older than the window; then the next
    publication prunes it, and everything else beyond keep_releases that is not
    recent.
    """
    config = make_config(tmp_path, institute, keep_releases=2, keep_replaced_seconds=60)
    agent = Agent(config)
    errors: list[str] = []
    publish(agent, institute, config.inbox, range(1, 7), errors)
    assert not errors, errors
    names = sorted(os.listdir(config.releases))
    assert len(names) == 6, names  # all replaced within the last 60 s
    # Age releases 1..3 (as if built 2 minutes ago): release 1 and 2 were replaced
    # long ago (their successors 2 and 3 are old); release 3 was replaced by 4 now.
    old = time.time() - 120
    for name in names[:3]:
        os.utime(config.releases / name, (old, old))
    publish(agent, institute, config.inbox, range(7, 8), errors)
    assert not errors, errors
    kept = sorted(os.listdir(config.releases))
    assert kept == names[2:] + [n for n in kept if n not in names], (names, kept)
    assert len(kept) == 5
