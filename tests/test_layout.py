"""The agent root's layout: named once, in ``agent/layout.py``, and used everywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import prep_agent
from prep_agent.agent.layout import Layout
from tests.kit import Institute, make_config

PACKAGE = Path(prep_agent.__file__).resolve().parent
PATHS = {
    "releases": "releases",
    "current": "current",
    "staging": "staging",
    "quarantine": "quarantine",
    "public": "public",
    "nginx": "nginx",
    "state_file": "state.json",
    "journal_file": "journal.jsonl",
    "lock_file": "lock",
    "publish_lock_file": "publish.lock",
}
"""Layout property -> name under the root, as operators, packaging and nginx know them."""
OTHER_MEANINGS = {
    ("core/freshness.py", "current"): 1,  # the freshness state, not the symlink
    ("cli/difusor.py", "releases"): 2,  # a key of `status --json`, written and skipped
    ("rehearsal/browser.py", "current"): 1,  # the frame's freshness state
}
"""How many string constants equal to a layout name a module holds that do not name a path."""


def test_layout_names_the_documented_paths(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    for prop, name in PATHS.items():
        assert getattr(layout, prop) == tmp_path / name, prop
    assert layout.current_target("0000000000000001-ab") == "releases/0000000000000001-ab"
    assert layout.current_temp(42) == tmp_path / ".current.42"


def test_create_makes_the_agent_folders(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    layout.create()
    layout.create()  # idempotent
    made = sorted(p.name for p in layout.root.iterdir())
    assert made == ["quarantine", "releases", "staging"]
    (layout.root / ".current.7").symlink_to("releases/x")
    assert layout.current_temps() == [layout.root / ".current.7"]


def test_config_paths_are_the_layout(tmp_path: Path, institute: Institute) -> None:
    config = make_config(tmp_path, institute)
    assert config.layout == Layout(config.root)
    for prop in PATHS:
        if hasattr(config, prop):
            assert getattr(config, prop) == getattr(config.layout, prop), prop


def test_only_the_layout_spells_the_names() -> None:
    """A second spelling (``root / "releases"``) anywhere in the package is a bug:
    it silently diverges the day the layout changes."""
    names = set(PATHS.values())
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "agent/layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.setdefault((rel, node.value), []).append(node.lineno)
    extra = {k: v for k, v in found.items() if len(v) > OTHER_MEANINGS.get(k, 0)}
    assert not extra, extra
