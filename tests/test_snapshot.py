from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mloop.data.canonical import table_digest
from mloop.data.profile import compute_profile
from mloop.data.snapshot import SnapshotStore
from mloop.data.source import read_file_table
from mloop.errors import SnapshotNotFoundError
from mloop.storage import ObjectStore

from .helpers import BIKE, rentals_frame


@pytest.fixture
def bike_table() -> pa.Table:
    return pq.read_table(BIKE / "data" / "bike_hourly.parquet")


def test_digest_is_the_same_for_csv_and_parquet_of_one_table(tmp_path: Path,
                                                             bike_table: pa.Table) -> None:
    pq.write_table(bike_table, tmp_path / "a.parquet")
    pacsv.write_csv(bike_table, tmp_path / "a.csv")
    from_parquet = read_file_table(tmp_path / "a.parquet")
    from_csv = read_file_table(tmp_path / "a.csv")
    assert from_csv.num_rows == from_parquet.num_rows == 17379
    assert table_digest(from_csv) == table_digest(from_parquet)


def test_digest_ignores_row_group_size_and_chunking(tmp_path: Path, bike_table: pa.Table) -> None:
    pq.write_table(bike_table, tmp_path / "one.parquet", row_group_size=1_000_000)
    pq.write_table(bike_table, tmp_path / "many.parquet", row_group_size=777)
    one = pq.read_table(tmp_path / "one.parquet")
    many = pq.read_table(tmp_path / "many.parquet")
    assert many["cnt"].num_chunks > 1
    assert table_digest(one) == table_digest(many) == table_digest(bike_table)


def test_digest_ignores_integer_width_and_dictionary_encoding(bike_table: pa.Table) -> None:
    narrow = bike_table.set_column(bike_table.schema.get_field_index("cnt"), "cnt",
                                   bike_table["cnt"].cast(pa.int32()))
    dict_encoded = bike_table.set_column(bike_table.schema.get_field_index("season"), "season",
                                         bike_table["season"].dictionary_encode())
    assert table_digest(narrow) == table_digest(bike_table) == table_digest(dict_encoded)


@pytest.mark.parametrize("change", ["value", "null", "column_name", "row_order"])
def test_digest_changes_when_the_data_changes(bike_table: pa.Table, change: str) -> None:
    frame = bike_table.slice(0, 500).to_pandas()
    if change == "value":
        frame.loc[10, "temp"] += 0.01
    elif change == "null":
        frame.loc[10, "season"] = None
    elif change == "column_name":
        frame = frame.rename(columns={"temp": "temperature"})
    else:
        frame = frame.iloc[::-1]
    assert table_digest(pa.Table.from_pandas(frame, preserve_index=False)) != table_digest(
        bike_table.slice(0, 500))


def test_same_data_twice_is_stored_once(tmp_path: Path, bike_table: pa.Table) -> None:
    store = SnapshotStore(ObjectStore(str(tmp_path / "data")))
    first, created_first = store.put(bike_table, source="a")
    rechunked = pa.Table.from_batches(bike_table.to_batches(max_chunksize=1000))
    second, created_second = store.put(rechunked, source="b")
    assert (created_first, created_second) == (True, False)
    assert first.digest == second.digest
    assert store.list() == [first]
    assert [p.name for p in (tmp_path / "data").iterdir()] == [first.digest]
    assert store.read_table(first.digest).num_rows == 17379
    assert table_digest(store.read_table(first.digest)) == first.digest


def test_snapshot_lookup_by_prefix_and_unknown_digest(tmp_path: Path) -> None:
    store = SnapshotStore(ObjectStore(str(tmp_path / "data")))
    snap, _ = store.put(pa.table({"a": [1, 2, 3]}), source="t")
    assert store.get(snap.digest[:10]).digest == snap.digest
    with pytest.raises(SnapshotNotFoundError, match="no snapshot 'ffffff'"):
        store.get("ffffff")


def test_numeric_profile_bins_on_reference_quantiles_with_counts(bike_table: pa.Table) -> None:
    prof = compute_profile(bike_table, bins=10)
    temp = prof["columns"]["temp"]
    values = bike_table["temp"].to_numpy()
    assert prof["rows"] == 17379
    assert temp["kind"] == "numeric"
    assert temp["count"] == 17379 and temp["missing"] == 0
    assert temp["mean"] == pytest.approx(values.mean())
    assert temp["std"] == pytest.approx(values.std(ddof=1))
    assert (temp["min"], temp["max"]) == (values.min(), values.max())
    assert temp["quantiles"]["0.5"] == pytest.approx(np.median(values))
    edges = temp["bin_edges"]
    assert edges == sorted(edges) and edges[0] == values.min() and edges[-1] == values.max()
    assert sum(temp["bin_counts"]) == 17379
    assert len(temp["bin_counts"]) == len(edges) - 1
    # quantile edges: no bin holds much more than its share (ties can merge edges)
    assert max(temp["bin_counts"]) < 17379 * 0.25


def test_categorical_profile_keeps_top_k_and_other_and_missing(bike_table: pa.Table) -> None:
    prof = compute_profile(bike_table, top_k=5)
    day = prof["columns"]["weekday"]  # 7 days and 875 gaps
    assert day["kind"] == "categorical" and day["n_unique"] == 7
    assert len(day["top"]) == 5 and day["top"]["Sat"] == 2387
    assert sum(day["top"].values()) + day["other_count"] + day["missing"] == 17379
    assert prof["columns"]["hr"]["kind"] == "numeric"  # the hour of the day, 0-23
    weather = prof["columns"]["weathersit"]
    assert weather["missing"] == 1258
    assert weather["missing_rate"] == pytest.approx(1258 / 17379)
    assert weather["top"]["Clear"] == 10155
    assert prof["schema"]["datetime"].startswith("timestamp")
    assert prof["columns"]["datetime"]["min"].startswith("2011-01-01")


def test_numeric_missing_and_nan_are_counted(tmp_path: Path) -> None:
    table = pa.table({"x": pa.array([1.0, None, float("nan"), 4.0, 5.0])})
    x = compute_profile(table)["columns"]["x"]
    assert (x["count"], x["missing"]) == (3, 2)
    assert x["missing_rate"] == pytest.approx(0.4)


def test_profile_is_stored_beside_the_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(ObjectStore(str(tmp_path / "data")))
    snap, _ = store.put(pa.Table.from_pandas(rentals_frame(), preserve_index=False), source="t")
    on_disk = json.loads((tmp_path / "data" / snap.digest / "profile.json").read_text())
    assert on_disk == store.profile(snap.digest)
    assert set(on_disk["columns"]) == {"ts", "hour", "weather", "temp", "cnt"}


def test_reading_a_missing_file_names_it(tmp_path: Path) -> None:
    from mloop.errors import DataSourceError

    with pytest.raises(DataSourceError, match=r"data.path '.*nope.csv' does not exist"):
        read_file_table(tmp_path / "nope.csv")


def test_unknown_extension_asks_for_data_format(tmp_path: Path) -> None:
    from mloop.errors import DataSourceError

    (tmp_path / "x.txt").write_text("a,b\n1,2\n")
    with pytest.raises(DataSourceError, match=r"cannot tell the format.*set data.format"):
        read_file_table(tmp_path / "x.txt")


def test_folder_of_parquet_files_reads_as_one_table(tmp_path: Path) -> None:
    frame = rentals_frame(300)
    (tmp_path / "parts").mkdir()
    frame.iloc[:100].to_parquet(tmp_path / "parts" / "a.parquet", index=False)
    frame.iloc[100:].to_parquet(tmp_path / "parts" / "b.parquet", index=False)
    table = read_file_table(tmp_path / "parts")
    assert table_digest(table) == table_digest(pa.Table.from_pandas(frame,
                                                                     preserve_index=False))
    assert isinstance(frame, pd.DataFrame)


def test_a_snapshot_interrupted_before_its_marker_is_invisible_and_completed_later(
        tmp_path: Path) -> None:
    """snapshot.json is written last: a crash before it leaves nothing a reader would trust."""
    objects = ObjectStore(str(tmp_path / "data"))
    store = SnapshotStore(objects)
    table = pa.Table.from_pandas(rentals_frame(), preserve_index=False)
    digest = table_digest(table)
    objects.write_parquet(f"{digest}/data.parquet", table.slice(0, 10))  # torn earlier attempt
    (tmp_path / "data" / digest / ".tmp-dead-profile.json").write_text("{")
    assert store.list() == []
    with pytest.raises(SnapshotNotFoundError):
        store.get(digest)
    snap, created = store.put(table, source="retry")
    assert created is True
    assert store.read_table(snap.digest).num_rows == 600
    assert [s.digest for s in store.list()] == [digest]


def test_nanosecond_timestamps_are_snapshotted_exactly(tmp_path: Path) -> None:
    base = 1_500_000_000_000_000_000
    exact = pd.to_datetime([base + 123, base + 456], unit="ns")
    table = pa.table({"t": pa.array(exact, type=pa.timestamp("ns"))})
    store = SnapshotStore(ObjectStore(str(tmp_path / "data")))
    snap, _ = store.put(table, source="t")
    back = store.read_table(snap.digest)["t"].to_pylist()
    assert [v.value for v in back] == [base + 123, base + 456]
    coarse = pa.table({"t": pa.array(pd.to_datetime([base, base + 1000], unit="ns"),
                                     type=pa.timestamp("ns"))})
    assert table_digest(coarse) == table_digest(coarse.cast(pa.schema(
        [("t", pa.timestamp("us"))])))
