"""Shared fixtures; every test fails if it leaks a thread.

Tests marked ``core`` need nothing but Python and the runtime dependencies.
Every other test may need real tools: as soon as one of them is collected, the
run stops before any test runs (never a skip) if a required tool is missing.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import Institute

REQUIRED_TOOLS = ("ssh-keygen", "sftp", "rsync")
CORE = "core"


def _core_only(config: pytest.Config) -> bool:
    return str(config.getoption("markexpr", "")).strip() == CORE


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A ``-m core`` run imports only the test modules that have core tests:
    the others may import what a core-only environment lacks (selenium)."""
    if _core_only(config) and collection_path.suffix == ".py":
        name = collection_path.name
        if name.startswith("test_") and "mark.core" not in collection_path.read_text():
            return True
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse to run, naming the tools, when a collected non-core test may need one."""
    if all(item.get_closest_marker(CORE) for item in session.items):
        return
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
