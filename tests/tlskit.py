"""Edge tests' tools: a test CA, Debian's pebble (ACME) and certbot, Chromium, fail2ban.

``TestCA`` makes a CA and leaves with ``cryptography`` (pebble's own HTTPS, the
portal of the browser test). ``Pebble`` runs pebble-challtestsrv as the DNS
server that answers 127.0.0.1 for every name, and pebble on loopback with its
http-01 validations sent to the nginx site's port. ``certbot`` runs Debian's
certbot against it with every directory under the test's folder. ``TLSPortal``
and ``chrome_trusting`` are the HTTPS portal and the browser that trusts its
certificates by SPKI hash. ``Fail2ban`` runs fail2ban-server in the foreground
with the shipped jails. Nothing here touches /etc, the host's firewall or the
network beyond loopback.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browserkit import BROWSER_FLAGS, CHROMEDRIVER, CHROMIUM
from tests.kit import free_port, stop_process, wait_for, wait_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"
CERTBOT = shutil.which("certbot") or "/usr/bin/certbot"
DEPLOY_HOOK = Path(__file__).resolve().parents[1] / "packaging" / "certbot" / "prep-agent-nginx"
"""The shipped certbot deploy hook (reloads nginx)."""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A throwaway certificate authority; ``leaf`` issues server certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("prep-agent test CA"))
            .issuer_name(_name("prep-agent test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = folder / "ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str, names: Sequence[str]) -> tuple[Path, Path]:
        """A server certificate for DNS names or IP addresses; return (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.folder / f"{name}.pem"
        key_path = self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.pem.read_bytes())
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


def spki_hash(pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in ``pem``.

    The form Chromium's --ignore-certificate-errors-spki-list takes.
    """
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Pebble:
    """pebble (ACME) and pebble-challtestsrv (DNS: every name is 127.0.0.1) on loopback."""

    def __init__(self, folder: Path, http_port: int, ca: TestCA) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.management = free_port()
        self.dns_port = free_port()
        cert, key = ca.leaf("pebble", ["127.0.0.1", "localhost"])
        self.api_ca = ca.pem
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management}",
                "certificate": str(cert),
                "privateKey": str(key),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (folder / "pebble.json").write_text(json.dumps(config))
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start both; wait until the ACME directory answers."""
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        log = open(self.folder / "pebble.log", "ab")  # noqa: SIM115
        with log:
            self.procs.append(
                subprocess.Popen(
                    [
                        CHALLTESTSRV,
                        "-dns01",
                        f"127.0.0.1:{self.dns_port}",
                        "-http01",
                        "",
                        "-https01",
                        "",
                        "-tlsalpn01",
                        "",
                        "-management",
                        f"127.0.0.1:{free_port()}",
                        "-defaultIPv6",
                        "",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            self.procs.append(
                subprocess.Popen(
                    [
                        PEBBLE,
                        "-config",
                        str(self.folder / "pebble.json"),
                        "-dnsserver",
                        f"127.0.0.1:{self.dns_port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        wait_for(self._answers, 20, f"pebble answers ({self.log()[-400:]})", interval=0.1)

    def _answers(self) -> bool:
        try:
            got = requests.get(self.directory, verify=str(self.api_ca), timeout=2)
        except requests.RequestException:
            return False
        return bool(got.status_code == 200)

    def roots(self) -> bytes:
        """pebble's root and intermediate (generated at each start), PEM."""
        out = b""
        for path in ("/roots/0", "/intermediates/0"):
            got = requests.get(
                f"https://127.0.0.1:{self.management}{path}", verify=str(self.api_ca), timeout=5
            )
            got.raise_for_status()
            out += got.content
        return out

    def log(self) -> str:
        """What pebble and the DNS server printed."""
        path = self.folder / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop both."""
        for proc in self.procs:
            stop_process(proc, timeout=10)


def certbot(
    folder: Path, pebble: Pebble, args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Debian's certbot against ``pebble`` with its directories under ``folder``."""
    for sub in ("config", "work", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    command = [
        CERTBOT,
        *args,
        "--non-interactive",
        "--server",
        pebble.directory,
        "--config-dir",
        str(folder / "config"),
        "--work-dir",
        str(folder / "work"),
        "--logs-dir",
        str(folder / "logs"),
    ]
    environment = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.api_ca), **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=environment, check=False
    )


PORTAL_SERVER = """
import http.server, ssl, sys
port, folder, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=folder)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


class TLSPortal:
    """A news site over HTTPS on its own origin (https://NAME:PORT), in its own process."""

    def __init__(self, folder: Path, name: str, port: int, ca: TestCA) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port
        self.origin = f"https://{name}:{port}"
        self.cert, key = ca.leaf("portal", [name])
        (folder / "favicon.ico").write_bytes(b"")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PORTAL_SERVER, str(port), str(folder), str(self.cert), str(key)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port, 10, "portal over HTTPS", alive=self.proc)
        except AssertionError:
            self.stop()
            raise

    def page(self, name: str, html_text: str) -> str:
        """Write a page; return its URL."""
        (self.folder / f"{name}.html").write_text(html_text, encoding="utf-8")
        return f"{self.origin}/{name}.html"

    def stop(self) -> None:
        """Stop the server."""
        stop_process(self.proc, timeout=10)


def chrome_trusting(user_data_dir: Path, spki: Sequence[str], resolve: Sequence[str]) -> WebDriver:
    """Headless Chromium that trusts certificates with these SPKI hashes only.

    ``resolve`` names are mapped to 127.0.0.1 (--host-resolver-rules); every
    other certificate error still fails the load.
    """
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument("--window-size=1280,900")
    options.add_argument("--ignore-certificate-errors-spki-list=" + ",".join(spki))
    rules = ",".join(f"MAP {name} 127.0.0.1" for name in resolve)
    options.add_argument(f"--host-resolver-rules={rules}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


PACKAGING = Path(__file__).resolve().parents[1] / "packaging"


# --- fail2ban (foreground, its own socket, database and log) ------------------------------

FAIL2BAN_SERVER = shutil.which("fail2ban-server") or "/usr/bin/fail2ban-server"
FAIL2BAN_CLIENT = shutil.which("fail2ban-client") or "/usr/bin/fail2ban-client"


class Fail2ban:
    """fail2ban-server -f with the shipped jails and filter, reading a test's nginx log.

    The shipped jail file is used with its documented paths replaced, the
    institute's addresses written where the shipped include puts them, and
    127.0.0.1/8 narrowed to 127.0.0.1/32 (on loopback, the other 127.0.0.X are
    the test's internet). Every jail's action is fail2ban's stock ``dummy``,
    which writes +IP / -IP lines to a file: no firewall is touched.
    """

    def __init__(
        self, folder: Path, error_log: Path, institute: Sequence[str], bantime: int
    ) -> None:
        conf = folder / "conf"
        for sub in ("jail.d", "filter.d", "action.d"):
            (conf / sub).mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.socket = folder / "fail2ban.sock"
        self.bans = folder / "bans"
        (conf / "fail2ban.conf").write_text(
            "[Definition]\nloglevel = INFO\n"
            f"logtarget = {folder / 'fail2ban.log'}\nsocket = {self.socket}\n"
            f"pidfile = {folder / 'fail2ban.pid'}\ndbfile = {folder / 'fail2ban.sqlite3'}\n"
            "dbpurgeage = 1d\n"
        )
        # Debian's jail.conf defaults for filter (each jail must override it or have
        # a filter.d file of its name), and the stock dummy action for every jail.
        (conf / "jail.conf").write_text(
            "[DEFAULT]\nmode = normal\nfilter = %(__name__)s[mode=%(mode)s]\n"
            f'action = dummy[target="{self.bans}"]\n'
        )
        for name in ("nginx-limit-req.conf", "common.conf"):
            source = Path("/etc/fail2ban/filter.d") / name
            if source.exists():
                shutil.copy(source, conf / "filter.d" / name)
        shutil.copy(Path("/etc/fail2ban/action.d/dummy.conf"), conf / "action.d" / "dummy.conf")
        shipped = PACKAGING / "fail2ban"
        institute_file = folder / "fail2ban-institute.conf"
        institute_file.write_text(f"[prep-agent]\ninstitute = {' '.join(institute)}\n")
        subs = {
            "/etc/prep-agent/fail2ban-institute.conf": str(institute_file),
            "/var/log/nginx/prep-agent/error.log": str(error_log),
            "/var/log/nginx/prep-agent/*.error.log": str(error_log.parent / "*.error.log"),
            "127.0.0.1/8": "127.0.0.1/32",
        }
        text = (shipped / "prep-agent.conf").read_text()
        for old, new in subs.items():
            assert old in text, f"packaging/fail2ban/prep-agent.conf no longer contains {old}"
            text = text.replace(old, new)
        (conf / "jail.d" / "prep-agent.conf").write_text(text)
        (conf / "jail.d" / "test.local").write_text(
            "[sshd]\nenabled = false\n"
            f"[nginx-limit-req]\nbantime = {bantime}\n"
            f"[prep-agent-modsecurity]\nbantime = {bantime}\n"
        )
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start in the foreground; wait until both jails run."""
        out = open(self.folder / "server.out", "ab")  # noqa: SIM115
        with out:
            self.proc = subprocess.Popen(
                [
                    FAIL2BAN_SERVER,
                    "-f",
                    "-x",
                    "-c",
                    str(self.conf),
                    "-s",
                    str(self.socket),
                    "-p",
                    str(self.folder / "fail2ban.pid"),
                ],  # fmt: skip
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"fail2ban-server exited: {self.log()[-2000:]}")
            got = self.client("status")
            return "nginx-limit-req" in got and "prep-agent-modsecurity" in got

        wait_for(ready, 30, "fail2ban's jails running", interval=0.2)

    def client(self, *args: str) -> str:
        """fail2ban-client on this server's socket; its output ("" on failure)."""
        got = subprocess.run(
            [FAIL2BAN_CLIENT, "-c", str(self.conf), "-s", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return got.stdout if got.returncode == 0 else ""

    def get(self, jail: str, key: str) -> str:
        """A jail setting as the server holds it."""
        return self.client("get", jail, key).strip()

    def banned(self, jail: str) -> set[str]:
        """Addresses banned in ``jail`` now."""
        for line in self.client("status", jail).splitlines():
            if "Banned IP list:" in line:
                return set(line.split(":", 1)[1].split())
        return set()

    def actions(self) -> str:
        """What the dummy action wrote (+IP on ban, -IP on unban)."""
        return self.bans.read_text() if self.bans.exists() else ""

    def log(self) -> str:
        """fail2ban's own log."""
        path = self.folder / "fail2ban.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.client("stop")
        stop_process(self.proc, timeout=15)
