"""Several agents on one host: the paths and files of one instance, ``prep-agent@NAME``.

An outlet that is difusor of several institutes on one night (the federal and a
state PREP) runs one agent per institute from the template unit
``prep-agent@.service``. Each instance owns its config, root, drop folder,
upload account, sshd snippet and nginx site, all named after NAME
(``Instance``). ``render`` derives the sshd snippet and the nginx site from the
packaged single-agent files (``TEMPLATE_DIRS``), changing only the strings that
name paths, the upload account, the agent's address, the server name and
nginx's own names, so every instance has the hardening the package's tests
check. ``install`` writes the files and creates the account and the folders
with ``systemd-sysusers`` and ``systemd-tmpfiles``, as the package does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from prep_agent.agent.config import check_instance_name, render_template
from prep_agent.core.errors import ConfigError, Error
from prep_agent.shared.fsutil import atomic_write
from prep_agent.shared.httpserver import parse_listen

ETC = Path("/etc/prep-agent")
"""The packaged config folder; an instance's config is ``ETC/NAME.conf``."""

TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[2] / "packaging",
    Path("/usr/share/prep-agent/templates"),
)
"""Where the packaged sshd snippet and nginx site are read from: this source tree's
``packaging/``, else the copies the package installs (``packaging/install-files``)."""

SSHD_TEMPLATE = Path("ssh/prep-agent-upload.conf")
SITE_TEMPLATE = Path("nginx/prep-agent.conf")
SNIPPET_TEMPLATE = Path("nginx/prep-agent-site.conf")

FIRST_PORT = 8081
"""The first port ``init --instance`` proposes (the single agent's default is 8080)."""

SERVER_NAME = re.compile(r"[A-Za-z0-9*.-]+(?: [A-Za-z0-9*.-]+)*")
"""nginx ``server_name`` values accepted for an instance: host names, space separated."""


@dataclass(frozen=True)
class Instance:
    """Every path and name of the agent instance ``name`` (absolute, on the host)."""

    name: str

    def __post_init__(self) -> None:
        check_instance_name(self.name)

    @property
    def unit(self) -> str:
        """Its systemd unit."""
        return f"prep-agent@{self.name}.service"

    @property
    def config(self) -> Path:
        """The agent's config, which the template unit reads (``%i.conf``)."""
        return ETC / f"{self.name}.conf"

    @property
    def folder(self) -> Path:
        """The instance's other files in ``/etc``."""
        return ETC / self.name

    @property
    def trust(self) -> Path:
        """The institute's allowed_signers (a copy of ``init --trust``)."""
        return self.folder / "allowed_signers"

    @property
    def upload_keys(self) -> Path:
        """Keys that may log in as the upload account (root-owned)."""
        return self.folder / "upload_authorized_keys"

    @property
    def root(self) -> Path:
        """The agent's root: the template unit's only writable path."""
        return Path(f"/var/lib/prep-agent-{self.name}")

    @property
    def chroot(self) -> Path:
        """The upload account's ChrootDirectory (root-owned)."""
        return Path(f"/var/lib/prep-upload-{self.name}")

    @property
    def inbox(self) -> Path:
        """The drop folder: ``/inbox`` in the upload account's session."""
        return self.chroot / "inbox"

    @property
    def upload_user(self) -> str:
        """The institute's SFTP account."""
        return f"prep-upload-{self.name}"

    @property
    def sysusers(self) -> Path:
        """sysusers.d file of the upload account."""
        return Path(f"/etc/sysusers.d/prep-agent-{self.name}.conf")

    @property
    def tmpfiles(self) -> Path:
        """tmpfiles.d file of the root, the chroot, the drop folder and the error log."""
        return Path(f"/etc/tmpfiles.d/prep-agent-{self.name}.conf")

    @property
    def sshd(self) -> Path:
        """sshd_config.d snippet of the upload account."""
        return Path(f"/etc/ssh/sshd_config.d/prep-agent-upload-{self.name}.conf")

    @property
    def site(self) -> Path:
        """The nginx site (http context and server block; link it into sites-enabled)."""
        return Path(f"/etc/nginx/sites-available/prep-agent-{self.name}.conf")

    @property
    def snippet(self) -> Path:
        """The nginx server body the site includes."""
        return Path(f"/etc/nginx/snippets/prep-agent-{self.name}-site.conf")

    @property
    def access_log(self) -> Path:
        """nginx's access log of the site (kept for the memoria técnica)."""
        return Path(f"/var/log/nginx/prep-agent/{self.name}.access.log")

    @property
    def error_log(self) -> Path:
        """nginx's error log of the site (fail2ban's nginx-limit-req jail reads it)."""
        return Path(f"/var/log/nginx/prep-agent/{self.name}.error.log")

    @property
    def nginx_prefix(self) -> str:
        """Prefix of the site's nginx names (zones, variables, upstream, log format)."""
        return f"prep_agent_{self.name.replace('-', '_')}_"


@dataclass(frozen=True)
class Settings:
    """What ``init --instance`` is told about the instance."""

    election: str
    threshold: int
    listen: str
    server_name: str
    service_id: str


def find_templates() -> Path:
    """The first of ``TEMPLATE_DIRS`` holding the packaged files. Raises ``Error``."""
    for folder in TEMPLATE_DIRS:
        if all((folder / t).is_file() for t in (SSHD_TEMPLATE, SITE_TEMPLATE, SNIPPET_TEMPLATE)):
            return folder
    raise Error(f"the packaged sshd and nginx templates are missing from {TEMPLATE_DIRS[-1]}")


def _substitute(text: str, source: Path, required: dict[str, str], other: dict[str, str]) -> str:
    """Replace every key by its value in one pass (longest first, so a replaced value
    is never replaced again). Raises ``Error`` if a ``required`` key is absent."""
    missing = [old for old in required if old not in text]
    if missing:
        raise Error(f"{source} no longer contains {missing[0]!r}: reinstall prep-agent")
    subs = {**other, **required}
    pattern = re.compile("|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True)))
    return pattern.sub(lambda m: subs[m.group(0)], text)


def _header(instance: Instance, source: Path | None) -> str:
    origin = f" from {source}" if source else ""
    return (
        f"# prep-agent instance {instance.name} ({instance.unit}): written by\n"
        f"# `prep-agent init --instance {instance.name}`{origin}.\n"
    )


def render_config(instance: Instance, settings: Settings) -> str:
    """The instance's agent config: ``init``'s commented template with its paths."""
    return _header(instance, None) + render_template(
        election=settings.election,
        root=instance.root,
        inbox=instance.inbox,
        trust=instance.trust,
        threshold=settings.threshold,
        listen=settings.listen,
        service_id=settings.service_id,
        instance=instance.name,
    )


def render_sshd(instance: Instance, templates: Path) -> str:
    """The packaged upload-account snippet, for this instance's account and chroot."""
    source = templates / SSHD_TEMPLATE
    text = _substitute(
        source.read_text(encoding="utf-8"),
        source,
        {
            "Match User prep-upload\n": f"Match User {instance.upload_user}\n",
            "ChrootDirectory /var/lib/prep-upload\n": f"ChrootDirectory {instance.chroot}\n",
            "AuthorizedKeysFile /etc/prep-agent/upload_authorized_keys\n": (
                f"AuthorizedKeysFile {instance.upload_keys}\n"
            ),
        },
        {
            "/etc/ssh/sshd_config.d/prep-agent-upload.conf": str(instance.sshd),
            "/etc/prep-agent/upload_authorized_keys": str(instance.upload_keys),
            "/var/lib/prep-upload": str(instance.chroot),
            "sysusers.d/prep-agent.conf": str(instance.sysusers),
            "prep-upload": instance.upload_user,
        },
    )
    return _header(instance, source) + text


def render_nginx(instance: Instance, settings: Settings, templates: Path) -> dict[Path, str]:
    """The packaged nginx site and server body for this instance: its root, agent
    address, server name, logs and snippet path, and its own nginx names (two sites
    in one nginx cannot share a zone, variable, upstream or log format name)."""
    paths = {
        "/var/lib/prep-agent": str(instance.root),
        "127.0.0.1:8080": settings.listen,
        "/etc/nginx/snippets/prep-agent-site.conf": str(instance.snippet),
        "/var/log/nginx/prep-agent.access.log": str(instance.access_log),
        "/var/log/nginx/prep-agent.error.log": str(instance.error_log),
    }
    server = {"server_name _;": f"server_name {settings.server_name};"}
    root = {"/var/lib/prep-agent": str(instance.root)}
    out = {}
    for target, template, required in (
        (instance.site, SITE_TEMPLATE, {**paths, **server}),
        (instance.snippet, SNIPPET_TEMPLATE, root),
    ):
        source = templates / template
        text = _substitute(source.read_text(encoding="utf-8"), source, required, paths)
        text, count = re.subn(r"\bprep_agent_(?=[a-z])", instance.nginx_prefix, text)
        if not count:
            raise Error(f"{source} names nothing prep_agent_*: reinstall prep-agent")
        out[target] = _header(instance, source) + text
    return out


def render_sysusers(instance: Instance) -> str:
    """sysusers.d: the upload account (the agent's user comes with the package)."""
    return (
        _header(instance, None)
        + f"# {instance.upload_user}: the institute's SFTP account (chrooted, upload-only).\n"
        + f'u {instance.upload_user} - "prep-agent SFTP upload account ({instance.name})"\n'
    )


def render_tmpfiles(instance: Instance) -> str:
    """tmpfiles.d: the instance's folders, owners and modes as the package's own
    (packaging/tmpfiles/prep-agent.conf explains each; the log folder is the package's)."""
    rows = (
        ("d", instance.root, "0751", "prep-agent", "prep-agent"),
        ("d", instance.chroot, "0755", "root", "root"),
        ("d", instance.inbox, "2750", instance.upload_user, "prep-agent"),
        ("f", instance.error_log, "0640", "root", "adm"),
    )
    lines = "".join(f"{t} {path} {mode} {user} {group} -\n" for t, path, mode, user, group in rows)
    return _header(instance, None) + lines


def render(instance: Instance, settings: Settings, templates: Path) -> dict[Path, str]:
    """Every text file ``init --instance`` writes, by path (the allowed_signers copy
    and the upload keys are not among them). Raises ``ConfigError`` for bad settings,
    ``Error`` if a template lacks a string it must replace."""
    parse_listen(settings.listen)
    if not SERVER_NAME.fullmatch(settings.server_name):
        raise ConfigError(f"--server-name {settings.server_name!r} is not a host name")
    return {
        instance.config: render_config(instance, settings),
        instance.sysusers: render_sysusers(instance),
        instance.tmpfiles: render_tmpfiles(instance),
        instance.sshd: render_sshd(instance, templates),
        **render_nginx(instance, settings, templates),
    }


def listen_addresses(folder: Path = ETC) -> dict[str, Path]:
    """The ``listen`` of every agent config in ``folder``, to the file naming it."""
    found = {}
    for path in sorted(folder.glob("*.conf")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(r"^listen\s*=\s*(\S+)\s*$", text, re.M):
            found[match.group(1)] = path
    return found


def free_listen(folder: Path = ETC) -> str:
    """The first ``127.0.0.1:PORT`` from ``FIRST_PORT`` that no config in ``folder`` uses."""
    taken = listen_addresses(folder)
    port = FIRST_PORT
    while f"127.0.0.1:{port}" in taken:
        port += 1
    return f"127.0.0.1:{port}"


UPLOAD_KEYS_HEADER = """\
# Keys that may log in as {user}, the SFTP account of the institute of the
# prep-agent instance {name} (root-owned; no reload needed after a change).
# One line per key, restricted to the institute's addresses, e.g.:
#   from="192.0.2.10",restrict ssh-ed25519 AAAA... instituto-prep
"""


def install(instance: Instance, files: dict[Path, str], trust: Path, force: bool) -> None:
    """Write ``files``, copy ``trust`` and create the upload keys file (kept if it
    exists), then create the account and folders with systemd-sysusers and
    systemd-tmpfiles. Raises ``ConfigError`` if the instance exists (unless
    ``force``) and ``Error`` if a tool is missing or fails."""
    if instance.config.exists() and not force:
        raise ConfigError(f"{instance.config} exists (use --force to write the instance again)")
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            raise Error(f"{tool} is missing (Debian package systemd)")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode("utf-8"), 0o644)
    instance.folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(instance.trust, trust.read_bytes(), 0o644)
    if not instance.upload_keys.exists():
        header = UPLOAD_KEYS_HEADER.format(user=instance.upload_user, name=instance.name)
        atomic_write(instance.upload_keys, header.encode("utf-8"), 0o644)
    for argv in (
        ["systemd-sysusers", str(instance.sysusers)],
        ["systemd-tmpfiles", "--create", str(instance.tmpfiles)],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Error(f"{' '.join(argv)} failed (exit {proc.returncode}): {last}")
