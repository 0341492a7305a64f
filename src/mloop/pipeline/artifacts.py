"""Step outputs as artifacts addressed by digest.

Tables (Arrow or pandas) are stored as Parquet and addressed by their canonical digest, so a
step that recomputes an identical table lets everything downstream hit the cache. Snapshots are
passed by reference (their data already lives in the snapshot store). JSON values are stored
as JSON; anything else is pickled with cloudpickle.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import cloudpickle
import pandas as pd
import pyarrow as pa

from mloop.data.canonical import canonicalize, table_digest
from mloop.data.snapshot import Snapshot, SnapshotStore
from mloop.storage import ObjectStore


def save_output(value: Any, outputs: ObjectStore) -> dict[str, Any]:
    """Store ``value``; return its reference ``{"kind", "digest"}`` (kept in the step run)."""
    if isinstance(value, Snapshot):
        return {"kind": "snapshot", "digest": value.digest}
    if isinstance(value, pd.DataFrame):
        table = canonicalize(pa.Table.from_pandas(value, preserve_index=False))
        digest = table_digest(table)
        if not outputs.exists(f"{digest}.parquet"):
            outputs.write_parquet(f"{digest}.parquet", table)
        return {"kind": "frame", "digest": digest}
    if isinstance(value, pa.Table):
        table = canonicalize(value)
        digest = table_digest(table)
        if not outputs.exists(f"{digest}.parquet"):
            outputs.write_parquet(f"{digest}.parquet", table)
        return {"kind": "table", "digest": digest}
    try:
        data = json.dumps(value, sort_keys=True).encode()
        kind, ext = "json", "json"
    except TypeError:
        buf = io.BytesIO()
        cloudpickle.dump(value, buf)
        data, kind, ext = buf.getvalue(), "pickle", "pkl"
    digest = hashlib.sha256(data).hexdigest()
    if not outputs.exists(f"{digest}.{ext}"):
        outputs.write_bytes(f"{digest}.{ext}", data)
    return {"kind": kind, "digest": digest}


def output_exists(ref: dict[str, Any], outputs: ObjectStore, snapshots: SnapshotStore) -> bool:
    kind, digest = ref["kind"], ref["digest"]
    if kind == "snapshot":
        return snapshots.objects.exists(f"{digest}/snapshot.json")
    ext = {"frame": "parquet", "table": "parquet", "json": "json", "pickle": "pkl"}[kind]
    return outputs.exists(f"{digest}.{ext}")


def load_output(ref: dict[str, Any], outputs: ObjectStore, snapshots: SnapshotStore) -> Any:
    kind, digest = ref["kind"], ref["digest"]
    if kind == "snapshot":
        return snapshots.get(digest)
    if kind == "frame":
        return outputs.read_parquet(f"{digest}.parquet").to_pandas()
    if kind == "table":
        return outputs.read_parquet(f"{digest}.parquet")
    if kind == "json":
        return json.loads(outputs.read_bytes(f"{digest}.json"))
    return cloudpickle.loads(outputs.read_bytes(f"{digest}.pkl"))
