"""What one server process holds: the loaded versions, their batchers, the routing, the log.

The routing is one immutable object swapped in a single assignment, so a request sees either
the old deployment or the new one, never a mix. A version is loaded and warmed in a thread
before it is swapped in; if that fails, the old routing stays and an event records why.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from mloop.config import ServingConfig
from mloop.features.lookup import OnlineFeatures
from mloop.project import Project
from mloop.security.pii import PiiPolicy
from mloop.serving.batcher import MicroBatcher
from mloop.serving.deploy import DesiredState, desired_state
from mloop.serving.lookup import ModelLookup
from mloop.serving.metrics import ServingMetrics
from mloop.serving.model import ServedModel, load_served
from mloop.serving.schema import InputSchema
from mloop.serving.shared_reload import CHECK_SECONDS, SharedReload
from mloop.traffic.inference_log import InferenceLog

log = logging.getLogger("mloop.serving")


@dataclass
class Slot:
    model: ServedModel
    batcher: MicroBatcher
    lookup: ModelLookup | None = None  # features.store: the columns the server looks up
    schema: InputSchema = field(init=False)  # what a request to this version must carry

    def __post_init__(self) -> None:
        self.schema = self.lookup.request if self.lookup is not None else self.model.schema


@dataclass(frozen=True)
class Routing:
    champion: Slot | None = None
    challenger: Slot | None = None
    mode: str | None = None  # canary | shadow
    weight: float = 0.0

    def pick(self, key: str | None) -> tuple[Slot, str]:
        """The slot that answers and its role. With a key the choice is a pure function of
        it (same key, same version); without, a coin with the canary's weight."""
        assert self.champion is not None
        if self.mode != "canary" or self.challenger is None or self.weight <= 0:
            return self.champion, "champion"
        u = _unit(key) if key is not None else random.random()
        return (self.challenger, "canary") if u < self.weight else (self.champion, "champion")

    def describe(self) -> dict[str, Any]:
        return {
            "champion": self.champion.model.describe() if self.champion else None,
            "challenger": self.challenger.model.describe() if self.challenger else None,
            "mode": self.mode,
            "traffic": {"champion": 1.0 - (self.weight if self.mode == "canary" else 0.0),
                        "challenger": self.weight if self.mode == "canary" else 0.0},
        }


def _freeze_heap() -> None:
    """Move everything alive now (MLflow, pandas, scikit-learn, the loaded models: millions of
    objects) out of the garbage collector's reach. Otherwise each full collection walks them
    all, a 200-300 ms pause every few seconds under load (the inference log's buffers live long
    enough to trigger full collections)."""
    import gc

    gc.collect()
    gc.freeze()


def _unit(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


@dataclass
class ServerState:
    project: Project
    config: ServingConfig
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    inference_log: InferenceLog | None = None
    pii: PiiPolicy | None = None  # security.pii, applied to what the log keeps
    features: OnlineFeatures | None = None  # features.store: the online store, opened once
    routing: Routing = field(default_factory=Routing)
    desired: DesiredState | None = None
    failed: dict[int, str] = field(default_factory=dict)  # version -> why it would not load
    retry_at: dict[int, tuple[float, float]] = field(default_factory=dict)  # when, backoff
    shadow_rows: int = 0
    challenger_errors: dict[int, int] = field(default_factory=dict)  # version -> rows failed
    last_poll: float = 0.0
    poll_error: str | None = None
    reloads: SharedReload | None = None  # --workers N: a reload asked of one reaches all
    generation: int = 0  # the reload generation this worker last acted on
    _poll_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def ready(self) -> bool:
        return self.routing.champion is not None and self.routing.champion.model.warm

    # -------------------------------------------------------------------- convergence

    async def poll(self) -> None:
        """Read the desired deployment; load, warm and swap in whatever changed."""
        async with self._poll_lock:
            self.last_poll = time.time()
            # read before the deployment: an acknowledgement never claims more than was seen
            generation = self.reloads.generation() if self.reloads else 0
            if generation != self.generation:  # another worker was asked to reload
                self.failed.clear()
                self.retry_at.clear()
            try:
                await self._read_and_converge()
            finally:
                self.generation = generation
                if self.reloads is not None:
                    try:
                        await asyncio.to_thread(self.reloads.ack, generation, self._served())
                    except OSError as exc:  # serving goes on; a reload waiting says who is late
                        log.warning("could not acknowledge reload generation %s in %s: %s",
                                    generation, self.reloads.folder, exc)

    async def _read_and_converge(self) -> None:
        try:
            want = await asyncio.to_thread(desired_state, self.project)
        except Exception as exc:  # the store is unreachable: keep serving what we have
            self.poll_error = f"{type(exc).__name__}: {exc}"
            log.warning("could not read the deployment state: %s", self.poll_error)
            return
        self.poll_error = None
        self.desired = want
        await self._converge(want)

    def _served(self) -> dict[str, Any]:
        r = self.routing
        return {"champion": r.champion.model.version if r.champion else None,
                "challenger": r.challenger.model.version if r.challenger else None,
                "poll_error": self.poll_error}

    async def reload(self) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Re-read the deployment now and retry failed loads, in every worker of this server.
        Returns what each worker serves (by pid; ``{}`` for a single process) and the pids that
        did not confirm in time."""
        self.failed.clear()
        self.retry_at.clear()
        if self.reloads is None:
            await self.poll()
            return {}, []
        generation = await asyncio.to_thread(self.reloads.bump)
        await self.poll()
        return await self.reloads.wait_for(generation)

    async def _converge(self, want: DesiredState) -> None:
        cur = self.routing
        champion = await self._slot_for(want.champion, cur)
        if champion is None:
            champion = cur.champion  # no champion yet, or it failed: keep the old one
        challenger = None
        if want.challenger is not None:
            challenger = await self._slot_for(want.challenger, cur)
        new = Routing(champion, challenger, want.mode if challenger else None,
                      want.weight if challenger else 0.0)
        if new == cur:
            return
        self.routing = new  # the atomic swap
        self._export(new)
        _freeze_heap()
        live = {id(s) for s in (new.champion, new.challenger) if s is not None}
        for old in (cur.champion, cur.challenger):
            if old is not None and id(old) not in live:
                # No request can reach it any more (routing and submit happen in one event
                # loop step), so stopping drains exactly what it already queued.
                await old.batcher.stop()

    async def _slot_for(self, version: int | None, cur: Routing) -> Slot | None:
        if version is None:
            return None
        for s in (cur.champion, cur.challenger):
            if s is not None and s.model.version == version:
                return s
        if version in self.failed and time.time() < self.retry_at[version][0]:
            return None  # failed recently: retried with backoff (1 min, doubling to 15 min)
        try:
            model, lookup = await asyncio.to_thread(self._load, version)
            if self.pii is not None:  # a policy naming no input would protect nothing
                self.pii.check_inputs(model.schema.names, version=version,
                                      config=self.project.config)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            first = version not in self.failed
            self.failed[version] = why
            backoff = min(900.0, self.retry_at.get(version, (0.0, 30.0))[1] * 2)
            self.retry_at[version] = (time.time() + backoff, backoff)
            self.metrics.model_load_failures.labels(str(version)).inc()
            log.error("v%s failed to load or warm; still serving what was there: %s",
                      version, why)
            if first:
                await asyncio.to_thread(self._record_failure, version, why)
            return None
        self.failed.pop(version, None)
        self.retry_at.pop(version, None)
        self.metrics.model_loads.labels(str(version)).inc()
        return Slot(model, self._batcher(model, lookup), lookup)

    def _load(self, version: int) -> tuple[ServedModel, ModelLookup | None]:
        """A version loaded and warmed, and with a feature store its lookups (None when the
        store is unset, or the version's signature holds none of the looked-up columns)."""
        model = load_served(self.project, version, compile=self.config.compile)
        if self.features is None:
            return model, None
        lookup = ModelLookup(self.features, model.schema)
        return model, (lookup if lookup.names else None)

    def _batcher(self, model: ServedModel, lookup: ModelLookup | None = None) -> MicroBatcher:
        v = str(model.version)
        rows = self.metrics.histogram(self.metrics.batch_rows, v)
        secs = self.metrics.histogram(self.metrics.batch_seconds, v)

        def on_batch(n: int, seconds: float) -> None:
            rows.observe(n)
            secs.observe(seconds)

        predict = model.score_columns if lookup is None else lookup.scorer(model.score_columns)
        b = MicroBatcher(predict, max_batch=self.config.max_batch_rows,
                         max_wait_ms=self.config.max_wait_ms, name=f"v{v}", on_batch=on_batch,
                         threads=self.config.model_threads,
                         max_batch_ms=self.config.max_batch_ms,
                         # only a compiled model's fixed-thread engine, and no store lookup
                         inline_ms=self.config.inline_ms
                         if model.compiled is not None and lookup is None else 0.0)
        b.start()
        return b

    def _record_failure(self, version: int, why: str) -> None:
        from mloop.security.audit import append_event

        try:
            append_event(self.project.store, "serve.load_failed",
                         {"model": self.project.config.model_name, "version": version,
                          "error": why[:2000]})
        except Exception:
            log.exception("could not record the failed load of v%s", version)

    def challenger_failed(self, version: int, rows: int, exc: BaseException) -> None:
        """A canary's predict raised: count it and tell the controller (an audit event on the
        first failure and then at 10, 100, ... failed rows; the rows themselves are answered by
        the champion). The controller rolls the challenger back on its next pass."""
        self.metrics.challenger_errors.labels(str(version)).inc(rows)
        before = self.challenger_errors.get(version, 0)
        after = self.challenger_errors[version] = before + rows
        if before and len(str(after)) == len(str(before)):
            return
        from mloop.security.audit import append_event

        payload = {"model": self.project.config.model_name, "version": version,
                   "failed_rows": after, "error": f"{type(exc).__name__}: {exc}"[:2000]}

        def record() -> None:
            try:
                append_event(self.project.store, "serve.challenger_error", payload)
            except Exception:
                log.exception("could not record the failure of challenger v%s", version)

        asyncio.get_running_loop().run_in_executor(None, record)

    def _export(self, r: Routing) -> None:
        m = self.metrics
        m.serving_version.labels("champion").set(r.champion.model.version if r.champion else 0)
        m.serving_version.labels("challenger").set(
            r.challenger.model.version if r.challenger else 0)
        share = r.weight if r.mode == "canary" else 0.0
        m.traffic.labels("champion").set(1.0 - share if r.champion else 0.0)
        m.traffic.labels("challenger").set(share)

    async def watch(self) -> None:
        """Poll forever (cancelled at shutdown); with workers sharing a reload generation,
        also as soon as it changes."""
        while True:
            await self._next_poll()
            try:
                await self.poll()
            except Exception:
                log.exception("deployment poll failed")

    async def _next_poll(self) -> None:
        if self.reloads is None:
            await asyncio.sleep(self.config.poll_seconds)
            return
        due = time.monotonic() + self.config.poll_seconds
        while time.monotonic() < due:
            await asyncio.sleep(min(CHECK_SECONDS, max(0.0, due - time.monotonic())))
            if self.reloads.generation() != self.generation:
                return

    async def close(self) -> None:
        for s in (self.routing.champion, self.routing.challenger):
            if s is not None:
                await s.batcher.stop()
        if self.inference_log is not None:
            await asyncio.to_thread(self.inference_log.close)
        if self.reloads is not None:
            self.reloads.forget()
