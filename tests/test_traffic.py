"""The inference log and labels on real files: no acknowledged row lost silently, a damaged
segment never halts a reader, an event clock that stray rows cannot move, purges that can be
undone, label files whose errors name the right line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mloop.errors import MloopError, PurgeNotFoundError
from mloop.project import open_project
from mloop.security.audit import list_events, verify_chain
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import (
    InferenceLog,
    LogEntry,
    new_request_id,
    read_log,
    read_quarantined_entries,
)
from mloop.traffic.labels import read_label_file, read_labels, store_labels

from .helpers import SMALL_CONFIG, copy_project, rentals_frame, train_champion

T2011 = datetime(2011, 3, 1, tzinfo=UTC).timestamp()


def _entry(ts: float, temp: Any = 20.0, *, version: int = 1, n: int = 1,
           role: str = "champion") -> LogEntry:
    return LogEntry([new_request_id(ts) for _ in range(n)], ts, version, role, 1.0,
                    [10.0] * n, {"hour": [8] * n, "weather": ["Clear"] * n, "temp": [temp] * n})


def _commit(uri: str, entries: list[LogEntry]) -> None:
    log = InferenceLog(uri, commit_interval=3600)
    for e in entries:
        assert log.append(e)
    log.close()


def _replay(uri: str, rows: int = 300, start: float = T2011, step: float = 3600.0,
            per_commit: int = 100) -> list[str]:
    """``rows`` answered rows with explicit event times from ``start``, ``step`` seconds
    apart, committed ``per_commit`` at a time (several segments a day)."""
    entries = [_entry(start + i * step) for i in range(rows)]
    for i in range(0, rows, per_commit):
        _commit(uri, entries[i:i + per_commit])
    return [e.ids[0] for e in entries]


def _segments(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("part-*.parquet") if "quarantine" not in p.parts)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------- no acknowledged row lost silently

@pytest.mark.parametrize("bad", [2**63 + 5, 2**53 + 1, {"c": 20}, [1, 2], "warm"],
                         ids=["int-beyond-int64", "int-beyond-2^53", "object", "list", "text"])
def test_one_unstorable_value_costs_only_its_own_request(tmp_path: Path, bad: Any) -> None:
    uri = str(tmp_path / "log")
    written: list[int] = []
    quarantined: list[int] = []
    log = InferenceLog(uri, commit_interval=3600, on_write=written.append,
                       on_quarantine=quarantined.append)
    ts = 1_700_000_000.0
    good = [_entry(ts + i, 20.0 + i, n=2) for i in range(5)]
    poison = _entry(ts + 2.5, bad)
    for e in (*good[:3], poison, *good[3:]):
        assert log.append(e)
    report = log.commit_report()
    assert (report.written, report.quarantined, report.segments) == (10, 1, 1)
    assert (written, quarantined) == ([10], [1])
    table = read_log(uri)
    assert sorted(table.column("_request_id").to_pylist()) == sorted(
        i for e in good for i in e.ids)
    assert table.schema.field("temp").type == pa.float64()
    # the set-aside request keeps every field exactly as the server appended it
    [name] = report.quarantine_files
    [back] = read_quarantined_entries(ObjectStore(uri), name)
    assert back.ids == poison.ids and back.cols["temp"] == [bad] and back.ts == poison.ts
    assert (back.version, back.role, back.predictions) == (1, "champion", [10.0])
    note = json.loads((tmp_path / "log" / (name + ".pending.json")).read_text())
    assert note["kind"] == "rows_quarantined" and note["rows"] == 1
    assert note["request_ids"] == poison.ids and "input 'temp'" in note["reasons"][0]


def test_a_lone_request_with_an_object_for_a_number_is_quarantined_not_logged(
        tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    log = InferenceLog(uri, commit_interval=3600)
    assert log.append(_entry(1_700_000_000.0, {"c": 20}))
    report = log.commit_report()
    assert (report.written, report.quarantined) == (0, 1)
    assert "input 'temp' holds struct" in json.loads(
        (tmp_path / "log" / (report.quarantine_files[0] + ".pending.json")).read_text()
    )["reasons"][0]
    assert read_log(uri).num_rows == 0


@pytest.mark.parametrize("ts", [float("nan"), 1e13], ids=["nan", "year-318857"])
def test_an_impossible_event_time_is_quarantined_and_later_commits_go_on(tmp_path: Path,
                                                                          ts: float) -> None:
    uri = str(tmp_path / "log")
    log = InferenceLog(uri, commit_interval=3600)
    assert log.append(LogEntry(["f" * 24], ts, 1, "champion", 1.0, [1.0], {"temp": [1.0]}))
    assert log.append(_entry(1_700_000_000.0))
    report = log.commit_report()
    assert (report.written, report.quarantined) == (1, 1)
    assert log.quarantined == 1 and log.queued == 0
    assert log.append(_entry(1_700_000_100.0))
    assert log.commit() == 1
    assert read_log(uri).num_rows == 2


def test_quarantined_rows_can_be_fixed_and_appended_again(tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    log = InferenceLog(uri, commit_interval=3600)
    assert log.append(_entry(1_700_000_000.0, 2**63 + 5))
    [name] = log.commit_report().quarantine_files
    [entry] = read_quarantined_entries(ObjectStore(uri), name)
    entry.cols["temp"] = [21.5]
    assert log.append(entry)
    assert log.commit() == 1
    assert read_log(uri).column("temp").to_pylist() == [21.5]


def test_a_failed_write_puts_the_rows_back_for_the_next_commit(tmp_path: Path) -> None:
    uri = tmp_path / "log"
    uri.mkdir()
    (uri / "day=2023-11-14").write_text("a file where a folder must go")
    log = InferenceLog(str(uri), commit_interval=3600)
    assert log.append(_entry(1_700_000_000.0))
    with pytest.raises(OSError):
        log.commit()
    assert log.queued == 1  # nothing lost: still buffered
    (uri / "day=2023-11-14").unlink()
    assert log.commit() == 1


# ------------------------------------------------------------ damaged segments never halt

def test_a_truncated_segment_is_quarantined_and_readers_go_on_with_the_rest(
        tmp_path: Path) -> None:
    from mloop.monitoring.windows import read_rows
    from mloop.traffic.quarantine import quarantined_segments

    root = tmp_path / "log"
    ids = _replay(str(root), rows=300, step=60, per_commit=100)  # one day, three commits
    segments = _segments(root)
    assert len(segments) == 3
    _truncate(segments[1])
    rows = read_rows(str(root))
    assert rows.num_rows == 200
    assert set(rows.column("_request_id").to_pylist()) == set(ids[:100] + ids[200:])
    rel = str(segments[1].relative_to(root))
    store = ObjectStore(str(root))
    assert quarantined_segments(store) == [f"quarantine/segments/{rel}"]
    assert not segments[1].exists()
    note = json.loads((root / "quarantine" / "segments" / (rel + ".pending.json")).read_text())
    assert note["segment"] == rel and "magic bytes" in note["reason"]
    assert read_log(str(root)).num_rows == 200  # the next reader does not trip on it again


def test_a_read_error_on_a_healthy_file_is_raised_not_quarantined(tmp_path: Path) -> None:
    from mloop.traffic.quarantine import read_or_quarantine

    root = tmp_path / "log"
    _replay(str(root), rows=10, per_commit=10)
    [segment] = _segments(root)

    def flaky() -> pa.Table:
        raise OSError("connection reset by peer")

    with pytest.raises(OSError, match="connection reset"):
        read_or_quarantine(ObjectStore(str(root)), str(segment), flaky)
    assert segment.exists()


def test_a_damaged_label_segment_is_skipped_and_the_other_labels_join(tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    ids = _replay(uri, rows=20, per_commit=20)
    store = ObjectStore(uri)
    store_labels(store, {i: 1.0 for i in ids[:10]}, task="regression", source="a")
    store_labels(store, {i: 2.0 for i in ids[10:]}, task="regression", source="b")
    first = sorted((tmp_path / "log" / "labels").rglob("part-*.parquet"))[0]
    first.write_bytes(b"")
    labels = read_labels(uri)
    assert labels.num_rows == 10 and set(labels.column("label").to_pylist()) in ({1.0}, {2.0})
    assert len(list((tmp_path / "log" / "quarantine" / "segments" / "labels").rglob(
        "part-*.parquet"))) == 1


def test_two_logs_committing_in_the_same_millisecond_keep_both_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each log numbered its segments from 1: two logs in one process (two servers, or a log
    reopened) committing within one millisecond wrote the same name, and the second segment
    replaced the first."""
    import mloop.traffic.inference_log as ilog

    monkeypatch.setattr(ilog.time, "time", lambda: 1_800_000_000.0)  # one millisecond
    uri = str(tmp_path / "log")
    ids = _replay(uri, rows=20, step=60, per_commit=10)  # two logs, one segment each
    assert len(_segments(tmp_path / "log")) == 2
    monkeypatch.undo()
    assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted(ids)


def test_label_ids_are_found_when_a_segment_of_their_day_is_damaged(tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    ids = _replay(uri, rows=20, step=60, per_commit=10)  # one day, two segments
    _truncate(_segments(tmp_path / "log")[0])
    result = store_labels(ObjectStore(uri), {i: 1.0 for i in ids}, task="regression",
                          source="test")
    assert result["stored"] == 10 and sorted(result["unknown_ids"]) == sorted(ids[:10])


def test_early_feedback_finds_rows_the_writer_commits_while_it_looks(tmp_path: Path) -> None:
    """/feedback right after /predict: the rows are still in the writer's queue, or on disk,
    or (the race) committed between the two looks. Here the commit lands at the first look
    at the queue; every label must still find its row."""
    uri = str(tmp_path / "log")
    log = InferenceLog(uri, commit_interval=3600)
    entry = _entry(T2011, n=5)
    assert log.append(entry)

    def pending_then_committed(request_id: str) -> bool:
        log.commit()  # the writer's interval ends now
        return log.pending(request_id)

    result = store_labels(ObjectStore(uri), dict.fromkeys(entry.ids, 1.0), task="regression",
                          source="feedback", pending=pending_then_committed)
    assert (result["stored"], result["unknown"]) == (5, 0)
    log.close()


def test_a_segment_rewritten_by_another_process_is_not_served_from_the_cache(
        tmp_path: Path) -> None:
    uri = str(tmp_path / "log")
    _replay(uri, rows=10, per_commit=10)
    assert read_log(uri).num_rows == 10  # now cached
    [segment] = _segments(tmp_path / "log")
    pq.write_table(pq.read_table(segment).slice(0, 4), segment)  # as a purge elsewhere would
    assert read_log(uri).num_rows == 4


# --------------------------------------------------------------------- the event clock

def test_one_request_without_a_timestamp_after_a_replay_leaves_the_clock_in_2011(
        make_project: Callable[..., Path]) -> None:
    from mloop.loop.retrain import event_time_now

    project = open_project(make_project())
    uri = project.uris["inference_log_uri"]
    _replay(uri, rows=300)
    replayed = datetime.fromtimestamp(T2011 + 299 * 3600, UTC)
    assert event_time_now(project) == replayed
    _commit(uri, [_entry(time.time())])  # e.g. a smoke-test curl, stamped on arrival
    assert event_time_now(open_project(project.root)) == replayed
    # a batch without timestamps is one request too: all its rows share the arrival time
    _commit(uri, [_entry(time.time(), n=500)])
    assert event_time_now(open_project(project.root)) == replayed


def test_ten_requests_after_the_gap_move_the_clock_because_live_traffic_began(
        make_project: Callable[..., Path]) -> None:
    from mloop.loop.retrain import event_time_now

    project = open_project(make_project())
    uri = project.uris["inference_log_uri"]
    _replay(uri, rows=300)
    now = time.time()
    _commit(uri, [_entry(now - 10 + i) for i in range(9)])
    assert event_time_now(project).year == 2011
    _commit(uri, [_entry(now)])
    assert abs(event_time_now(project).timestamp() - now) < 1e-3


def test_quiet_nights_and_weekend_gaps_do_not_hold_the_clock_back() -> None:
    from mloop.monitoring.windows import event_clock

    def clock(times: list[float]) -> float:
        ts = pa.array([int(t * 1e6) for t in times], pa.int64()).cast(
            pa.timestamp("us", tz="UTC"))
        out = event_clock(ts)
        assert out is not None
        return out.timestamp()

    # one request a minute all day, then a few at night, hours apart
    day = [T2011 + 60 * i for i in range(600)] + [T2011 + 36_000 + 3600 * 5 * j
                                                  for j in range(1, 4)]
    assert clock(day) == max(day)
    # daily data, weekdays only (three-day gaps)
    weekdays = [T2011 + 86_400 * (7 * w + d) for w in range(6) for d in range(5)]
    assert clock(weekdays) == max(weekdays)


def test_a_stray_row_does_not_close_the_replays_last_window() -> None:
    from mloop.monitoring.windows import time_windows

    times = [T2011 + 600 * i for i in range(6 * 24 * 3 + 6 * 5)]  # three days and 5 hours
    stray = time.time()
    ts = [int(t * 1e6) for t in [*times, stray]]
    table = pa.table({"_request_id": [str(i) for i in range(len(ts))],
                      "_ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC"))})
    windows = time_windows(table, timedelta(days=1), None)
    assert len(windows) == 3  # the fourth day is not over in the replay's time
    assert windows[-1][1] == datetime.fromtimestamp(T2011 + 3 * 86_400, UTC)


# ---------------------------------------------------------------------- purge and restore

def _replay_and_stray(project: Any) -> tuple[list[str], list[str]]:
    uri = project.uris["inference_log_uri"]
    replayed = _replay(uri, rows=48, step=1800, per_commit=48)  # one day, then the next
    now = time.time()
    strays = [_entry(now - 5), _entry(now - 3, version=2), _entry(now - 1)]
    _commit(uri, strays)
    return replayed, [e.ids[0] for e in strays]


def test_purge_moves_rows_out_of_the_log_and_restore_puts_back_the_same_rows(
        make_project: Callable[..., Path]) -> None:
    from mloop.traffic.purge import list_purges, purge_rows, restore_purge

    project = open_project(make_project())
    uri = project.uris["inference_log_uri"]
    replayed, _ = _replay_and_stray(project)
    before = read_log(uri).sort_by("_request_id")
    now = datetime.now(UTC)
    result = purge_rows(project, start=now - timedelta(hours=1), end=now,
                        reason="smoke tests after the replay")
    assert result.status == "purged" and result.rows == 3
    assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted(replayed)
    assert result.location is not None and "quarantine/purges" in result.location
    event = list_events(project.store, kind="log.purged")[0]
    assert event.payload["purge_id"] == result.purge_id and event.payload["rows"] == 3
    assert event.payload["reason"] == "smoke tests after the replay"
    assert [p["status"] for p in list_purges(project)] == ["purged"]

    back = restore_purge(project, result.purge_id)
    assert back.rows == 3 and back.status == "restored"
    assert read_log(uri).sort_by("_request_id").equals(before)
    assert list_events(project.store, kind="log.purge_restored")[0].payload["rows"] == 3
    assert verify_chain(project.store).ok
    with pytest.raises(MloopError, match=f"purge {result.purge_id} was already restored"):
        restore_purge(project, result.purge_id)


def test_purge_of_one_version_keeps_the_other_versions_rows(
        make_project: Callable[..., Path]) -> None:
    from mloop.traffic.purge import purge_rows

    project = open_project(make_project())
    uri = project.uris["inference_log_uri"]
    _, strays = _replay_and_stray(project)
    now = datetime.now(UTC)
    result = purge_rows(project, start=now - timedelta(hours=1), end=now, version=2)
    assert result.rows == 1
    left = set(read_log(uri).column("_request_id").to_pylist())
    assert strays[1] not in left and {strays[0], strays[2]} <= left


def test_purge_keeps_the_rest_of_a_segment_in_place(make_project: Callable[..., Path]
                                                   ) -> None:
    from mloop.loop.retrain import event_time_now
    from mloop.traffic.purge import purge_rows, restore_purge

    project = open_project(make_project())
    uri = project.uris["inference_log_uri"]
    replayed = _replay(uri, rows=48, step=1800, per_commit=48)
    segments = _segments(Path(uri))
    noon = datetime.fromtimestamp(T2011 + 12 * 3600, UTC)
    result = purge_rows(project, start=noon, end=noon + timedelta(days=1))
    assert result.rows == 24
    assert _segments(Path(uri)) == segments  # rewritten under the same name
    assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted(replayed[:24])
    assert event_time_now(project) == noon - timedelta(minutes=30)
    restore_purge(project, result.purge_id)
    assert event_time_now(project) == datetime.fromtimestamp(T2011 + 47 * 1800, UTC)


def test_purge_names_its_errors(make_project: Callable[..., Path]) -> None:
    from mloop.traffic.purge import purge_rows, restore_purge

    project = open_project(make_project())
    now = datetime.now(UTC)
    with pytest.raises(MloopError, match=r"--from .* must be before --to"):
        purge_rows(project, start=now, end=now - timedelta(hours=1))
    nothing = purge_rows(project, start=now - timedelta(days=1), end=now)
    assert (nothing.status, nothing.rows, nothing.purge_id) == ("nothing", 0, None)
    assert list_events(project.store, kind="log.purged") == []
    with pytest.raises(PurgeNotFoundError, match=r"no purge 'nope'.*known: none"):
        restore_purge(project, "nope")


# --------------------------------------------------------------------------- label files

@pytest.mark.parametrize(("suffix", "where"), [(".csv", "line 4"), (".parquet", "row 3")])
def test_a_bad_label_is_named_by_where_a_person_finds_it(tmp_path: Path, suffix: str,
                                                         where: str) -> None:
    path = tmp_path / f"labels{suffix}"
    rows = [("a1", "1.5"), ("a2", "2.5"), ("a3", "warm"), ("a4", "3")]
    if suffix == ".csv":
        path.write_text("request_id,label\n" + "".join(f"{i},{v}\n" for i, v in rows))
    else:
        pq.write_table(pa.table({"request_id": [i for i, _ in rows],
                                 "label": [v for _, v in rows]}), path)
    with pytest.raises(MloopError, match=f"labels{suffix}: {where}: label: .*got 'warm'"):
        read_label_file(path, "regression")


def test_a_label_file_with_numbers_as_text_and_blank_lines_is_read(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("request_id,label\na1,1.5\n\na2,2\n")
    assert read_label_file(path, "regression") == {"a1": 1.5, "a2": 2.0}
    path.write_text("request_id,label\na1,1.5\n\n,2\n")
    with pytest.raises(MloopError, match="line 4: empty request_id"):
        read_label_file(path, "regression")


# ------------------------------------------- a trained project: monitor, loop, label ingest

LOOP_ALERT = "loop: {action: alert}\nmonitoring: {window: 1d}\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_champion(tmp_path_factory.mktemp("traffic") / "proj",
                          SMALL_CONFIG + LOOP_ALERT, rentals_frame(400))


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    return copy_project(trained, tmp_path)


def _traffic(uri: str, day: str, rows: int, commits: int = 2, seed: int = 0) -> list[str]:
    frame = rentals_frame(rows, seed=seed)
    start = datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()
    entries = [LogEntry([new_request_id(start + i * 86_000 / rows)], start + i * 86_000 / rows,
                        1, "champion", 1.0, [float(frame["cnt"][i])],
                        {"hour": [int(frame["hour"][i])], "weather": [frame["weather"][i]],
                         "temp": [float(frame["temp"][i])]}) for i in range(rows)]
    per = rows // commits
    for i in range(0, rows, per):
        _commit(uri, entries[i:i + per])
    return [e.ids[0] for e in entries]


@pytest.mark.slow
def test_monitor_loop_and_label_ingest_go_on_when_a_segment_is_truncated(proj: Path) -> None:
    from mloop.loop.controller import run_once
    from mloop.monitoring.alerts import MonitorCollector
    from mloop.monitoring.service import run_monitor
    from mloop.traffic.labels import ingest_label_file

    project = open_project(proj)
    uri = project.uris["inference_log_uri"]
    ids = {day: _traffic(uri, day, 200, seed=n)
           for n, day in enumerate(["2024-03-01", "2024-03-02", "2024-03-03"])}
    _traffic(uri, "2024-03-04", 10, commits=1, seed=9)
    damaged = _segments(Path(uri))[2]  # the first half of 2024-03-02
    _truncate(damaged)
    rel = str(damaged.relative_to(uri))

    result = run_monitor(project)
    assert [(w["start"][:10], w["rows"]) for w in result["evaluated"]] == [
        ("2024-03-01", 200), ("2024-03-02", 100), ("2024-03-03", 200)]
    assert [q["segment"] for q in result["quarantined"]] == [rel]
    [event] = list_events(project.store, kind="log.segment_quarantined")
    assert event.payload["segment"] == rel
    assert event.payload["moved_to"] == f"quarantine/segments/{rel}"
    assert (Path(uri) / "quarantine" / "segments" / rel).exists()
    families = {f.name: f for f in MonitorCollector(project).collect()}
    assert families["mloop_inference_log_quarantined_segments"].samples[0].value == 1

    _truncate(_segments(Path(uri))[-1])  # the newest day: found by the loop's clock
    out = run_once(open_project(proj))
    assert out["now"].startswith("2024-03-03")
    assert len(list_events(project.store, kind="log.segment_quarantined")) == 2

    _truncate(_segments(Path(uri))[0])  # half of 2024-03-01, where the labels point
    labels = proj / "labels.csv"
    labels.write_text("request_id,label\n" + "".join(f"{i},5\n" for i in ids["2024-03-01"]))
    ingested = ingest_label_file(open_project(proj), labels)
    assert ingested["stored"] == 100 and ingested["unknown"] == 100
    assert len(ingested["quarantined"]) == 1
    assert len(list_events(project.store, kind="log.segment_quarantined")) == 3
    assert verify_chain(project.store).ok


@pytest.mark.slow
def test_rows_without_a_timestamp_are_stamped_with_their_arrival_time(proj: Path) -> None:
    from mloop.serving.app import create_app

    from .serving_util import ServerThread

    project = open_project(proj)
    rows = [{"hour": 8, "weather": "Clear", "temp": 20.0}]
    t0 = time.time()
    with ServerThread(create_app(project)) as srv:
        srv.wait_for(lambda: srv.get("/ready").status_code == 200)
        assert srv.post("/predict", {"records": rows}).status_code == 200
        assert srv.post("/invocations", {"dataframe_records": rows}).status_code == 200
        assert srv.post("/flush").status_code == 200
    t1 = time.time()
    stamps = [ts.timestamp() for ts in read_log(project.uris["inference_log_uri"])
              .column("_ts").to_pylist()]
    assert len(stamps) == 2 and all(t0 <= s <= t1 for s in stamps)


def test_mloop_data_purge_and_restore_from_the_command_line(
        make_project: Callable[..., Path]) -> None:
    import json

    from mloop.cli.app import main

    root = make_project()
    project = open_project(root)
    uri = project.uris["inference_log_uri"]
    replayed, strays = _replay_and_stray(project)
    now = datetime.now(UTC)
    args = ["-C", str(root), "data", "purge", "--from", (now - timedelta(hours=1)).isoformat(),
            "--to", now.isoformat(), "--reason", "smoke tests", "--json"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    done = json.loads(buf.getvalue())
    assert done["status"] == "purged" and done["rows"] == len(strays)
    assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted(replayed)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["-C", str(root), "data", "purges", "--json"]) == 0
    assert [p["purge_id"] for p in json.loads(buf.getvalue())["purges"]] == [done["purge_id"]]

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["-C", str(root), "data", "restore", done["purge_id"]]) == 0
    assert len(read_log(uri)) == len(replayed) + len(strays)


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "yesterday", "--to", "2011-01-02"], "--from 'yesterday': not an ISO 8601"),
    (["--from", "2011-01-02", "--to", "2011-01-01"], "must be before --to"),
])
def test_mloop_data_purge_refuses_a_bad_range_and_changes_nothing(
        make_project: Callable[..., Path], capsys: pytest.CaptureFixture[str],
        args: list[str], message: str) -> None:
    from mloop.cli.app import main

    root = make_project()
    project = open_project(root)
    replayed, strays = _replay_and_stray(project)
    assert main(["-C", str(root), "data", "purge", *args]) == 1
    assert message in capsys.readouterr().err
    assert len(read_log(project.uris["inference_log_uri"])) == len(replayed) + len(strays)


def test_mloop_data_restore_of_an_unknown_purge_names_it(
        make_project: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.cli.app import main

    root = make_project()
    assert main(["-C", str(root), "data", "restore", "no-such-purge"]) == 1
    assert "no-such-purge" in capsys.readouterr().err
