"""A real nginx with the packaged site (packaging/nginx) and a real agent daemon, for tests.

``instantiate`` copies the site for a temporary root and port by replacing the
per-installation strings that ``packaging/nginx/prep-agent.conf`` documents at its
top; ``Nginx`` runs it in the foreground (``daemon off``) and stops it; the
agent is the kit's ``AgentDaemon``. Clients choose their source address on
loopback (``session_from("127.0.0.2")``): nginx's limits and the agent's
allow-list see different clients without extra network setup.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import requests  # type: ignore[import-untyped]  # no stubs in Debian 12
from requests.adapters import HTTPAdapter  # type: ignore[import-untyped]

from prep_agent.agent.config import Config
from tests.kit import (
    AgentDaemon,
    Institute,
    free_port,
    make_config,
    stop_process,
    wait_for,
    wait_port,
)

PACKAGING = Path(__file__).resolve().parents[1] / "packaging" / "nginx"
"""The shipped nginx files."""
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class SourceAddressAdapter(HTTPAdapter):  # type: ignore[misc]  # requests is untyped
    """Connect from a chosen local address (any 127.0.0.0/8 address works on Linux)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(source: str) -> requests.Session:
    """A requests session whose connections come from ``source``."""
    session = requests.Session()
    adapter = SourceAddressAdapter(source)
    session.mount("http://", adapter)
    return session


def raw_get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET ``path`` byte for byte (requests would normalise ``..`` and encodings)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def substitutions(
    root: Path, agent: str, port: int, folder: Path, institute: Path
) -> dict[str, str]:
    """The replacements documented at the top of packaging/nginx/prep-agent.conf."""
    return {
        "/var/lib/prep-agent": str(root),
        "127.0.0.1:8080": agent,
        "listen 80;": f"listen 127.0.0.1:{port};",
        "listen [::]:80;": "",
        "/etc/prep-agent/nginx-institute.conf": str(institute),
        "/etc/nginx/snippets/prep-agent-site.conf": str(folder / "prep-agent-site.conf"),
        "/var/log/nginx/prep-agent.access.log": str(folder / "logs" / "access.log"),
        "/var/log/nginx/prep-agent.error.log": str(folder / "logs" / "error.log"),
        "/var/www/acme": str(folder / "acme"),
        "/etc/prep-agent/nginx-waf/*.conf": str(folder / "waf" / "*.conf"),
    }


def _replace_all(text: str, subs: dict[str, str]) -> str:
    for old, new in subs.items():
        text = text.replace(old, new)
    return text


def main_conf(folder: Path, site: Path) -> Path:
    """A minimal nginx.conf for ``folder`` that includes ``site`` in its http block."""
    for sub in ("logs", "temp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = folder / "temp"
    text = f"""{user}worker_processes 1;
pid {folder}/nginx.pid;
lock_file {folder}/nginx.lock;
error_log {folder}/logs/main-error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {site};
}}
"""
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


def instantiate(
    folder: Path, root: Path, agent: str, port: int, exempt: tuple[str, ...] = ("127.0.0.1",)
) -> Path:
    """The packaged site for ``root`` on 127.0.0.1:``port``; return the main config path.

    The institute file is the shipped example (all comments) plus ``exempt``.
    Raises AssertionError if a documented string is missing from the shipped
    files (the site and this kit drifted apart).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    institute = folder / "nginx-institute.conf"
    example = (PACKAGING / "nginx-institute.conf").read_text()
    institute.write_text(example + "".join(f"{a} 1;\n" for a in exempt))
    subs = substitutions(root, agent, port, folder, institute)
    texts = {name: (PACKAGING / name).read_text() for name in SITE_FILES}
    together = "".join(texts.values())
    missing = [old for old in subs if old not in together]
    assert not missing, f"packaging/nginx no longer contains {missing}"
    for name, text in texts.items():
        (folder / name).write_text(_replace_all(text, subs))
    return main_conf(folder, folder / "prep-agent.conf")


SITE_FILES = ("prep-agent.conf", "prep-agent-site.conf")


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a main config."""
    return subprocess.run(
        [NGINX, "-t", "-c", str(conf), "-p", f"{conf.parent}/"],
        capture_output=True,
        text=True,
        timeout=20,
    )


class Nginx:
    """nginx in the foreground on a config from ``instantiate``."""

    def __init__(self, conf: Path, port: int) -> None:
        self.conf = conf
        self.port = port
        self.folder = conf.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        log = open(self.folder / "logs" / "stderr.log", "ab")  # noqa: SIM115
        with log:
            self.proc = subprocess.Popen(
                [NGINX, "-c", str(self.conf), "-p", f"{self.folder}/", "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            wait_port(self.port, 10, "nginx", alive=self.proc)
        except AssertionError:
            self.stop()
            raise AssertionError(f"nginx did not start: {self.errors()}") from None

    def errors(self) -> str:
        """Everything nginx wrote to its error logs."""
        logs = self.folder / "logs"
        return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*error*.log")))

    def site_errors(self) -> str:
        """The site's own error log (``error.log``; the WAF and rate limits write there)."""
        path = self.folder / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        """The site's access log (written every second)."""
        path = self.folder / "logs" / "access.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGTERM); kill after 10 s."""
        stop_process(self.proc, timeout=10)


def wait_published(public: Path, sequence: int, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until ``public/status.json`` on disk shows ``sequence``; return it."""

    def published() -> dict[str, Any] | None:
        try:
            status: dict[str, Any] = json.loads((public / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return status if status.get("sequence") == sequence else None

    return wait_for(published, timeout, f"sequence {sequence} published", interval=0.02)


TLS_EXAMPLE = "prep-agent-tls.conf.example"
PLAIN_SERVER = "\nserver {\n    listen 80;"


def instantiate_tls(
    folder: Path, root: Path, agent: str, port: int, tls_port: int, certs: dict[str, Path]
) -> Path:
    """The site with prep-agent-tls.conf.example in place of its plain server block.

    ``certs`` maps fullchain.pem, privkey.pem and chain.pem to files. The redirect
    server listens on 127.0.0.1:``port``, TLS on 127.0.0.1:``tls_port``.
    """
    conf = instantiate(folder, root, agent, port)
    site = (PACKAGING / "prep-agent.conf").read_text()
    cut = site.rfind(PLAIN_SERVER)
    assert cut > 0 and site.rstrip().endswith("}"), "prep-agent.conf must end with its server"
    assert site.count("\nserver {") == 1, "prep-agent.conf must have one server block"
    example = (PACKAGING / TLS_EXAMPLE).read_text()
    subs = {
        **substitutions(root, agent, port, folder, folder / "nginx-institute.conf"),
        "listen 443 ssl http2;": f"listen 127.0.0.1:{tls_port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        "/var/www/acme": str(folder / "acme"),
        **{f"/etc/ssl/prep-agent/{name}": str(path) for name, path in certs.items()},
    }
    text = _replace_all(site[:cut] + "\n" + example, subs)
    (folder / "prep-agent.conf").write_text(text)
    return conf


@dataclass
class Served:
    """A running agent and, if asked for, the packaged nginx site in front of it."""

    config: Config
    agent: AgentDaemon
    listen: str
    url: str
    nginx: Nginx | None


@contextlib.contextmanager
def serving_agent(
    tmp: Path,
    institute: Institute,
    kind: str,
    prepare: Callable[[Path], None] | None = None,
    **options: Any,
) -> Iterator[Served]:
    """A running agent for ``institute`` under ``tmp`` (``options`` go to
    ``make_config``), reached through its embedded server or (``kind="nginx"``)
    through the packaged nginx site, whose main config ``prepare`` may edit
    before nginx starts. Yields the ``Served`` stand; stops it on exit.
    """
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(tmp, institute, listen=listen, **options)
    agent = AgentDaemon(tmp / "prep-agent.conf")
    nginx: Nginx | None = None
    try:
        agent.start()
        url = f"http://{listen}"
        if kind == "nginx":
            port = free_port()
            conf = instantiate(tmp / "nginx", config.root, listen, port)
            if prepare is not None:
                prepare(conf)
            nginx = Nginx(conf, port)
            nginx.start()
            url = nginx.url
        yield Served(config, agent, listen, url, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        agent.stop()
