"""Fixed-schedule baselines: what retraining on a calendar (every 4 weeks, every 2 weeks,
weekly) would have scored on the same traffic the loop served.

A loop that retrains "when needed" is only worth its machinery if it beats the plain cron job
a team would otherwise write. So the baseline is that cron job, replayed on the same hours:
at each scheduled time ``t`` it fits the project's own model (``resolve_spec`` →
``build_model`` → fit, the same ``model`` config and thread limit the pipeline uses) on the
labelled rows the loop's retrain would have had at ``t`` (event time in ``(t - window, t]``
whose label had arrived, i.e. at most ``t - label_delay``), holding out the most recent
``holdout`` fraction as the pipeline's time split does, and serves it at once (no gate, no
canary) until the next scheduled time. It runs on the data, not through the server: it is a
yardstick, not a deployment.

What keeps it cheap (a fit is ~1 s on an idle core, several on a busy one):
- the cadences nest (4 weeks ⊂ 2 weeks ⊂ 1 week from the same start), and a fit depends only
  on its time, so each time is fitted once and shared (a weekly schedule's fits are all);
- only the fits whose serving interval reaches the scored period are made; the retrain
  *count* is still the whole replay's, so it compares with the loop's count;
- :class:`BackgroundSchedules` runs the fits in a process of their own while the demo
  replays traffic over HTTP (client and server take turns: one core is mostly idle).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mloop.config import ProjectConfig
from mloop.errors import MloopError


@dataclass(frozen=True)
class Schedule:
    """A fixed retraining cadence, counted from the replay's start."""

    name: str
    every: timedelta

    def times(self, start: datetime, end: datetime) -> list[datetime]:
        """Retrain times strictly after ``start`` and before ``end``."""
        out, t = [], start + self.every
        while t < end:
            out.append(t)
            t += self.every
        return out


DEFAULT_SCHEDULES = (Schedule("every 4 weeks", timedelta(days=28)),
                     Schedule("every 2 weeks", timedelta(days=14)),
                     Schedule("weekly", timedelta(days=7)))


@dataclass
class ScheduleResult:
    name: str
    every_days: float
    retrains: int  # over the whole replay, as the loop's count is
    fits: int  # the ones that served inside the scored period
    mae: float | None  # over the scored period
    months: dict[str, float]  # MAE per month of the scored period

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScheduleRun:
    """Each schedule's predictions for the replayed rows (NaN: the initial model serves)."""

    schedules: list[Schedule]
    retrains: dict[str, int]
    fits: dict[str, int]
    predictions: dict[str, np.ndarray]
    fitted: int  # distinct fits made (shared between schedules)
    window: timedelta
    label_delay: timedelta
    holdout: float
    seconds: float
    cpu_seconds: float


def _naive(t: datetime) -> np.datetime64:
    return np.datetime64(t.replace(tzinfo=None), "us")


def predict_schedules(frame: pd.DataFrame, cfg: ProjectConfig, *, start: datetime,
                      end: datetime, window: timedelta, label_delay: timedelta,
                      holdout: float, score_from: datetime | None = None,
                      schedules: Sequence[Schedule] = DEFAULT_SCHEDULES,
                      progress: Callable[[int, int], None] | None = None) -> ScheduleRun:
    """Replay each schedule over the rows of ``frame`` with ``start <= time < end`` (in time
    order); ``frame`` holds every row of the data, its time column tz-naive UTC (earlier
    rows may train the first retrains: their labels are known). ``score_from``: fit only
    what serves at or after it (None: everything). ``progress(done, total)`` per fit."""
    from threadpoolctl import threadpool_limits

    from mloop.tabular.model import build_model, features_frame, resolve_spec

    tcol = cfg.features.time_column
    if not tcol:
        raise MloopError("fixed-schedule baselines need features.time_column in mloop.yaml")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    frame = frame.sort_values(tcol, kind="stable").reset_index(drop=True)
    when = frame[tcol].to_numpy(dtype="datetime64[us]")
    idx = np.flatnonzero((when >= _naive(start)) & (when < _naive(end)))
    r_when = when[idx]
    floor = _naive(score_from) if score_from is not None else None
    import pyarrow as pa

    spec = resolve_spec(pa.Schema.from_pandas(frame, preserve_index=False),
                        pa.chunked_array([pa.array(frame[cfg.target].iloc[:1000])]),
                        target=cfg.target, task=cfg.task,
                        features=cfg.features.model_dump(mode="json"))
    X = features_frame(frame, spec)
    y = frame[cfg.target].to_numpy()
    X_replay = X.iloc[idx]
    plans: dict[str, list[tuple[np.datetime64, np.ndarray]]] = {}
    retrains: dict[str, int] = {}
    for sched in schedules:
        times = [_naive(t) for t in sched.times(start, end)]
        retrains[sched.name] = len(times)
        bounds = [*times, _naive(end)]
        plans[sched.name] = [(t, (r_when >= t) & (r_when < bounds[i + 1]))
                             for i, t in enumerate(times)
                             if floor is None or bounds[i + 1] > floor]
    needed = sorted({t for plan in plans.values() for t, _ in plan})
    models: dict[np.datetime64, Any] = {}
    for n, t in enumerate(needed):
        rows = np.flatnonzero((when > t - np.timedelta64(window)) &
                              (when <= t - np.timedelta64(label_delay)))
        keep = rows[: len(rows) - round(len(rows) * holdout)]  # the pipeline's time split
        model = build_model(spec, cfg.model)
        with threadpool_limits(cfg.model.threads):
            model.fit(X.iloc[keep], y[keep])
        models[t] = model
        if progress is not None:
            progress(n + 1, len(needed))
    predictions = {}
    for name, plan in plans.items():
        pred = np.full(len(idx), np.nan)
        for t, serve in plan:
            if serve.any():
                pred[serve] = models[t].predict(X_replay[serve])
        predictions[name] = pred
    return ScheduleRun(list(schedules), retrains, {k: len(v) for k, v in plans.items()},
                       predictions, len(needed), window, label_delay, holdout,
                       round(time.perf_counter() - t_start, 1),
                       round(time.process_time() - cpu_start, 1))


def score_schedules(run: ScheduleRun, *, when: Sequence[datetime], truth: np.ndarray,
                    initial: np.ndarray, score_from: datetime | None) -> list[ScheduleResult]:
    """Each schedule's MAE over the scored rows; ``initial`` (the first model's predictions)
    fills the hours before a schedule's first retrain."""
    month = np.array([w.strftime("%Y-%m") for w in when])
    scored = (np.array([w >= score_from for w in when]) if score_from is not None
              else np.ones(len(when), dtype=bool))
    out = []
    for sched in run.schedules:
        pred = run.predictions[sched.name]
        err = np.abs(np.where(np.isnan(pred), initial, pred) - truth)
        out.append(ScheduleResult(
            name=sched.name, every_days=sched.every.total_seconds() / 86400,
            retrains=run.retrains[sched.name], fits=run.fits[sched.name],
            mae=float(err[scored].mean()) if scored.any() else None,
            months={m: float(err[scored & (month == m)].mean())
                    for m in sorted(set(month[scored]))}))
    return out


def _child(job: Path) -> None:
    """``python -m mloop.loop.schedules JOB``: read the pickled job, write progress lines
    (``fit DONE TOTAL``) on stdout and the pickled result (or the error) next to the job."""
    import pickle

    # written a moment ago by the parent into its own work folder: not a trust boundary
    data, cfg, kwargs = pickle.loads(job.read_bytes())  # nosec B301
    try:
        run: ScheduleRun | str = predict_schedules(
            pd.read_parquet(data), cfg, **kwargs,
            progress=lambda d, n: print(f"fit {d} {n}", flush=True))
    except Exception as exc:  # reported to the parent, which raises it with context
        run = f"{type(exc).__name__}: {exc}"
    job.with_suffix(".out").write_bytes(pickle.dumps(run))


class BackgroundSchedules:
    """:func:`predict_schedules` in a process of its own, a plain ``python -m`` child (not
    multiprocessing: its spawn re-runs the caller's main script when that lacks a
    ``__main__`` guard, and a fork would copy the parent's threads and MLflow clients).
    ``poll()`` reads its progress without waiting; ``result()`` waits for it."""

    def __init__(self, data: Path, cfg: ProjectConfig, *, workdir: Path, **kwargs: Any
                 ) -> None:
        import os
        import pickle
        import subprocess
        import sys
        import threading

        workdir.mkdir(parents=True, exist_ok=True)
        self._job = workdir / "schedules.job"
        self._job.write_bytes(pickle.dumps((str(data), cfg, kwargs)))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mloop.loop.schedules", str(self._job)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(cfg.model.threads or 1)})
        self.done, self.total = 0, 0
        self._lines: queue.Queue[str] = queue.Queue()
        self._tail: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        if self._proc.stdout is None:
            return
        for line in self._proc.stdout:
            self._lines.put(line)

    def poll(self) -> None:
        """Take in the progress reported so far."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            parts = line.split()
            if len(parts) == 3 and parts[0] == "fit":
                self.done, self.total = int(parts[1]), int(parts[2])
            else:
                self._tail = [*self._tail, line.rstrip()][-20:]

    def result(self, progress: Callable[[int, int], None] | None = None) -> ScheduleRun:
        import pickle
        import subprocess

        while True:
            try:
                self._proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                self.poll()
                if progress is not None and self.total:
                    progress(self.done, self.total)
        self.poll()
        out = self._job.with_suffix(".out")
        if not out.exists():
            tail = "\n".join(self._tail)
            raise MloopError(f"the fixed-schedule baselines' process exited with code "
                             f"{self._proc.returncode} and no result: {tail}")
        run = pickle.loads(out.read_bytes())  # nosec B301 # our child's answer, our folder
        if isinstance(run, str):
            raise MloopError(f"fixed-schedule baselines failed: {run}")
        return run

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


if __name__ == "__main__":
    import sys

    # through the module's own name: run as __main__, its classes would pickle as
    # __main__.ScheduleRun, which the parent cannot load
    from mloop.loop.schedules import _child as child

    child(Path(sys.argv[1]))
