"""The OpenSSH ``allowed_signers`` file (ssh-keygen(1), ALLOWED SIGNERS).

Pure: text in, trust lines out, the clock passed in as ``now``. Principals and
``namespaces=`` are OpenSSH pattern-lists; ``valid-after=``/``valid-before=``
bound a line's validity window. Options, quoting and dates (``20230231``) are
parsed strictly; ``cert-authority`` lines are skipped (prep-cut-v1 §3:
certificates are not trusted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import NamedTuple

from prep_agent.core.errors import SignatureFormatError
from prep_agent.core.sshkeys import PublicKey, is_key_type, parse_public_key, split_fields


@dataclass(frozen=True)
class AllowedSigner:
    """One usable line of an ``allowed_signers`` file."""

    principals: tuple[str, ...]
    key: PublicKey
    namespaces: tuple[str, ...] | None
    valid_after: datetime | None
    valid_before: datetime | None

    def matches_principal(self, principal: str) -> bool:
        """Tell whether ``principal`` matches the principals pattern-list."""
        return _match_pattern_list(principal, self.principals)

    def allows_namespace(self, namespace: str) -> bool:
        """Tell whether the ``namespaces=`` option (if any) admits ``namespace``."""
        return self.namespaces is None or _match_pattern_list(namespace, self.namespaces)

    def valid_at(self, now: datetime) -> bool:
        """Tell whether ``now`` lies in [valid-after, valid-before], both inclusive."""
        now = now.replace(microsecond=0)  # OpenSSH compares whole seconds
        if self.valid_after is not None and now < self.valid_after:
            return False
        return self.valid_before is None or now <= self.valid_before


def parse_allowed_signers(text: str, local_tz: tzinfo = timezone.utc) -> list[AllowedSigner]:
    """Parse an OpenSSH ``allowed_signers`` file (ssh-keygen(1), ALLOWED SIGNERS).

    Blank and ``#`` lines and ``cert-authority`` lines are skipped. Times without
    a ``Z``/``UTC`` suffix are local time in OpenSSH; here they are read in
    ``local_tz`` (default UTC). Raise SignatureFormatError naming the line.
    """
    signers: list[AllowedSigner] = []
    for number, line in enumerate(text.split("\n"), start=1):
        try:
            signer = _parse_allowed_line(line.rstrip("\r"), local_tz)
        except SignatureFormatError as exc:
            raise SignatureFormatError(f"allowed_signers line {number}: {exc}") from None
        if signer is not None:
            signers.append(signer)
    return signers


class _Options(NamedTuple):
    cert_authority: bool
    namespaces: tuple[str, ...] | None
    valid_after: datetime | None
    valid_before: datetime | None


def _parse_allowed_line(line: str, local_tz: tzinfo) -> AllowedSigner | None:
    """Parse one line: ``principals [options] keytype base64 [comment]``."""
    rest = line.lstrip(" \t")
    if not rest or rest.startswith("#"):
        return None
    principals, rest = _take_principals(rest)
    options = ""
    if not is_key_type(split_fields(rest)[0]):
        options, rest = _take_options(rest)
    key = parse_public_key(rest)
    parsed = _parse_options(options, local_tz)
    if parsed.cert_authority:
        return None  # prep-cut-v1 §3: certificates are not trusted
    return AllowedSigner(
        tuple(principals.split(",")),
        key,
        parsed.namespaces,
        parsed.valid_after,
        parsed.valid_before,
    )


def _take_principals(text: str) -> tuple[str, str]:
    """Split off the principals field, optionally in double quotes."""
    if text.startswith('"'):
        close = text.find('"', 1)
        if close < 0:
            raise SignatureFormatError("unterminated quote in principals")
        principals, rest = text[1:close], text[close + 1 :]
        if rest and rest[0] not in " \t":
            raise SignatureFormatError("text after the quoted principals")
    else:
        principals = re.split(r"[ \t]", text, maxsplit=1)[0]
        rest = text[len(principals) :]
        if '"' in principals:
            raise SignatureFormatError("stray quote in principals")
    if not principals or not rest.strip(" \t"):
        raise SignatureFormatError("expected 'principals [options] key'")
    return principals, rest.lstrip(" \t")


def _take_options(text: str) -> tuple[str, str]:
    """Split off the options field: up to the first unquoted space or tab."""
    quoted, index = False, 0
    while index < len(text) and (quoted or text[index] not in " \t"):
        if text.startswith('\\"', index):
            index += 1
        elif text[index] == '"':
            quoted = not quoted
        index += 1
    if quoted:
        raise SignatureFormatError("unterminated quote in options")
    return text[:index], text[index:]


def _parse_options(text: str, local_tz: tzinfo) -> _Options:
    """Parse ``cert-authority``, ``namespaces=``, ``valid-after=``, ``valid-before=``.

    Names are case-insensitive and values double-quoted, as in OpenSSH.
    """
    values: dict[str, str] = {}
    cert_authority, position = False, 0
    while position < len(text):
        position, flag = _parse_option(text, position, values)
        cert_authority = cert_authority or flag
        if position == len(text):
            break
        if text[position] != ",":
            raise SignatureFormatError(f"unknown option at {text[position:]!r}")
        position += 1
        if position == len(text):
            raise SignatureFormatError("options end with a comma")
    return _options_from(cert_authority, values, local_tz)


def _parse_option(text: str, position: int, values: dict[str, str]) -> tuple[int, bool]:
    """Read the option at ``position`` into ``values``; tell if it is cert-authority."""
    if _starts_with_name(text, position, "cert-authority"):
        return position + len("cert-authority"), True
    for name in ("namespaces=", "valid-after=", "valid-before="):
        if _starts_with_name(text, position, name):
            if name[:-1] in values:
                raise SignatureFormatError(f"option {name[:-1]} given twice")
            values[name[:-1]], position = _dequote(text, position + len(name))
            break
    return position, False


def _starts_with_name(text: str, position: int, name: str) -> bool:
    """Tell whether ``text`` has the ASCII ``name`` at ``position``, ignoring case."""
    segment = text[position : position + len(name)]
    return segment.isascii() and segment.lower() == name


def _options_from(cert_authority: bool, values: dict[str, str], local_tz: tzinfo) -> _Options:
    """Build the parsed options; valid-before must come after valid-after."""
    after = _parse_time(values["valid-after"], local_tz) if "valid-after" in values else None
    before = _parse_time(values["valid-before"], local_tz) if "valid-before" in values else None
    if after is not None and before is not None and before <= after:
        raise SignatureFormatError("valid-before is not after valid-after")
    namespaces = tuple(values["namespaces"].split(",")) if "namespaces" in values else None
    return _Options(cert_authority, namespaces, after, before)


def _dequote(text: str, position: int) -> tuple[str, int]:
    """Read a double-quoted option value at ``position`` (``\\"`` escapes a quote)."""
    if not text.startswith('"', position):
        raise SignatureFormatError("option value must be in double quotes")
    value: list[str] = []
    position += 1
    while position < len(text) and text[position] != '"':
        if text.startswith('\\"', position):
            position += 1
        value.append(text[position])
        position += 1
    if position == len(text):
        raise SignatureFormatError("missing end quote in option value")
    return "".join(value), position + 1


_TIME = re.compile(r"([0-9]{8}|[0-9]{12}|[0-9]{14})(z|utc)?", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _parse_time(value: str, local_tz: tzinfo) -> datetime:
    """Parse ``YYYYMMDD[HHMM[SS]][Z|UTC]`` into an aware UTC datetime."""
    match = _TIME.fullmatch(value)
    if match is None:
        raise SignatureFormatError(f"bad time {value!r}: expected YYYYMMDD[HHMM[SS]][Z]")
    digits = match.group(1).ljust(14, "0")
    year, month, day = int(digits[:4]), int(digits[4:6]), int(digits[6:8])
    hour, minute, second = int(digits[8:10]), int(digits[10:12]), int(digits[12:])
    zone = timezone.utc if match.group(2) else local_tz
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=zone)
        moment = moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise SignatureFormatError(f"bad time {value!r}: no such date") from None
    if moment <= _EPOCH:
        raise SignatureFormatError(f"bad time {value!r}: not after 1970")
    return moment


def _match_pattern_list(value: str, patterns: Sequence[str]) -> bool:
    """OpenSSH ``match_pattern_list``: some pattern matches and no ``!`` one does."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _match_pattern(value, pattern[1:] if negated else pattern):
            if negated:
                return False
            matched = True
    return matched


def _match_pattern(value: str, pattern: str) -> bool:
    """Match ``*`` (any run) and ``?`` (any one character); all else is literal."""
    index = position = 0
    star, resume = -1, 0
    while index < len(value):
        if position < len(pattern) and pattern[position] == "*":
            star, resume, position = position, index, position + 1
        elif position < len(pattern) and pattern[position] in ("?", value[index]):
            index, position = index + 1, position + 1
        elif star >= 0:
            resume += 1
            index, position = resume, star + 1
        else:
            return False
    return pattern[position:].strip("*") == ""


# --- trust at a moment ---------------------------------------------------------------


def trusted_line(
    key: PublicKey, signers: Sequence[AllowedSigner], namespace: str, now: datetime
) -> tuple[AllowedSigner | None, str]:
    """Find the first line with ``key`` whose options admit ``namespace`` at ``now``.

    Return ``(line, "")``, or ``(None, reason)`` with a one-line reason naming the
    key's fingerprint (and, if only the time is wrong, the line's window).
    """
    lines = [signer for signer in signers if signer.key == key]
    if not lines:
        return None, f"key {key.fingerprint()} not in allowed_signers"
    lines = [signer for signer in lines if signer.allows_namespace(namespace)]
    if not lines:
        return None, f"namespace not allowed for key {key.fingerprint()}"
    for signer in lines:
        if signer.valid_at(now):
            return signer, ""
    return None, f"key {key.fingerprint()} not valid at {_iso(now)} ({_window(lines[0])})"


def _iso(moment: datetime) -> str:
    """Format an aware datetime as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window(signer: AllowedSigner) -> str:
    """Describe the validity window of a line."""
    parts = []
    if signer.valid_after is not None:
        parts.append(f"valid-after {_iso(signer.valid_after)}")
    if signer.valid_before is not None:
        parts.append(f"valid-before {_iso(signer.valid_before)}")
    return ", ".join(parts)
