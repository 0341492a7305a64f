"""Snapshots: immutable, content-addressed dataset versions with their profile.

Layout under the data URI: ``<digest>/data.parquet``, ``<digest>/profile.json`` and
``<digest>/snapshot.json``. ``snapshot.json`` is written last, so its presence means the
snapshot is complete; storing the same data twice finds it there and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mloop.errors import SnapshotNotFoundError

if TYPE_CHECKING:  # reading a snapshot's record needs neither pyarrow.compute nor numpy
    import numpy as np
    import pyarrow as pa

    from mloop.storage import ObjectStore


@dataclass(frozen=True)
class Snapshot:
    digest: str
    rows: int
    schema: dict[str, str]
    source: str
    created_at: str
    uri: str

    @property
    def short(self) -> str:
        return self.digest[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SnapshotStore:
    """Put and get snapshots by digest. ``put`` is idempotent.

    With ``time_column`` and ``window`` (the project's ``features.time_column`` and
    ``monitoring.window``), a snapshot holding that column also gets, in its profile, the
    drift statistics of its contiguous window-sized chunks (temporal calibration, see
    :mod:`mloop.monitoring.temporal`), and with ``rolling`` (a rolling reference's span)
    each chunk's statistics against that span before it; computed here, once, never when a
    window is judged.
    Every snapshot also gets what the multivariate check needs (a ``joint`` profile section
    and an encoded reference sample, :mod:`mloop.data.joint_profile`) over its columns but
    ``exclude`` (the target and excluded columns, which live windows never hold)."""

    def __init__(self, objects: ObjectStore, *, bins: int = 20, top_k: int = 50,
                 time_column: str | None = None, window: str | None = None,
                 exclude: tuple[str, ...] = (), rolling: str | None = None) -> None:
        self.objects = objects
        self.bins = bins
        self.top_k = top_k
        self.time_column = time_column
        self.window = window
        self.rolling = rolling  # monitoring.reference's rolling span: its null is stored too
        self.exclude = exclude

    def put(self, table: pa.Table, *, source: str) -> tuple[Snapshot, bool]:
        """Store ``table``; return the snapshot and whether it was newly written."""
        from mloop.data.canonical import canonicalize, table_digest
        from mloop.data.profile import compute_profile

        table = canonicalize(table)
        digest = table_digest(table)
        if self.objects.exists(f"{digest}/snapshot.json"):
            return self.get(digest), False
        self.objects.write_parquet(f"{digest}/data.parquet", table)
        profile = compute_profile(table, bins=self.bins, top_k=self.top_k)
        if self.time_column and self.window and self.time_column in table.column_names:
            from mloop.data.temporal_profile import temporal_profile

            profile["temporal"] = temporal_profile(table, profile, time_column=self.time_column,
                                                   window=self.window, rolling=self.rolling)
        from mloop.data.joint_profile import SAMPLE_KEY, joint_profile, sample_bytes

        profile["joint"], sample = joint_profile(table, profile, exclude=set(self.exclude),
                                                 time_column=self.time_column,
                                                 window=self.window)
        if sample is not None:
            self.objects.write_bytes(f"{digest}/{SAMPLE_KEY}", sample_bytes(sample))
        self.objects.write_bytes(f"{digest}/profile.json", json.dumps(profile).encode())
        snap = Snapshot(
            digest=digest,
            rows=table.num_rows,
            schema={f.name: str(f.type) for f in table.schema},
            source=source,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            uri=self.objects.uri_for(f"{digest}/data.parquet"),
        )
        self.objects.write_bytes(f"{digest}/snapshot.json", json.dumps(snap.to_dict()).encode())
        return snap, True

    def resolve(self, digest_or_prefix: str) -> str:
        """Full digest from a unique prefix (>= 6 hex chars)."""
        if self.objects.exists(f"{digest_or_prefix}/snapshot.json"):
            return digest_or_prefix
        if len(digest_or_prefix) >= 6:
            hits = [d for d in self.objects.listdir() if d.startswith(digest_or_prefix)]
            hits = [d for d in hits if self.objects.exists(f"{d}/snapshot.json")]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise SnapshotNotFoundError(
                    f"snapshot prefix '{digest_or_prefix}' is ambiguous: {', '.join(hits[:5])}")
        raise SnapshotNotFoundError(
            f"no snapshot '{digest_or_prefix}' in {self.objects.uri}")

    def get(self, digest: str) -> Snapshot:
        digest = self.resolve(digest)
        meta = json.loads(self.objects.read_bytes(f"{digest}/snapshot.json"))
        return Snapshot(**meta)

    def read_table(self, digest: str) -> pa.Table:
        return self.objects.read_parquet(f"{self.resolve(digest)}/data.parquet")

    def profile(self, digest: str) -> dict[str, Any]:
        return json.loads(self.objects.read_bytes(f"{self.resolve(digest)}/profile.json"))

    def joint_sample(self, digest: str) -> np.ndarray | None:
        """The encoded reference sample of the multivariate check; None for a snapshot stored
        before it existed (or with too little to sample)."""
        from mloop.data.joint_profile import SAMPLE_KEY, read_sample

        key = f"{self.resolve(digest)}/{SAMPLE_KEY}"
        return read_sample(self.objects.read_bytes(key)) if self.objects.exists(key) else None

    def copy_to(self, other: SnapshotStore, digest: str) -> bool:
        """Copy snapshot ``digest`` into ``other`` (another environment's data store) byte for
        byte: data, profile, then the record that makes it visible, so an interrupted copy
        is no snapshot there. False when ``other`` holds it already (a digest is content)."""
        digest = self.resolve(digest)
        if other.objects.exists(f"{digest}/snapshot.json"):
            return False
        from mloop.data.joint_profile import SAMPLE_KEY

        for name in ("data.parquet", SAMPLE_KEY, "profile.json"):
            if name == SAMPLE_KEY and not self.objects.exists(f"{digest}/{name}"):
                continue  # stored before the multivariate check
            other.objects.write_bytes(f"{digest}/{name}",
                                      self.objects.read_bytes(f"{digest}/{name}"))
        meta = json.loads(self.objects.read_bytes(f"{digest}/snapshot.json"))
        meta["uri"] = other.objects.uri_for(f"{digest}/data.parquet")
        other.objects.write_bytes(f"{digest}/snapshot.json", json.dumps(meta).encode())
        return True

    def list(self) -> list[Snapshot]:
        out = []
        for d in self.objects.listdir():
            if not d.startswith(".") and self.objects.exists(f"{d}/snapshot.json"):
                out.append(self.get(d))
        return sorted(out, key=lambda s: s.created_at, reverse=True)
