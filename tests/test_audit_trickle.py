"""``prep-agent audit`` on an answer that trickles past its deadline (issue 17).

A body without Content-Length that keeps coming, a byte at a time, never makes
one read wait as long as the timeout: only the audit's watchdog ends it, by
shutting the socket down at the deadline, and the read then sees an ordinary
end of body. What arrived until then is not the answer: the audit must report
a timeout (no answer), not an altered copy of the bytes that came.
"""

from __future__ import annotations

import json
import time

import pytest

from prep_agent.cli.main import main
from prep_agent.core.errors import EXIT_AUDIT_UNREACHABLE
from tests.auditkit import TRICKLE, Front
from tests.kit import Institute

pytestmark = pytest.mark.timeout(60)


def test_a_trickled_status_json_is_a_timeout(
    institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    with Front("http://127.0.0.1:9") as front:  # nothing behind it is ever asked
        front.spoiled["/status.json"] = TRICKLE
        trust = str(institute.allowed_signers)
        started = time.monotonic()
        code = main(["audit", front.url, "--trust", trust, "--timeout", "1", "--json"])
        took = time.monotonic() - started
    report = json.loads(capsys.readouterr().out)
    assert (code, report["verdict"]) == (EXIT_AUDIT_UNREACHABLE, "unreachable"), report
    assert [(f["path"], f["got"]) for f in report["findings"]] == [("status.json", "timeout")]
    assert took < 4, f"the audit took {took:.1f} s with --timeout 1"
