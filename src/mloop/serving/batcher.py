"""Adaptive micro-batching: concurrent requests share one predict call.

A one-row scikit-learn predict costs milliseconds of per-call overhead while a row inside a
batch costs tens of microseconds, so throughput comes from batching. The model thread takes
what is queued when it is free; a lone request is never held. When requests keep arriving and
the model's per-call cost dominates, a free model holds the batch open briefly for the clients
it just answered (``mloop.serving.hold``: learned per version, at most ``max_wait_ms``), so
concurrent clients share one call instead of taking turns in halves. Requests arriving while
the model works queue up and become the next batch (up to ``max_batch`` rows or, when more
wait, as many as fit the time budget below).

A request larger than a batch is scored in pieces, and after each piece the requests that
arrived meanwhile go first: a one-row request waits for at most one piece, not for all of a
30,000-row request. A piece is sized by time, not rows: each predict call has a fixed cost
(about 7 ms for a scikit-learn pipeline, 30 µs compiled) besides its per-row cost, so fixed
64-row pieces made a 34,000-row request 45x slower on the original model. ``CallCost`` fits
seconds = fixed + per_row x rows to the batches actually scored, and a piece is the largest
row count predicted to take at most ``max_batch_ms`` (never fewer than ``max_batch`` rows).

Model work runs in one dedicated thread per model, except a batch predicted to take at most
``inline_ms`` (a compiled model's, whose engine's threads are fixed when it loads): handing
that to the thread and back (a queue put, a thread wake-up, the loop's wake-up pipe) cost
more than the call itself, ~7% of the compiled path's throughput at 32 connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from mloop.serving.hold import Hold


def _limit_threads(threads: int | None) -> None:
    """OpenMP's thread count is per calling thread, so the limit is set in the model thread
    itself. Idle OpenMP workers spin; on a small machine they steal the CPU the event loop
    needs (one-row serving throughput rises ~60% with one thread here)."""
    if threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)


@dataclass
class _Item:
    cols: dict[str, list]
    n: int
    future: asyncio.Future
    done: int = 0  # rows already scored (an item larger than a batch is scored in pieces)
    preds: list[Any] = field(default_factory=list)  # their predictions, for such an item


# (request, first row, end row) of one batch: a whole request, or a piece of a large one
_Piece = tuple[_Item, int, int]


class CallCost:
    """An exponentially weighted least-squares fit of a model's predict time,
    ``seconds = fixed + per_row * rows``, from the batches it actually scored.

    ``observe`` is a handful of float updates per batch (the hot path); the fit itself is
    solved only when a large request is cut (``rows_within``). Until the batches seen differ
    enough in size to separate the two costs, all of the time is taken as per-row, which
    never predicts more rows than fit the budget. A piece may also grow at most ``growth``
    times past the largest batch measured, so a noisy early fit costs one overlong piece at
    worst, and that piece's measurement corrects the fit.
    """

    def __init__(self, *, decay: float = 0.1, growth: int = 8) -> None:
        self.decay = decay
        self.growth = growth
        self.largest = 0  # rows of the largest batch measured
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # decayed sums
        self._fit: tuple[float, float] | None = None  # the last well-conditioned (fixed, per_row)
        self._last = (0, 0.0)  # rows and seconds of the latest batch

    def observe(self, rows: int, seconds: float) -> None:
        keep = 1.0 - self.decay
        self._w = self._w * keep + 1.0
        self._x = self._x * keep + rows
        self._y = self._y * keep + seconds
        self._xx = self._xx * keep + rows * rows
        self._xy = self._xy * keep + rows * seconds
        if rows > self.largest:
            self.largest = rows
        self._last = (rows, seconds)

    def estimate(self) -> tuple[float, float] | None:
        """(fixed seconds per call, seconds per row), or None before any batch. When the
        recent batches were all about one size, or the larger ones were faster (noise), the
        last fit that separated the costs is kept (a flood of one-row requests says nothing
        about large ones); before there is one, the whole time counts as per-row."""
        if self._w == 0.0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > (0.05 * mx) ** 2:
            per_row = (self._xy / self._w - mx * my) / var
            if per_row > 0.0:  # not a larger batch that happened to be faster (noise)
                self._fit = (max(0.0, my - per_row * mx), per_row)
        if self._fit is not None:
            return self._fit
        return 0.0, my / mx if mx > 0 else 0.0

    def call_costs(self) -> tuple[float, float] | None:
        """(fixed, per_row) seconds for deciding whether to hold a batch open: the fit once
        batches of different sizes separated the two, before that the recent mean call time
        taken as all fixed (a hold then makes a larger batch, whose time separates them).
        None before any batch."""
        if self.estimate() is None:
            return None
        if self._fit is not None:
            return self._fit
        return self._y / self._w, 0.0

    def rows_within(self, budget: float, *, least: int) -> int:
        """The most rows one call is predicted to score within ``budget`` seconds: at least
        ``least`` (also the answer before any measurement), at most ``growth`` times the
        largest batch measured. Never fewer than the latest batch's time per row allows:
        counting all of its time as per-row overstates what a larger call costs, so that
        bound is safe even when the fit is stale or noisy (pieces grow while they fit)."""
        est = self.estimate()
        if est is None:
            return least
        fixed, per_row = est
        most = max(least, self.growth * self.largest)
        rows, seconds = self._last
        if per_row <= 0.0 or seconds <= 0.0:
            return most
        safe = budget * rows / seconds
        return max(least, min(most, int(max((budget - fixed) / per_row, safe))))


def _piece_cols(piece: _Piece) -> dict[str, list]:
    item, start, stop = piece
    if start == 0 and stop == item.n:
        return item.cols
    return {k: v[start:stop] for k, v in item.cols.items()}


class MicroBatcher:
    def __init__(self, predict: Callable[[dict[str, list]], list[Any]], *, max_batch: int = 64,
                 max_wait_ms: float = 10.0, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None,
                 threads: int | None = 1, max_batch_ms: float = 20.0,
                 inline_ms: float = 0.0) -> None:
        """``max_batch``: rows per batch, and the smallest piece of a large request.
        ``max_batch_ms``: the time a piece of a large request (or a batch of many queued
        requests) may be predicted to take; 0 keeps every batch at ``max_batch`` rows.
        ``max_wait_ms``: the most a free model holds a batch open for company (only while
        requests arrive and its per-call cost dominates, see ``mloop.serving.hold``); 0
        never holds. ``inline_ms``: a batch predicted to take at most this long is scored on
        the event loop itself (only for a model whose engine's thread count is fixed apart
        from the calling thread, and that does no I/O); 0 always uses the model thread."""
        self._predict = predict
        self.inline_s = max(0.0, inline_ms) / 1000.0
        self.max_batch = max(1, max_batch)
        self.budget = max(0.0, max_batch_ms) / 1000.0
        self.cost = CallCost()
        self.hold = Hold(budget_s=max(0.0, max_wait_ms) / 1000.0)
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mloop-{name}",
                                            initializer=_limit_threads, initargs=(threads,))
        self._task: asyncio.Task | None = None
        self._on_batch = on_batch
        self._wake: asyncio.Future | None = None  # resolved by the next submit while holding
        self._closed = False
        self._waiting: deque[_Item] = deque()  # taken off the queue, not yet fully scored

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, cols: dict[str, list], n: int) -> list[Any]:
        """Queue validated columns; resolve to their predictions, in row order."""
        if self._closed:
            raise RuntimeError("this model was swapped out; retry the request")
        if self._task is None:
            self.start()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(cols, n, fut))
        self.hold.arrived()
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return await fut

    @property
    def queued(self) -> int:
        """Requests submitted and not yet fully scored."""
        return self._queue.qsize() + len(self._waiting)

    async def stop(self) -> None:
        """Finish what is queued, then stop the model thread. Later submits are refused."""
        self._closed = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    def _drain(self, waiting: deque[_Item]) -> bool:
        """Move what is queued to ``waiting``; True once the stop sentinel is seen."""
        stopping = False
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                stopping = True
            else:
                waiting.append(item)
        return stopping

    def _take(self, waiting: deque[_Item]) -> tuple[list[_Piece], int, _Item | None]:
        """The next batch from the front of ``waiting``: whole requests while they fit, then
        the head of the first one that does not (its tail is returned, to go back in line
        behind what arrives while this batch is scored). A batch is ``max_batch`` rows, or
        more once what waits exceeds that: as many as the time budget allows."""
        pieces: list[_Piece] = []
        rows = 0
        cap = self.max_batch
        sized = not self.budget
        while waiting and rows < cap:
            item = waiting[0]
            if item.future.done():  # the client went away: score nothing more of it
                waiting.popleft()
                continue
            left = item.n - item.done
            if not sized and left > cap - rows:
                sized = True
                cap = self.cost.rows_within(self.budget, least=self.max_batch)
            room = cap - rows
            waiting.popleft()
            if left <= room:
                pieces.append((item, item.done, item.n))
                rows += left
                continue
            pieces.append((item, item.done, item.done + room))
            return pieces, rows + room, item
        return pieces, rows, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        stopping = False
        while True:
            stopping = self._drain(waiting) or stopping
            if not waiting:
                if stopping:
                    break
                first = await self._queue.get()
                if first is None:
                    break
                waiting.append(first)
                stopping = self._drain(waiting) or stopping
            if self.hold.budget and not stopping:
                stopping = await self._hold(loop, waiting)
            pieces, rows, tail = self._take(waiting)
            if not pieces:
                continue
            self.hold.busy = True
            try:
                await self._score(loop, pieces, rows)
            finally:
                self.hold.busy = False
                self.hold.called(len(pieces))
            # requests that arrived while this batch was scored go ahead of the rest of a
            # large one: a one-row request waits for at most one batch, not the whole request
            stopping = self._drain(waiting) or stopping
            if tail is not None and not tail.future.done():
                waiting.append(tail)

    async def _hold(self, loop: asyncio.AbstractEventLoop, waiting: deque[_Item]) -> bool:
        """Hold the queued batch open while ``Hold`` says company is worth waiting for;
        True once the stop sentinel is seen. Submits wake it through ``_wake`` (a future:
        nothing is taken off the queue by a wait that times out, so no request is lost)."""
        costs = self.cost.call_costs()
        if costs is None:
            return False
        rows = sum(i.n - i.done for i in waiting)
        fixed, per_row = self.hold.assumed(*costs, rows=rows)
        start = loop.time()
        while rows < self.max_batch:
            wait = self.hold.timeout(rows=rows, requests=len(waiting), held=loop.time() - start,
                                     fixed=fixed, per_row=per_row)
            if wait <= 0.0:
                break
            wake = self._wake = loop.create_future()
            timer = loop.call_later(wait, _resolve, wake)
            try:
                await wake
            finally:
                timer.cancel()
                self._wake = None
            if self._queue.empty():  # timed out: nobody came
                break
            before = len(waiting)
            if self._drain(waiting):
                return True
            rows += sum(i.n for i in islice(waiting, before, None))
        return False

    async def _score(self, loop: asyncio.AbstractEventLoop, pieces: list[_Piece], rows: int
                     ) -> None:
        if len(pieces) == 1:
            merged = _piece_cols(pieces[0])
        else:
            parts = [_piece_cols(p) for p in pieces]
            merged = {k: [v for part in parts for v in part[k]] for k in parts[0]}
        try:
            est = self.cost.estimate() if self.inline_s else None
            if est is not None and est[0] + est[1] * rows <= self.inline_s:
                preds, seconds = _timed(self._predict, merged)
            else:
                preds, seconds = await loop.run_in_executor(self._executor, _timed,
                                                            self._predict, merged)
            if len(preds) != rows:
                raise RuntimeError(f"model returned {len(preds)} predictions for {rows} rows")
        except Exception as exc:  # the model failed: every request in the batch gets the error
            for item, _, _ in pieces:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.cost.observe(rows, seconds)
        if self._on_batch is not None:
            self._on_batch(rows, seconds)
        start = 0
        for item, first, stop in pieces:
            size = stop - first
            if size == item.n:
                result = preds[start:start + size]
            else:
                item.preds.extend(preds[start:start + size])
                result = item.preds
            start += size
            item.done = stop
            # a cancelled request (client went away) is skipped
            if item.done == item.n and not item.future.done():
                item.future.set_result(result)


def _timed(predict: Callable[[dict[str, list]], list[Any]], cols: dict[str, list]
           ) -> tuple[list[Any], float]:
    """Predictions and the seconds the call itself took, timed where it runs: timed from the
    event loop, a call handed to the model thread would also count the hand-off and the
    loop's own backlog, which under load kept a compiled model's batches (~0.1 ms) looking
    too slow to score inline."""
    t0 = time.perf_counter()
    preds = predict(cols)
    return preds, time.perf_counter() - t0


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
