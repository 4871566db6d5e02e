"""Large manifests: the agent's memory does not grow with keep_releases × files, and a
cut settling for its files is not verified and parsed again at every retry (issue 11,
measured manifest memory; figures at 200,000 files in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from prep_agent.agent.layout import Layout
from prep_agent.agent.store import Store, release_name
from prep_agent.core.manifest import WELL_KNOWN, Limits, parse_manifest
from prep_agent.daemon import Agent
from tests.kit import ELECTION, Institute, make_config, minute_ago

FILES = 10_000
RELEASES = 6


def manifest_doc(sequence: int, files: int) -> dict[str, Any]:
    """Acta images; 5 % of them change from one sequence to the next."""
    entries = []
    for i in range(files):
        version = sequence if i % 20 == sequence % 20 else 0
        body = f"acta {i} version {version}".encode()
        entries.append(
            {
                "path": f"actas/{i // 1000:03d}/acta-{i:06d}.jpg",
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )
    when = minute_ago(60 - sequence)
    return {
        "format": "prep-cut/1",
        "election": ELECTION,
        "sequence": sequence,
        "cut_time": when.isoformat(),
        "signed_at": when.isoformat(),
        "entry": entries[0]["path"],
        "files": entries,
    }


def retained_by(make: Any) -> tuple[int, Any]:
    """Bytes still allocated after ``make()`` returned (its result kept alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        kept = make()
        gc.collect()
        return tracemalloc.get_traced_memory()[0], kept
    finally:
        tracemalloc.stop()


def make_releases(root: Path, count: int) -> tuple[Layout, list[str], bytes]:
    """``count`` releases of FILES files (only their manifests), the last one current;
    returns the layout, the release names and the last manifest's bytes."""
    layout = Layout(root)
    layout.create()
    names, data = [], b""
    for sequence in range(1, count + 1):
        data = json.dumps(manifest_doc(sequence, FILES), indent=1).encode()
        manifest = parse_manifest(data, Limits())
        name = release_name(manifest, hashlib.sha256(data).hexdigest())
        folder = layout.releases / name / WELL_KNOWN
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_bytes(data)
        names.append(name)
    os.symlink(layout.current_target(names[-1]), layout.current)
    return layout, names, data


def held_by_store(layout: Layout) -> tuple[int, Store]:
    """Memory a store holds once it read ``current`` and built its reuse index (as
    the agent does before its first publication after a start)."""

    def start() -> Store:
        store = Store(layout, Limits())
        store.current()
        store.reuse_index()
        return store

    return retained_by(start)


@pytest.mark.core
def test_retained_releases_are_not_kept_parsed(tmp_path: Path) -> None:
    few, _, data = make_releases(tmp_path / "few", 2)
    many, many_names, _ = make_releases(tmp_path / "many", RELEASES)
    one, _ = retained_by(lambda: parse_manifest(data, Limits()))
    held_few, _ = held_by_store(few)
    held_many, store = held_by_store(many)
    per_release = (held_many - held_few) / (RELEASES - 2)
    assert per_release < one / 4, (
        f"{per_release / 2**20:.2f} MiB more per retained release; "
        f"one parsed release is {one / 2**20:.2f} MiB"
    )
    # Reuse still covers every retained release (§4.5): a file only release 1 holds.
    body = b"acta 1 version 1"
    assert store.reuse_index()[(hashlib.sha256(body).hexdigest(), len(body))] == (
        many_names[0],
        "actas/000/acta-000001.jpg",
    )


def test_settling_cut_is_not_parsed_again(tmp_path: Path) -> None:
    """A signed cut of 50,000 listed files, none uploaded yet: each retry costs a
    stat of the first missing file and a hash of the manifest, not a parse."""
    inst = Institute(tmp_path / "inst")
    config = make_config(tmp_path, inst, settle_timeout=300)
    agent = Agent(config)
    doc = manifest_doc(1, 50_000)
    inst.deliver(config.inbox, {}, doc)
    started = time.process_time()
    first = agent.step()
    first_cpu = time.process_time() - started
    assert first.status == "waiting" and first.rejection is not None
    assert first.rejection.reason == "incomplete"
    started = time.process_time()
    for _ in range(5):
        assert agent.step().status == "waiting"
    retries_cpu = time.process_time() - started
    assert retries_cpu < first_cpu, f"5 retries {retries_cpu:.2f} s, first {first_cpu:.2f} s"
