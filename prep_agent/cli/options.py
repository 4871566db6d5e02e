"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Protocol

from prep_agent.agent.config import Config, load

DEFAULT_CONFIG = Path("/etc/prep-agent/prep-agent.conf")
"""The packaged agent config: used when neither ``--config`` nor ``PREP_AGENT_CONFIG`` is given."""

CONFIG_ENV = "PREP_AGENT_CONFIG"
"""Environment variable naming the agent config (overridden by ``--config``)."""


def add_config(p: argparse.ArgumentParser) -> None:
    """The ``--config FILE`` option of the agent's commands (default: packaged path)."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"agent config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )


def config_path(args: argparse.Namespace) -> Path:
    """The agent config path: ``--config``, else ``$PREP_AGENT_CONFIG``, else the packaged one."""
    if args.config:
        return Path(args.config)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(args: argparse.Namespace) -> Config:
    """Load the agent config the command line names. Raises ``ConfigError``."""
    return load(config_path(args))


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def operator() -> str:
    """Who runs an operator action, for the journal."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())


class AddCommand(Protocol):
    """The parser's ``add(name, func, help)``: registers one subcommand."""

    def __call__(
        self, name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser: ...
