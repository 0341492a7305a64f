"""Verifying the keyed audit chain: 10,000 events in at most 1 s (issue #16).

    python benchmarks/security/bench_audit_verify.py [--events 10000] [--repeats 3]
        [--store-uri postgresql+psycopg://postgres@127.0.0.1:5432/test] [--json]

Builds a chain of N events in a fresh store (SQLite in a temp folder by default; with
``--store-uri``, a fresh database named after it on that PostgreSQL server, dropped at the
end), each with a realistic promotion-sized payload, exactly as ``add_event`` writes them
(inserted in bulk, so building stays quick), then times
``verify_chain``: load every row, recompute each sha256 link and HMAC, check the checkpoint
outside the store. Prints the best and median of ``--repeats`` full checks, the best CPU
time (the wall time on a machine shared with other jobs includes their share) and the bound.
Exit 1 if the chain does not verify or the best time is over the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

BOUND_S = 1.0


def build(store, events: int) -> None:
    """N events exactly as ``add_event`` writes them (same hash, MAC, head row and
    checkpoint), inserted in bulk: one ``add_event`` per event would take minutes here and
    is not what is measured."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from mloop.security.audit import GENESIS, event_hash
    from mloop.security.audit_key import advance_checkpoint, audit_key, event_mac
    from mloop.store.models import AuditHeadRow, EventRow

    key = audit_key(store, create=True)
    prev, rows, t0 = GENESIS, [], datetime.now(UTC)
    for i in range(events):
        payload = {"model": "bike", "alias": "champion", "version": i % 40 + 1,
                   "replaced": i % 40, "reason": f"scheduled retrain #{i}: mae 41.2 < 43.0",
                   "traffic": 1.0, "gates": {"passed": True, "against": i % 40}}
        at, actor = t0 + timedelta(milliseconds=i), "alice (token #3, cli)"
        digest = event_hash(prev, at, "promote", actor, payload)
        rows.append({"at": at, "kind": "promote", "actor": actor, "payload": payload,
                     "prev_hash": prev, "hash": digest, "mac": event_mac(key, digest)})
        prev = digest
    with store.engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            conn.execute(sa.insert(EventRow.__table__), rows[i:i + 1000])
        conn.execute(sa.insert(AuditHeadRow.__table__).values(id=1, events=events,
                                                              head_hash=prev))
    advance_checkpoint(store, key, events, prev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--store-uri", default=None, help="a PostgreSQL server URL (a fresh "
                                                      "database is created on it)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import sqlalchemy as sa

    from mloop.security.audit import verify_chain
    from mloop.store.db import Store

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        admin, dbname = None, None
        if args.store_uri:
            dbname = f"mloop_bench_{uuid.uuid4().hex[:8]}"
            admin = sa.create_engine(args.store_uri, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{dbname}"'))
            url = args.store_uri.rsplit("/", 1)[0] + "/" + dbname
        else:
            url = f"sqlite:///{Path(tmp) / 'mloop.db'}"
        try:
            store = Store(url, keys_dir=keys)
            t0 = time.perf_counter()
            build(store, args.events)
            built = time.perf_counter() - t0
            times, cpu, report = [], [], None
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                report = verify_chain(store)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            store.engine.dispose()
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
                admin.dispose()
    result = {"events": args.events, "store": url.split(":", 1)[0],
              "build_s": round(built, 2), "verify_best_s": round(min(times), 3),
              "verify_median_s": round(statistics.median(times), 3),
              "verify_best_cpu_s": round(min(cpu), 3), "load_avg_1m": os.getloadavg()[0],
              "bound_s": BOUND_S,
              "ok": bool(report and report.ok and report.events == args.events),
              "within_bound": min(times) <= BOUND_S}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"verify_chain over {args.events:,} keyed events ({result['store']}): best "
              f"{result['verify_best_s']} s, median {result['verify_median_s']} s over "
              f"{args.repeats} (bound {BOUND_S} s; best CPU time {result['verify_best_cpu_s']} "
              f"s, load average {result['load_avg_1m']:.1f}); chain intact: {result['ok']}; "
              f"built in {result['build_s']} s")
    return 0 if result["ok"] and result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
