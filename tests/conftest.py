"""Shared fixtures; every test fails if it leaks a thread."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest

from tests.kit import Institute

REQUIRED_TOOLS = ("ssh-keygen", "sftp", "rsync")


def pytest_configure(config: pytest.Config) -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(f"missing tools {missing}: run scripts/install-deps as root")


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"


@pytest.fixture(scope="session")
def institute(tmp_path_factory: pytest.TempPathFactory) -> Institute:
    return Institute(tmp_path_factory.mktemp("institute"))
