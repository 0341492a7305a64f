"""The compile verdict as recorded on a version (the ``mloop.compiled`` tag): read by the
registry's lineage, the dashboard and the server. Its own module, free of numpy and
onnxruntime, so reading a version's lineage does not import the compiler
(:mod:`mloop.serving.compiled`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["TAG", "Verdict"]

TAG = "mloop.compiled"


@dataclass
class Verdict:
    """What the check of a compiled graph found, as recorded on the version's tag.

    ``against`` is what it was checked with (``verified_against``); ``artifact`` where the
    graph is stored (``run_id``, ``path``, ``sha256``, ``bytes``); ``compiled_at`` is
    ``registration`` or ``load``; ``note`` says why a load had to redo the work. ``seconds``
    is the time this process spent compiling and verifying (0 when it reused the stored
    verdict); it is not recorded."""

    status: str  # verified | mismatch | unsupported | unverified
    detail: str
    rows: int = 0
    max_abs_diff: float | None = None
    mismatches: int = 0
    seconds: float = 0.0
    against: dict[str, Any] | None = None
    artifact: dict[str, Any] | None = None
    compiled_at: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if v is not None or k in ("max_abs_diff",)}

    def to_tag(self) -> str:
        body = self.to_dict()
        body.pop("seconds", None)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_tag(cls, value: str | None) -> Verdict | None:
        """The verdict a tag holds; None for no tag or one this mloop cannot read."""
        if not value:
            return None
        try:
            body = json.loads(value)
            return cls(**{k: body[k] for k in cls.__dataclass_fields__ if k in body})
        except (ValueError, TypeError, KeyError):
            return None
