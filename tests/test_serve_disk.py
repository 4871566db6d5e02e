"""The embedded server serves a release file as it is on disk, like nginx.

Release files are kept in memory once read (a five-fold throughput gain), but a
file changed on disk after publication (which only an intruder or a broken disk
does) must show within the recheck interval, or an audit of the public copy
(``prep-agent audit``, the collector, the rehearsal's viewers) would be shown
the signed bytes the difusor no longer holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests  # type: ignore[import-untyped]

from tests.kit import AgentDaemon, Institute, free_port, make_config, minute_ago, wait_for
from tests.nginxkit import wait_published

FILES = {"index.html": b"<h1>Corte 1</h1>\n", "datos/resultados.csv": b"PARTIDO,VOTOS\nA,10\n"}


def test_a_release_file_changed_on_disk_is_served_as_on_disk(
    tmp_path: Path, institute: Institute
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(tmp_path, institute, listen=listen)
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    try:
        institute.deliver(config.inbox, FILES, institute.manifest(FILES, 1, minute_ago(5)))
        release = str(wait_published(config.public, 1)["release"])
        url = f"http://{listen}/cortes/{release}/datos/resultados.csv"
        for _ in range(3):  # read: now held in memory
            answer = requests.get(url, timeout=5)
            assert answer.status_code == 200 and answer.content == FILES["datos/resultados.csv"]
        path = config.layout.releases / release / "datos" / "resultados.csv"
        path.chmod(0o644)
        with open(path, "ab") as out:
            out.write(b"B,99\n")
        changed = FILES["datos/resultados.csv"] + b"B,99\n"
        started = time.monotonic()
        wait_for(lambda: requests.get(url, timeout=5).content == changed, 5, "the changed bytes")
        assert time.monotonic() - started < 2.0
    finally:
        agent.stop()
