"""The packaged nginx site (packaging/nginx) with a real nginx and a real agent daemon.

nginx serves the frame, status.json, the assets and the releases from the agent's
disk with the agent's own Cache-Control and security headers, and proxies only
the health paths; the agent must still see who the client is (X-Forwarded-For).
Clients connect from different loopback addresses (127.0.0.1 is the institute,
exempt from the rate limits; 127.0.0.2-4 are the public).
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from prep_agent.agent.config import Config
from prep_agent.daemon import Agent
from prep_agent.web.server import ASSETS, IMMUTABLE, SHORT, content_csp, frame_csp
from tests.kit import AgentDaemon, Institute, free_port, make_config, minute_ago, wait_port
from tests.nginxkit import (
    NGINX,
    Nginx,
    instantiate,
    instantiate_tls,
    nginx_test,
    raw_get,
    session_from,
    wait_published,
)

pytestmark = pytest.mark.timeout(60)

PORTAL = "https://portal.example.mx"
PUBLIC_KEYS = {"status", "serviceId", "time", "checks"}
CUT_CHECKS = {"cut:sequence", "cut:time", "cut:age", "cut:manifest", "cut:last-rejection"}


@pytest.fixture(scope="module", autouse=True)
def nginx_installed() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.fail("nginx is not installed: run scripts/install-deps (Debian package nginx)")


@dataclass
class Stack:
    """An agent daemon and nginx in front of it."""

    config: Config
    agent: AgentDaemon
    nginx: Nginx
    manifests: dict[int, bytes]

    @property
    def url(self) -> str:
        return self.nginx.url

    @property
    def agent_url(self) -> str:
        return f"http://{self.config.listen}"

    def deliver(self, inst: Institute, sequence: int, minutes_ago: int) -> str:
        """Deliver a cut, wait until it is published; return its release name."""
        self.manifests[sequence] = inst.cut(
            self.config.inbox, sequence, cut_time=minute_ago(minutes_ago)
        )
        return str(wait_published(self.config.public, sequence)["release"])


@contextlib.contextmanager
def running_stack(
    tmp: Path, inst: Institute, exempt: tuple[str, ...] = ("127.0.0.1",), **settings: str
) -> Iterator[Stack]:
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(tmp, inst, listen=listen, frame_ancestors=PORTAL, **settings)
    agent = AgentDaemon(tmp / "prep-agent.conf")
    nginx: Nginx | None = None
    try:
        agent.start()  # writes ROOT/nginx/*.conf, which the site includes
        port = free_port()
        nginx = Nginx(instantiate(tmp / "nginx", config.root, listen, port, exempt), port)
        nginx.start()
        yield Stack(config, agent, nginx, {})
    finally:
        if nginx is not None:
            nginx.stop()
        agent.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, institute: Institute) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("nginx"), institute) as s:
        s.deliver(institute, 1, 5)
        yield s


@pytest.fixture(scope="module")
def release(stack: Stack) -> str:
    """The release of cut 1."""
    return next(p.name for p in stack.config.releases.iterdir() if p.name.startswith(f"{1:016d}-"))


def get(url: str, source: str = "127.0.0.1", **kwargs: Any) -> requests.Response:
    with session_from(source) as session:
        return session.get(url, timeout=5, allow_redirects=False, **kwargs)


# --- the configuration ---------------------------------------------------------------


def test_packaged_site_passes_nginx_t(tmp_path: Path, institute: Institute) -> None:
    config = make_config(tmp_path, institute, frame_ancestors=PORTAL)
    conf = instantiate(tmp_path / "nginx", config.root, "127.0.0.1:8080", free_port())
    # Before the agent ever ran there are no header snippets: nginx refuses the
    # site instead of serving the frame without its CSP.
    refused = nginx_test(conf)
    assert refused.returncode != 0 and "frame-headers.conf" in refused.stderr
    Agent(config)  # writes the snippets, the frame and status.json
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    assert "[warn]" not in checked.stderr and "[emerg]" not in checked.stderr, checked.stderr


# --- public files from disk ----------------------------------------------------------


def test_frame_and_status_served_with_agent_headers(stack: Stack, release: str) -> None:
    frame = {
        "Cache-Control": SHORT,
        "Content-Security-Policy": frame_csp(stack.config),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "strict-origin-when-cross-origin",
    }
    assert f"frame-ancestors {PORTAL}" in frame["Content-Security-Policy"]
    public = stack.config.public
    for path, name, ctype in (
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/index.html", "index.html", "text/html; charset=utf-8"),
        ("/status.json", "status.json", "application/json; charset=utf-8"),
    ):
        r = get(stack.url + path)
        assert r.status_code == 200, path
        assert r.content == (public / name).read_bytes(), path
        assert r.headers["Content-Type"] == ctype, path
        for header, value in frame.items():
            assert r.headers.get(header) == value, (path, header)
        assert "Strict-Transport-Security" not in r.headers  # plain HTTP
        assert r.headers["Server"] == "nginx"  # no version (server_tokens off)
    assert json.loads(get(stack.url + "/status.json").content)["release"] == release

    r = get(stack.url + "/static/frame.js")
    assert r.status_code == 200 and r.content == (public / "static/frame.js").read_bytes()
    assert r.headers["Cache-Control"] == ASSETS
    assert r.headers["Content-Security-Policy"] == frame["Content-Security-Policy"]
    assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_release_files_immutable_and_identical(
    stack: Stack, release: str, institute: Institute
) -> None:
    base = f"{stack.url}/cortes/{release}"
    content = {
        "Cache-Control": IMMUTABLE,
        "Content-Security-Policy": content_csp(stack.config),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "strict-origin-when-cross-origin",
    }
    assert content["Content-Security-Policy"] == f"frame-ancestors 'self' {PORTAL}"
    folder = stack.config.releases / release
    for rel, ctype in (
        ("index.html", "text/html; charset=utf-8"),
        ("datos/COAH_AYUN_2021.csv", "text/csv; charset=utf-8"),
        ("img/logo.svg", "image/svg+xml; charset=utf-8"),
        (".well-known/prep-cut/manifest.json", "application/json; charset=utf-8"),
        (".well-known/prep-cut/manifest.json.sig", "application/octet-stream"),
    ):
        r = get(f"{base}/{rel}")
        assert r.status_code == 200, rel
        assert r.content == (folder / rel).read_bytes(), rel
        assert r.headers["Content-Type"] == ctype, rel
        for header, value in content.items():
            assert r.headers.get(header) == value, (rel, header)
        # The agent's own server sends the same headers for the same file.
        direct = get(f"{stack.agent_url}/cortes/{release}/{rel}")
        assert direct.content == r.content
        for header in ("Cache-Control", "Content-Security-Policy"):
            assert direct.headers[header] == r.headers[header], (rel, header)
    assert get(f"{base}/index.html").content == b"<h1>Corte 1</h1>"
    # The signed manifest is part of the publication: anyone can verify the cut.
    manifest = get(f"{base}/.well-known/prep-cut/manifest.json").content
    assert manifest == stack.manifests[1]
    # A trailing slash gives the release's index.html.
    slash = get(f"{base}/")
    assert slash.status_code == 200 and slash.content == b"<h1>Corte 1</h1>"
    assert slash.headers["Cache-Control"] == IMMUTABLE


def test_revalidation_and_compression(stack: Stack, release: str) -> None:
    r = get(f"{stack.url}/cortes/{release}/index.html")
    etag = r.headers["ETag"]
    again = get(f"{stack.url}/cortes/{release}/index.html", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["Cache-Control"] == IMMUTABLE
    # The frame page is big enough to be compressed; the body is the same file.
    with session_from("127.0.0.1") as session:
        zipped = session.get(
            stack.url + "/", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=5
        )
        raw = zipped.raw.read(decode_content=False)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    assert gzip.decompress(raw) == (stack.config.public / "index.html").read_bytes()
    assert zipped.headers["Cache-Control"] == SHORT


def _assert_not_found(r: requests.Response, path: str) -> None:
    assert r.status_code == 404, (path, r.status_code)
    assert r.headers["Cache-Control"] == "no-store", path
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8", path
    assert r.content == b"No encontrado\n", path


def test_only_the_publication_is_reachable(stack: Stack, release: str) -> None:
    for path in (
        "/state.json",
        "/journal.jsonl",
        "/lock",
        "/prep-agent.conf",
        "/current",
        "/current/index.html",
        "/releases/",
        f"/releases/{release}/index.html",
        "/nginx/frame-headers.conf",
        "/public/index.html",
        "/staging/",
        "/quarantine/",
        "/static/",
        "/cortes/",
        "/cortes/current/index.html",
        f"/cortes/{release}/datos/",
        f"/cortes/{release}/no-such-file.html",
        "/cortes/0000000000000099-0000000000000000/index.html",
        "/index.htm",
        "/favicon.ico",
        "/health/",
        "/metrics.txt",
    ):
        _assert_not_found(get(stack.url + path), path)


def test_folders_without_slash_redirect_relative(stack: Stack, release: str) -> None:
    """nginx's own answer for a folder named without its slash: 301 to it, relative."""
    for path in (f"/cortes/{release}", f"/cortes/{release}/datos"):
        r = requests.get(stack.url + path, allow_redirects=False, timeout=5)
        assert r.status_code == 301, path
        assert r.headers["Location"] == path + "/", path
    r = requests.get(f"{stack.url}/cortes/{release}", timeout=5)  # then its index.html
    assert r.status_code == 200 and r.url.endswith(f"/cortes/{release}/")
    assert r.content == (stack.config.releases / release / "index.html").read_bytes()


def test_traversal_never_escapes(stack: Stack, release: str) -> None:
    """nginx decodes and normalises the path before choosing a location.

    A path that climbs above / is a 400; one that stays inside but leaves the
    publication (state.json, the config) is the plain 404.
    """
    secrets = (b"highest_sequence", b"agent-started", b"[agent]", b"add_header")
    cases = {
        "/cortes/../state.json": 404,
        "/cortes/%2e%2e/state.json": 404,
        "/cortes/%2E%2E/journal.jsonl": 404,
        f"/cortes/{release}/../../state.json": 404,
        f"/cortes/{release}/..%2f..%2fstate.json": 404,
        f"/cortes/{release}%2f..%2f..%2fstate.json": 404,
        f"/cortes/{release}/%2e%2e/%2e%2e/nginx/frame-headers.conf": 404,
        "/static/../state.json": 404,
        "/static/..%2fstate.json": 404,
        "/static/../../state.json": 400,
        "/cortes/../../state.json": 400,
        "/cortes/../../../etc/passwd": 400,
        "/%2e%2e/state.json": 400,
        "/..%2f..%2fstate.json": 400,
        f"/cortes/{release}/..\\..\\state.json": 404,
        f"/cortes/{release}/index.html%00.json": 400,
        "//state.json": 404,
    }
    for path, expected in cases.items():
        status, body = raw_get(stack.nginx.port, path)
        assert status == expected, (path, status)
        assert not any(s in body for s in secrets), path


def test_symlinks_below_the_roots_are_not_followed(stack: Stack, release: str) -> None:
    folder = stack.config.releases / release
    links = {
        folder / "leak.json": stack.config.state_file,  # a file link
        folder / "up": stack.config.root,  # a folder link
        stack.config.public / "static" / "leak.json": stack.config.state_file,
    }
    folder.chmod(0o755)
    try:
        for link, target in links.items():
            link.symlink_to(target)
        for path in (
            f"/cortes/{release}/leak.json",
            f"/cortes/{release}/up/state.json",
            f"/cortes/{release}/up/public/index.html",
            "/static/leak.json",
        ):
            _assert_not_found(get(stack.url + path), path)
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        folder.chmod(0o555)


def test_read_only_methods(stack: Stack, release: str) -> None:
    with session_from("127.0.0.1") as session:
        for path in ("/", "/status.json", f"/cortes/{release}/index.html", "/health", "/nope"):
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                r = session.request(method, stack.url + path, data=b"x", timeout=5)
                assert r.status_code == 405, (method, path)
                assert r.headers["Allow"] == "GET, HEAD", (method, path)
                assert r.headers["Cache-Control"] == "no-store"
        head = session.head(stack.url + "/status.json", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Cache-Control"] == SHORT


def test_access_log_combined_with_request_time(stack: Stack) -> None:
    get(stack.url + "/status.json?log-probe", headers={"User-Agent": "log-probe/1"})
    line_re = re.compile(
        r'^127\.0\.0\.1 - - \[[^\]]+\] "GET /status\.json\?log-probe HTTP/1\.1" 200 \d+ '
        r'"-" "log-probe/1" \d+\.\d{3}$'
    )
    deadline = time.monotonic() + 5
    while not any(line_re.match(ln) for ln in stack.nginx.access_log().splitlines()):
        assert time.monotonic() < deadline, stack.nginx.access_log()[-2000:]
        time.sleep(0.1)


# --- health through the proxy --------------------------------------------------------


def test_health_full_for_the_allowed_client(stack: Stack) -> None:
    r = get(stack.url + "/health")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/health+json"
    assert r.headers["Cache-Control"] == "no-store"
    doc = r.json()
    assert "version" in doc and "disk:utilization" in doc["checks"]
    assert doc["checks"]["cut:sequence"][0]["observedValue"] >= 1
    metrics = get(stack.url + "/metrics")
    assert metrics.status_code == 200 and "prep_cut_sequence " in metrics.text
    assert get(stack.url + "/livez").text == "ok\n"
    assert get(stack.url + "/readyz").status_code == 200


def test_health_sees_the_client_not_the_proxy(stack: Stack) -> None:
    """From 127.0.0.2 (not on the default allow list) only the public subset.

    nginx connects to the agent from 127.0.0.1, which is on the allow list: the
    agent must take the client from X-Forwarded-For, trusted only from 127.0.0.1.
    """
    # Directly, from an address that is not the proxy, a forged header is ignored.
    direct = get(stack.agent_url + "/health", "127.0.0.2", headers={"X-Forwarded-For": "::1"})
    assert set(direct.json()) == PUBLIC_KEYS
    for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}):
        r = get(stack.url + "/health", "127.0.0.2", headers=headers)
        assert r.status_code == 200
        doc = r.json()
        assert set(doc) == PUBLIC_KEYS, (headers, sorted(doc))
        assert set(doc["checks"]) == CUT_CHECKS
        metrics = get(stack.url + "/metrics", "127.0.0.2", headers=headers)
        assert metrics.status_code == 403, headers


# --- the newest cut at once ----------------------------------------------------------


def test_status_follows_a_new_cut_within_a_second(stack: Stack, institute: Institute) -> None:
    """status.json and index.html are replaced by rename; nginx caches their descriptors
    for open_file_cache_valid 1s, so the new ones are served at most ~1 s later."""
    with session_from("127.0.0.1") as session:
        for _ in range(30):  # warm every cache nginx has
            assert json.loads(session.get(stack.url + "/status.json").content)["sequence"] == 1
            session.get(stack.url + "/")
        new = stack.deliver(institute, 2, 4)  # returns once status.json on disk says 2
        index = stack.config.public / "index.html"
        while 'data-sequence="2"' not in index.read_text():  # written right after
            time.sleep(0.01)
        on_disk = time.monotonic()
        while True:
            status = json.loads(session.get(stack.url + "/status.json", timeout=5).content)
            page = session.get(stack.url + "/", timeout=5).text
            if status["sequence"] == 2 and 'data-sequence="2"' in page:
                break
            # 1 s of cache validity, plus scheduling slack on a loaded test machine.
            assert time.monotonic() - on_disk < 1.5, "nginx served a stale frame or status"
            time.sleep(0.02)
        entry = session.get(f"{stack.url}/{status['entry']}", timeout=5)
    assert status["release"] == new
    assert entry.status_code == 200 and entry.content == b"<h1>Corte 2</h1>"


# --- rate limits ---------------------------------------------------------------------


def _burst(url: str, source: str, count: int) -> list[requests.Response]:
    with session_from(source) as session:
        return [session.get(url, timeout=5) for _ in range(count)]


def test_rate_limits_spare_the_institute(stack: Stack) -> None:
    """burst=200 nodelay at 20 r/s for files, burst=20 at 2 r/s for health; then 429."""
    start = time.monotonic()
    responses = _burst(stack.url + "/status.json", "127.0.0.3", 400)
    public = [r.status_code for r in responses]
    allowed = 200 + 1 + 20 * (time.monotonic() - start)
    assert public[:150] == [200] * 150
    assert set(public) == {200, 429} and public.count(200) <= allowed, public.count(200)
    # The bucket refills at 20 r/s, so a request made after the burst may pass on a
    # slow machine: look at a refusal from inside the burst.
    busy = next(r for r in reversed(responses) if r.status_code == 429)
    assert busy.content == b"Demasiadas solicitudes\n"
    assert busy.headers["Retry-After"] == "1" and busy.headers["Cache-Control"] == "no-store"

    start = time.monotonic()
    health = [r.status_code for r in _burst(stack.url + "/livez", "127.0.0.4", 60)]
    allowed = 20 + 1 + 2 * (time.monotonic() - start)
    assert health[:15] == [200] * 15
    assert set(health) == {200, 429} and health.count(200) <= allowed, health

    # 127.0.0.1 is listed in the institute's include: never limited.
    institute = [r.status_code for r in _burst(stack.url + "/status.json", "127.0.0.1", 400)]
    assert institute == [200] * 400
    assert [r.status_code for r in _burst(stack.url + "/livez", "127.0.0.1", 60)] == [200] * 60


# --- health with a narrow allow list and a token --------------------------------------


def test_health_public_subset_metrics_forbidden_token_unlocks(
    tmp_path: Path, institute: Institute
) -> None:
    token = "s3cr3t-token-for-monitoring"
    (tmp_path / "health.token").write_text(token + "\n")
    settings = {"allow": "10.9.9.0/24", "token_file": str(tmp_path / "health.token")}
    assert ipaddress.ip_address("127.0.0.1") not in ipaddress.ip_network("10.9.9.0/24")
    with running_stack(tmp_path, institute, **settings) as s:
        s.deliver(institute, 1, 5)
        r = get(s.url + "/health")
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
        doc = r.json()
        assert set(doc) == PUBLIC_KEYS
        assert doc["serviceId"] == s.config.service_id and doc["status"] in ("pass", "warn")
        assert set(doc["checks"]) == CUT_CHECKS
        assert doc["checks"]["cut:sequence"][0]["observedValue"] == 1
        assert get(s.url + "/metrics").status_code == 403
        wrong = get(s.url + "/health", headers={"Authorization": "Bearer nope"})
        assert set(wrong.json()) == PUBLIC_KEYS

        bearer = {"Authorization": f"Bearer {token}"}
        full = get(s.url + "/health", headers=bearer).json()
        assert "version" in full and "memory:utilization" in full["checks"]
        metrics = get(s.url + "/metrics", headers=bearer)
        assert metrics.status_code == 200 and "prep_cut_sequence 1" in metrics.text
        assert get(s.url + "/readyz").status_code == 200


# --- the agent stopped ----------------------------------------------------------------


def test_agent_stopped_files_still_served_health_502(tmp_path: Path, institute: Institute) -> None:
    with running_stack(tmp_path, institute) as s:
        release = s.deliver(institute, 1, 5)
        assert s.agent.stop() == 0
        assert json.loads(get(s.url + "/status.json").content)["sequence"] == 1
        assert get(s.url + "/").status_code == 200
        entry = get(f"{s.url}/cortes/{release}/index.html")
        assert entry.status_code == 200 and entry.content == b"<h1>Corte 1</h1>"
        for path in ("/health", "/livez", "/readyz", "/metrics"):
            r = get(s.url + path)
            # Connection refused: nginx answers 502 Bad Gateway, never cacheable.
            assert r.status_code == 502, (path, r.status_code)
            assert r.headers["Cache-Control"] == "no-store"


# --- TLS example ----------------------------------------------------------------------


def _self_signed(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prep.example.mx")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    paths = {n: folder / n for n in ("fullchain.pem", "chain.pem", "privkey.pem")}
    paths["fullchain.pem"].write_bytes(pem)
    paths["chain.pem"].write_bytes(pem)
    paths["privkey.pem"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_tls_example_serves_https_with_hsts(tmp_path: Path, institute: Institute) -> None:
    config = make_config(tmp_path, institute, frame_ancestors=PORTAL)
    Agent(config)  # the header snippets and the frame; no daemon (health would be 502)
    certs = _self_signed(tmp_path / "tls")
    port, tls_port = free_port(), free_port()
    conf = instantiate_tls(tmp_path / "nginx", config.root, "127.0.0.1:8080", port, tls_port, certs)
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    nginx = Nginx(conf, port)
    try:
        nginx.start()
        wait_port(tls_port, 10, "nginx over TLS")
        plain = get(f"http://127.0.0.1:{port}/status.json?x=1")
        assert plain.status_code == 301
        assert plain.headers["Location"] == "https://127.0.0.1/status.json?x=1"
        secure = requests.get(
            f"https://127.0.0.1:{tls_port}/status.json", verify=str(certs["chain.pem"]), timeout=5
        )
        assert secure.status_code == 200
        assert secure.headers["Strict-Transport-Security"] == "max-age=63072000"
        assert secure.headers["Cache-Control"] == SHORT
        assert secure.headers["Content-Security-Policy"] == frame_csp(config)
        missing = requests.get(
            f"https://127.0.0.1:{tls_port}/state.json", verify=str(certs["chain.pem"]), timeout=5
        )
        assert missing.status_code == 404 and "Strict-Transport-Security" in missing.headers
    finally:
        nginx.stop()
