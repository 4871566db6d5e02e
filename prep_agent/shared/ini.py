"""INI config files, as both the agent and the collector write theirs."""

from __future__ import annotations

import configparser
from pathlib import Path

from prep_agent.core.errors import ConfigError


def read_ini(path: Path, section: str) -> configparser.ConfigParser:
    """Parse an INI config file that must have ``[section]``. Raises ``ConfigError``."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"config {path}: {exc.message.splitlines()[0]}") from None
    if not parser.has_section(section):
        raise ConfigError(f"config {path}: no [{section}] section")
    return parser
