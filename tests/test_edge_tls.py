"""HTTPS by ACME end to end, offline: pebble + certbot + the shipped nginx site + Chromium.

The difusor's documented path (packaging/nginx/README.md): the plain site serves
/.well-known/acme-challenge/ from certbot's webroot, certbot obtains the first
certificate, the TLS example is put in place, and certbot's renewals run the
shipped deploy hook (packaging/certbot/prep-agent-nginx), which reloads nginx.
Here pebble (Debian's ACME test server, its own CA) validates http-01 against
the nginx site on loopback; every name resolves to 127.0.0.1 through
pebble-challtestsrv's DNS.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from prep_agent.agent.config import Config
from tests.browserkit import PORTAL_PAGE
from tests.kit import AgentDaemon, Institute, free_port, make_config, minute_ago, wait_for
from tests.nginxkit import NGINX, Nginx, instantiate, instantiate_tls, wait_published
from tests.tlskit import (
    DEPLOY_HOOK,
    Pebble,
    TestCA,
    TLSPortal,
    certbot,
    chrome_trusting,
    spki_hash,
)

pytestmark = [pytest.mark.edge, pytest.mark.timeout(180)]

NAME = "prep.example.test"
PORTAL = "portal.example.test"
CERT = "prep"
"""certbot's --cert-name: /etc/letsencrypt/live/prep/ on a real host."""


@dataclass
class Site:
    """An agent, the shipped nginx site over TLS with a certificate from pebble."""

    config: Config
    agent: AgentDaemon
    nginx: Nginx
    pebble: Pebble
    ca: TestCA
    certbot_dir: Path
    tls_port: int
    portal_port: int
    bundle: Path
    nginx_args: str
    live: Path = field(init=False)

    def __post_init__(self) -> None:
        self.live = self.certbot_dir / "config" / "live" / CERT


@dataclass
class Answer:
    """One HTTPS request: status, the served certificate's serial, body."""

    status: int
    serial: int
    body: bytes


def https_get(port: int, path: str, cafile: Path) -> Answer:
    """GET over a new TLS connection to 127.0.0.1:``port`` as ``NAME``, verified.

    Raises OSError or ssl.SSLError when the connection or the verification fails.
    """
    context = ssl.create_default_context(cafile=str(cafile))
    request = f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with raw, context.wrap_socket(raw, server_hostname=NAME) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(request.encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return Answer(status, int(x509.load_der_x509_certificate(der).serial_number), body)


def file_serial(path: Path) -> int:
    """Serial of the first certificate in a PEM file."""
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


@pytest.fixture(scope="module", autouse=True)
def tools_installed() -> None:
    for tool in ("pebble", "pebble-challtestsrv", "certbot"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/install-deps (Debian packages)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, institute: Institute) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("acme")
    ca = TestCA(tmp / "ca")
    listen = f"127.0.0.1:{free_port()}"
    port, tls_port, portal_port = free_port(), free_port(), free_port()
    config = make_config(
        tmp, institute, listen=listen, frame_ancestors=f"https://{PORTAL}:{portal_port}"
    )
    agent = AgentDaemon(tmp / "prep-agent.conf")
    nginx: Nginx | None = None
    pebble: Pebble | None = None
    try:
        agent.start()
        institute.cut(config.inbox, 1, cut_time=minute_ago(3))
        wait_published(config.public, 1)
        folder = tmp / "nginx"
        conf = instantiate(folder, config.root, listen, port)
        (folder / "acme").mkdir()
        nginx = Nginx(conf, port)
        nginx.start()
        pebble = Pebble(tmp / "pebble", port, ca)
        pebble.start()
        # The first certificate: only the plain site runs (no certificate yet).
        got = certbot(
            tmp / "certbot",
            pebble,
            [
                "certonly",
                "--webroot",
                "-w",
                str(folder / "acme"),
                "-d",
                NAME,
                "--cert-name",
                CERT,
                "--agree-tos",
                "--register-unsafely-without-email",
            ],
        )
        assert got.returncode == 0, got.stdout + got.stderr + pebble.log()[-2000:]
        live = tmp / "certbot" / "config" / "live" / CERT
        certs = {n: live / n for n in ("fullchain.pem", "privkey.pem", "chain.pem")}
        instantiate_tls(folder, config.root, listen, port, tls_port, certs)
        # Renewals run every executable in renewal-hooks/deploy/ (the documented install).
        hooks = tmp / "certbot" / "config" / "renewal-hooks" / "deploy"
        hooks.mkdir(parents=True, exist_ok=True)
        shutil.copy2(DEPLOY_HOOK, hooks / DEPLOY_HOOK.name)
        nginx_args = f"-c {conf} -p {folder}/"
        # The same hook puts the TLS site in place (checks it first, then reloads).
        hooked = subprocess.run(
            [str(DEPLOY_HOOK)],
            env={"PATH": f"{Path(NGINX).parent}:/usr/bin:/bin", "NGINX_ARGS": nginx_args},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert hooked.returncode == 0, hooked.stderr
        bundle = tmp / "pebble-roots.pem"
        bundle.write_bytes(pebble.roots())
        wait_for(
            lambda: _answers(tls_port, bundle), 10, f"nginx serves TLS ({nginx.errors()[-800:]})"
        )
        yield Site(
            config, agent, nginx, pebble, ca, tmp / "certbot", tls_port, portal_port, bundle,
            nginx_args,
        )  # fmt: skip
    finally:
        if pebble is not None:
            pebble.stop()
        if nginx is not None:
            nginx.stop()
        agent.stop()


def _answers(port: int, bundle: Path) -> bool:
    try:
        return https_get(port, "/status.json", bundle).status == 200
    except OSError:
        return False


def test_certbot_certificate_served_by_the_shipped_site(site: Site) -> None:
    answer = https_get(site.tls_port, "/status.json", site.bundle)
    assert answer.status == 200 and json.loads(answer.body)["sequence"] == 1
    assert answer.serial == file_serial(site.live / "cert.pem")
    issued = x509.load_pem_x509_certificate((site.live / "cert.pem").read_bytes())
    names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [NAME]
    assert "Pebble" in issued.issuer.rfc4514_string()
    renewal = (site.certbot_dir / "config" / "renewal" / f"{CERT}.conf").read_text()
    assert "authenticator = webroot" in renewal  # `certbot renew` repeats the webroot path


def test_forced_renewal_replaces_the_certificate_without_dropping_requests(site: Site) -> None:
    before = https_get(site.tls_port, "/status.json", site.bundle).serial
    stop = threading.Event()
    answers: list[tuple[float, int | str, int]] = []
    lock = threading.Lock()

    def client() -> None:
        deadline = time.monotonic() + 90
        for _ in range(5000):  # bounded in count and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                got = https_get(site.tls_port, "/status.json", site.bundle)
                row: tuple[float, int | str, int] = (time.monotonic(), got.status, got.serial)
            except OSError as error:
                row = (time.monotonic(), repr(error), 0)
            with lock:
                answers.append(row)
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        renewed = certbot(
            site.certbot_dir,
            site.pebble,
            ["renew", "--force-renewal", "--no-random-sleep-on-renew", "--cert-name", CERT],
            env={"NGINX_ARGS": site.nginx_args},
        )
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        # certbot ran the shipped hook from renewal-hooks/deploy/, which signalled nginx.
        assert "Hook 'deploy-hook' ran" in renewed.stderr, renewed.stderr
        assert "signal process started" in renewed.stderr, renewed.stderr
        after = file_serial(site.live / "cert.pem")
        assert after != before
        wait_for(
            lambda: any(a[2] == after for a in list(answers)), 15, "the new certificate served"
        )
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]
    served = [a[2] for a in answers]
    assert before in served and served[-1] == after
    # nginx's reload: new workers load the new certificate, the old ones finish what
    # they accepted and leave (a few milliseconds in which both answer); a second
    # after the first new answer, only the new certificate is served.
    first_new = min(a[0] for a in answers if a[2] == after)
    late = [a[2] for a in answers if a[0] > first_new + 1.0]
    assert late and set(late) == {after}
    assert len(answers) >= 20


def test_frame_over_https_inside_an_https_portal_in_chromium(site: Site, tmp_path: Path) -> None:
    portal = TLSPortal(tmp_path / "portal", PORTAL, site.portal_port, site.ca)
    driver: WebDriver | None = None
    try:
        frame_url = f"https://{NAME}:{site.tls_port}/"
        url = portal.page("embed", PORTAL_PAGE.format(src=frame_url, height=560))
        served = (site.live / "cert.pem").read_bytes()
        spki = [spki_hash(served), spki_hash(portal.cert.read_bytes())]
        driver = chrome_trusting(tmp_path / "profile", spki, [NAME, PORTAL])
        driver.get(url)
        assert driver.execute_script("return location.protocol") == "https:"
        driver.switch_to.frame(driver.find_element(By.ID, "prep"))
        browser = driver
        shown = wait_for(
            lambda: "".join(e.text for e in browser.find_elements(By.ID, "cut-time")),
            15,
            "the frame shows the cut time",
        )
        assert shown
        status = json.loads(https_get(site.tls_port, "/status.json", site.bundle).body)
        element = driver.find_element(By.ID, "cut-time")
        assert element.get_attribute("datetime") == status["cut_time"]
        assert driver.execute_script("return location.href") == frame_url
        driver.switch_to.default_content()
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not [e for e in errors if "frame-ancestors" in e or "Mixed Content" in e], errors
    finally:
        if driver is not None:
            driver.quit()
        portal.stop()
