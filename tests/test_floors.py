"""The package's folders are floors and imports run one way (style guide: layout).

core < shared < agent < web < daemon < cli; the institute's side (institute/)
shares only core and shared with the difusor's; report/ may read the agent's
records. core is pure: no I/O, network, process or clock modules, and no clock
reads. Read from the source with ``ast``, imports inside functions included.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import prep_agent

pytestmark = pytest.mark.core


PACKAGE = Path(prep_agent.__file__).parent
ROOT = "root"
"""The package itself (``prep_agent/__init__.py``: the version only)."""
BELOW = {
    "core": set(),
    "shared": {"core"},
    "agent": {"core", "shared"},
    "web": {"core", "shared", "agent"},
    "daemon": {"core", "shared", "agent", "web"},
    "institute": {"core", "shared"},
    "report": {"core", "shared", "agent"},
    "rehearsal": {"core", "shared", "agent"},
    "cli": {"core", "shared", "agent", "web", "daemon", "institute", "report", "rehearsal"},
}
"""The floors each floor may import besides itself (and, above core, ``ROOT``)."""
CORE_FORBIDDEN = {
    "os",
    "socket",
    "subprocess",
    "time",
    "shutil",
    "tempfile",
    "requests",
    "psutil",
    "watchdog",
    "flask",
    "waitress",
}
"""Modules core must not import: I/O, network, processes, the clock, frameworks."""
CLOCK_CALLS = {"now", "utcnow", "today"}
"""Attribute calls that read the clock (``datetime.now()``, ``date.today()``)."""
TIME_CALLS = {"time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"}
"""Functions of ``time`` that read a clock."""


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is written."""

    module: str
    target: str
    line: int


def floor_of(module: str) -> str:
    """``prep_agent.web.health`` -> ``web``; ``prep_agent.daemon`` -> ``daemon``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imports_of(module: str, source: str) -> list[Import]:
    """Every module ``source`` imports (absolute names; relative ones resolved)."""
    found: list[Import] = []
    is_package = PACKAGE.parent.joinpath(*module.split(".")).is_dir()
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if is_package_module(full) else base
                found.append(Import(module, target, node.lineno))
    return found


def clock_reads(source: str) -> list[int]:
    """Lines of calls that read a clock: ``x.now()``, ``x.utcnow()``, ``time.time()``..."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        on_time = isinstance(func.value, ast.Name) and func.value.id == "time"
        if func.attr in CLOCK_CALLS or (on_time and func.attr in TIME_CALLS):
            lines.append(node.lineno)
    return lines


def floor_violations(imports: list[Import]) -> list[str]:
    """The imports of prep_agent that go sideways or up a floor."""
    bad = []
    for imp in imports:
        if imp.target != "prep_agent" and not imp.target.startswith("prep_agent."):
            continue
        here, there = floor_of(imp.module), floor_of(imp.target)
        allowed = {here} | BELOW[here] | (set() if here == "core" else {ROOT})
        if there not in allowed:
            bad.append(f"{imp.module}:{imp.line} ({here}) imports {imp.target} ({there})")
    return bad


def core_violations(module: str, source: str) -> list[str]:
    """Forbidden module imports and clock reads of one core module."""
    bad = [
        f"{module}:{imp.line} imports {imp.target}"
        for imp in imports_of(module, source)
        if imp.target.split(".")[0] in CORE_FORBIDDEN
    ]
    bad += [f"{module}:{line} reads the clock" for line in clock_reads(source)]
    return bad


def modules() -> dict[str, str]:
    return {
        module_name(path): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


ALL = modules()


def test_every_module_is_on_a_known_floor() -> None:
    unknown = sorted(m for m in ALL if floor_of(m) not in BELOW and floor_of(m) != ROOT)
    assert not unknown, f"modules outside the floors {sorted(BELOW)}: {unknown}"
    assert len(ALL) > 40  # the walk really found the package


def test_imports_run_one_way() -> None:
    imports = [imp for module, source in ALL.items() for imp in imports_of(module, source)]
    assert not floor_violations(imports), "\n".join(floor_violations(imports))


def test_institute_uses_only_core_and_shared() -> None:
    targets = {
        floor_of(imp.target)
        for module, source in ALL.items()
        if floor_of(module) == "institute"
        for imp in imports_of(module, source)
        if imp.target.startswith("prep_agent.")
    }
    assert targets <= {"core", "shared", "institute"}, targets
    assert {"core", "shared"} <= targets  # the scan saw the institute's real imports


def test_root_package_imports_nothing_of_its_own() -> None:
    assert not [i for i in imports_of("prep_agent", ALL["prep_agent"]) if "prep_agent" in i.target]


@pytest.mark.parametrize("module", sorted(m for m in ALL if floor_of(m) == "core"))
def test_core_is_pure(module: str) -> None:
    assert not core_violations(module, ALL[module])


# The checks themselves must be able to fail.


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("prep_agent.core.x", "from prep_agent.web.frame import f", ["web"]),
        ("prep_agent.core.x", "from prep_agent import __version__", ["root"]),
        ("prep_agent.core.x", "from . import manifest", []),
        ("prep_agent.institute.collector.app", "from prep_agent.agent.config import C", ["agent"]),
        ("prep_agent.institute.sign", "from ..web import server", ["web"]),
        ("prep_agent.institute.sign", "from prep_agent.shared.ini import read_ini", []),
        ("prep_agent.agent.store", "import prep_agent.web.frame", ["web"]),
        ("prep_agent.web.health", "from prep_agent import daemon", ["daemon"]),
        ("prep_agent.web.health", "from prep_agent import __version__", []),
        ("prep_agent.shared.x", "def f():\n    from prep_agent.agent import store\n", ["agent"]),
        ("prep_agent.report.generate", "from prep_agent.agent.journal import j", []),
        ("prep_agent.report.generate", "from prep_agent.web import health", ["web"]),
        ("prep_agent.daemon", "from prep_agent.cli import main", ["cli"]),
        ("prep_agent.cli.main", "from prep_agent.institute import sign", []),
    ],
)
def test_floor_check_catches(module: str, source: str, expected: list[str]) -> None:
    found = floor_violations(imports_of(module, source))
    assert [v.rsplit("(", 1)[1].rstrip(")") for v in found] == expected, found


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import os", True),
        ("import os.path", True),
        ("from time import monotonic", True),
        ("from psutil import cpu_percent", True),
        ("from datetime import datetime\nx = datetime.now(timezone.utc)", True),
        ("import datetime\nx = datetime.datetime.utcnow()", True),
        ("x = date.today()", True),
        ("def f():\n    return time.time()", True),
        ("from datetime import datetime\nx = datetime.fromisoformat(t)", False),
        ("x = when.time()", False),
        ("import hashlib, io, re", False),
    ],
)
def test_core_check_catches(source: str, caught: bool) -> None:
    assert bool(core_violations("prep_agent.core.x", source)) is caught
