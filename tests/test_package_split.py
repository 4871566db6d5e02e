"""Two packages, .deb and .rpm alike: prep-agent and prep-agent-report.

prep-agent is the agent (daemon, commands, embedded server, the institute's
tools, the system files) and depends on its runtime dependencies only;
prep-agent-report is the memoria técnica (``prep_agent/report``) and depends
on the agent of the same build. Together they hold every module of this tree.
``tests/test_fresh_system.py`` installs them on a fresh Debian.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.packagingkit import ROOT, build, check, require_tools, version

# packaging: built with Debian's tools and inspected as files; no venv release is involved.
pytestmark = [pytest.mark.timeout(600), pytest.mark.packaging]

RUNTIME = {
    "python3-cryptography",
    "python3-flask",
    "python3-psutil",
    "python3-requests",
    "python3-waitress",
    "python3-watchdog",
}
"""The agent's Debian dependencies besides python3 and adduser (its users, without systemd)."""
PYDIST = {"cryptography", "flask", "psutil", "requests", "waitress", "watchdog"}
"""The same, as the RPM's python3dist() requirements."""
SOURCES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "prep_agent").rglob("*")
    if p.is_file()
    if "__pycache__" not in p.parts
)
"""Every file of the Python package in this tree."""


def by_name(paths: list[Path], names: dict[str, str]) -> dict[str, Path]:
    """Artifacts by kind: the first kind whose name prefix the file has."""
    found = {}
    for path in paths:
        kind = next(k for k, prefix in names.items() if path.name.startswith(prefix))
        found[kind] = path
    assert len(found) == len(paths), paths
    return found


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    require_tools()
    paths, _ = build("deb")
    found = by_name(paths, {"report": "prep-agent-report_", "agent": "prep-agent_"})
    assert found["agent"].name == f"prep-agent_{version()}-1_all.deb"
    assert found["report"].name == f"prep-agent-report_{version()}-1_all.deb"
    return found


@pytest.fixture(scope="module")
def rpms() -> dict[str, Path]:
    require_tools()
    paths, _ = build("rpm")
    found = by_name(
        paths, {"report": "prep-agent-report-", "src": f"prep-agent-{version()}-1.src", "agent": ""}
    )
    assert found["agent"].name == f"prep-agent-{version()}-1.noarch.rpm"
    return found


def package_names(field: str) -> list[list[str]]:
    """A Depends-style field as alternatives of package names (versions dropped)."""
    return [
        [re.sub(r"\s*\(.*\)", "", alt).strip() for alt in item.split("|")]
        for item in field.split(",")
        if item.strip()
    ]


def deb_files(deb: Path) -> list[str]:
    return [ln.split(maxsplit=5)[5] for ln in check(["dpkg-deb", "-c", str(deb)]).splitlines()]


def python_files(listing: list[str], marker: str) -> list[str]:
    """``prep_agent/...`` paths of a package listing (``marker`` ends the site folder)."""
    return sorted(
        "prep_agent/" + f.split(marker, 1)[1]
        for f in listing
        if marker in f and not f.endswith("/") and "__pycache__" not in f
    )


def test_deb_agent_depends_on_its_runtime_only(debs: dict[str, Path]) -> None:
    depends = package_names(check(["dpkg-deb", "-f", str(debs["agent"]), "Depends"]))
    python = {alt for item in depends for alt in item if alt.startswith("python3-")}
    assert python == RUNTIME
    others = sorted(item[0] for item in depends if not item[0].startswith("python3-"))
    assert others == ["adduser", "python3:any"], depends
    fields = check(["dpkg-deb", "-f", str(debs["agent"]), "Recommends", "Suggests"])
    assert "Recommends: nginx | httpd, openssh-server" in fields
    assert "prep-agent-report" in fields.split("Suggests:", 1)[1]


def test_deb_report_is_its_own_package(debs: dict[str, Path]) -> None:
    depends = check(["dpkg-deb", "-f", str(debs["report"]), "Depends"]).strip()
    assert depends == f"prep-agent (= {version()}-1), python3:any (>= 3.9~)"
    assert "chromium" in check(["dpkg-deb", "-f", str(debs["report"]), "Suggests"])
    marker = "/dist-packages/prep_agent/"
    agent, report = deb_files(debs["agent"]), deb_files(debs["report"])
    agent_py, report_py = python_files(agent, marker), python_files(report, marker)
    assert report_py and all(p.startswith("prep_agent/report/") for p in report_py)
    assert not any(p.startswith("prep_agent/report/") for p in agent_py)
    assert sorted(agent_py + report_py) == SOURCES
    for path in (
        "./lib/systemd/system/prep-agent.service",
        "./lib/systemd/system/prep-agent@.service",
        "./usr/share/prep-agent/templates/ssh/prep-agent-upload.conf",
        "./usr/share/prep-agent/templates/nginx/prep-agent.conf",
        "./usr/share/prep-agent/templates/nginx/prep-agent-site.conf",
        "./usr/share/prep-agent/examples/ha/README.md",
        "./usr/share/prep-agent/examples/ha/haproxy.cfg",
        "./usr/share/prep-agent/examples/ha/keepalived.conf",
        "./usr/share/prep-agent/examples/ha/default.vcl",
        "./usr/bin/prep-agent",
    ):
        assert path in agent, path
    assert not [f for f in report if f.startswith(("./etc/", "./lib/", "./usr/bin/"))]


def test_rpm_report_is_its_own_package(rpms: dict[str, Path]) -> None:
    requires = check(["rpm", "-qp", "-R", str(rpms["agent"])])
    assert set(re.findall(r"python3dist\((\w+)\)", requires)) == PYDIST
    report_requires = check(["rpm", "-qp", "-R", str(rpms["report"])])
    assert f"prep-agent = {version()}-1" in report_requires.splitlines()
    assert "python3dist" not in report_requires
    marker = "/site-packages/prep_agent/"
    agent = check(["rpm", "-qlp", str(rpms["agent"])]).split()
    report = check(["rpm", "-qlp", str(rpms["report"])]).split()
    # rpm lists folders too: compare with this tree's files.
    report_py = {p for p in python_files(report, marker) if p in SOURCES}
    assert report_py == {p for p in SOURCES if p.startswith("prep_agent/report/")}
    assert all(p.startswith("prep_agent/report") for p in python_files(report, marker))
    assert not [p for p in python_files(agent, marker) if p.startswith("prep_agent/report")]
    assert {p for p in python_files(agent, marker) if p in SOURCES} == set(SOURCES) - report_py
    assert "/usr/lib/systemd/system/prep-agent@.service" in agent
    assert "/usr/share/prep-agent/templates/nginx/prep-agent.conf" in agent
    for name in ("README.md", "haproxy.cfg", "keepalived.conf", "default.vcl"):
        assert f"/usr/share/prep-agent/examples/ha/{name}" in agent, name
    suggests = check(["rpm", "-qp", "--suggests", str(rpms["agent"])])
    assert "prep-agent-report" in suggests
