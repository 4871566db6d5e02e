"""The package stays readable: no module of prep_agent over 600 lines (style guide)."""

from __future__ import annotations

from pathlib import Path

import pytest

import prep_agent

pytestmark = pytest.mark.core


MAX_LINES = 600
PACKAGE = Path(prep_agent.__file__).parent


def test_no_module_is_over_600_lines() -> None:
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 40, "the package was found"
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
