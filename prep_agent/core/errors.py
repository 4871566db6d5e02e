"""The one base error of prep-agent, its subclasses and the exit codes.

Every expected failure is an ``Error``: its message is one line meant for the
operator, and it carries the process exit code the command line returns.
"""

from __future__ import annotations

EXIT_OK = 0
"""Success."""
EXIT_ERROR = 2
"""Usage, configuration or environment error."""
EXIT_REJECTED = 3
"""``verify``: the cut would be rejected."""
EXIT_LOCKED = 4
"""Another agent already holds the lock on this root."""
EXIT_UNDELIVERED = 5
"""``distribute``: some enabled difusor does not hold the cut."""
EXIT_AUDIT_ALTERED = 6
"""``audit``: the difusor serves something other than the institute's signed cut."""
EXIT_AUDIT_STALE = 7
"""``audit``: an intact copy of a cut older than ``--expect-sequence``."""
EXIT_AUDIT_UNREACHABLE = 8
"""``audit``: nothing differs, but some answer did not come (timeout, connection, 5xx)."""
EXIT_INTERNAL = 70
"""Unexpected failure (a bug); the traceback is in the log."""


class Error(Exception):
    """Base class of every expected prep-agent failure."""

    exit_code = EXIT_ERROR


class ConfigError(Error):
    """The configuration file or a command-line value is invalid."""


class LockError(Error):
    """Another prep-agent instance holds the lock."""

    exit_code = EXIT_LOCKED


class SignatureFormatError(Error):
    """An SSHSIG block, public key or allowed_signers line does not parse."""


class Rejection(Error):
    """A cut is not accepted; ``reason`` is its stable reason class.

    ``transient`` rejections may be caused by an upload still in progress
    (prep-cut-v1 §1.3): the agent retries them until ``settle_timeout``.
    """

    exit_code = EXIT_REJECTED

    def __init__(self, reason: str, detail: str, transient: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient


# Reason classes, as written to the journal, the state and health.
SIGNATURE_MALFORMED = "signature-malformed"
"""A block of the .sig file does not parse as SSHSIG v1, or the file holds none."""
SIGNATURE_UNTRUSTED = "signature-untrusted"
"""Fewer than ``threshold`` distinct trusted keys validly signed."""
MANIFEST_INVALID = "manifest-invalid"
"""The manifest breaks a rule of spec §2."""
PATH_INVALID = "path-invalid"
"""A manifest path breaks the path rules of spec §2."""
WRONG_ELECTION = "wrong-election"
"""``election`` differs from the configured one (§4.2)."""
ROLLBACK = "rollback"
"""``sequence`` below the highest accepted (§4.3)."""
EQUIVOCATION = "equivocation"
"""Same ``sequence`` as the highest accepted, different bytes (§4.3)."""
TIME_INVALID = "time-invalid"
"""A §4.4 timestamp rule fails."""
INCOMPLETE = "incomplete"
"""A listed file, the manifest or its signature is absent from the drop folder (§1.3, §4.5)."""
FILE_MISMATCH = "file-mismatch"
"""A listed file has another size or SHA-256 (§4.5)."""
FILE_TYPE = "file-type"
"""A listed file is not a regular file (symlink, FIFO, device, directory)."""
LIMIT_EXCEEDED = "limit-exceeded"
"""A §4.6 limit (files, bytes) is exceeded."""
STAMP_MISMATCH = "stamp-mismatch"
"""A CSV or zip cut stamp disagrees with ``cut_time`` (§4.7)."""
ZIP_INVALID = "zip-invalid"
"""A listed zip cannot be read within the bounds (corrupt or a zip bomb)."""
PACKAGE_INVALID = "package-invalid"
"""A downloaded PREP package holds no results CSV with a cut stamp (issue 15)."""
PACKAGE_UNSIGNED = "package-unsigned"
"""A package source that requires a signature serves a package without one."""
