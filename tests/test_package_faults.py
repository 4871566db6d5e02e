"""A failing institute server, and a killed agent, through the real daemon (issue 15).

The agent is the real ``prep-agent run`` (``--once`` per poll, or the daemon)
polling a real HTTPS server on loopback (``tests/kit/https_site.py``) that hangs,
answers 200 with an HTML error page, cuts the body short, or presents a
certificate of another CA. Each poll gives its one-line reason (the ``run
--once`` line, the journal, the daemon's health ``source:fetch``) and the
published cut keeps serving: the release, the frame and ``status.json`` stay
byte for byte (but the time they were written). An agent killed with SIGKILL
while a large package trickles in leaves the root as it was, and the next
agent's poll publishes the package.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prep_agent.institute.simulation.testca import TestCA, issue, make_ca, write_server_files
from tests.kit import AgentDaemon, wait_for
from tests.kit.https_site import Site, cut_short, hang, trickle
from tests.test_package_checks import CUT_STAMPS, cut_members, cut_package, zip_bytes
from tests.test_package_publish import Env, ca, package_env, tree, urlopen, write_conf  # noqa: F401

DEADLINE = 2
"""``[source] deadline_seconds`` of these agents: a hanging server costs this much."""
HTML_PAGE = b"<!DOCTYPE html><html><body><h1>Servicio no disponible</h1></body></html>\n"


def fault_conf(env: Env, url: str | None = None, poll_seconds: int = 30) -> Path:
    """The env's config with a short poll deadline (and another URL, if given)."""
    conf = write_conf(env.tmp, env.site, env.institute, poll_seconds)
    text = conf.read_text().replace("deadline_seconds = 300", f"deadline_seconds = {DEADLINE}")
    if url is not None:
        text = text.replace(env.site.url("/paquetes/"), url)
    conf.write_text(text)
    return conf


@pytest.fixture
def env(tmp_path: Path, ca: TestCA) -> Iterator[Env]:  # noqa: F811  # ca: the fixture
    with package_env(tmp_path, ca) as made:
        made.conf = fault_conf(made)
        yield made


_WRITTEN_AT = re.compile(rb'"written_at": ?"[^"]*"')


def unwritten(public: bytes) -> bytes:
    """A frame or status.json without its ``written_at`` (each agent process that
    starts rewrites the public files for ``current``: the same cut, a new time)."""
    return _WRITTEN_AT.sub(b'"written_at": ""', public)


def served(env: Env) -> dict[str, bytes]:
    """What readers get: the release ``current`` names, the frame and status.json."""
    public = env.root / "public"
    return {
        "current": str(env.current()).encode(),
        **{f"release/{k}": v for k, v in tree(env.current()).items()},
        "index.html": unwritten((public / "index.html").read_bytes()),
        "status.json": unwritten((public / "status.json").read_bytes()),
    }


def test_each_server_fault_gives_its_reason_and_the_published_cut_keeps_serving(
    env: Env, tmp_path: Path
) -> None:
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    assert env.once() == (0, "published: sequence 202106062240")
    published = served(env)
    newer_name, newer = cut_package(CUT_STAMPS[1])
    env.offer(newer_name, newer)  # what the server would give if it worked
    package_path = f"/paquetes/{newer_name}"
    half = len(newer) // 2

    # Another CA's certificate on the same folder (the difusor trusts the test CA only).
    other_ca = make_ca()
    other_files = write_server_files(tmp_path / "other-tls", other_ca, issue(other_ca))
    impostor = Site(env.site.folder, other_files[1], other_files[2], other_files[0])
    try:
        faults: list[tuple[str, Any, str]] = [
            ("hang", hang, f"source-timeout: no complete answer within {DEADLINE} s"),
            (
                "html",
                lambda h: h.answer(200, HTML_PAGE, {"Content-Type": "text/html"}),
                "package-not-zip: the answer is an HTML page (text/html), not a zip",
            ),
            (
                "short",
                cut_short(newer, half),
                f"package-truncated: {half} of {len(newer)} bytes (Content-Length)",
            ),
            ("certificate", None, "source-tls: certificate verify failed"),
        ]
        for fault, route, said in faults:
            if route is None:
                env.conf = fault_conf(env, impostor.url("/paquetes/"))
            else:
                env.site.routes[package_path] = route
            code, out = env.once()
            assert code == 2 and out.startswith(f"source-error: {said}"), (fault, out)
            assert "\n" not in out
            last = env.journal()[-1]
            assert last["event"] == "source-error", fault
            assert f"{last['reason']}: {last['detail']}".startswith(said), (fault, last)
            assert served(env) == published, fault
            assert not any((env.root / "staging").iterdir()), fault
            assert not (env.root / "quarantine").exists() or not env.quarantined(), fault
            env.site.routes.clear()
        assert not impostor.seen  # the TLS handshake failed: no request was sent
    finally:
        impostor.close()
    # The server works again: the next poll publishes the newer cut.
    env.conf = fault_conf(env)
    assert env.once() == (0, "published: sequence 202106062320")


def health(agent: AgentDaemon) -> dict[str, Any]:
    """The full health document (loopback is on the default allow-list)."""
    import urllib.error

    try:
        with urlopen(f"http://{agent.address}/health") as answer:
            doc: dict[str, Any] = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        doc = json.loads(exc.read())
    return doc


def fetch_check(agent: AgentDaemon) -> dict[str, Any]:
    check: dict[str, Any] = health(agent)["checks"]["source:fetch"][0]
    return check


def test_the_daemon_reports_a_failing_server_in_health_and_recovers(env: Env) -> None:
    conf = fault_conf(env, poll_seconds=1)
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    agent = AgentDaemon(conf).start(timeout=30)
    try:
        wait_for(lambda: agent.status()["sequence"] == 202106062240, 30, "the first cut")
        assert fetch_check(agent)["status"] == "pass"
        published = served(env)
        newer_name, newer = cut_package(CUT_STAMPS[1])
        env.site.routes[f"/paquetes/{newer_name}"] = lambda h: h.answer(
            200, HTML_PAGE, {"Content-Type": "text/html"}
        )
        env.offer(newer_name, newer)
        said = "package-not-zip: the answer is an HTML page (text/html), not a zip"
        wait_for(lambda: fetch_check(agent)["observedValue"] == said, 30, "source:fetch warns")
        doc = health(agent)
        assert doc["checks"]["source:fetch"][0]["status"] == "warn"
        assert doc["status"] == "warn" and "source:fetch" in doc["output"]
        assert doc["checks"]["cut:sequence"][0]["observedValue"] == 202106062240
        with urlopen(f"http://{agent.address}/status.json") as answer:
            assert unwritten(answer.read()) == published["status.json"]
        with urlopen(f"http://{agent.address}/") as answer:
            assert unwritten(answer.read()) == published["index.html"]
        assert served(env) == published
        env.site.routes.clear()
        wait_for(lambda: agent.status()["sequence"] == 202106062320, 30, "the newer cut")
        wait_for(lambda: fetch_check(agent)["status"] == "pass", 10, "source:fetch passes")
        assert fetch_check(agent)["observedValue"] is None
    finally:
        assert agent.stop() == 0
    events = [e for e in agent.journal() if e["event"].startswith("source-")]
    assert events[0]["event"] == "source-error" and events[0]["reason"] == "package-not-zip"
    assert events[-1] == {**events[-1], "event": "source-recovered", "reason": "package-not-zip"}


def root_files(env: Env) -> dict[str, bytes]:
    """Every file and link under the agent's root (public files without ``written_at``;
    the journal aside), to tell whether anything was published or left behind."""
    found: dict[str, bytes] = {}
    for path in sorted(env.root.rglob("*")):
        relative = path.relative_to(env.root).as_posix()
        if relative == "journal.jsonl" or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink():
            found[relative] = f"-> {os.readlink(path)}".encode()
        else:
            found[relative] = unwritten(path.read_bytes())
    return found


def test_kill_9_during_a_slow_download_publishes_nothing_and_the_next_poll_does(
    env: Env,
) -> None:
    conf = fault_conf(env, poll_seconds=1)
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    agent = AgentDaemon(conf).start(timeout=30)
    wait_for(lambda: agent.status()["sequence"] == 202106062240, 30, "the first cut")
    before = root_files(env)
    big_name = f"{CUT_STAMPS[-1]}_PREP_CAMP.zip"
    filler = random.Random(15).randbytes(8 * 1024**2)  # incompressible: the zip is as big
    big = zip_bytes({**cut_members(CUT_STAMPS[-1]), "anexos/relleno.bin": filler})
    sent = [0]
    env.site.routes[f"/paquetes/{big_name}"] = trickle(big, 256 * 1024, 0.05, sent)
    env.offer(big_name, big)
    try:
        wait_for(lambda: sent[0] >= len(big) // 2, 30, "half the package sent")
    finally:
        assert agent.kill() == -9
    assert 0 < sent[0] < len(big)
    assert root_files(env) == before  # nothing partial published, written or left behind
    events = [e["event"] for e in agent.journal()]
    assert events.count("cut-published") == 1 and "cut-rejected" not in events

    env.site.routes.clear()
    agent = AgentDaemon(conf).start(timeout=30)
    try:
        wait_for(lambda: agent.status()["sequence"] == 202106072000, 60, "the big package")
    finally:
        assert agent.stop() == 0
    release = env.current()
    assert (release / "paquete" / big_name).read_bytes() == big
    assert (release / "archivos" / "anexos" / "relleno.bin").read_bytes() == filler
    assert not any((env.root / "staging").iterdir())
