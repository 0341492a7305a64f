"""One reading of a time a person types (``--since 2012-03-20``, ``?at=2012-03-20T12:00``).

The CLI and the dashboard both take such times and must agree on what they mean: ISO 8601
as :meth:`datetime.fromisoformat` reads it, and UTC when the text names no zone (mloop stores
every time in UTC). Each caller words its own error (a CLI flag, a page's query parameter);
this module only parses, so it sits at the bottom and either may import it.
"""

from __future__ import annotations

from datetime import UTC, datetime


def parse_iso_time(text: str) -> datetime:
    """``text`` as an aware datetime (UTC when it names no zone).

    Raises :class:`ValueError` when ``text`` is not ISO 8601; the caller turns that into a
    message naming where the value came from.
    """
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
