"""``monitoring.reference``: what a window is compared with.

- ``training`` (the default): the champion's training profile, computed when its snapshot was
  taken, and the profile of its holdout predictions.
- ``{rolling: 28d}``: the traffic logged in that much event time just before the window
  (``start - 28d <= _ts < start``), labelled or not, every version's, shadow rows left out.
  It follows slow, seasonal change, so a drift that builds up over months is not flagged
  window after window, while a sudden shift still is.
- ``{seasonal: 1y}``: the same period one cycle earlier (``earlier(start) <= _ts <
  earlier(end)``). When the log holds fewer than :data:`MIN_ROWS` rows there (it does not
  reach back that far), the window is judged against training, and its report says why.
  ``rolling`` falls back the same way (the first windows of a log have nothing before them).

A log-based reference is a profile of the log's rows with the training profile's ``bins`` and
``top_k``: the inputs under their own names, and ``_prediction`` for prediction drift. Its
``rows`` are the reference size the iid calibration simulates (a 700-row reference has a wider
null than a 20,000-row training set), so the thresholds stay honest for the smaller sample.

Temporal calibration of a log-based reference: the training profile's chunk statistics
measure a chunk of the training period against the rest of it, not a window against the
weeks before it, so they do not apply. A ``rolling`` reference has a null of its own when the
training snapshot was profiled under the same ``rolling`` span (its profile's
``temporal.rolling``: each training chunk against the span before it,
:mod:`mloop.data.temporal_profile`), and its windows are judged against it, so an ordinary
week of a season is not flagged against the weeks before it. Without it (another span, an
older snapshot), and for ``seasonal`` (a year-ago null needs years of training data), windows
are judged iid-only and their report's ``drift.temporal`` says why.

A computed profile is cached in the outputs store per (version, kind, window start and end),
so a re-run reads it back rather than the log. It is built only from rows before the window's
start, never from the window itself.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import pyarrow as pa

from mloop.config import RollingReference, SeasonalReference
from mloop.data.temporal_profile import same_window
from mloop.monitoring.windows import read_rows

if TYPE_CHECKING:
    from mloop.project import Project

MIN_ROWS = 50  # a log-based reference smaller than this falls back to training
PREDICTION = "_prediction"
TEMPORAL_REASON = ("the reference is {kind} traffic from the inference log, and the training "
                   "profile's chunk statistics measure the training period against itself")


class _Reference(Protocol):
    """What this module reads of a version's reference (a dataclass:
    :class:`mloop.monitoring.service.Reference`, which imports this module)."""

    version: int
    profile: dict[str, Any]
    features: list[str]
    prediction_profile: dict[str, Any] | None


R = TypeVar("R", bound=_Reference)


@dataclass(frozen=True)
class ChosenReference(Generic[R]):
    """The reference a window is judged against and its record for the report."""

    reference: R
    record: dict[str, Any]
    key: str  # names the reference (its null models are cached under it)


def choose_reference(project: Project, base: R, start: datetime, end: datetime
                     ) -> ChosenReference[R]:
    """The reference for the window ``[start, end)`` under ``monitoring.reference``: ``base``
    (the version's training reference) or a profile of the log's rows before ``start``."""
    choice = project.config.monitoring.reference
    training = {"kind": "training", "version": base.version, "rows": base.profile.get("rows")}
    if not isinstance(choice, RollingReference | SeasonalReference):
        return ChosenReference(base, training, f"training-v{base.version}")
    since, until = _span(choice, start, end)
    key = (f"monitoring/reference/{project.config.model_name}-v{base.version}-"
           f"{choice.text.replace(' ', '-')}-{_stamp(start)}-{_stamp(end)}.json")
    store = project.outputs
    cached = store.exists(key)
    if cached:
        stored = json.loads(store.read_bytes(key))
    else:
        stored = _profiles(project, base, since, until)
        store.write_bytes(key, json.dumps(stored).encode())
    kind = "rolling" if isinstance(choice, RollingReference) else "seasonal"
    span = {"since": since.isoformat(), "until": until.isoformat(), "rows": stored["rows"]}
    if stored["rows"] < MIN_ROWS:
        why = (f"the inference log holds {stored['rows']} row(s) from {since.isoformat()} to "
               f"{until.isoformat()} (fewer than {MIN_ROWS}; it does not reach back that "
               f"far): judged against training")
        return ChosenReference(base, {**training, "requested": choice.text, **{
            f"requested_{k}": v for k, v in span.items()}, "fallback": why},
            f"training-v{base.version}")
    profile = stored["inputs"]
    profile["temporal"] = log_temporal(base.profile, choice, kind)
    chosen = copy.copy(base)  # the version's metrics and calibration stay as they are
    chosen.profile, chosen.features = profile, stored["features"]
    chosen.prediction_profile = stored["prediction"]
    record = {"kind": kind, "length" if kind == "rolling" else "cycle": choice.text.split()[1],
              "version": base.version, **span, "cached": cached}
    return ChosenReference(chosen, record, key)


def log_temporal(training: dict[str, Any], choice: RollingReference | SeasonalReference,
                  kind: str) -> dict[str, Any]:
    """The temporal section a log-based reference's windows are judged with: the training
    snapshot's rolling null for this span, or why there is none."""
    stored = training.get("temporal") or {}
    rolling = stored.get("rolling") or {}
    if not isinstance(choice, RollingReference) or not rolling:
        return {"reason": TEMPORAL_REASON.format(kind=kind)}
    if not same_window(str(rolling.get("length")), choice.rolling.text):
        return {"reason": f"the training snapshot's rolling null is for {rolling.get('length')}"
                          f", this reference is {choice.text} (the next training snapshot is "
                          f"profiled for it)"}
    if rolling.get("reason"):
        return {"reason": str(rolling["reason"])}
    return {"window": stored.get("window"), "chunks": rolling.get("chunks"),
            "columns": rolling.get("columns") or {}, "rolling": rolling.get("length")}


def _span(choice: RollingReference | SeasonalReference, start: datetime, end: datetime
          ) -> tuple[datetime, datetime]:
    """The event times ``[since, until)`` the reference is read from; ``until <= start``."""
    if isinstance(choice, RollingReference):
        return start - choice.rolling, start
    since, until = choice.earlier(start), choice.earlier(end)
    return since, min(until, start)


def _profiles(project: Project, base: _Reference, since: datetime, until: datetime
              ) -> dict[str, Any]:
    """Profiles of the inputs and predictions logged with ``since <= _ts < until``."""
    from mloop.data.profile import compute_profile

    tick = timedelta(microseconds=1)  # read_rows takes since < _ts <= until
    rows = read_rows(project.uris["inference_log_uri"], since=since - tick, until=until - tick)
    bins = int(base.profile.get("bins") or project.config.profile.bins)
    top_k = int(base.profile.get("top_k") or project.config.profile.top_k)
    # a feature these rows never held (logged before it existed) is left out, not invented
    present = [c for c in base.features if c in rows.column_names]
    inputs = compute_profile(rows.select(present), bins=bins, top_k=top_k)
    prediction = None
    if base.prediction_profile is not None and PREDICTION in rows.column_names and rows.num_rows:
        prediction = compute_profile(pa.table({PREDICTION: rows.column(PREDICTION)}),
                                     bins=bins, top_k=top_k)
    return {"rows": rows.num_rows, "features": present, "inputs": inputs,
            "prediction": prediction}


def _stamp(when: datetime) -> str:
    return when.strftime("%Y%m%dT%H%M%S%fZ")
