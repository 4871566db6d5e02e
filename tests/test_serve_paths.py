"""File names in URLs: the embedded server reads them as nginx does (issue 11, finding 3).

A release may hold any name the manifest allows (UTF-8, NFC, ``%`` included). The
WSGI server hands the application a path already percent-decoded, as latin-1 text
(PEP 3333); the agent decoded it a second time, so ``datos/Torreón.txt`` was a 404
and a request for the file literally named ``datos/a%41.txt`` got ``datos/aA.txt``.
Each URL is asked byte for byte of a real agent and of the real packaged nginx site
in front of the same root: both must give the same answer, the expected one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.kit import AgentDaemon, Institute, free_port, make_config, minute_ago
from tests.nginxkit import NGINX, Nginx, instantiate, raw_get, wait_published

pytestmark = pytest.mark.timeout(60)

FILES = {
    "index.html": b"<h1>Corte 1</h1>",
    "datos/Torre\u00f3n.txt": b"Torreon: the file named with an o-acute\n",
    "datos/a%41.txt": b"the file named a%41.txt, percent sign and all\n",
    "datos/aA.txt": b"the file named aA.txt\n",
    "datos/con espacio.txt": b"a space in the name\n",
}
NOT_FOUND = (404, b"No encontrado\n")


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, institute: Institute
) -> Iterator[tuple[int, int, str]]:
    """An agent and the packaged nginx site on the same root, with one release of
    ``FILES``; yields the agent's port, nginx's port and the release name."""
    if not os.access(NGINX, os.X_OK):
        pytest.fail("nginx is not installed: run scripts/install-deps (Debian package nginx)")
    tmp = tmp_path_factory.mktemp("paths")
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(tmp, institute, listen=listen)
    agent = AgentDaemon(tmp / "prep-agent.conf").start()
    nginx: Nginx | None = None
    try:
        when = minute_ago(5)
        institute.deliver(config.inbox, FILES, institute.manifest(FILES, 1, when))
        release = str(wait_published(config.public, 1)["release"])
        port = free_port()
        nginx = Nginx(instantiate(tmp / "nginx", config.root, listen, port), port)
        nginx.start()
        yield int(listen.rsplit(":", 1)[1]), port, release
    finally:
        if nginx is not None:
            nginx.stop()
        agent.stop()


def both(servers: tuple[int, int, str], path: str) -> tuple[int, bytes]:
    """GET ``path`` (``{r}`` is the release) from the agent and from nginx; the two
    answers must be the same, and that answer is returned."""
    agent_port, nginx_port, release = servers
    url = path.format(r=f"/cortes/{release}")
    from_agent = raw_get(agent_port, url)
    from_nginx = raw_get(nginx_port, url)
    assert from_agent == from_nginx, (url, from_agent, from_nginx)
    return from_agent


def test_a_non_ascii_name_is_served(servers: tuple[int, int, str]) -> None:
    expected = (200, FILES["datos/Torre\u00f3n.txt"])
    assert both(servers, "{r}/datos/Torre%C3%B3n.txt") == expected
    assert both(servers, "{r}/datos/Torre%c3%b3n.txt") == expected


def test_a_percent_sign_in_a_name_is_decoded_once(servers: tuple[int, int, str]) -> None:
    """``a%2541.txt`` names the file ``a%41.txt``; ``a%41.txt`` in a URL names ``aA.txt``."""
    assert both(servers, "{r}/datos/a%2541.txt") == (200, FILES["datos/a%41.txt"])
    assert both(servers, "{r}/datos/a%41.txt") == (200, FILES["datos/aA.txt"])
    assert both(servers, "{r}/datos/aA.txt") == (200, FILES["datos/aA.txt"])
    assert both(servers, "{r}/datos/con%20espacio.txt") == (200, FILES["datos/con espacio.txt"])


def test_a_path_that_is_not_utf8_is_not_found(servers: tuple[int, int, str]) -> None:
    """Bytes that are not UTF-8 name no file (a manifest path is UTF-8): 404, not 500."""
    for path in (
        "{r}/datos/Torre%F3n.txt",  # latin-1 o-acute
        "{r}/datos/Torre%C3n.txt",  # a lone lead byte
        "{r}/datos/%FF",
        "{r}/datos/%ED%A0%80.txt",  # an encoded surrogate
        "/static/%C3%28",
        "/%FF",
    ):
        assert both(servers, path) == NOT_FOUND, path
