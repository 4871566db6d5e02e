"""The https-package source (agent/fetch.py): one poll against a real HTTPS server.

The server is Python's own (``tests/kit/https_site.py``: ``http.server``, its
directory listing is a real autoindex page, ``Last-Modified``/``If-Modified-Since``
are its own) over TLS on loopback, with a CA made by the test
(``institute/simulation/testca.py``). Each failure gives its one-line reason and
nothing is returned.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import ssl
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from prep_agent import __version__
from prep_agent.agent.fetch import (
    BACKOFF_CAP,
    Fetcher,
    Package,
    Settings,
    backoff,
    check_zip_end,
    newest_in_index,
    package_file_name,
)
from prep_agent.agent.https_get import FetchError, spki_sha256
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.package import package_stamp
from prep_agent.institute.simulation.testca import TestCA, issue, make_ca, write_server_files
from tests.kit import SHARED, keygen, ssh_sign
from tests.kit.https_site import Site
from tests.kit.https_site import SiteHandler as _Handler

CAMPECHE = SHARED / "fixtures" / "prep-real" / "campeche-2021-20210601_1852_PREP_CAMP.zip"
NAME = "20210601_1852_PREP_CAMP.zip"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return make_ca()


@pytest.fixture
def site(tmp_path: Path, ca: TestCA) -> Iterator[Site]:
    ca_path, cert, key = write_server_files(tmp_path / "tls", ca, issue(ca))
    folder = tmp_path / "www"
    (folder / "paquetes").mkdir(parents=True)
    made = Site(folder, cert, key, ca_path)
    yield made
    made.close()


def settings(site: Site, path: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "url": site.url(path),
        "ca_file": site.ca_file,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "deadline_seconds": 10.0,
    }
    return Settings(**{**values, **changes})


def poll(site: Site, path: str, fetcher: Fetcher | None = None, **changes: Any) -> Package | None:
    fetcher = fetcher or Fetcher(settings(site, path, **changes), signers=())
    return fetcher.poll(datetime.now(timezone.utc))


def refused(site: Site, path: str, **changes: Any) -> FetchError:
    with pytest.raises(FetchError) as caught:
        poll(site, path, **changes)
    assert "\n" not in str(caught.value)
    return caught.value


def small_zip(note: str = "x") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("LEEME.txt", note)
    return buffer.getvalue()


# --- finding the newest package -------------------------------------------------------


@pytest.mark.core
def test_fixed_url_serves_the_campeche_package_byte_identical(site: Site) -> None:
    data = CAMPECHE.read_bytes()
    site.routes["/latest.zip"] = lambda h: h.answer(
        200,
        data,
        {
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{NAME}"',
        },
    )
    package = poll(site, "/latest.zip")
    assert package is not None
    assert package.data == data
    assert package.file_name == NAME
    assert package.signed_by is None
    assert package.host == "127.0.0.1"
    headers = dict(site.seen)["/latest.zip"]
    assert headers["User-Agent"] == f"prep-agent/{__version__}"
    assert headers["Accept-Encoding"] == "identity"


@pytest.mark.core
def test_fixed_url_without_disposition_is_named_by_its_path(site: Site) -> None:
    shutil.copy(CAMPECHE, site.folder / NAME)
    package = poll(site, f"/{NAME}")
    assert package is not None and package.file_name == NAME


@pytest.mark.core
def test_newest_package_of_an_autoindex_page(site: Site) -> None:
    folder = site.folder / "paquetes"
    for name in ("20210601_1832_PREP_CAMP.zip", "20210531_2359_PREP_CAMP.zip", "LEEME.txt"):
        (folder / name).write_bytes(small_zip(name))
    shutil.copy(CAMPECHE, folder / NAME)
    package = poll(site, "/paquetes/")
    assert package is not None
    assert package.file_name == NAME
    assert package.url == site.url(f"/paquetes/{NAME}")
    assert package.data == CAMPECHE.read_bytes()


@pytest.mark.core
def test_newest_package_of_a_json_index(site: Site) -> None:
    folder = site.folder / "paquetes"
    shutil.copy(CAMPECHE, folder / NAME)
    (folder / "20210601_1750_PREP_CAMP.zip").write_bytes(small_zip())
    listing = [
        "20210601_1750_PREP_CAMP.zip",
        {"name": NAME, "size": CAMPECHE.stat().st_size},
        "20219999_9999_PREP_CAMP.zip",  # no such date: not a package name
    ]
    site.routes["/indice/"] = lambda h: h.answer(
        200, json.dumps(listing).encode(), {"Content-Type": "application/json"}
    )
    fetcher = Fetcher(settings(site, "/indice/"), signers=())
    site.routes["/indice/" + NAME] = lambda h: h.answer(200, CAMPECHE.read_bytes())
    package = fetcher.poll(datetime.now(timezone.utc))
    assert package is not None and package.file_name == NAME


@pytest.mark.core
def test_an_index_with_two_newest_names_or_none_is_refused() -> None:
    page = b'<a href="20210601_1852_PREP_CAMP.zip">a</a><a href="20210601_1852_PREP.zip">b</a>'
    with pytest.raises(FetchError, match="source-index-invalid: .*several packages"):
        newest_in_index("https://x.mx/p/", page)
    with pytest.raises(FetchError, match="source-index-invalid: .*names no"):
        newest_in_index("https://x.mx/p/", b'<a href="../">..</a><a href="x.zip">x</a>')
    with pytest.raises(FetchError, match="not on https"):
        newest_in_index("https://x.mx/p/", b'["http://x.mx/p/20210601_1852_PREP.zip"]')


@pytest.mark.core
def test_file_names_stamps_and_zip_ends() -> None:
    url = "https://x.mx/descarga?id=7"
    assert package_file_name("https://x.mx/p/latest.zip", "") == "latest.zip"
    assert package_file_name(url, f"attachment; filename={NAME}") == NAME
    assert package_file_name("https://x.mx/p/a%20b.zip", 'inline; filename="../../x.zip"') == (
        "a b.zip"
    )
    with pytest.raises(FetchError, match="no file name"):
        package_file_name("https://x.mx/p/", "")
    assert package_stamp(NAME) == "202106011852"
    assert package_stamp("20210601_1852_PREP.zip") == "202106011852"
    assert package_stamp("20210631_1852_PREP_CAMP.zip") is None  # June has 30 days
    assert package_stamp("20210601_1852_PREP_CAMP.zip.sig") is None
    data = small_zip()
    commented = data[:-2] + b"\x05\x00hola!"  # a 5-byte archive comment
    check_zip_end(commented)
    with pytest.raises(FetchError, match="package-truncated"):
        check_zip_end(commented[:-1])


# --- conditional requests ---------------------------------------------------------------


@pytest.mark.core
def test_unchanged_package_is_304_and_nothing_new(site: Site) -> None:
    shutil.copy(CAMPECHE, site.folder / "paquetes" / NAME)
    fetcher = Fetcher(settings(site, "/paquetes/"), signers=())
    first = fetcher.poll(datetime.now(timezone.utc))
    assert first is not None and first.validators.last_modified
    assert fetcher.poll(datetime.now(timezone.utc)) is None
    sent = [h for p, h in site.seen if p == f"/paquetes/{NAME}"]
    assert "If-Modified-Since" not in sent[0]
    assert sent[1]["If-Modified-Since"] == first.validators.last_modified


@pytest.mark.core
def test_etag_is_sent_back_and_a_new_package_is_fetched(site: Site) -> None:
    versions = [small_zip("1"), small_zip("2")]

    def latest(h: _Handler) -> None:
        tag = f'"v{len(versions)}"'
        if h.headers.get("If-None-Match") == tag:
            h.answer(304, b"")
        else:
            h.answer(200, versions[-1], {"ETag": tag})

    site.routes["/ultimo/" + NAME] = latest
    fetcher = Fetcher(settings(site, "/ultimo/" + NAME), signers=())
    assert fetcher.poll(datetime.now(timezone.utc)) is not None
    assert fetcher.poll(datetime.now(timezone.utc)) is None
    versions.append(small_zip("3"))
    package = fetcher.poll(datetime.now(timezone.utc))
    assert package is not None and package.data == versions[-1]
    assert package.validators.etag == '"v3"'


@pytest.mark.core
def test_fixed_url_redirecting_to_the_newest_is_conditional_too(site: Site) -> None:
    shutil.copy(CAMPECHE, site.folder / "paquetes" / NAME)

    def redirect(h: _Handler) -> None:
        h.answer(302, b"", {"Location": f"/paquetes/{NAME}"})

    site.routes["/latest.zip"] = redirect
    fetcher = Fetcher(settings(site, "/latest.zip"), signers=())
    package = fetcher.poll(datetime.now(timezone.utc))
    assert package is not None
    assert (package.url, package.file_name) == (site.url(f"/paquetes/{NAME}"), NAME)
    assert fetcher.poll(datetime.now(timezone.utc)) is None
    asked = [path for path, _ in site.seen]
    assert asked == ["/latest.zip", f"/paquetes/{NAME}", f"/paquetes/{NAME}.sig"] + asked[:2]
    assert "If-Modified-Since" in site.seen[-1][1]


@pytest.mark.core
def test_redirect_to_plain_http_is_refused(site: Site) -> None:
    site.routes["/latest.zip"] = lambda h: h.answer(302, b"", {"Location": "http://x.mx/a.zip"})
    error = refused(site, "/latest.zip")
    assert str(error) == (
        f"source-http-status: {site.url('/latest.zip')}: redirect 302 to a non-https URL"
    )


# --- the server misbehaves -----------------------------------------------------------


@pytest.mark.core
def test_server_that_does_not_answer_times_out(site: Site) -> None:
    site.routes["/lento.zip"] = lambda h: h.server.release.wait(10)
    started = time.monotonic()
    error = refused(site, "/lento.zip", read_timeout=0.5)
    assert error.reason == "source-timeout"
    assert time.monotonic() - started < 5


@pytest.mark.core
def test_trickling_body_ends_at_the_poll_deadline(site: Site) -> None:
    def trickle(h: _Handler) -> None:
        data = small_zip()
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for byte in data:
            if h.server.release.wait(0.2):
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()

    site.routes["/goteo.zip"] = trickle
    started = time.monotonic()
    error = refused(site, "/goteo.zip", deadline_seconds=1.0)
    assert error.reason == "source-timeout", error
    assert time.monotonic() - started < 4


@pytest.mark.core
def test_500_is_refused_and_backs_off(site: Site) -> None:
    site.routes["/x.zip"] = lambda h: h.answer(500, b"<html>error</html>")
    fetcher = Fetcher(settings(site, "/x.zip", poll_seconds=30.0), signers=())
    with pytest.raises(FetchError, match=r"^source-http-status: HTTP 500 from https://"):
        fetcher.poll(datetime.now(timezone.utc))
    assert 48 <= fetcher.delay() <= 60
    site.routes["/x.zip"] = lambda h: h.answer(200, small_zip())
    assert fetcher.poll(datetime.now(timezone.utc)) is not None
    assert fetcher.delay() == 30


@pytest.mark.core
def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n, 30.0) for n in range(5)] == [30, 60, 120, 240, BACKOFF_CAP]
    assert backoff(100, 30.0) == BACKOFF_CAP
    assert backoff(3, 30.0, jitter=0.5) == 240 * 0.9
    assert backoff(2, 600.0) == 600  # the cap never shortens poll_seconds


@pytest.mark.core
def test_200_with_an_html_error_page_is_not_a_zip(site: Site) -> None:
    page = b"<!DOCTYPE html><html><body>Servicio no disponible</body></html>" * 2000
    site.routes["/latest.zip"] = lambda h: h.answer(200, page, {"Content-Type": "text/html"})
    error = refused(site, "/latest.zip")
    assert str(error) == "package-not-zip: the answer is an HTML page (text/html), not a zip"


@pytest.mark.core
def test_truncated_body_is_refused(site: Site) -> None:
    data = CAMPECHE.read_bytes()

    def short(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: len(data) // 2])

    site.routes["/corto.zip"] = short
    error = refused(site, "/corto.zip")
    half, whole = len(data) // 2, len(data)
    assert str(error) == f"package-truncated: {half} of {whole} bytes (Content-Length)"


@pytest.mark.core
def test_truncated_body_without_length_lacks_the_zip_end(site: Site) -> None:
    data = CAMPECHE.read_bytes()

    def no_length(h: _Handler) -> None:
        h.send_response(200)
        h.end_headers()
        h.wfile.write(data[:-30])  # HTTP/1.0: the end of the body is the end of the connection

    site.routes["/corto.zip"] = no_length
    error = refused(site, "/corto.zip")
    assert str(error).startswith("package-truncated: no end of the zip's central directory")
    check_zip_end(data)


@pytest.mark.core
def test_body_over_the_limit_is_refused(site: Site) -> None:
    big = small_zip() + b"\0" * (3 * 1024**2)

    def no_length(h: _Handler) -> None:
        h.send_response(200)
        h.end_headers()
        h.wfile.write(big)

    site.routes["/grande.zip"] = lambda h: h.answer(200, big)
    site.routes["/grande-sin-longitud.zip"] = no_length
    error = refused(site, "/grande.zip", max_bytes=1024**2)
    assert str(error) == f"package-too-large: Content-Length {len(big)} is over 1048576 bytes"
    error = refused(site, "/grande-sin-longitud.zip", max_bytes=1024**2)
    assert str(error) == "package-too-large: body over 1048576 bytes"


# --- TLS ---------------------------------------------------------------------------------


@pytest.mark.core
def test_certificate_of_another_ca_is_refused(site: Site, tmp_path: Path) -> None:
    shutil.copy(CAMPECHE, site.folder / NAME)
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca().pem)
    error = refused(site, f"/{NAME}", ca_file=str(other))
    assert error.reason == "source-tls"
    assert "certificate verify failed" in error.detail
    assert not any(path == f"/{NAME}" for path, _ in site.seen)


@pytest.mark.core
def test_without_ca_file_the_system_cas_decide(site: Site) -> None:
    """The test CA is in no system bundle: without ca_file the server is not trusted."""
    shutil.copy(CAMPECHE, site.folder / NAME)
    error = refused(site, f"/{NAME}", ca_file=None)
    assert str(error).startswith("source-tls: certificate verify failed"), error


@pytest.mark.core
def test_certificate_for_another_host_is_refused(tmp_path: Path, ca: TestCA) -> None:
    ca_path, cert, key = write_server_files(tmp_path / "tls", ca, issue(ca, ("otro.example.mx",)))
    (tmp_path / "www").mkdir()
    shutil.copy(CAMPECHE, tmp_path / "www" / NAME)
    site = Site(tmp_path / "www", cert, key, ca_path)
    try:
        error = refused(site, f"/{NAME}", ca_file=str(ca_path))
    finally:
        site.close()
    assert error.reason == "source-tls"
    assert "127.0.0.1" in error.detail
    assert not site.seen


@pytest.mark.core
def test_pinned_key_is_checked_on_the_connection_before_the_request(site: Site, ca: TestCA) -> None:
    shutil.copy(CAMPECHE, site.folder / NAME)
    wrong = frozenset({issue(ca).spki_sha256})
    error = refused(site, f"/{NAME}", pins=wrong)
    assert error.reason == "source-pin-mismatch"
    assert str(error).startswith("source-pin-mismatch: the server's key (SPKI SHA-256 ")
    assert not site.seen  # no request was sent on the unpinned connection
    leaf_pem = (Path(site.ca_file).parent / "server.pem").read_bytes()
    der = ssl.PEM_cert_to_DER_cert(leaf_pem.decode())
    right = frozenset({spki_sha256(der), *wrong})
    package = poll(site, f"/{NAME}", pins=right)
    assert package is not None and package.data == CAMPECHE.read_bytes()


# --- the institute's signature --------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    key = tmp_path_factory.mktemp("signer") / "instituto"
    return key, keygen(key)


def signed_fetcher(site: Site, public: str, path: str, **changes: Any) -> Fetcher:
    signers = parse_allowed_signers(f'iec namespaces="prep-cut,prep-package" {public}\n')
    return Fetcher(settings(site, path, **changes), signers=signers)


def test_unsigned_package_is_refused_when_a_signature_is_required(
    site: Site, signer: tuple[Path, str]
) -> None:
    shutil.copy(CAMPECHE, site.folder / NAME)
    fetcher = signed_fetcher(site, signer[1], f"/{NAME}", require_signature=True)
    with pytest.raises(FetchError) as caught:
        fetcher.poll(datetime.now(timezone.utc))
    assert str(caught.value) == (
        f"package-unsigned: no signature at {site.url(f'/{NAME}')}.sig and one is required"
    )
    assert fetcher.validators == {}  # the next poll downloads it again


def test_good_signature_names_its_key(site: Site, signer: tuple[Path, str]) -> None:
    data = CAMPECHE.read_bytes()
    shutil.copy(CAMPECHE, site.folder / "paquetes" / NAME)
    signature = ssh_sign(signer[0], data, namespace="prep-package")
    (site.folder / "paquetes" / f"{NAME}.sig").write_bytes(signature)
    fetcher = signed_fetcher(site, signer[1], "/paquetes/", require_signature=True)
    package = fetcher.poll(datetime.now(timezone.utc))
    assert package is not None and package.data == data
    blob = base64.b64decode(signer[1].split()[1])
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert package.signed_by == (fingerprint,)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("other-bytes", "signature-untrusted: signed by 0/1 required trusted keys "),
        ("prep-cut", "signature-untrusted: signed by 0/1 required trusted keys "),
        ("garbage", "signature-malformed: "),
    ],
)
def test_bad_signature_is_refused_even_when_not_required(
    site: Site, signer: tuple[Path, str], how: str, reason: str
) -> None:
    data = CAMPECHE.read_bytes()
    shutil.copy(CAMPECHE, site.folder / NAME)
    if how == "other-bytes":
        signature = ssh_sign(signer[0], data + b"\0", namespace="prep-package")
    elif how == "prep-cut":
        signature = ssh_sign(signer[0], data, namespace="prep-cut")
    else:
        signature = b"<html>404</html>"
    (site.folder / f"{NAME}.sig").write_bytes(signature)
    fetcher = signed_fetcher(site, signer[1], f"/{NAME}")
    with pytest.raises(FetchError) as caught:
        fetcher.poll(datetime.now(timezone.utc))
    assert str(caught.value).startswith(reason), caught.value
    assert "\n" not in str(caught.value)
