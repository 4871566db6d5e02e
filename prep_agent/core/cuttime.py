"""The cut time as PREP shows it to readers (pure).

Both sides show it: the difusor's frame and the institute's collector dashboard.
"""

from __future__ import annotations

import re
from datetime import datetime

_OFFSET_RE = re.compile(r"(Z|z|[+-]\d{2}:\d{2})$")


def format_cut_time(text: str, when: datetime) -> str:
    """``06/06/2021 20:30 h (UTC-5)``: the cut time in its own offset, as PREP shows it.

    ``text`` is the RFC 3339 ``cut_time`` as sent (its offset is kept) and ``when``
    the same instant parsed. Raises nothing.
    """
    m = _OFFSET_RE.search(text)
    offset = "UTC"
    if m and m.group(1) not in ("Z", "z"):
        sign, hours, minutes = m.group(1)[0], int(m.group(1)[1:3]), m.group(1)[4:6]
        if hours or minutes != "00":
            offset = f"UTC{sign}{hours}" + (f":{minutes}" if minutes != "00" else "")
    return f"{when:%d/%m/%Y %H:%M} h ({offset})"
