"""The controller's progress, typed: what it has seen, what it is doing, what it did.

One :class:`LoopState` per model is kept in mloop's store (table ``loop_state``, one JSON
column) and saved after every step of a pass with a revision check, so a restart resumes from
the last saved step and a save based on a stale read fails
(:class:`~mloop.errors.StaleStateError`). That check only notices a second controller when it
saves; what keeps two from acting at once is the pass's lease (``mloop.loop.lease``), which
each save also checks is still this controller's.

The JSON is the one the controller wrote before these models existed: the keys are the field
names, times are ISO 8601 strings (read back as aware UTC datetimes; a time stored without an
offset, as SQLite returns window bounds, is UTC), and the wall clocks stored as Unix seconds
(``started_wall``) read as datetimes too. Keys the models do not know (written by another
mloop version) are kept: loaded into the model's extras and written back on save, so a load
and save never loses what someone else wrote.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer
from pydantic import ValidationError as _PydanticValidationError

from mloop.errors import MloopError, StaleStateError
from mloop.project import Project
from mloop.store.db import json_safe, utcnow
from mloop.store.models import LoopStateRow

if TYPE_CHECKING:
    from mloop.loop.lease import LoopLease

__all__ = ["DriftTrigger", "EstimatedPerformanceTrigger", "FeatureTrigger", "InFlight",
           "Instant", "LoopState", "NewLabelsTrigger", "Outcome", "PerformanceTrigger",
           "Probation", "Retrain", "ScheduleTrigger", "Trigger", "load_state", "save_state"]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# An aware UTC datetime, written as ``isoformat()`` (``2024-06-03T19:06:40+00:00``, as the
# controller always wrote it); naive input is UTC, a number is Unix seconds.
Instant = Annotated[datetime, AfterValidator(_utc),
                    PlainSerializer(lambda v: v.isoformat(), return_type=str, when_used="json")]


class _Record(BaseModel):
    """Unknown keys are kept (see the module's docstring); assignments are validated, so a
    naive datetime set on a field is made UTC like one read from the store."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


# --------------------------------------------------------------------------------- triggers

class DriftTrigger(_Record):
    """``consecutive`` drifted windows in a row (judged against the serving champion)."""

    trigger: Literal["drift"] = "drift"
    streak: int
    onset: Instant | None = None  # start of the first drifted window of the streak
    windows: list[int] = Field(default_factory=list)  # the drifted windows' ids
    drift_share: list[float | None] = Field(default_factory=list)


class FeatureTrigger(_Record):
    """A watched feature (``loop.triggers.features``) drifted in a window."""

    trigger: Literal["feature"] = "feature"
    feature: str
    window: int
    score: float | None = None
    threshold: float | None = None
    min_effect: float | None = None
    onset: Instant | None = None


class PerformanceTrigger(_Record):
    """The newest window with enough labels is worse than the reference by the margin."""

    trigger: Literal["performance"] = "performance"
    window: int
    metric: str | None = None
    value: float | None = None
    reference: float | None = None
    margin: float
    label_coverage: float | None = None
    onset: Instant | None = None


class EstimatedPerformanceTrigger(_Record):
    """The label-free estimate (CBPE or DLE) of ``consecutive`` windows in a row is worse than
    the version's holdout value by the margin, each estimate calibrated on the holdout."""

    trigger: Literal["estimated_performance"] = "estimated_performance"
    streak: int
    windows: list[int] = Field(default_factory=list)  # the newest worse windows' ids
    metric: str | None = None
    method: str | None = None  # cbpe or dle
    values: list[float] = Field(default_factory=list)  # their estimates
    reference: float | None = None
    margin: float
    onset: Instant | None = None  # start of the first window of the streak


class ScheduleTrigger(_Record):
    """``loop.triggers.schedule`` has passed since the last retrain (or the first pass)."""

    trigger: Literal["schedule"] = "schedule"
    every: str  # the schedule as written in mloop.yaml
    since: Instant
    onset: Instant | None = None


class NewLabelsTrigger(_Record):
    """At least ``threshold`` labelled rows arrived since the last retrain."""

    trigger: Literal["new_labels"] = "new_labels"
    labelled_rows: int
    threshold: int
    onset: Instant | None = None


Trigger = Annotated[DriftTrigger | FeatureTrigger | PerformanceTrigger
                    | EstimatedPerformanceTrigger | ScheduleTrigger | NewLabelsTrigger,
                    Field(discriminator="trigger")]

# what became of a retrain: "canary" while its challenger is on probation
Outcome = Literal["failed", "rejected", "promoted", "canary", "rolled_back"]


# ------------------------------------------------------------------------------ the state

class InFlight(_Record):
    """A retrain started and not yet finished: found at the start of a pass, it was
    interrupted (the controller died), and is recorded as such instead of redone."""

    triggered_at: Instant
    triggers: list[str] = Field(default_factory=list)  # the kinds that fired
    # which controller ran it, since when (wall clock), against which champion, and its
    # pipeline run once started (marked failed when the retrain is found interrupted);
    # states saved before these fields existed have none of them
    holder: str | None = None
    started_wall: Instant | None = None
    champion: int | None = None
    pipeline_run_id: str | None = None


class Probation(_Record):
    """A retrained challenger serving as canary, until the controller judges it."""

    version: int
    champion: int  # the champion it is judged against (and must still be to be replaced)
    started_at: Instant  # event time: the probation's length is counted in it
    # wall clock: the server's challenger errors are counted from here (older states: none)
    started_wall: Instant | None = None
    # the gate report the candidate passed (GateReport.to_dict()) and the hash of the gate
    # config it passed under: promote reuses it while that config is unchanged
    gates: dict[str, Any] | None = None
    gates_config: str | None = None


class Retrain(_Record):
    """One retrain the controller started, what it cost and what became of it."""

    triggered_at: Instant  # event time
    triggers: list[Trigger] = Field(default_factory=list)
    onset: Instant | None = None  # the earliest onset among the triggers (time to detect)
    champion: int | None = None  # the champion when it started
    started_wall: Instant | None = None
    version: int | None = None  # the candidate it registered (the refit, when there is one)
    held_out_version: int | None = None  # the held-out fit that passed the gates, if refit
    seconds: float | None = None
    cpu_seconds: float | None = None
    peak_memory_mb: float | None = None
    training_rows: int | None = None
    labelled_rows: int | None = None
    # with a feature store: the point-in-time join its training table went through
    features: dict[str, Any] | None = None
    pipeline_run_id: str | None = None  # the held-out fit's run
    refit_run_id: str | None = None  # the refit's run, if there was one
    gates_passed: bool | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    decided_at: Instant | None = None  # event time of promotion or rollback


class LoopState(_Record):
    """The controller's progress for one model; ``model`` and ``revision`` are the row's
    key and optimistic lock, not part of the stored JSON."""

    model: str = Field(exclude=True)
    revision: int = Field(default=0, exclude=True)  # 0: never saved
    started_at: Instant | None = None  # event time of the first pass that saw traffic
    last_window_id: int = 0  # monitor windows up to this id have been looked at
    drift_streak: int = 0
    drift_onset: Instant | None = None
    performance_seen_window: int = 0  # the last window the performance trigger fired on
    # windows in a row whose calibrated estimate was worse than the holdout by the margin
    estimate_streak: int = 0
    estimate_onset: Instant | None = None
    last_retrain_at: Instant | None = None  # event time; the cooldown counts from it
    last_promotion_at: Instant | None = None
    retrain_times: list[Instant] = Field(default_factory=list)  # the last 50, for max_per_day
    in_flight: InFlight | None = None
    probation: Probation | None = None
    history: list[Retrain] = Field(default_factory=list)

    def retrain_of(self, version: int) -> Retrain | None:
        """The newest history entry that registered ``version``."""
        return next((r for r in reversed(self.history) if r.version == version), None)


def load_state(project: Project) -> LoopState:
    """The saved state of the project's model (a fresh one if no controller saved one)."""
    name = project.config.model_name
    with project.store.session() as s:
        row = s.get(LoopStateRow, name)
        if row is None:
            return LoopState(model=name)
        body, revision = dict(row.state), row.revision
    try:
        return LoopState.model_validate({**body, "model": name, "revision": revision})
    except _PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MloopError(f"the loop state of '{name}' (revision {revision}, table loop_state "
                         f"of mloop's store) cannot be read: {where}: {first['msg']}") from None


def save_state(project: Project, state: LoopState, *, lease: LoopLease | None = None) -> None:
    """Write ``state`` if nobody saved since it was read, and bump its revision; else
    StaleStateError (another controller is running: this pass must stop acting). With the
    pass's ``lease``, the same transaction checks it is still this controller's
    (LeaseLostError, a StaleStateError, if not)."""
    body = json_safe(state.model_dump(mode="json"))
    with project.store.session(write=True) as s:
        if lease is not None:
            lease.verify(s)
        row = s.get(LoopStateRow, state.model)
        current = row.revision if row is not None else 0
        if current != state.revision:
            raise StaleStateError(f"the loop state of '{state.model}' changed underneath this "
                                  f"pass (revision {current}, expected {state.revision}): "
                                  f"another controller is running")
        if row is None:
            s.add(LoopStateRow(model=state.model, revision=1, state=body, updated_at=utcnow()))
        else:
            row.revision, row.state, row.updated_at = current + 1, body, utcnow()
        try:
            s.commit()
        except sa.exc.IntegrityError:
            raise StaleStateError(f"another controller created the loop state of "
                                  f"'{state.model}' first") from None
    state.revision = current + 1
