"""A viewer of one difusor: follows ``status.json`` as the frame does and checks
every page it would show against the institute's signed manifest.

Every new release's manifest and signature are read from the difusor's public
``.well-known/prep-cut/`` copy and verified with ``ssh-keygen -Y verify``
against the institute's allowed_signers; the entry page is then compared with
the manifest's SHA-256. Findings: a cut time or sequence that went backwards, a
page whose bytes the signed manifest does not list (a mixed or altered page),
an unsigned cut, an error answer, a missing interruption notice (``stale_at``
passed by the viewer's clock more than ``NOTICE_GRACE`` ago, or by the
difusor's own ``written_at``, yet the state is not ``stale``). Each notice that
came due is recorded: its sequence, when it was due, when it was first shown.
The loop is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prep_agent.core.manifest import WELL_KNOWN
from prep_agent.core.protocol import RELEASES_FOLDER

MAX_BYTES = 8 * 1024 * 1024
"""Largest answer a viewer reads."""
NOTICE_GRACE = 5.0
"""Seconds after ``stale_at`` within which status.json must say ``stale`` (the agent
rewrites it one second after, §6, or after the publication it is busy with)."""
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); status 0 when it did not answer."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return int(response.status), response.read(MAX_BYTES)
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except Exception:
        return 0, b""


def signed_by_institute(allowed_signers: Path, manifest: bytes, signature: bytes) -> bool | None:
    """Whether ``ssh-keygen -Y verify`` accepts ``signature`` over ``manifest`` (None:
    it did not answer within 10 s, as on a machine loaded past its cores; ask again)."""
    folder = allowed_signers.parent
    sig = folder / f".viewer-{threading.get_ident()}.sig"
    sig.write_bytes(signature)
    try:
        done = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(allowed_signers), "-I", "iec",
             "-n", "prep-cut", "-s", str(sig)],
            input=manifest, capture_output=True, timeout=10, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    finally:
        sig.unlink(missing_ok=True)
    return done.returncode == 0


@dataclass
class Finding:
    """Something a viewer saw: when, what kind, one line."""

    at: float
    kind: str
    detail: str


@dataclass
class Viewer:
    """The bounded poller of one difusor, run in its own thread."""

    service_id: str
    url: str
    allowed_signers: Path
    interval: float = 0.5
    stale_periods: int = 3
    """The rehearsal's ``stale_periods``: a notice is due by the signed manifest's
    cut_time and period_seconds, whatever the difusor's status.json claims."""
    first_seen: dict[int, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    notices: dict[int, dict[str, float | None]] = field(default_factory=dict)
    """Sequence → ``due`` (its stale_at) and ``shown`` (first poll that said stale)."""
    polls: int = 0
    timeouts: int = 0
    """Looks at status.json that got no answer within the timeout."""
    _missed: bool = False
    _last: tuple[int, str] | None = None
    _checked: dict[str, dict[str, str] | None] = field(default_factory=dict)
    _due: dict[str, float | None] = field(default_factory=dict)
    """Release → when its notice is due by its signed manifest (None: final)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, max_seconds: float) -> None:
        """Poll in a thread until ``stop`` or ``max_seconds`` have passed."""
        self._thread = threading.Thread(target=self._loop, args=(max_seconds,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        for _ in range(int(max_seconds / self.interval) + 1):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            self.poll_once()
            self._stop.wait(self.interval)

    def _note(self, kind: str, detail: str) -> None:
        self.findings.append(Finding(time.time(), kind, detail))

    def _release_files(self, release: str) -> dict[str, str] | None:
        """The signed manifest's path → SHA-256 of ``release``; None when not signed."""
        if release in self._checked:
            return self._checked[release]
        base = f"{self.url}/{RELEASES_FOLDER}/{release}/{WELL_KNOWN}/manifest.json"
        code, manifest = fetch(base)
        code_sig, signature = fetch(base + ".sig")
        if code != 200 or code_sig != 200:
            self._note("error", f"manifest of {release}: HTTP {code}/{code_sig}")
            return None  # not cached: a transient error is tried again
        files: dict[str, str] | None = None
        verdict = signed_by_institute(self.allowed_signers, manifest, signature)
        if verdict is None:
            return None  # not cached: asked again on the next look (the thread lives on)
        if verdict:
            doc = json.loads(manifest)
            files = {str(f["path"]): str(f["sha256"]) for f in doc.get("files", [])}
            cut_time = datetime.fromisoformat(str(doc["cut_time"])).timestamp()
            late = self.stale_periods * float(doc["period_seconds"])
            self._due[release] = None if doc.get("final") else cut_time + late
        else:
            self._note("unsigned", f"release {release}: signature refused")
        self._checked[release] = files
        return files

    def poll_once(self) -> None:
        """One look at the difusor, as the frame would take it."""
        self.polls += 1
        code, body = fetch(self.url + "/status.json")
        now = time.time()
        if code == 0 and not self._missed:
            # One look unanswered within the timeout: a frame keeps its page and looks
            # again; two in a row are an error (counted in ``timeouts`` either way).
            self._missed, self.timeouts = True, self.timeouts + 1
            return
        if code != 200:
            self.timeouts += code == 0
            self._note("error", f"status.json: HTTP {code}")
            return
        self._missed = False
        try:
            status: dict[str, Any] = json.loads(body)
        except ValueError:
            self._note("error", "status.json is not JSON")
            return
        sequence, release = status.get("sequence"), status.get("release")
        if not isinstance(sequence, int) or not isinstance(release, str):
            return  # no cut yet
        cut_time = str(status.get("cut_time"))
        if self._last is not None:
            last_seq, last_time = self._last
            moment = datetime.fromisoformat(cut_time)
            if sequence < last_seq or moment < datetime.fromisoformat(last_time):
                self._note("backwards", f"{last_seq} {last_time} -> {sequence} {cut_time}")
        self._last = (sequence, cut_time)
        files = self._release_files(release)
        self._check_notice(status, sequence, now, self._due.get(release))
        if files is None:
            return
        entry = str(status.get("entry") or "")
        code, page = fetch(self.url + entry if entry.startswith("/") else f"{self.url}/{entry}")
        if code != 200:
            self._note("error", f"entry page of {sequence}: HTTP {code}")
            return
        path = entry.split(f"{RELEASES_FOLDER}/{release}/", 1)[-1]
        if files.get(path) != hashlib.sha256(page).hexdigest():
            self._note("mixed", f"entry page {path} of {sequence}: not the signed bytes")
            return
        self.first_seen.setdefault(sequence, now)

    def _check_notice(
        self, status: dict[str, Any], sequence: int, now: float, signed_due: float | None
    ) -> None:
        stale_at, written = status.get("stale_at"), status.get("written_at")
        if not stale_at or not written or status.get("final"):
            return
        due_at = signed_due or datetime.fromisoformat(str(stale_at)).timestamp()
        stale = status.get("state") == "stale"
        if stale or now > due_at:
            notice = self.notices.setdefault(sequence, {"due": due_at, "shown": None})
            if stale and notice["shown"] is None:
                notice["shown"] = now
        if stale:
            return
        if datetime.fromisoformat(str(written)).timestamp() > due_at:
            self._note("notice", f"{sequence} stale since {stale_at}, written at {written} "
                       f"as {status.get('state')}")  # fmt: skip
        elif now > due_at + NOTICE_GRACE:
            self._note("notice", f"{sequence} stale since {stale_at}, still "
                       f"{status.get('state')} {now - due_at:.1f} s later")  # fmt: skip

    def notice_shown(self, since: float) -> float | None:
        """When a notice was first shown at or after ``since`` (None: not yet)."""
        shown = [n["shown"] for n in list(self.notices.values())
                 if n["shown"] is not None and n["shown"] >= since]  # fmt: skip
        return min(shown) if shown else None
