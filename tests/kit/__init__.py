"""The one shared test kit; tests, the other kits and the benchmarks import from here.

``cut``: the fake institute (cuts signed with the real ``ssh-keygen``), agent
configs, ``ssh_verify``. ``process``: real ``prep-agent`` processes
(``AgentDaemon``, ``Daemon``), ``status_json``, ``stop_process`` and the one
``wait_for``.
"""

from tests.kit.cut import (
    ELECTION,
    OFFSET,
    SHARED,
    Institute,
    csv_bytes,
    keygen,
    make_config,
    minute_ago,
    ssh_sign,
    ssh_verify,
    tree_digest,
)
from tests.kit.process import (
    PREP_AGENT,
    AgentDaemon,
    Daemon,
    answers,
    ctrl_c_reaches,
    free_port,
    status_json,
    stop_process,
    wait_for,
    wait_port,
)

__all__ = [
    "ELECTION",
    "OFFSET",
    "PREP_AGENT",
    "SHARED",
    "AgentDaemon",
    "Daemon",
    "Institute",
    "answers",
    "ctrl_c_reaches",
    "csv_bytes",
    "free_port",
    "keygen",
    "make_config",
    "minute_ago",
    "ssh_sign",
    "ssh_verify",
    "status_json",
    "stop_process",
    "tree_digest",
    "wait_for",
    "wait_port",
]
