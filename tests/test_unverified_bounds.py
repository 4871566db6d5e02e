"""An unsigned manifest as large as the limit allows costs the agent bounded memory,
bounded reading and bounded quarantine (issue 11, finding 6).

A real ``prep-agent run`` process gets a 32 MiB manifest (the default
``max_manifest_bytes``) whose signature does not verify, again and again. The
kernel's own counters of that process are read: ``VmHWM`` (peak resident memory)
and ``rchar`` (bytes it read). Unverified bytes are never parsed beyond a small
bound, a settling cut whose files did not change is not read again, and the
quarantine stays within ``keep_quarantine_bytes``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from prep_agent.agent.intake import HINT_BYTES, sequence_hint
from tests.kit import AgentDaemon, Institute, make_config, minute_ago, ssh_sign, wait_for

MIB = 1024 * 1024
MANIFEST_LIMIT = 32 * MIB
"""The default ``max_manifest_bytes``."""
PEAK_BOUND = 200 * MIB
"""Peak RSS the agent must stay under while refusing the large unsigned manifests."""
QUARANTINE_BOUND = 80 * MIB
"""``keep_quarantine_bytes`` of the test: room for two of the large manifests."""
SETTLE = 3.0
"""``settle_timeout`` of the test: the agent retries the cut for this long."""


def proc_counter(pid: int, name: str, key: str) -> int:
    """One counter of ``/proc/PID/<name>`` (``status`` values in kB are returned in bytes)."""
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        field, _, value = line.partition(":")
        if field == key:
            number, _, unit = value.strip().partition(" ")
            return int(number) * (1024 if unit == "kB" else 1)
    raise AssertionError(f"no {key} in /proc/{pid}/{name}")


def hostile_manifest(sequence: int, size: int) -> bytes:
    """Well-formed JSON of ``size`` bytes that costs the most to parse: millions of
    empty objects (3 bytes each, some 70 bytes each once parsed)."""
    head = b'{"format": "prep-cut/1", "election": "coah-ayun-2021", "sequence": %d, "files": ['
    head %= sequence
    count = (size - len(head) - 4) // 3
    data = head + b"{}," * count + b"{}]}"
    assert size - 3 < len(data) <= size, len(data)
    json.loads(data[: len(head)] + b"{}]}")  # the same shape, small
    return data


def quarantine_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.core
def test_sequence_hint_reads_only_a_bounded_head() -> None:
    assert sequence_hint(b'{"format": "prep-cut/1", "sequence": 7, "files": []}') == 7
    assert sequence_hint(b'{"sequence": true}') is None
    assert sequence_hint(b"[" * 100_000) is None
    big = b'{\n "format": "prep-cut/1",\n "sequence": 12,\n "files": [' + b" " * (4 * MIB) + b"]}"
    assert sequence_hint(big) == 12  # found in the head, the rest never decoded
    late = b'{"files": [' + b" " * HINT_BYTES + b'], "sequence": 12}'
    assert sequence_hint(late) is None  # beyond the bound: not looked for


def test_large_unsigned_manifest_bounded_memory_reads_and_quarantine(tmp_path: Path) -> None:
    inst = Institute(tmp_path / "inst")
    stranger = Institute(tmp_path / "stranger")  # a key the agent does not trust
    make_config(
        tmp_path,
        inst,
        settle_timeout=SETTLE,
        rescan_interval=0.5,
        keep_quarantine_bytes=QUARANTINE_BOUND,
    )
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    inbox = agent.config.inbox
    try:
        inst.cut(inbox, 1, cut_time=minute_ago(9))
        wait_for(lambda: agent.status()["sequence"] == 1, what="cut 1 published")
        assert agent.proc is not None
        pid = agent.proc.pid
        data = hostile_manifest(2, MANIFEST_LIMIT)
        sig = ssh_sign(stranger.key, data)
        (inbox / "prep-manifest.json").write_bytes(data)
        time.sleep(1.2)  # uploading 32 MiB takes a while: the signature comes later
        rounds = 3
        for n in range(1, rounds + 1):
            read_before = proc_counter(pid, "io", "rchar")
            tmp = inbox / ".sig.part"
            tmp.write_bytes(sig)
            os.replace(tmp, inbox / "prep-manifest.json.sig")  # a new upload of the signature
            started = time.monotonic()
            while time.monotonic() - started < SETTLE - 0.5:
                (inbox / "upload.part").write_bytes(b"x")  # drop-folder events: retries
                time.sleep(0.1)

            def rejected(count: int = n) -> bool:
                events = agent.journal()
                return sum(e["event"] == "cut-rejected" for e in events) == count

            wait_for(rejected, what=f"rejection {n}", alive=agent.proc, context=agent.output)
            read = proc_counter(pid, "io", "rchar") - read_before
            # Seen once, then read once more for the verdict once settled.
            assert read < 2.5 * len(data), f"round {n}: read {read / MIB:.0f} MiB"
        peak = proc_counter(pid, "status", "VmHWM")
        events = [e for e in agent.journal() if e["event"] == "cut-rejected"]
        kept = quarantine_bytes(agent.config.quarantine)
    finally:
        assert agent.stop() == 0, agent.output()
    assert [e["reason"] for e in events] == ["signature-untrusted"] * rounds
    assert [e["sequence"] for e in events] == [2] * rounds  # the bounded hint still finds it
    assert peak < PEAK_BOUND, f"peak RSS {peak / MIB:.0f} MiB"
    assert kept <= QUARANTINE_BOUND, f"quarantine holds {kept / MIB:.0f} MiB"
    assert len(list(agent.config.quarantine.iterdir())) == 2
    assert agent.status()["sequence"] == 1
