"""mloop's exception tree.

Every error a user can cause derives from :class:`MloopError`; the CLI turns these into a
one-line message and exit code 1 (``--debug`` shows the traceback). Anything else is a bug.
Each is also importable from ``mloop`` itself.

    MloopError
    ├── ConfigError              mloop.yaml is malformed (carries file, line, key)
    ├── ProjectNotFoundError     no mloop.yaml in the folder or its parents
    ├── MissingExtraError        an optional dependency is not installed (carries extra, module)
    ├── DataSourceError          an input cannot be read: the configured data, a file to score,
    │                            a labels file (missing, unreadable, or lacking what is needed)
    ├── ValidationFailedError    data broke the expectations in mloop.yaml (carries the report)
    ├── SnapshotNotFoundError    no snapshot with that digest
    ├── PipelineDefinitionError  the step graph is malformed (cycle, unknown step, bad override)
    │                            or lacks a step a command needs (tune's 'train')
    ├── StepFailedError          a step raised after its retries (carries step, run id, traceback)
    ├── RunNotFoundError         no pipeline run with that id
    ├── ModelNotFoundError       no such registered version, or no champion (carries model,
    │                            version)
    ├── CandidateNotRegisteredError  a pipeline run registered no model version (carries run id)
    ├── GateFailedError          promotion refused: the candidate failed a gate
    ├── PromotionError           an alias change could not be made (lost a race, MLflow refused)
    ├── StaleStateError          another loop controller saved the state first: stop acting
    ├── LeaseLostError           (a StaleStateError) this controller's lease ran out or was
    │                            taken over: stop acting
    ├── LeaseHeldError           another loop controller holds the lease (carries holder, until)
    ├── PurgeNotFoundError       no inference-log purge with that id
    ├── PermissionDeniedError    the acting person's role may not do this (carries person,
    │                            role, action, needed)
    ├── WindowNotFoundError      no monitored window with that id for the project's model
    ├── EncryptionKeyError       a file encrypted at rest cannot be opened: its master key is
    │                            missing or not the configured one (carries the key source)
    ├── SealedDataError          a file encrypted at rest is damaged (its tag does not verify)
    └── OnlineStoreError         the feature store's online store could not be read (Redis down,
                                 SQLite file gone): the server answers 503, never a prediction
                                 on missing features (carries the store type)

``MloopError`` itself is raised where no caller would handle the case apart from any other
user error, the message being all there is to act on: a bad argument or option value
(``--weight``, ``--out``, a window like ``1x``), an id that names nothing (a token, a study),
a missing ``--reason``, a precondition not met yet (too few labelled rows to retrain), a
version mloop did not make (no lineage tags to gate or monitor with), a machine that lacks
something (Spark without S3A), a process that failed on its way (the demo's server, a tune
worker), mloop's own records in a shape it cannot read. A subclass is added when some caller
catches it on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


class MloopError(Exception):
    """Base of every error mloop raises on purpose."""


@dataclass
class ConfigError(MloopError):
    """mloop.yaml (or an override) is invalid.

    Rendered as ``file:line: message`` so editors can jump to it.
    """

    message: str
    file: str | None = None
    line: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.file or "mloop.yaml"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.message}"


class ProjectNotFoundError(MloopError):
    pass


class DataSourceError(MloopError):
    pass


class SnapshotNotFoundError(MloopError):
    pass


class PipelineDefinitionError(MloopError):
    pass


class RunNotFoundError(MloopError):
    pass


class ModelNotFoundError(MloopError):
    """No such version of ``model`` (``version``), or none holds the alias asked for (no
    champion yet: ``version`` is None)."""

    def __init__(self, message: str, *, model: str | None = None,
                 version: int | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.version = version


class MissingExtraError(MloopError):
    """A feature needs an optional dependency: ``module``, installed by ``mloop[extra]``.
    Raised by :func:`mloop.extras.require_extra`, which words every such message alike."""

    def __init__(self, message: str, *, extra: str, module: str) -> None:
        super().__init__(message)
        self.extra = extra
        self.module = module


class ValidationFailedError(MloopError):
    """The data broke one or more expectations; ``report`` lists every violation."""

    def __init__(self, message: str, *, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class StepFailedError(MloopError):
    """A step raised after exhausting its retries."""

    def __init__(self, step: str, run_id: str, error: str, traceback: str) -> None:
        super().__init__(f"Step '{step}' failed in pipeline run {run_id}: {error}")
        self.step = step
        self.run_id = run_id
        self.error = error
        self.traceback = traceback


class CandidateNotRegisteredError(MloopError):
    """A pipeline run finished (or stopped) without its ``register`` step's output."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"pipeline run {run_id} has registered no model version (no "
                         f"succeeded 'register' step)")
        self.run_id = run_id


class GateFailedError(MloopError):
    pass


class PromotionError(MloopError):
    pass


class StaleStateError(MloopError):
    """The loop controller's saved state changed since this pass read it (another controller
    saved first): the pass stops without acting further."""


class LeaseLostError(StaleStateError):
    """This controller's lease ran out without a renewal (the store was unreachable, the
    process was paused) or another controller took it: the pass stops without acting
    further."""


class LeaseHeldError(MloopError):
    """Another controller holds the loop lease of this model: this one must not act.
    ``mloop loop --once`` exits 3 on it; ``mloop loop`` stands by until the lease is free."""

    def __init__(self, message: str, *, model: str, holder: str, acquired_at: datetime,
                 expires_at: datetime) -> None:
        super().__init__(message)
        self.model, self.holder = model, holder
        self.acquired_at, self.expires_at = acquired_at, expires_at


class PurgeNotFoundError(MloopError):
    pass


class WindowNotFoundError(MloopError):
    """No monitored window with that id for the project's model (the dashboard answers 404)."""


class PermissionDeniedError(MloopError):
    """The person acting (their token's role) may not do this: the CLI exits 1, the server and
    dashboard answer 403. Nothing was changed."""

    def __init__(self, message: str, *, person: str, role: str | None, action: str,
                 needed: str) -> None:
        super().__init__(message)
        self.person, self.role, self.action, self.needed = person, role, action, needed


class EncryptionKeyError(MloopError):
    """A file encrypted at rest (``security.encryption``) cannot be opened or sealed: the
    master key is missing (no key file, unset variable, KMS refusing) or is not the key the
    file was sealed under. ``source`` names where the key was looked for (a file path, an
    environment variable, a KMS key id), so the message says what to fix."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class SealedDataError(MloopError):
    """A sealed file's key unwrapped but its contents do not verify: the bytes were damaged
    or altered after sealing. Readers of the inference log quarantine such a segment; a key
    error never is (the file is fine, the key is wrong)."""


class OnlineStoreError(MloopError):
    """The online store of the Feast repo could not be read. A server answers 503 with this
    message instead of predicting on features it did not get."""

    def __init__(self, message: str, *, store: str) -> None:
        super().__init__(message)
        self.store = store
