"""A known shift injected into replayed traffic, and how long monitoring took to see it.

"Time to detect" is only a measurement when the onset is known. A replay of real data has no
known onset (the loop's own ``time_to_detect_hours`` is measured from the first drifting
window of a streak, which real, seasonal data always has). So ``mloop demo --inject-shift``
moves one numeric input by a stated number of its training standard deviations from a stated
event time on, in the requests sent to the server (labels unchanged), and this module reads
the monitor's windows afterwards: the first window ending after the onset in which that
column drifted is the detection, and the same column's verdicts in the windows before the
onset say how often it was flagged with nothing injected (without that, a detection could be
the usual noise).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from mloop.errors import MloopError
from mloop.project import Project
from mloop.store.models import MonitorWindowRow

_SPEC = re.compile(r"^(?P<column>[A-Za-z_][\w.]*)(?P<sd>[+-]\d+(?:\.\d+)?)sd$")


@dataclass(frozen=True)
class InjectedShift:
    """``column`` moved by ``sd`` training standard deviations (``delta`` in its units) in
    every request with event time at or after ``onset``."""

    column: str
    sd: float
    onset: datetime
    delta: float = 0.0

    @classmethod
    def parse(cls, text: str, onset: datetime) -> InjectedShift:
        """``temp+0.5sd`` → temp moved up by half a standard deviation."""
        m = _SPEC.match(text.strip())
        if m is None:
            raise MloopError(f"--inject-shift: '{text}' is not COLUMN+Nsd or COLUMN-Nsd "
                              f"(e.g. temp+0.5sd: temp moved up by half its training "
                              f"standard deviation)")
        return cls(m["column"], float(m["sd"]), onset.astimezone(UTC))

    def with_scale(self, training: Any, inputs: list[str]) -> InjectedShift:
        """The shift in the column's units: ``sd`` times its standard deviation in
        ``training`` (a pandas frame of the initial model's training rows)."""
        import pandas as pd

        if self.column not in inputs:
            raise MloopError(f"--inject-shift: column '{self.column}' is not one of the "
                              f"model's inputs ({', '.join(inputs)})")
        values = training[self.column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise MloopError(f"--inject-shift: column '{self.column}' is not numeric "
                              f"({values.dtype}); only a numeric input can be moved by "
                              f"standard deviations")
        return InjectedShift(self.column, self.sd, self.onset,
                             float(self.sd * values.astype(float).std()))

    def apply(self, record: dict[str, Any], when: datetime) -> None:
        if when >= self.onset and record.get(self.column) is not None:
            record[self.column] = float(record[self.column]) + self.delta


@dataclass
class Detection:
    column: str
    onset: datetime
    sd: float
    delta: float
    detected_at: datetime | None  # end of the first window after the onset that flagged it
    window: int | None  # that window's id
    time_to_detect_hours: float | None
    windows_after_onset_to_detect: int | None  # 1: the first window that saw shifted rows
    flagged_before_onset: int  # windows ending at or before the onset that flagged it anyway
    windows_before_onset: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("onset", "detected_at"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def measure_detection(project: Project, shift: InjectedShift) -> Detection:
    """Read the monitor's windows (the project's window spec) for the injected column."""
    with project.store.session() as s:
        windows = list(s.scalars(sa.select(MonitorWindowRow).where(
            MonitorWindowRow.model == project.config.model_name,
            MonitorWindowRow.spec == project.config.monitoring.window)
            .order_by(MonitorWindowRow.seq)))
    before = flagged = 0
    after = 0
    for w in windows:
        cols = ((w.report or {}).get("drift") or {}).get("columns", [])
        hit = any(c.get("column") == shift.column and c.get("drifted") for c in cols)
        end = _utc(w.end)
        if end <= shift.onset:
            before += 1
            flagged += hit
            continue
        after += 1
        if hit:
            hours = (end - shift.onset).total_seconds() / 3600
            return Detection(shift.column, shift.onset, shift.sd, shift.delta, end, w.id,
                             round(hours, 1), after, flagged, before)
    return Detection(shift.column, shift.onset, shift.sd, shift.delta, None, None, None,
                     None, flagged, before)
