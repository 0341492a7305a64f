"""mloop.yaml: the pydantic model of a project's configuration, and its loader.

The loader keeps the YAML line of every key so each error reads
``mloop.yaml:12: unknown key 'modle' under 'train' (did you mean 'model'?)``.
``${VAR}`` in any string value is replaced from the environment (for secrets); a missing
variable is an error naming the key, never an empty string.

Lengths of time (``cooldown: 21d``) are parsed here once, into :class:`Duration` (a
``timedelta``); every other module uses that. Fields that do not shape the trained model carry
a :class:`NotHashed` marker, which is how :meth:`ProjectConfig.config_hash` leaves them out.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from mloop.errors import ConfigError

CONFIG_FILE = "mloop.yaml"

Task = Literal["regression", "classification"]


# ------------------------------------------------------------------------------ durations

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_HELP = "a number and a unit (s, m, h or d), e.g. 30s, 90m, 6h, 1.5d"


class Duration(timedelta):
    """A length of time as mloop.yaml writes it: ``30s``, ``90m``, ``6h``, ``1.5d``.

    It is a ``timedelta`` (compare it, add it to a datetime, ``total_seconds()``) that prints
    and dumps as it was written, so messages and events quote the user's value ("cooldown
    21d", not "21 days, 0:00:00"). Arithmetic on it gives plain timedeltas. The one parser of
    durations: monitoring windows and the loop's policy use it too.
    """

    __slots__ = ("text",)
    text: str

    @classmethod
    def parse(cls, value: object) -> Duration:
        """``value`` as a Duration: a string such as ``6h``, or a timedelta. ValueError names
        the value and the accepted forms (the config loader adds file, line and key)."""
        if isinstance(value, Duration):
            return value
        if isinstance(value, timedelta) and value >= timedelta(0):
            return cls._make(value, _written(value))
        m = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            hint = (f"; for seconds write {value}s" if isinstance(value, int | float)
                    and not isinstance(value, bool) else "")
            raise ValueError(f"{value!r} is not a duration: write {_DURATION_HELP}{hint}")
        try:
            length = timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
        except OverflowError:
            raise ValueError(f"{value!r} is too long a duration (at most 999999999d)") from None
        return cls._make(length, m.group(0))

    @classmethod
    def _make(cls, length: timedelta, text: str) -> Duration:
        out = cls(length.days, length.seconds, length.microseconds)
        out.text = text
        return out

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Duration({self.text!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # copies and pickles keep the text
        return (Duration.parse, (self.text,))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler
                                     ) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.to_string_ser_schema(when_used="json"))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler
                                     ) -> JsonSchemaValue:
        return {"type": "string", "pattern": f"^{_DURATION_RE.pattern}$",
                "examples": ["30s", "90m", "6h", "1.5d"]}


def _written(length: timedelta) -> str:
    """The shortest way to write ``length`` in the units a Duration reads."""
    us = length // timedelta(microseconds=1)
    for unit in ("d", "h", "m", "s"):
        per = _UNIT_SECONDS[unit] * 1_000_000
        if us % per == 0:
            return f"{us // per}{unit}"
    return f"{us // 1_000_000}.{us % 1_000_000:06d}".rstrip("0") + "s"


def parse_window(text: str) -> Duration | int:
    """A monitoring window's size: a positive duration (``1d``, ``6h``; by event time) or a
    positive row count (``5000rows``). ValueError says what is allowed."""
    spec = text.strip()
    rows = re.fullmatch(r"(\d+)rows", spec)
    size: Duration | int | None = int(rows.group(1)) if rows else None
    if rows is None and _DURATION_RE.fullmatch(spec):
        size = Duration.parse(spec)
    if not size:  # neither, or zero
        raise ValueError(f"{text!r} is not a window size: a duration such as 1d, 6h or 30m, "
                         f"or a row count such as 5000rows")
    return size


def _window(text: str) -> str:
    parse_window(text)
    return text


def _prometheus_interval(value: Duration) -> Duration:
    # written as-is into a ServiceMonitor: Prometheus takes whole numbers with a unit
    if not re.fullmatch(r"\d+[smhd]", value.text):
        raise ValueError(f"{value.text!r}: Prometheus takes a whole number and a unit "
                         f"(s, m, h or d), e.g. 30s or 1m")
    return value


PrometheusInterval = Annotated[Duration, AfterValidator(_prometheus_interval)]


# ------------------------------------------------------------------------- config_hash


@dataclass(frozen=True)
class NotHashed:
    """Marks a config field that does not shape the trained model, so ``config_hash`` (which
    registered versions carry) leaves it out: ``Annotated[ServingConfig, NotHashed("...")]``.
    ``why`` is the reason, for the reader; a marker on a nested field works too."""

    why: str


@functools.cache
def unhashed_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` marked :class:`NotHashed`, as pydantic's ``exclude`` argument:
    ``{"stores": True, ...}``, with nested markers under their section (``{"__all__": ...}``
    through lists and mappings of models)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if any(isinstance(m, NotHashed) for m in field.metadata):
            out[name] = True
            continue
        inner = _unhashed_inside(field.annotation)
        if inner:
            out[name] = inner
    return out


def _unhashed_inside(annotation: Any) -> dict[str, Any]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unhashed_fields(annotation)
    origin, args = getattr(annotation, "__origin__", None), getattr(annotation, "__args__", ())
    if origin in (list, dict) and args:
        inner = _unhashed_inside(args[-1])
        return {"__all__": inner} if inner else {}
    for arg in args:  # X | None
        inner = _unhashed_inside(arg)
        if inner:
            return inner
    return {}


class _Strict(BaseModel):
    # defer_build: a model's validator is built when first used, not at import: every
    # command imports this module, most validate a few sections (~0.1 s per call here)
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)


class StoresConfig(_Strict):
    """Where everything lives. Relative paths resolve against the project folder.

    Each is overridden by an environment variable (see ``STORE_ENV_VARS``).
    """

    tracking_uri: str = "sqlite:///.mloop/mlflow.db"
    registry_uri: str | None = None
    artifact_root: str = ".mloop/artifacts"
    store_uri: str = "sqlite:///.mloop/mloop.db"
    data_uri: str = ".mloop/data"
    outputs_uri: str = ".mloop/outputs"
    inference_log_uri: str = ".mloop/inference"


STORE_ENV_VARS: dict[str, str] = {
    "tracking_uri": "MLOOP_TRACKING_URI",
    "registry_uri": "MLOOP_REGISTRY_URI",
    "artifact_root": "MLOOP_ARTIFACT_ROOT",
    "store_uri": "MLOOP_STORE_URI",
    "data_uri": "MLOOP_DATA_URI",
    "outputs_uri": "MLOOP_OUTPUTS_URI",
    "inference_log_uri": "MLOOP_INFERENCE_LOG_URI",
}


class DataConfig(_Strict):
    """The training data: a CSV/Parquet file or folder, or a SQL query on a SQLAlchemy URL."""

    path: str | None = None
    format: Literal["csv", "parquet"] | None = None
    sql: str | None = None
    url: str | None = None
    since: str | None = Field(None, description="keep rows with time_column >= since")
    until: str | None = Field(None, description="keep rows with time_column < until")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.path is None and self.sql is None:
            raise ValueError("needs either 'path' (a CSV/Parquet file or folder) or 'sql' + 'url'")
        if self.path is not None and self.sql is not None:
            raise ValueError("give either 'path' or 'sql', not both")
        if self.sql is not None and not self.url:
            raise ValueError("'sql' needs 'url' (a SQLAlchemy URL such as postgresql://host/db)")
        return self


class FeaturesConfig(_Strict):
    """Which columns feed the model. Unlisted columns are typed from their dtype.

    ``store: feast`` adds columns from a Feast feature repo: ``data`` is then the entity table
    (join keys, event timestamps in ``time_column``, request-time features, the target) and
    the ingest step joins the ``feature_refs`` (or the ``feature_service``) onto it point in
    time.
    """

    numeric: list[str] | None = None
    categorical: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    time_column: str | None = None
    store: Literal["feast"] | None = None
    repo: str = "feature_repo"  # the Feast repo folder (feature_store.yaml + definitions)
    feature_refs: list[str] | None = None  # "view:feature"
    feature_service: str | None = None

    @field_validator("feature_refs")
    @classmethod
    def _refs(cls, refs: list[str] | None) -> list[str] | None:
        for ref in refs or []:
            view, _, name = ref.partition(":")
            if not view or not name or ":" in name:
                raise ValueError(f"feature reference '{ref}' must be 'view:feature'")
        return refs

    @model_validator(mode="after")
    def _feast(self) -> FeaturesConfig:
        chosen = [k for k in ("feature_refs", "feature_service") if getattr(self, k)]
        if self.store is None:
            if chosen:
                raise ValueError(f"'{chosen[0]}' needs 'store: feast'")
            return self
        if len(chosen) != 1:
            raise ValueError("'store: feast' needs exactly one of 'feature_refs' (a list of "
                             "'view:feature') or 'feature_service'")
        if not self.time_column:
            raise ValueError("'store: feast' needs 'time_column': the entity table's event "
                             "timestamps, the instant each row's features are looked up at")
        return self


class SplitConfig(_Strict):
    method: Literal["time", "random"] | None = None  # time when a time column is set
    holdout: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 42
    # Fit the registered model on every row (train + holdout). The holdout is still cut and
    # its metrics are in-sample, so such a version is tagged ``mloop.refit``; the loop sets it
    # only after the held-out fit passed its gates (``loop.retrain.refit``).
    refit: bool = False


class ModelConfig(_Strict):
    name: str | None = None  # registered model name; defaults to the project name
    estimator: str | None = None  # import path; a HistGradientBoosting model by task if unset
    params: dict[str, Any] = Field(default_factory=dict)
    categorical_encoding: Literal["onehot", "ordinal"] = "onehot"
    numeric_imputation: Literal["median", "mean", "none"] = "median"
    # OpenMP/BLAS threads while fitting (None: the libraries' default, every core). On a
    # machine that also serves, a tree ensemble's thread team waits for busy cores: a fit of
    # a few thousand rows took 20 s with two threads and 1 s with one.
    threads: int | None = Field(None, ge=1)
    # What the model is for and where it must not be trusted, in the team's words: the model
    # card (`mloop models card`) quotes them as written. Not part of training: excluded from
    # every dump, so the train step's parameters (its cache key), a tuning study's setup and
    # the config hash stay as they were; editing them retrains nothing.
    description: str | None = Field(None, exclude=True)
    limitations: str | None = Field(None, exclude=True)


class ColumnExpectation(_Strict):
    type: Literal["numeric", "integer", "string", "bool", "datetime"] | None = None
    min: float | None = None
    max: float | None = None
    allowed: list[Any] | None = None
    max_missing_rate: float | None = Field(None, ge=0.0, le=1.0)


class ValidationConfig(_Strict):
    """Expectations checked by the validate step; a violation fails the run with a report."""

    required_columns: list[str] = Field(default_factory=list)
    max_missing_rate: float | None = Field(None, ge=0.0, le=1.0)
    min_rows: int = Field(1, ge=0)
    columns: dict[str, ColumnExpectation] = Field(default_factory=dict)


class PipelineConfig(_Strict):
    entry: str | None = None  # "module:function" (module relative to the project) or built-in
    steps: dict[str, str] = Field(default_factory=dict)  # step name -> "module:function"
    retries: int = Field(0, ge=0, le=10)
    retry_backoff_seconds: float = Field(1.0, ge=0.0)
    cache: bool = True


class ProfileConfig(_Strict):
    bins: int = Field(20, ge=2, le=1000)
    top_k: int = Field(50, ge=1, le=10_000)


class AbsoluteGate(_Strict):
    """``metric >= min`` and/or ``metric <= max`` on the candidate's holdout."""

    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> AbsoluteGate:
        if self.min is None and self.max is None:
            raise ValueError("needs 'min' and/or 'max'")
        return self


class NonInferiorityGate(_Strict):
    """The candidate may be worse than the champion by at most ``margin`` (metric units), judged
    on the upper end of a paired bootstrap confidence interval of the difference."""

    metric: str | None = None  # default: the primary metric
    margin: float = Field(ge=0.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    resamples: int = Field(2000, ge=100, le=100_000)
    seed: int = 0


class LatencyGate(_Strict):
    """Measured through the pyfunc interface on holdout rows."""

    p95_ms: float | None = Field(None, gt=0.0)  # single-row predict
    min_rows_per_s: float | None = Field(None, gt=0.0)  # one batch of batch_rows
    samples: int = Field(100, ge=10, le=100_000)
    batch_rows: int = Field(1000, ge=10)


class SizeGate(_Strict):
    max_mb: float = Field(gt=0.0)


class SanityGate(_Strict):
    """Always on: no NaN/inf, classes seen in training; optional regression output range."""

    prediction_min: float | None = None
    prediction_max: float | None = None


class SliceGate(_Strict):
    """The metric on each value of ``column`` (quantile buckets if numeric) may be worse than
    the overall metric by at most ``margin``; slices under ``min_size`` rows are skipped."""

    column: str
    metric: str | None = None
    margin: float = Field(ge=0.0)
    min_size: int = Field(30, ge=1)
    buckets: int = Field(4, ge=2, le=100)


class GatesConfig(_Strict):
    auto_promote: bool = False
    absolute: list[AbsoluteGate] = Field(default_factory=list)
    non_inferiority: NonInferiorityGate | None = None
    latency: LatencyGate | None = None
    size: SizeGate | None = None
    signature: bool = True  # compatibility with the champion's signature
    sanity: SanityGate = Field(default_factory=SanityGate)
    slices: list[SliceGate] = Field(default_factory=list)
    # how far `mloop models reproduce` may land from the recorded metrics (0: exactly)
    reproduce_tolerance: float = Field(0.0, ge=0.0)


class InferenceLogConfig(_Strict):
    """The background writer of served rows (see mloop.traffic.inference_log)."""

    enabled: bool = True
    commit_interval_seconds: float = Field(1.0, gt=0, le=3600)  # what a kill -9 can lose
    max_queue_rows: int = Field(200_000, ge=1)
    on_full: Literal["drop", "block"] = "drop"  # drop-and-count, or hold the response


class CompileConfig(_Strict):
    """The verified fast path (mloop.serving.compiled): ONNX only where it matches."""

    enabled: bool = True
    # values and class probabilities: |compiled - original| <= atol + rtol*|original|
    atol: float = Field(1e-3, ge=0)
    rtol: float = Field(1e-4, ge=0)
    # classification: share of rows whose label or a probability may differ
    max_label_mismatch: float = Field(0.0, ge=0, le=1)
    # load the graph and verdict stored with the version (false: compile and verify at
    # every load, as before they were stored; kept to measure the difference)
    stored: bool = True


class ServingConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    max_batch_rows: int = Field(64, ge=1)  # micro-batch size, and the smallest piece
    # a large request is scored in pieces predicted to take this long (0: max_batch_rows)
    max_batch_ms: float = Field(20.0, ge=0, le=10_000)
    # the most a free model holds a batch open for company (only while requests arrive and
    # its per-call cost dominates; 0: never)
    max_wait_ms: float = Field(10.0, ge=0, le=1000)
    # a compiled model's batch predicted to take at most this long is scored on the event
    # loop, without the hand-off to the model thread (0: always the model thread)
    inline_ms: float = Field(0.5, ge=0, le=100)
    max_body_bytes: int = Field(1_048_576, ge=1024)  # larger bodies get 413
    # request fields outside the signature: left out and counted (false), or 422 (true)
    strict_columns: bool = False
    poll_seconds: float = Field(5.0, gt=0)  # how often aliases are checked (hot swap)
    model_threads: int = Field(1, ge=1)  # BLAS/OpenMP threads inside predict
    shadow_queue_rows: int = Field(10_000, ge=1)  # beyond this, shadow copies are dropped
    auth: bool | None = None  # None: on when binding beyond loopback
    tls_cert: str | None = None
    tls_key: str | None = None
    inference_log: InferenceLogConfig = Field(default_factory=InferenceLogConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServingConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self


class QualityConfig(_Strict):
    missing_rate_rise: float = Field(0.05, ge=0, le=1)  # absolute rise over the reference
    out_of_range_rate: float = Field(0.01, ge=0, le=1)  # share outside the reference range
    unseen_category_rate: float = Field(0.01, ge=0, le=1)


class WebhookConfig(_Strict):
    """POSTed a JSON body when a window breaches (drift, quality, performance)."""

    url: str = Field(pattern=r"^https?://")
    timeout_seconds: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0, le=20)
    backoff_seconds: float = Field(0.5, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. a token from ${VAR}


DriftMethod = Literal["auto", "psi", "ks", "wasserstein", "jensen_shannon", "chisquare"]


class RollingReference(_Strict):
    """``reference: {rolling: 28d}``: each window is compared with the traffic (labelled or
    not) logged in this much event time just before it."""

    rolling: Duration

    @field_validator("rolling")
    @classmethod
    def _positive(cls, value: Duration) -> Duration:
        if value <= timedelta(0):
            raise ValueError(f"{value.text!r} must be longer than zero, e.g. 28d")
        return value

    @property
    def text(self) -> str:
        return f"rolling {self.rolling.text}"


_CYCLE_RE = re.compile(r"([1-9]\d*)y")


class SeasonalReference(_Strict):
    """``reference: {seasonal: 1y}``: each window is compared with the same period one cycle
    earlier. ``Ny`` is N calendar years (the same date and hour; 29 February maps to the 28th),
    any other duration a fixed length (``364d`` keeps weekdays aligned)."""

    seasonal: str

    @field_validator("seasonal", mode="before")
    @classmethod
    def _cycle(cls, value: object) -> str:
        if isinstance(value, str) and _CYCLE_RE.fullmatch(value):
            return value
        try:
            length = Duration.parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a cycle: write a number of years (1y) or "
                             f"{_DURATION_HELP}") from None
        if length <= timedelta(0):
            raise ValueError(f"{value!r} must be longer than zero, e.g. 1y or 364d")
        return length.text

    @property
    def text(self) -> str:
        return f"seasonal {self.seasonal}"

    def earlier(self, when: datetime) -> datetime:
        """``when`` one cycle ago."""
        years = _CYCLE_RE.fullmatch(self.seasonal)
        if years is None:
            return when - Duration.parse(self.seasonal)
        year = when.year - int(years.group(1))
        try:
            return when.replace(year=year)
        except ValueError:  # 29 February in a year without one
            return when.replace(year=year, day=28)


_REFERENCE_HELP = "training, {rolling: 28d} or {seasonal: 1y}"


def _reference(value: object) -> object:
    """The one shape check of ``monitoring.reference``, so a bad value gets one message
    naming what it takes rather than one per member of the union."""
    if isinstance(value, RollingReference | SeasonalReference) or value == "training":
        return value
    if isinstance(value, dict) and len(value) == 1:
        kind = str(next(iter(value)))
        kinds: dict[str, type[_Strict]] = {"rolling": RollingReference,
                                           "seasonal": SeasonalReference}
        model = kinds.get(kind)
        if model is not None:
            try:
                return model.model_validate(value)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"{kind}: {msg}") from None
    got = json.dumps(value, default=str)
    raise ValueError(f"expected {_REFERENCE_HELP}, got {got}")


ReferenceChoice = Annotated[Literal["training"] | RollingReference | SeasonalReference,
                            BeforeValidator(_reference)]


class MonitoringConfig(_Strict):
    """Drift and quality of live windows against the champion's training profile."""

    # by event time (1d, 6h) or by count (5000rows); the text names the windows in the store
    window: Annotated[str, AfterValidator(_window)] = "1d"
    # a time window closes once the newest event is this far past its end (late commits)
    lateness_seconds: float = Field(10.0, ge=0)
    label_horizon_windows: int = Field(60, ge=1)  # windows re-scored when labels arrive
    false_alarm_rate: float = Field(0.01, gt=0, lt=0.5)  # P(dataset drift | no change)
    methods: dict[str, DriftMethod] = Field(default_factory=dict)  # column -> method
    min_effect: dict[str, float] = Field(default_factory=dict)  # method -> practical size
    simulations: int | None = Field(None, ge=100)  # null draws (at least enough for Holm)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    # a window's labelled metric this much worse than the holdout's (relative) is a breach
    performance_margin: float = Field(0.1, ge=0)
    min_label_coverage: float = Field(0.5, ge=0, le=1)  # alert rule: coverage below this
    webhook: WebhookConfig | None = None
    # what a window is compared with: the training profile, the traffic just before it, or
    # the same period a cycle ago (mloop.monitoring.reference)
    reference: ReferenceChoice = "training"


class DriftTrigger(_Strict):
    consecutive: int = Field(2, ge=1)  # dataset drift in this many consecutive windows


class PerformanceTrigger(_Strict):
    margin: float = Field(0.15, ge=0)  # labelled metric worse than holdout by this (relative)
    min_labelled: int = Field(100, ge=1)  # labelled rows a window needs to count


class EstimatedPerformanceTrigger(_Strict):
    """The metric estimated without labels (CBPE for a classifier, DLE for regression) worse
    than the version's holdout value by ``margin`` (relative, in the metric's direction, as
    ``performance``) in ``consecutive`` windows in a row; only an estimate whose holdout check
    passed (``calibrated``) counts."""

    margin: float = Field(0.15, ge=0)
    consecutive: int = Field(2, ge=1)


class TriggersConfig(_Strict):
    """Any one of these starts a retrain (subject to the guards)."""

    drift: DriftTrigger | None = None
    features: list[str] = Field(default_factory=list)  # drift of a named feature
    performance: PerformanceTrigger | None = None
    estimated_performance: EstimatedPerformanceTrigger | None = None  # before labels
    schedule: Duration | None = None  # at most this long between retrains
    new_labels: int | None = Field(None, ge=1)  # labelled rows since the last retrain


class RetrainConfig(_Strict):
    window: Duration = Duration.parse("60d")  # most recent labelled traffic
    include_original: bool = False  # plus the champion's original training snapshot
    min_labelled_rows: int = Field(500, ge=1)
    # once the held-out fit passed its gates, fit again on the whole window (its holdout too)
    # and roll that out: the most recent days are the ones a retrain most needs
    refit: bool = True


class GuardsConfig(_Strict):
    cooldown: Duration = Duration.parse("1d")  # between retrains (event time)
    max_per_day: int = Field(3, ge=1)


class CanaryPolicy(_Strict):
    weight: float = Field(0.2, gt=0, lt=1)
    probation: Duration = Duration.parse("3d")  # event time before the verdict
    min_labelled: int = Field(100, ge=1)  # labelled rows of the probation (paired verdict)
    margin: float = Field(0.0, ge=0)  # challenger may be worse than champion by this (rel.)
    latency_p95_ms: float | None = Field(None, gt=0)  # breach: immediate rollback


class CostRates(_Strict):
    """Prices of compute (``mloop cost``, the loop's retrain cost) and the daily budget.

    Written as the top-level ``costs:`` section; ``loop.costs`` (where the prices lived
    first) is still read, and the two are one object after loading."""

    cpu_hour: float = Field(0.05, ge=0)  # money per CPU-hour
    gb_hour: float = Field(0.005, ge=0)  # money per GB-hour of peak memory
    currency: str = "USD"
    # money per day (last 24 hours, wall clock) for training, tuning, retraining and serving
    # together: an alert rule above it, and the loop holds a retrain that would exceed it
    budget_per_day: float | None = Field(None, gt=0)


def _lease_length(value: Duration) -> Duration:
    if value.total_seconds() < 1:
        raise ValueError(f"{value.text!r} is too short a lease: at least 1s (it is renewed "
                         f"every third of it; 5m is the default)")
    return value


class LoopConfig(_Strict):
    """The closed loop's policy: when to retrain, how to roll out, when to give up."""

    enabled: bool = True
    # how long a controller that stopped renewing (killed, its node gone) keeps others out;
    # renewed every third of it while it runs, so a long pass never outlives it (loop/lease.py)
    lease: Annotated[Duration, AfterValidator(_lease_length)] = Duration.parse("5m")
    action: Literal["retrain", "alert"] = "retrain"  # alert: tell, never act
    # with features.store set: each pass first brings the online store up to its clock
    materialize: bool = True
    triggers: TriggersConfig = Field(default_factory=TriggersConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    canary: CanaryPolicy | None = Field(default_factory=CanaryPolicy)  # None: promote at once
    costs: CostRates = Field(default_factory=CostRates)


def _partial(model: type[BaseModel], name: str) -> Any:
    """``model`` with every field optional and unset by default: an environment's override
    of a section, validated field by field with the section's own types and bounds, and
    merged onto the project's section (:meth:`ProjectConfig.in_environment`)."""
    from pydantic import create_model

    fields: dict[str, Any] = {}
    for key, f in model.model_fields.items():
        kind: Any = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[key] = (kind | None, None)
    return create_model(name, __base__=_Strict, __doc__=model.__doc__, **fields)


if TYPE_CHECKING:  # to mypy, a section model; to pydantic, its all-optional twin
    StoresOverride = _Strict
    ServingOverride = _Strict
else:
    StoresOverride = _partial(StoresConfig, "StoresOverride")
    ServingOverride = _partial(ServingConfig, "ServingOverride")
_ENV_NAME = r"^[a-z][a-z0-9_-]*$"


class EnvironmentConfig(_Strict):
    """One environment (dev, staging, prod): the stores and serving settings that differ
    from the project's own; anything unset is the project's."""

    stores: StoresOverride = Field(default_factory=StoresOverride)
    serving: ServingOverride = Field(default_factory=ServingOverride)


class PromotionConfig(_Strict):
    """How a version moves between environments (``mloop models promote V --to ENV``)."""

    # environments in the order a version travels; empty: the order of ``environments``
    order: list[str] = Field(default_factory=list)
    # how long a version must have served as champion, without a breach, in an environment
    # it was promoted into before it may leave it (staging -> prod); None: no soak
    soak: Duration | None = None
    # environments whose promotions need `mloop models approve ... --by NAME` first
    approval: dict[str, bool] = Field(default_factory=dict)


PiiAction = Literal["drop", "hash", "mask"]


def _positive_retention(value: Duration | None) -> Duration | None:
    if value is not None and value.total_seconds() <= 0:
        raise ValueError(f"{value.text!r}: a retention must be longer than zero (e.g. 180d)")
    return value


class SearchParam(_Strict):
    """One estimator parameter of a tuning search space: a float or int between ``low`` and
    ``high`` (optionally on a log scale or in steps), or one of ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[str | int | float | bool | None] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            extra = [k for k in ("low", "high", "step") if getattr(self, k) is not None]
            if extra or self.log:
                raise ValueError(f"a categorical parameter takes only 'choices', not "
                                 f"{', '.join(extra or ['log'])}")
            return self
        if self.choices is not None:
            raise ValueError(f"'choices' is for categorical parameters; a {self.type} takes "
                             f"'low' and 'high'")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("give either 'log' or 'step', not both")
        if self.type == "int":
            for k in ("low", "high", "step"):
                v = getattr(self, k)
                if v is not None and v != int(v):
                    raise ValueError(f"an int parameter needs a whole '{k}' (got {v:g})")
        return self


class TuneConfig(_Strict):
    """`mloop tune`: an Optuna study over estimator parameters, scored on an inner validation
    split of the training snapshot; the best trial becomes a gated candidate."""

    metric: str | None = None  # default: the primary (first) metric
    trials: int = Field(30, ge=1, le=100_000)  # the study's total of complete + pruned trials
    timeout_seconds: float | None = Field(None, gt=0)  # per worker: start no trial after this
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0  # worker i samples with seed + i
    pruner: Literal["median", "none"] = "median"  # where the estimator can train in stages
    # share of the training snapshot that scores trials (default: split.holdout); the holdout
    # itself stays unseen until the chosen candidate is evaluated and gated
    validation: float | None = Field(None, gt=0.0, lt=1.0)
    # BLAS/OpenMP threads of each worker's fits (null: the libraries' default); parallelism
    # comes from --workers: one thread per trial is fastest on small data and a busy machine
    threads: int | None = Field(1, ge=1)
    search_space: dict[str, SearchParam] = Field(default_factory=dict)

    @field_validator("search_space")
    @classmethod
    def _a_space(cls, space: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if not space:
            raise ValueError("empty: list at least one estimator parameter, e.g. "
                             "learning_rate: {type: float, low: 0.01, high: 0.3, log: true}")
        return space


# Kubernetes quantities: 500m, 2, 0.5, 512Mi, 1Gi
_QUANTITY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_QUANTITY_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
                    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50,
                    "Ei": 2.0**60}
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_CRON_FIELD = r"[0-9A-Za-z*?/,-]+"
_CRON_RE = re.compile(rf"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
                      rf"|{_CRON_FIELD}(\s+{_CRON_FIELD}){{4}})$")


def quantity_value(q: str) -> float:
    """A Kubernetes quantity (``500m``, ``1Gi``) as a plain number, for comparisons."""
    m = _QUANTITY_RE.match(q)
    if m is None:
        raise ValueError(f"'{q}' is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 1Gi)")
    return float(m.group(1)) * _QUANTITY_SUFFIX.get(m.group(2) or "", 1.0)


def _number_to_str(value: Any) -> Any:
    # YAML reads `cpu: 1` as a number; Kubernetes wants the quantity as a string
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _quantity(value: str) -> str:
    quantity_value(value)
    return value


def _dns_label(value: str) -> str:
    if not re.match(_DNS_LABEL, value):
        raise ValueError(f"'{value}' is not a DNS label: lowercase letters, digits and '-', "
                         f"starting and ending with a letter or digit")
    return value


DnsLabel = Annotated[str, AfterValidator(_dns_label)]


def _cron(value: str) -> str:
    if not _CRON_RE.match(value.strip()):
        raise ValueError(f"'{value}' is not a cron schedule (five fields such as "
                         f"'*/15 * * * *', or @hourly / @daily / @weekly)")
    return value.strip()


Quantity = Annotated[str, BeforeValidator(_number_to_str), AfterValidator(_quantity)]


class ResourceAmounts(_Strict):
    cpu: Quantity | None = None  # 500m, 1, 2
    memory: Quantity | None = None  # 512Mi, 2Gi


class ResourcesConfig(_Strict):
    """A container's requests and limits (Kubernetes quantities)."""

    requests: ResourceAmounts = Field(default_factory=lambda: ResourceAmounts(
        cpu="500m", memory="1Gi"))
    limits: ResourceAmounts = Field(default_factory=lambda: ResourceAmounts(
        cpu="2", memory="2Gi"))

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourcesConfig:
        for kind in ("cpu", "memory"):
            want, cap = getattr(self.requests, kind), getattr(self.limits, kind)
            if want is not None and cap is not None and quantity_value(want) > quantity_value(
                    cap):
                raise ValueError(f"requests.{kind} ({want}) is above limits.{kind} ({cap})")
        return self


class HpaConfig(_Strict):
    """The HorizontalPodAutoscaler of the serving Deployment (autoscaling/v2, on CPU)."""

    enabled: bool = True
    min_replicas: int = Field(2, ge=1)
    max_replicas: int = Field(10, ge=1)
    cpu_utilization: int = Field(70, ge=1, le=100)  # target average, % of the CPU request

    @model_validator(mode="after")
    def _ordered(self) -> HpaConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas "
                             f"({self.max_replicas})")
        return self


class LoopJobConfig(_Strict):
    """The CronJob running ``mloop loop --once`` (never two at once)."""

    schedule: Annotated[str, AfterValidator(_cron)] = "*/15 * * * *"  # cron, in time_zone
    time_zone: str | None = None  # e.g. Europe/Berlin (default: the controller manager's)
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(
        requests=ResourceAmounts(cpu="1", memory="2Gi"),
        limits=ResourceAmounts(cpu="2", memory="4Gi")))
    deadline_seconds: int | None = Field(None, ge=1)  # activeDeadlineSeconds of one pass


class UiDeployConfig(_Strict):
    """The dashboard's Deployment and Service (``mloop ui``; bound beyond loopback, so it
    needs a login unless serving.auth is false). On by default: it only reads the stores the
    other pods share, and its Service is cluster-internal (no Ingress is written)."""

    enabled: bool = True
    port: int = Field(8050, ge=1, le=65535)  # the container's port
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(
        requests=ResourceAmounts(cpu="100m", memory="512Mi"),
        limits=ResourceAmounts(cpu="1", memory="1Gi")))


class KubernetesConfig(_Strict):
    """What `mloop export k8s` writes: images, sizes and schedules of the cluster objects."""

    # default: the project's name made DNS-safe; "<name>-loop" must fit a CronJob's 52 chars
    name: DnsLabel | None = Field(None, max_length=47)
    namespace: DnsLabel | None = Field(None, max_length=63)  # None: kubectl's current one
    image: str | None = None  # default: "<name>:latest"
    base_image: str = "python:3.11-slim"  # FROM of the Dockerfile
    port: int = Field(8080, ge=1, le=65535)  # the container's HTTP (and /metrics) port
    replicas: int = Field(2, ge=1)  # the Deployment's, when the HPA is off
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    hpa: HpaConfig = Field(default_factory=HpaConfig)
    loop: LoopJobConfig = Field(default_factory=LoopJobConfig)
    ui: UiDeployConfig = Field(default_factory=UiDeployConfig)
    secret_name: DnsLabel | None = None  # holds store URIs with credentials; "<name>-stores"
    service_account: DnsLabel | None = None
    monitor_labels: dict[str, str] = Field(default_factory=dict)  # for Prometheus' selectors
    scrape_interval: PrometheusInterval = Duration.parse("30s")

    @model_validator(mode="after")
    def _hpa_needs_a_cpu_request(self) -> KubernetesConfig:
        if self.hpa.enabled and self.resources.requests.cpu is None:
            raise ValueError("hpa targets CPU utilization, a share of resources.requests.cpu: "
                             "set resources.requests.cpu or hpa.enabled: false")
        return self


class AirflowConfig(_Strict):
    """What `mloop export airflow` writes: a DAG whose tasks call the mloop CLI."""

    dag_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", max_length=200)  # project
    schedule: Annotated[str, AfterValidator(_cron)] | None = None  # None: triggered by hand
    mloop_bin: str = Field("mloop", min_length=1)  # the mloop executable on the workers
    project_dir: str | None = None  # the project's folder on the workers; None: this one


class KubeflowConfig(_Strict):
    """What `mloop export kubeflow` writes: a KFP v2 pipeline whose tasks call the mloop CLI."""

    # KFP's pipeline name; None: the project's name in lower case, '-' for other characters
    pipeline_name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,127}$")
    # every task's image: it must hold mloop and kfp (mloop[kubeflow]); tasks install nothing.
    # None: the image `mloop export k8s` builds (kubernetes.image, else "<name>:latest")
    base_image: str | None = Field(None, min_length=1)
    mloop_bin: str = Field("mloop", min_length=1)  # the mloop executable in the image
    project_dir: str | None = None  # the project's folder in the image; None: /app/project


class SparkConfig(_Strict):
    """`mloop predict --engine spark` (mloop[spark]): where the job runs and Spark settings."""

    master: str = Field("local[2]", min_length=1)  # --master overrides; e.g. spark://host:7077
    # any Spark setting, e.g. spark.jars.packages (hadoop-aws for s3://), spark.executor.memory
    conf: dict[str, str | int | float | bool] = Field(default_factory=dict)


class KeySourceConfig(_Strict):
    """Where a master key lives: exactly one of a local key file (32 random bytes, made 0600
    by ``mloop keys init``; relative paths resolve against the project folder), an
    environment variable holding the key in base64, or an AWS KMS key (id, ARN or alias)."""

    key_file: str | None = None
    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    aws_kms: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> KeySourceConfig:
        given = [k for k in ("key_file", "env", "aws_kms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("needs exactly one key source: 'key_file' (a path), 'env' (an "
                             "environment variable) or 'aws_kms' (a KMS key id or ARN); got "
                             f"{', '.join(given) or 'none'}")
        return self


class EncryptionConfig(KeySourceConfig):
    """``security.encryption``: the inference log, labels, snapshots and step outputs are
    sealed at rest under the master key named here (see mloop.security.encryption).
    ``previous``: keys files may still be sealed under during a rotation; readers accept
    them, and ``mloop keys rotate`` re-wraps every such file under the current key."""

    previous: list[KeySourceConfig] = Field(default_factory=list)


class SecurityConfig(_Strict):
    """What mloop keeps of its users' data (mloop.security.pii, mloop.traffic.retention).

    ``pii`` maps a model input to what the inference log stores of it: ``drop`` (nothing),
    ``hash`` (a keyed HMAC-SHA256: equal values stay equal, so monitoring still counts
    categories) or ``mask`` (a fixed ``***``). The model always scores the raw value.
    ``retention``: answered rows and their labels older than this (by event time) are
    deleted on each loop pass. ``encryption``: files at rest sealed under a master key
    (mloop.security.encryption)."""

    pii: dict[str, PiiAction] = Field(default_factory=dict)
    retention: Annotated[Duration | None, AfterValidator(_positive_retention)] = None
    encryption: EncryptionConfig | None = None


class ProjectConfig(_Strict):
    project: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stores: Annotated[StoresConfig, NotHashed(
        "moving the stores changes nothing about the model")] = Field(
        default_factory=StoresConfig)
    data: DataConfig
    target: str
    task: Task | None = None
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    metrics: list[str] | None = None
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    gates: Annotated[GatesConfig, NotHashed("a gate judges a model, it does not shape it")] = (
        Field(default_factory=GatesConfig))
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    serving: Annotated[ServingConfig, NotHashed("how a model is served")] = Field(
        default_factory=ServingConfig)
    monitoring: Annotated[MonitoringConfig, NotHashed("how a served model is watched")] = (
        Field(default_factory=MonitoringConfig))
    loop: Annotated[LoopConfig, NotHashed("when a model is retrained and rolled out")] = Field(
        default_factory=LoopConfig)
    kubernetes: Annotated[KubernetesConfig, NotHashed("where it is deployed")] = Field(
        default_factory=KubernetesConfig)
    airflow: Annotated[AirflowConfig, NotHashed("who schedules the runs")] = Field(
        default_factory=AirflowConfig)
    kubeflow: Annotated[KubeflowConfig, NotHashed("who schedules the runs")] = Field(
        default_factory=KubeflowConfig)
    spark: Annotated[SparkConfig, NotHashed("where batch scoring runs")] = Field(
        default_factory=SparkConfig)
    security: Annotated[SecurityConfig, NotHashed("what is kept of served data, not what is "
                                                  "learned")] = Field(
        default_factory=SecurityConfig)
    # a search space changes what `mloop tune` tries, not what one run trains: a tuned run
    # carries its parameters in model.params
    tune: Annotated[TuneConfig | None, NotHashed("what `mloop tune` tries")] = None
    environments: Annotated[dict[str, EnvironmentConfig], NotHashed(
        "where a model is promoted to, not what it is")] = Field(default_factory=dict)
    promotion: Annotated[PromotionConfig, NotHashed("how a model moves between environments")
                         ] = Field(default_factory=PromotionConfig)
    # prices and budget; None: ``loop.costs`` (the older place), which is then the same object
    costs: Annotated[CostRates | None, NotHashed("what compute costs")] = None
    _file: str = PrivateAttr(default=CONFIG_FILE)
    _lines: dict[tuple[Any, ...], int] = PrivateAttr(default_factory=dict)
    _secrets: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="after")
    def _one_price_list(self) -> ProjectConfig:
        """``costs`` and ``loop.costs`` name one price list: set either (not both), read
        either."""
        if self.costs is not None and "costs" in self.loop.model_fields_set \
                and self.costs != self.loop.costs:
            raise ValueError("'costs' and 'loop.costs' both set prices: keep one ('costs'; "
                             "'loop.costs' is the older place)")
        if self.costs is None:
            self.costs = self.loop.costs
        else:
            self.loop.costs = self.costs
        return self

    @property
    def cost_rates(self) -> CostRates:
        """The prices and budget, wherever mloop.yaml set them."""
        return self.costs or self.loop.costs

    @property
    def environment_order(self) -> list[str]:
        """The environments in the order a version travels them (``promotion.order``, else
        as ``environments`` lists them); empty without environments."""
        return list(self.promotion.order or self.environments)

    @property
    def default_environment(self) -> str | None:
        """The environment a command uses without ``--env``: the first of the order (a
        laptop's dev); None when the project defines none."""
        order = self.environment_order
        return order[0] if order else None

    def in_environment(self, name: str) -> ProjectConfig:
        """This config as environment ``name`` sees it: its stores and serving overrides laid
        over the project's (keys it leaves unset keep the project's value). ConfigError
        listing the defined environments when there is no such one."""
        env = self.environments.get(name)
        if env is None:
            known = ", ".join(self.environments)
            raise ConfigError(
                f"unknown environment '{name}'; "
                + (f"defined: {known}" if known else "this project defines none (add an "
                   "'environments:' section to use --env)"),
                file=self._file, line=self._lines.get(("environments",)), key="environments")
        stores = StoresConfig.model_validate({**self.stores.model_dump(exclude_unset=True),
                                              **env.stores.model_dump(exclude_unset=True)})
        serving = ServingConfig.model_validate({
            **self.serving.model_dump(exclude_unset=True),
            **env.serving.model_dump(exclude_unset=True)})
        out = self.model_copy(update={"stores": stores, "serving": serving})
        out._file, out._lines, out._secrets = self._file, self._lines, self._secrets
        return out

    @property
    def secrets(self) -> frozenset[str]:
        """Values substituted from ``${VAR}``: never logged, never printed."""
        return self._secrets

    def locate(self, error: ConfigError) -> ConfigError:
        """``error`` with this file's name and the line of its key filled in, when missing.

        Checks that run after loading (an unknown metric, an unimportable step) know the key
        but not the line; this gives them the same ``file:line:`` form as parse errors.
        """
        if error.line is not None and error.file is not None:
            return error
        path = tuple(int(p) if p.isdigit() else p for p in (error.key or "").split(".") if p)
        return ConfigError(error.message, file=error.file or self._file,
                           line=error.line or _nearest_line(path, self._lines), key=error.key)

    @property
    def model_name(self) -> str:
        return self.model.name or self.project

    def config_hash(self) -> str:
        """sha256 of everything that shapes the model: every field but those marked
        :class:`NotHashed` (stores, gates, serving, ...). Registered versions carry it, so a
        project whose model-shaping settings are unchanged keeps its hash."""
        body = self.model_dump(mode="json", exclude=unhashed_fields(type(self)))
        if body["features"]["store"] is None:  # a project without a feature store keeps the
            for key in ("store", "repo", "feature_refs", "feature_service"):  # hash it had
                body["features"].pop(key)
        if not body["split"]["refit"]:  # nor does one that fits on the training rows only
            body["split"].pop("refit")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- loading with line numbers

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, path: tuple[Any, ...], line: int, first: int) -> None:
        self.key, self.path, self.line, self.first = key, path, line, first


def _line_map(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise _DuplicateKey(key, path, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out)


def _interpolate(value: Any, path: tuple[Any, ...], lines: dict, file: str,
                 secrets: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*path, k), lines, file, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*path, i), lines, file, secrets) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"'{_dotted(path)}' refers to environment variable ${{{name}}}, "
                    "which is not set",
                    file=file,
                    line=_nearest_line(path, lines),
                    key=_dotted(path),
                )
            secrets.add(os.environ[name])
            return os.environ[name]

        return _ENV_RE.sub(repl, value)
    return value


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _nearest_line(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    p = tuple(path)
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return lines.get(())


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``path`` (for did-you-mean).

    Walks fields; a ``dict[str, Model]`` field (e.g. ``validation.columns``) consumes one free
    key and continues in ``Model``.
    """
    model: Any = ProjectConfig
    parts = list(path)
    while parts:
        part = parts.pop(0)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if getattr(ann, "__origin__", None) is dict:
            value_type = getattr(ann, "__args__", (None, None))[1]
            if not (isinstance(value_type, type) and issubclass(value_type, BaseModel)):
                return None
            if not parts:
                return None  # keys of the mapping itself are free
            parts.pop(0)
            model = value_type
            continue
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: Any, lines: dict, file: str) -> ConfigError:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _dotted(loc)
    line = _nearest_line(loc, lines)
    etype = err["type"]
    if etype == "extra_forbidden":
        parent, name = loc[:-1], str(loc[-1])
        owner = _model_at(parent)
        where = f" under '{_dotted(parent)}'" if parent else ""
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(name, list(owner.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else (
                f"; allowed: {', '.join(sorted(owner.model_fields))}"
            )
        return ConfigError(f"unknown key '{name}'{where}{hint}", file=file, line=line, key=key)
    if etype == "missing":
        return ConfigError(f"missing required key '{key}'", file=file, line=line, key=key)
    got = err.get("input")
    got_s = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return ConfigError(f"'{key}': {msg}", file=file, line=line, key=key)
    return ConfigError(f"'{key}': {msg} (got {got_s})", file=file, line=line, key=key)


# libyaml's parser when PyYAML was built with it: every command parses mloop.yaml, and the
# pure-Python parser takes ~0.1 s of a read command's time. Same constructors, same marks;
# a file libyaml rejects is parsed again in Python, whose error messages mloop shows.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse_yaml(text: str) -> tuple[Any, Any]:
    try:
        # _YAML_LOADER is libyaml's or Python's SafeLoader: plain data, never objects
        return (yaml.compose(text, Loader=_YAML_LOADER),
                yaml.load(text, Loader=_YAML_LOADER))  # nosec B506
    except yaml.YAMLError:
        return yaml.compose(text), yaml.safe_load(text)


def parse_config(text: str, *, file: str = CONFIG_FILE) -> ProjectConfig:
    """Parse mloop.yaml text; raise ConfigError naming file, line and key on any problem."""
    try:
        node, raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"not valid YAML: {problem}", file=file, line=line) from None
    if node is None or raw is None:
        raise ConfigError("file is empty; expected a mapping with at least 'project', "
                          "'data' and 'target'", file=file, line=1)
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(raw).__name__}",
                          file=file, line=1)
    lines: dict[tuple[Any, ...], int] = {}
    try:
        _line_map(node, (), lines)
    except _DuplicateKey as dup:
        where = f" under '{_dotted(dup.path)}'" if dup.path else ""
        raise ConfigError(f"duplicate key '{dup.key}'{where} (first set on line {dup.first}); "
                          f"keep one", file=file, line=dup.line,
                          key=_dotted((*dup.path, dup.key))) from None
    secrets: set[str] = set()
    raw = _interpolate(raw, (), lines, file, secrets)
    try:
        config = ProjectConfig.model_validate(raw)
        config._file, config._lines, config._secrets = file, lines, frozenset(secrets)
    except ValidationError as exc:
        errors = [_describe(e, lines, file) for e in exc.errors()]
        first = errors[0]
        if len(errors) > 1:
            more = "; ".join(f"line {e.line}: {e.message}" for e in errors[1:])
            first = ConfigError(f"{first.message} (and {len(errors) - 1} more: {more})",
                                file=first.file, line=first.line, key=first.key)
        raise first from None
    _check_environments(config, lines, file)
    _check_pii_columns(config)
    return config


def _check_environments(config: ProjectConfig, lines: dict, file: str) -> None:
    """What the models alone cannot check: names the promotion section uses are defined
    environments, and each environment's merged stores and serving are valid."""

    def fail(message: str, *path: Any) -> NoReturn:
        raise ConfigError(message, file=file, line=_nearest_line(path, lines),
                          key=_dotted(path))

    for name in config.environments:
        if not re.match(_ENV_NAME, name):
            fail(f"environment name {name!r} must be lower-case letters, digits, '-' or '_', "
                 f"starting with a letter (e.g. dev, staging, prod)", "environments", name)
    known = ", ".join(config.environments) or "none: add an 'environments:' section"
    for key, names in (("order", config.promotion.order),
                       ("approval", list(config.promotion.approval))):
        for i, n in enumerate(names):
            if n not in config.environments:
                fail(f"'promotion.{key}' names environment {n!r}, which 'environments' does "
                     f"not define (defined: {known})", "promotion", key,
                     *((i,) if key == "order" else (n,)))
    if len(set(config.promotion.order)) != len(config.promotion.order):
        fail(f"'promotion.order' lists an environment twice: {config.promotion.order}",
             "promotion", "order")
    for name in config.environments:
        try:
            config.in_environment(name)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            fail(f"'environments.{name}': {msg}", "environments", name)


def _check_pii_columns(config: ProjectConfig) -> None:
    """``security.pii`` names model inputs: a key that cannot be one is a mistake to report
    now (the model's own signature is checked again when the server loads a version)."""
    feats = config.features
    listed = None if feats.numeric is None and feats.categorical is None else {
        *(feats.numeric or []), *(feats.categorical or [])}
    for column in config.security.pii:
        why = None
        if column == config.target:
            why = "is the target, not a model input (the inference log never holds it)"
        elif column.startswith("_"):
            why = "starts with '_', which marks mloop's own log columns, not model inputs"
        elif column in feats.exclude:
            why = "is in features.exclude, so the model never receives it"
        elif listed is not None and column not in listed:
            why = (f"is not among features.numeric/features.categorical "
                   f"({', '.join(sorted(listed))})")
        if why is not None:
            raise config.locate(ConfigError(f"'security.pii.{column}': column '{column}' "
                                            f"{why}", key=f"security.pii.{column}"))


def load_config(path: str | Path) -> ProjectConfig:
    """Read and validate a mloop.yaml file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(p)) from None
    return parse_config(text, file=str(p))
