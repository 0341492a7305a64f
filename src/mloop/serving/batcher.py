"""Adaptive micro-batching: concurrent requests share one predict call.

A one-row scikit-learn predict costs milliseconds of per-call overhead while a row inside a
batch costs tens of microseconds, so throughput comes from batching. The batcher never waits
for a batch to fill when a request is alone: the model thread takes whatever is queued the
moment it is free. Requests arriving while it works queue up and become the next batch (up to
``max_batch`` rows). ``max_wait_ms`` > 0 additionally holds a non-full batch that briefly when
the previous batch had company, trading a little latency for larger batches under load.

A request larger than ``max_batch`` rows is scored ``max_batch`` rows at a time, and after each
piece the requests that arrived meanwhile go first: a one-row request waits for at most one
batch, not for all of a 30,000-row one (the large request pays a predict call per piece).

Model work runs in one dedicated thread per model, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


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


def _piece_cols(piece: _Piece) -> dict[str, list]:
    item, start, stop = piece
    if start == 0 and stop == item.n:
        return item.cols
    return {k: v[start:stop] for k, v in item.cols.items()}


class MicroBatcher:
    def __init__(self, predict: Callable[[dict[str, list]], list[Any]], *, max_batch: int = 64,
                 max_wait_ms: float = 0.0, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None,
                 threads: int | None = 1) -> None:
        self._predict = predict
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mloop-{name}",
                                            initializer=_limit_threads, initargs=(threads,))
        self._task: asyncio.Task | None = None
        self._on_batch = on_batch
        self._last_size = 1
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
        behind what arrives while this batch is scored)."""
        pieces: list[_Piece] = []
        rows = 0
        while waiting and rows < self.max_batch:
            item = waiting[0]
            if item.future.done():  # the client went away: score nothing more of it
                waiting.popleft()
                continue
            room = self.max_batch - rows
            waiting.popleft()
            left = item.n - item.done
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
            if self.max_wait and not stopping and self._last_size > 1:
                rows = sum(i.n - i.done for i in waiting)
                deadline = loop.time() + self.max_wait
                while rows < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                    if item is None:
                        stopping = True
                        break
                    waiting.append(item)
                    rows += item.n
            pieces, rows, tail = self._take(waiting)
            if not pieces:
                continue
            self._last_size = len(pieces)
            await self._score(loop, pieces, rows)
            # requests that arrived while this batch was scored go ahead of the rest of a
            # large one: a one-row request waits for at most one batch, not the whole request
            stopping = self._drain(waiting) or stopping
            if tail is not None and not tail.future.done():
                waiting.append(tail)

    async def _score(self, loop: asyncio.AbstractEventLoop, pieces: list[_Piece], rows: int
                     ) -> None:
        if len(pieces) == 1:
            merged = _piece_cols(pieces[0])
        else:
            parts = [_piece_cols(p) for p in pieces]
            merged = {k: [v for part in parts for v in part[k]] for k in parts[0]}
        t0 = time.perf_counter()
        try:
            preds = await loop.run_in_executor(self._executor, self._predict, merged)
            if len(preds) != rows:
                raise RuntimeError(f"model returned {len(preds)} predictions for {rows} rows")
        except Exception as exc:  # the model failed: every request in the batch gets the error
            for item, _, _ in pieces:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(rows, time.perf_counter() - t0)
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
