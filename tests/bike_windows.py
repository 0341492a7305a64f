"""The bike data as the monitoring tests cut it: the hourly file, the model's inputs, and the
rows of a span of event time (what a monitoring window of the inference log holds)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

BIKE = Path(__file__).resolve().parents[1] / "examples" / "bike_sharing" / "data" / \
    "bike_hourly.parquet"
FEATURES = ["season", "hr", "holiday", "weekday", "workingday", "weathersit", "temp", "atemp",
            "hum", "windspeed"]


def between(table: pa.Table, start: datetime, end: datetime) -> pa.Table:
    """The rows with ``start <= datetime < end``."""
    ts = table.column("datetime")
    return table.filter(pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)),
                                pc.less(ts, pa.scalar(end, ts.type))))
