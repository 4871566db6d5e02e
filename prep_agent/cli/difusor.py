"""The difusor's commands: init, run, verify, status, rollback, reset-sequence, keygen."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

from prep_agent.agent.config import Config, load, render_template
from prep_agent.agent.floor import JournalFloor, checked_state, release_sequence
from prep_agent.agent.intake import read_delivery
from prep_agent.agent.journal import Journal
from prep_agent.agent.layout import Layout
from prep_agent.agent.lock import LockFile
from prep_agent.agent.package_verify import verify_release
from prep_agent.agent.state import State, load_state, save_state
from prep_agent.agent.store import Store
from prep_agent.cli.options import AddCommand, add_config, load_config, operator, positive_int
from prep_agent.core.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REJECTED,
    ConfigError,
    Error,
    Rejection,
)
from prep_agent.core.freshness import freshness, stale_at
from prep_agent.core.verify import decide
from prep_agent.daemon import Agent, load_policy, published_view, serving
from prep_agent.shared.clock import utc_now
from prep_agent.web.frame import release_source, write_public

DEFAULT_LISTEN = "127.0.0.1:8080"
"""The agent's address when ``init`` is not told one (the packaged nginx site's upstream)."""


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented config file and create the folder layout; with
    ``--instance``, write a whole agent instance of this host (``init_instance``)."""
    if args.instance is not None:
        return init_instance(args)
    if args.root is None:
        raise ConfigError("--root is required (or --instance NAME)")
    if args.server_name is not None:
        raise ConfigError("--server-name goes with --instance")
    if args.ca_file is not None and args.source_url is None:
        raise ConfigError("--ca-file goes with --source-url")
    root = Path(args.root).resolve()
    inbox = Path(args.inbox).resolve() if args.inbox else root / "inbox"
    trust = Path(args.trust).resolve()
    config_path = Path(args.config) if args.config else root / "prep-agent.conf"
    if not trust.is_file():
        raise ConfigError(f"allowed_signers file {trust} does not exist")
    if config_path.exists() and not args.force:
        raise ConfigError(f"{config_path} exists (use --force to overwrite)")
    text = render_template(
        election=args.election,
        root=root,
        inbox=inbox,
        trust=trust,
        threshold=args.threshold,
        listen=args.listen or DEFAULT_LISTEN,
        service_id=args.service_id or "difusor",
        **_source_values(args),
    )
    Layout(root).create()
    inbox.mkdir(parents=True, exist_ok=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text, encoding="utf-8")
    config = load(config_path)
    load_policy(config)
    if config.source.type == "https-package":
        print(f"wrote {config_path}; source {config.source.url}")
    else:
        print(f"wrote {config_path}; drop folder {inbox}")
    return EXIT_OK


def _source_values(args: argparse.Namespace) -> dict[str, str]:
    """``[source]`` of ``init``'s config: https-package with ``--source-url``."""
    if args.source_url is None:
        return {}
    ca_file = str(Path(args.ca_file).resolve()) if args.ca_file else ""
    return {"source_type": "https-package", "source_url": args.source_url, "ca_file": ca_file}


def init_instance(args: argparse.Namespace) -> int:
    """``init --instance NAME``: the config, folders, upload account, sshd snippet and
    nginx site of ``prep-agent@NAME`` (``agent/instance.py``). Run as root.

    Raises ConfigError for bad or conflicting options, Error if writing fails.
    """
    from prep_agent.agent import instance as instances

    given = [f"--{k}" for k in ("root", "inbox", "config") if getattr(args, k) is not None]
    if given:
        raise ConfigError(f"--instance names its own paths: drop {', '.join(given)}")
    if args.source_url is not None or args.ca_file is not None:
        raise ConfigError("--source-url and --ca-file go without --instance (edit its [source])")
    if not args.server_name:
        raise ConfigError("--instance needs --server-name (the public host name of its site)")
    instance = instances.Instance(args.instance)
    trust = Path(args.trust).resolve()
    if not trust.is_file():
        raise ConfigError(f"allowed_signers file {trust} does not exist")
    if os.geteuid() != 0:
        raise ConfigError("init --instance writes /etc and creates a system account: run as root")
    taken = instances.listen_addresses()
    mine = [address for address, path in taken.items() if path == instance.config]
    listen = args.listen or (mine[0] if mine else instances.free_listen())
    owner = taken.get(listen)
    if owner is not None and owner != instance.config:
        raise ConfigError(f"{listen} is the listen address of {owner}: choose another --listen")
    settings = instances.Settings(
        election=args.election,
        threshold=args.threshold,
        listen=listen,
        server_name=args.server_name,
        service_id=args.service_id or instance.name,
    )
    # The institute's keys are checked before anything is written.
    checked = Config(
        root=instance.root,
        inbox=instance.inbox,
        election=args.election,
        trust=trust,
        threshold=args.threshold,
    )
    load_policy(checked)
    files = instances.render(instance, settings, instances.find_templates())
    instances.install(instance, files, trust, args.force)
    load(instance.config)
    i = instance
    print(f"wrote {i.config} and the files of {i.unit} (sshd, nginx, sysusers.d, tmpfiles.d)")
    print(
        f"instance {i.name}: root {i.root}, drop folder {i.inbox} (upload account "
        f"{i.upload_user}, session starts in /inbox), agent on {listen}, site {args.server_name}"
    )
    print(
        f"next: the institute's key in {i.upload_keys}, then `sshd -t && systemctl reload ssh`; "
        f"`systemctl enable --now {i.unit}`; `ln -s {i.site} /etc/nginx/sites-enabled/ "
        "&& nginx -t && systemctl reload nginx`"
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon: watch the drop folder (or poll the package URL) and publish cuts
    until stopped."""
    config = load_config(args)
    if args.once:
        config.root.mkdir(parents=True, exist_ok=True)
        with LockFile(config.layout.lock_file):
            outcome = Agent(config).run(once=True)
        _print_outcome(outcome.status, outcome.sequence, outcome.rejection)
        if outcome.status == "source-error":
            return EXIT_ERROR  # the package could not be fetched: nothing was decided
        return EXIT_REJECTED if outcome.status == "rejected" else EXIT_OK
    with serving(config) as (agent, server):

        def _stop(signum: int, frame: FrameType | None) -> None:
            agent.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        agent.run()
    return EXIT_OK


def _print_outcome(status: str, sequence: int | None, rejection: Rejection | None) -> None:
    if rejection is not None:
        print(f"{status}: {rejection.reason}: {rejection.detail}")
    elif sequence is not None:
        print(f"{status}: sequence {sequence}")
    else:
        print(status)


def cmd_verify(args: argparse.Namespace) -> int:
    """Decide a cut in DIR (default: the drop folder) without publishing it; with
    ``[source] type = https-package`` and no DIR, check the published package again."""
    config = load_config(args)
    if config.source.type == "https-package" and not args.dir:
        return _verify_package(config)
    folder = Path(args.dir).resolve() if args.dir else config.inbox
    policy = load_policy(config)
    store = Store(config.layout, config.limits)
    try:
        data, sig = read_delivery(folder, config.limits).contents()
        journal = JournalFloor(config.layout.journal_file)
        state, _raised = checked_state(config.layout.state_file, store, journal)
        published = published_view(store, state)
        decision = decide(data, sig, policy, published, utc_now())
        if not decision.already_published:
            store.check(
                decision.manifest, folder, config.stamp_check, lambda w: print(f"warning: {w}")
            )
    except Rejection as exc:
        print(f"rejected: {exc.reason}: {exc.detail}")
        return EXIT_REJECTED
    m = decision.manifest
    verdict = "already published" if decision.already_published else "accepted"
    print(
        f"{verdict}: sequence {m.sequence}, cut_time {m.cut_time_text}, {len(m.files)} files, "
        f"signed by {', '.join(decision.signers)}"
    )
    return EXIT_OK


def _verify_package(config: Config) -> int:
    """``verify`` of an https-package root: the current release checked again."""
    current = Store(config.layout, config.limits).current()
    if current is None:
        raise Error("no package is published yet: nothing to verify")
    try:
        found = verify_release(current, load_policy(config).signers, config.threshold)
    except Rejection as exc:
        print(f"rejected: {exc.reason}: {exc.detail}")
        return EXIT_REJECTED
    print(
        f"verified: sequence {found.sequence}, package {found.name} (sha256 {found.sha256}), "
        f"{found.files} files, {found.signature_text()}"
    )
    return EXIT_OK


def status_report(config: Config) -> dict[str, Any]:
    """What ``status --json`` prints: derived from ``current`` and the state."""
    store = Store(config.layout, config.limits)
    state = load_state(config.layout.state_file)
    current = store.current()
    manifest = current.manifest if current else None
    now = utc_now()
    return {
        "election": config.election,
        "sequence": manifest.sequence if manifest else None,
        "cut_time": manifest.cut_time_text if manifest else None,
        "manifest_sha256": current.manifest_sha256 if current else None,
        "current_path": str(current.path) if current else None,
        "final": manifest.final if manifest else None,
        "state": freshness(manifest, now, config.stale_periods),
        "stale_at": stale_at(manifest, config.stale_periods).isoformat() if manifest else None,
        "highest_sequence": state.highest_sequence,
        "last_rejection": asdict(state.last_rejection) if state.last_rejection else None,
        "releases": store.release_names(),
        "source": release_source(current) if current else None,
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Print what is published, its freshness and the last rejection."""
    doc = status_report(load_config(args))
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return EXIT_OK
    for key, value in doc.items():
        if key != "releases":
            print(f"{key}: {value if value is not None else '-'}")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    """Point ``current`` at an older retained release (logged operator action)."""
    config = load_config(args)
    store = Store(config.layout, config.limits)
    with LockFile(config.layout.publish_lock_file, blocking=True):
        names = store.release_names()
        current = store.current_name()
        if args.to is not None:
            matches = [n for n in names if release_sequence(n) == args.to]
        else:
            matches = [n for n in names if current is not None and n < current][-1:]
        if not matches:
            raise Error(
                "no retained release to roll back to"
                if args.to is None
                else f"no retained release with sequence {args.to}"
            )
        target = matches[-1]
        store.swap(target)
        write_public(config, store.load_release(target), utc_now())
        Journal(config.layout.journal_file).write(
            "operator-rollback", release_from=current, release_to=target, user=operator()
        )
    print(f"current -> releases/{target}")
    return EXIT_OK


def cmd_reset_sequence(args: argparse.Namespace) -> int:
    """Lower (or set) the highest accepted sequence (logged operator action).

    Also re-creates a missing or unreadable state file (the agent refuses to
    start without it once releases exist).
    """
    config = load_config(args)
    store = Store(config.layout, config.limits)
    layout = config.layout
    with LockFile(layout.publish_lock_file, blocking=True):
        current = store.current()
        if current is not None and args.to < current.manifest.sequence:
            raise Error(
                f"sequence {args.to} is below the published {current.manifest.sequence}; "
                "roll back first"
            )
        try:
            state, lost = load_state(layout.state_file, missing_ok=False), None
        except Error as exc:
            state, lost = State(), str(exc)
        digest = _digest_of(store, args.to, JournalFloor(layout.journal_file).read().set_aside)
        try:
            Journal(layout.journal_file).write(
                "operator-reset-sequence",
                strict=True,
                sequence_from=state.highest_sequence,
                sequence_to=args.to,
                manifest_sha256=digest,
                user=operator(),
                **({"state_lost": lost} if lost else {}),
            )
            save_state(
                layout.state_file,
                replace(
                    state,
                    highest_sequence=args.to,
                    highest_manifest_sha256=digest,
                    last_decided_signature=None,
                ),
            )
        except OSError as exc:
            raise Error(f"sequence not reset: {exc.filename}: {exc.strerror}") from None
    print(f"highest accepted sequence: {state.highest_sequence} -> {args.to}")
    return EXIT_OK


def _digest_of(store: Store, sequence: int, set_aside: frozenset[str]) -> str | None:
    """The manifest SHA-256 that goes with ``sequence`` as the new floor: the current
    release's, else that of the one retained release with that sequence (a cut sent
    again with the same bytes is then a replay, with others an equivocation)."""
    current = store.current()
    if current is not None and current.manifest.sequence == sequence:
        return current.manifest_sha256
    names = [n for n in store.release_names() if release_sequence(n) == sequence]
    names = [n for n in names if n not in set_aside] or names
    return store.load_release(names[0]).manifest_sha256 if len(names) == 1 else None


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create the difusor's report key and print the institute's allowed_signers line."""
    from prep_agent.agent import keygen

    if args.config:
        config = load_config(args)
        if config.push_key is None:
            raise ConfigError("[push] key is not set in the config: give its path there first")
        key, service_id = config.push_key, config.service_id
    elif args.key and args.service_id:
        key, service_id = Path(args.key).resolve(), args.service_id
    else:
        raise ConfigError("give --config FILE, or --key FILE and --service-id ID")
    line = keygen.create_key(key, service_id, force=args.force)
    print(f"# wrote {key} (private, 0600) and {key}.pub", file=sys.stderr)
    print("# send this line to the institute for its collector's allowed_signers:", file=sys.stderr)
    print(line)
    return EXIT_OK


def add_commands(add: AddCommand) -> None:
    """Register these commands with the parser's ``add`` function."""
    p = add("init", cmd_init, "write a commented config file and the folder layout")
    p.add_argument("--root", metavar="DIR", help="agent-owned storage folder")
    p.add_argument("--inbox", metavar="DIR", help="drop folder (default ROOT/inbox)")
    p.add_argument(
        "--election", required=True, metavar="ID", help="election id, e.g. coah-ayun-2021"
    )
    p.add_argument(
        "--trust",
        required=True,
        metavar="ALLOWED_SIGNERS",
        help="OpenSSH allowed_signers file with the institute's keys",
    )
    p.add_argument(
        "--threshold",
        type=positive_int,
        default=1,
        metavar="N",
        help="distinct trusted keys required (default 1)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"web server address (default {DEFAULT_LISTEN}; with --instance the first "
        "127.0.0.1 port from 8081 no other config in /etc/prep-agent uses)",
    )
    p.add_argument("--config", metavar="FILE", help="config path (default ROOT/prep-agent.conf)")
    p.add_argument(
        "--service-id", metavar="ID", help="serviceId in health reports (default difusor, or NAME)"
    )
    p.add_argument(
        "--instance",
        metavar="NAME",
        help="as root: one of several agents on this host (prep-agent@NAME.service): writes "
        "/etc/prep-agent/NAME.conf, its root, drop folder, upload account, sshd and nginx files",
    )
    p.add_argument(
        "--server-name",
        metavar="HOST",
        help="with --instance: the public host name of the instance's nginx site",
    )
    p.add_argument(
        "--source-url",
        metavar="URL",
        help="take cuts from the institute's PREP package over HTTPS instead of the drop "
        "folder: the URL of the newest package, or of a folder (ending in /) whose index "
        "names them ([source] type = https-package)",
    )
    p.add_argument(
        "--ca-file",
        metavar="FILE",
        help="with --source-url: PEM bundle trusted instead of the system's CAs",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")

    p = add("run", cmd_run, "watch the drop folder and publish cuts (the daemon)")
    add_config(p)
    p.add_argument(
        "--once",
        action="store_true",
        help="process the drop folder as it is now, without waiting to settle, and exit",
    )

    p = add(
        "verify",
        cmd_verify,
        "decide a cut without publishing it (exit 0 only if accepted); https-package: "
        "check the published package again",
    )
    add_config(p)
    p.add_argument("dir", nargs="?", metavar="DIR", help="folder holding the cut (default: inbox)")

    p = add("status", cmd_status, "show the published cut, its freshness and the last rejection")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("rollback", cmd_rollback, "publish an older retained release again (logged)")
    add_config(p)
    p.add_argument(
        "--to",
        type=positive_int,
        metavar="SEQUENCE",
        help="sequence to roll back to (default: the release before current)",
    )

    p = add(
        "reset-sequence",
        cmd_reset_sequence,
        "set the highest accepted sequence, e.g. after a leaked key (logged)",
    )
    add_config(p)
    p.add_argument("--to", type=int, required=True, metavar="N", help="new highest sequence")

    p = add("keygen", cmd_keygen, "create the difusor's health report key (ed25519)")
    p.add_argument("--config", metavar="FILE", help="agent config: uses [push] key and service_id")
    p.add_argument("--key", metavar="FILE", help="private key file to create (without --config)")
    p.add_argument("--service-id", metavar="ID", help="the difusor's serviceId (without --config)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
