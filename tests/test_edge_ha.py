"""Drills of the HA edge (packaging/ha) with the real engines, in network namespaces.

Two origins (real ``prep-agent run`` + the packaged nginx site) receive every
cut from the test's institute, each after its own random 0-5 s delay; two
balancers run Varnish (xkey) in front of HAProxy and share a floating address
with keepalived (unicast VRRP); a client namespace runs tests/edgecheck.py, a
bounded crowd that follows status.json like the frame. The drills run in order
on one stand (tests/edgekit.py):

1. steady cuts, the issue's 30: 0 errors, 0 mixed responses, 0 backward steps,
   every cut seen in order by every checker worker and by Chromium; the
   cache-busting variants never reach an origin as new objects; the soft purge
   reaches both Varnish nodes;
2. one origin killed (-9) mid-run and restored: 0 errors; an origin whose
   deliveries stop falls behind and leaves rotation for the pointers until it
   catches up;
3. the active balancer lost (its link down, then every process killed -9): the
   floating address moves; the failure window is measured; 0 errors after it;
4. every origin stopped: the cache keeps serving the last cut, and after 3
   periods by the server's clock (Date + Age) the frame shows the notice.

A headless Chromium follows the frame at the floating address throughout
(through a loopback tunnel into the client's namespace: tests/kit/netns.py),
polling at the floor (``[frame] poll_seconds = 1``). Real cuts are at least
60 s apart; the drill compresses time, so in the steady drill each cut is sent
once the previous one is on both origins and has been the newest at the
floating address for HOLD s, or until Chromium has shown it if that comes first
(tests/edgekit.py): with cuts at a fixed period shorter than 5 s + a poll, an
origin's 0-5 s delays alone could leave a cut on show for less than a poll (or
skip it).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from prep_agent.core.errors import Error
from tests.browserkit import chrome
from tests.edgekit import (
    AGE,
    EVERY,
    HOLD,
    PERIOD,
    VIP,
    Stand,
    haproxy_config,
    keepalived_config,
    missing_engines,
    stop_checker,
    summary,
    varnish_config,
)
from tests.kit import free_port, wait_for
from tests.kit.netns import Tunnel, available

pytestmark = [pytest.mark.edge, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    why = available()
    missing = missing_engines()
    if why or missing:
        pytest.fail(why or f"missing {missing}: scripts/install-deps installs them")
    folder = tmp_path_factory.mktemp("edge")
    built = Stand(folder)
    try:
        built.start()
        yield built
    finally:
        built.close()


@pytest.fixture(scope="module")
def viewer(stand: Stand) -> Iterator[WebDriver]:
    """Headless Chromium on the frame at the floating address (through a tunnel:
    the browser and its driver talk over this host's loopback)."""
    tunnel = Tunnel(stand.client, VIP, 80, str(stand.folder), free_port())
    profile = Path(tempfile.mkdtemp(prefix="prep-chromium-"))
    driver = chrome(profile)
    try:
        wait_for(lambda: answers(tunnel.port), 10, "the tunnel to the floating address")
        driver.get(f"http://127.0.0.1:{tunnel.port}/")
        yield driver
    finally:
        driver.quit()
        tunnel.close()
        shutil.rmtree(profile, ignore_errors=True)


def answers(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a connection."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def frame_state(driver: WebDriver) -> tuple[str, str]:
    """The frame's data-state and data-sequence."""
    got = driver.execute_script(
        "return [document.body.getAttribute('data-state') || '',"
        " document.body.getAttribute('data-sequence') || ''];"
    )
    return str(got[0]), str(got[1])


OBSERVE = """
window.prepShown = [];
new MutationObserver(function () {
  var s = document.body.getAttribute('data-sequence');
  var seen = window.prepShown;
  if (s && seen[seen.length - 1] !== s) { seen.push(s); }
}).observe(document.body, {attributes: true, attributeFilter: ['data-sequence']});
"""


class Shown:
    """Every sequence the frame puts on screen from now on, in order: recorded in
    the page on each change of the body's data-sequence, so a cut on show for an
    instant is not missed between two samples."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver
        driver.execute_script(OBSERVE)

    def sequences(self) -> list[int]:
        got = self.driver.execute_script("return window.prepShown;")
        return [int(s) for s in got]


@contextmanager
def ended_on_failure(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Kill ``proc`` (a checker) if the block fails, so it does not outlive the drill."""
    try:
        yield
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise


def pointer_hits(log: str) -> int:
    """Requests for status.json in an nginx access log (health checks excluded)."""
    return len(re.findall(r'"GET /status\.json[ ?]', log))


def vrrp_log_sizes(stand: Stand) -> dict[str, int]:
    """The size of each balancer's keepalived log (a mark for ``vrrp_changes``)."""
    return {n: (b.folder / "keepalived.log").stat().st_size for n, b in stand.balancers.items()}


def vrrp_changes(stand: Stand, since: dict[str, int]) -> list[str]:
    """keepalived's state changes and failed checks logged since ``since``: a
    balancer whose checks time out (a starved machine) hands the address over."""
    lines = []
    for name, balancer in stand.balancers.items():
        with open(balancer.folder / "keepalived.log", "rb") as log:
            log.seek(since[name])
            text = log.read().decode(errors="replace")
        lines += [f"{name}: {ln}" for ln in text.splitlines() if re.search(r"STATE|timed_out", ln)]
    return lines


def sequence_at(stand: Stand) -> int:
    """The sequence status.json names at the floating address (0: no answer)."""
    try:
        return int(json.loads(stand.client_get("/status.json")[1])["sequence"] or 0)
    except (ValueError, KeyError, AssertionError, Error):
        return 0


def publish_every(stand: Stand, count: int, spread: float = 5.0) -> list[int]:
    sequences = []
    for _ in range(count):
        sequences.append(stand.publish(spread))
        time.sleep(EVERY)
    return sequences


def assert_clean(doc: dict[str, object]) -> None:
    assert doc["errors"] == 0, doc["error_samples"]
    assert doc["mixed"] == 0, doc["mixed_samples"]
    assert doc["backward"] == 0
    assert doc["missing_release"] == 0


def test_shipped_configs_pass_the_engines_checks(tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg").write_text(haproxy_config({"o1": "198.18.0.11"}))
    (tmp_path / "default.vcl").write_text(varnish_config())
    (tmp_path / "k.conf").write_text(keepalived_config("lb1", "198.18.0.2", "198.18.0.3", 150))
    for argv in (
        ["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")],
        [
            "varnishd",
            "-C",
            "-j",
            "none",
            "-f",
            str(tmp_path / "default.vcl"),
            "-n",
            str(tmp_path / "v"),
        ],
        ["keepalived", "-t", "-f", str(tmp_path / "k.conf")],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])


def test_steady_cuts_no_error_no_mix_no_step_back(stand: Stand, viewer: WebDriver) -> None:
    before = {n: pointer_hits(o.access_log()) for n, o in stand.origins.items()}
    first = stand.sequence + 1
    cuts = 30
    checker = stand.checker(cuts * 15 + 30)  # ended by stop_checker once the cuts are out
    shown = Shown(viewer)
    vrrp = vrrp_log_sizes(stand)
    started = time.monotonic()
    cycles = []
    with ended_on_failure(checker):
        for _ in range(cuts):
            began = time.monotonic()
            # Each origin receives the cut 0-5 s late, on its own; the next cut is
            # sent once this one is on both origins and at the floating address,
            # HOLD s later.
            last = stand.publish(5.0)
            wait_for(
                lambda n=last: sequence_at(stand) == n,  # type: ignore[misc]
                15,
                f"cut {last} at the floating address",
            )
            at_vip = time.monotonic()
            stand.wait_everywhere(last)
            # HOLD gives Chromium its poll to see the cut; once it has (recorded
            # in the page), the rest of the HOLD proves nothing more.
            while time.monotonic() < at_vip + HOLD and shown.sequences()[-1:] != [last]:
                time.sleep(0.05)
            cycles.append(time.monotonic() - began)
        wait_for(lambda: shown.sequences()[-1:] == [last], 10, f"Chromium shows cut {last}")
    doc = stop_checker(checker)
    elapsed = time.monotonic() - started
    seen = shown.sequences()
    print(
        f"steady: {cuts} cuts in {elapsed:.0f} s (one every {min(cycles):.1f}-{max(cycles):.1f} s);"
        f" Chromium showed {seen}"
    )
    assert seen == list(range(first, last + 1)), seen  # every cut, in order, never back
    print("steady:", {k: doc[k] for k in ("requests", "errors", "pointer_regressions")})
    print("steady: keepalived", vrrp_changes(stand, vrrp) or "kept the address on lb1")
    assert_clean(doc)
    for sequences in doc["sequences"]:  # type: ignore[union-attr]
        assert sequences[-cuts:] == list(range(first, last + 1)), sequences
    # The crowd's ~20 % cache-busting variants reached no origin as new objects:
    # per balancer about one pointer fetch per 5 s max-age plus one per purge.
    reached = sum(pointer_hits(o.access_log()) - before[n] for n, o in stand.origins.items())
    requests = int(doc["requests"])  # type: ignore[call-overload]
    print(f"steady: {reached} status.json requests reached the origins of {requests}")
    assert reached <= 2 * (elapsed / 5 + cuts + 4) * 2
    assert requests > 20 * reached
    headers, _ = stand.client_get("/status.json")
    assert headers["surrogate-key"] == headers["cache-tag"] == "prep-pointer", headers
    assert "xkey" not in headers  # Varnish's own tags stay inside
    for origin in stand.origins.values():
        ok = re.findall(r'prep_purge_total\{node="[^"]+",result="ok"\} (\d+)', origin.metrics())
        assert len(ok) == 2 and all(int(n) >= cuts for n in ok), ok


def test_origin_killed_then_a_lagging_origin_leaves_pointer_rotation(stand: Stand) -> None:
    o1, o2 = stand.origins["o1"], stand.origins["o2"]
    checker = stand.checker(4 * EVERY + 8 + 5 * EVERY + 60)  # ended by stop_checker
    with ended_on_failure(checker):
        stand.publish()
        time.sleep(2)
        o1.kill()  # nginx and agent, -9, mid-run
        publish_every(stand, 3)
        o1.start()
        stand.wait_everywhere(stand.sequence)
        # The first origin (balance first: it answers every pointer) stops receiving cuts.
        stand.hold("o1")
        behind_at = None
        for _ in range(5):
            stand.publish()
            next_cut = time.monotonic() + EVERY
            while time.monotonic() < next_cut:
                if behind_at is None and o1.curl("http://127.0.0.1:8080/readyz?lag=114") == 503:
                    behind_at = time.monotonic()
                    hits_o1, hits_o2 = pointer_hits(o1.access_log()), pointer_hits(o2.access_log())
                time.sleep(0.1)
        assert behind_at is not None, "o1 never reported itself behind"
        # o1 out of rotation for the pointers (after HAProxy's two failed checks and
        # nginx's 1 s log buffer), o2 took them over.
        late_o1 = pointer_hits(o1.access_log()) - hits_o1
        late_o2 = pointer_hits(o2.access_log()) - hits_o2
        stand.release("o1")
        stand.wait_everywhere(stand.sequence)
        back = wait_for(
            lambda: o1.curl("http://127.0.0.1:8080/readyz?lag=114") == 200, 10, "o1 caught up"
        )
    doc = stop_checker(checker)
    print("origin drill:", {k: doc[k] for k in ("requests", "errors", "pointer_regressions")})
    print(f"while o1 was behind: o1 served {late_o1} pointers, o2 {late_o2}")
    assert_clean(doc)
    assert back
    assert late_o1 <= 4, late_o1  # only those in flight when the checks turned
    assert late_o2 >= 2, late_o2


def test_active_balancer_killed_moves_the_address(stand: Stand) -> None:
    lb1, lb2 = stand.balancers["lb1"], stand.balancers["lb2"]
    assert lb1.holds_vip() and not lb2.holds_vip()
    checker = stand.checker(22)
    stand.publish()
    time.sleep(5)
    killed = time.time()
    lb1.lose()
    wait_for(lb2.holds_vip, 15, "lb2 takes the floating address")
    moved = time.time() - killed
    publish_every(stand, 2)
    doc = summary(checker, 60)
    times = [t - killed for t in doc["error_times"]]  # type: ignore[union-attr]
    window = (max(times) - min(times)) if times else 0.0
    gap, gap_from = doc["max_gap"], doc["max_gap_from"] - killed  # type: ignore[operator]
    print(
        f"balancer drill: address moved {moved:.1f} s after the loss; "
        f"{len(times)} failed requests between {min(times, default=0):.2f} s and "
        f"{max(times, default=0):.2f} s after it (window {window:.2f} s); no status.json "
        f"answered for {gap:.2f} s from {gap_from:.2f} s; {doc['requests']} requests"
    )
    # Connections open on the lost balancer fail once the address has moved (the
    # first retransmission reaches lb2, which resets it): nothing fails later.
    assert all(0 <= t <= moved + 3 for t in times), times
    assert doc["mixed"] == 0 and doc["backward"] == 0 and doc["missing_release"] == 0
    assert doc["ended"] - killed - (moved + 3) > 5  # type: ignore[operator]


def test_every_origin_stopped_cache_serves_the_last_cut_then_notice(
    stand: Stand, viewer: WebDriver
) -> None:
    last = stand.publish(spread=0.0)
    stand.wait_everywhere(last)
    wait_for(lambda: sequence_at(stand) == last, 15, "the last cut at the floating address")
    wait_for(lambda: frame_state(viewer) == ("current", str(last)), 15, "Chromium on the last cut")
    stopped = time.time()
    for origin in stand.origins.values():
        origin.kill()
    checker = stand.checker(12)
    doc = summary(checker, 60)
    assert_clean(doc)
    assert doc["statuses"] == {"200": doc["requests"]}, doc["statuses"]
    # The frame's rule (frame.js isStale): server clock = Date + Age; stale once
    # it passes cut_time + stale_periods x period_seconds.
    cut_age_at_stop = AGE + (stopped - stand.published_at[last])
    due = 3 * PERIOD - cut_age_at_stop
    time.sleep(max(0.0, due - (time.time() - stopped)) + 2)
    headers, body = stand.client_get("/status.json")
    assert json.loads(body)["sequence"] == last
    server_now = parsedate_to_datetime(headers["date"]).timestamp() + int(headers.get("age", "0"))
    cut_time = datetime.fromisoformat(stand.cut_times[last]).timestamp()
    print(
        f"stopped drill: served stale for {time.time() - stopped:.0f} s, Age {headers.get('age')}"
    )
    assert server_now > cut_time + 3 * PERIOD
    # The viewer, polling the cache at the 1 s floor, now shows the notice over the last cut.
    wait_for(lambda: frame_state(viewer)[0] == "stale", 10, "the frame's interruption notice")
    assert frame_state(viewer) == ("stale", str(last))
    assert viewer.find_element(By.ID, "stale-notice").is_displayed()
