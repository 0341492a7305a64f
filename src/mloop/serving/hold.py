"""When a free model should wait for company before it scores what is queued.

The micro-batcher hands the model whatever is queued the moment the model is free. Under
steady concurrency that splits the clients into halves that take turns (8 connections, batches
of 4 and 4): each half pays the model's fixed per-call cost (about 12 ms for a scikit-learn
pipeline, where 64 rows cost hardly more than one), so throughput stays near half of what one
batch of everyone would give. Holding the batch open briefly while the answered clients come
back joins the halves.

Holding pays only under two conditions, both learned while serving rather than configured:

* **Requests are arriving.** ``company`` is the running mean, over recent calls, of the other
  requests around during a call: those batched with the first one plus those that arrived
  while the model worked. A lone closed-loop client (c=1) never has company (it sends its
  next request only after its answer), so it is never held; nor is any request while traffic
  is that sparse.
* **The per-call cost dominates.** With ``fixed + per_row x rows`` seconds per call (the
  batcher's ``CallCost``), one more row saves a whole call's ``fixed`` cost at the price of
  ``per_row``. A model whose queued rows already cost more than ``fixed`` gains little from
  more, and a model whose call costs under ``MIN_FIXED_S`` (a compiled graph: tens of µs) gains
  less than a timer wake-up costs; neither is held.

While holding, each wait for the next request lasts at most ``fixed / rows``: waiting raises
throughput only while requests come faster than ``rows`` per ``fixed`` seconds (for arrivals
at rate r, rows per call cycle ``n / (wait + fixed + per_row x n)`` grows with the wait exactly
when ``r x fixed > n``). The hold ends as soon as as many requests wait as a call cycle
usually sees (``seen``: the batch plus the arrivals during its call, which is the number of
clients for closed-loop traffic), and in all lasts at most the budget
(``serving.max_wait_ms``) and never longer than one ``fixed`` cost: holding longer than a
separate call would take is never worth it.

Until batches of different sizes have separated the fixed cost from the per-row one, the
whole call time counts as fixed for this decision: the first hold makes a larger batch, whose
time settles the question (a hold costs at most the budget if it was the wrong guess). The
same probe runs every ``PROBE_EVERY``-th time the fit refuses to hold while company is
around: on a busy machine one preempted call can skew the fit towards "per-row dominates",
and without holds the batches stay one size, which cannot correct it. (A cut-off learned only
from the gaps between arrivals that came was dropped for the same reason: a 40 µs first gap
kept every later wait at 0.2 ms, and 8 clients stayed in batches of 4 for a whole run.)
"""

from __future__ import annotations

# a timer wake-up on the event loop costs tens of µs: holding for a model whose whole call
# costs less than this gains nothing
MIN_FIXED_S = 0.001
MIN_STEP_S = 0.0002  # the shortest wait for the next request worth a timer
PROBE_EVERY = 16  # refusals by the cost fit, under company, before one hold probes it


class Hold:
    """The hold decision of one model's batcher: counters fed by the batcher (``arrived``,
    ``called``) and ``timeout``, asked before each wait. Plain float updates; the
    batcher's event loop is the only caller, so no locking."""

    def __init__(self, *, budget_s: float, decay: float = 0.2) -> None:
        self.budget = max(0.0, budget_s)
        self.decay = decay
        self.company = 0.0  # mean other requests around during a call
        self.seen = 0.0  # mean requests per call cycle (the batch + arrivals during its call)
        self.busy = False  # the model is scoring a batch
        self._arrivals = 0  # requests that arrived during the current call
        self._calls = 0
        self._refused = 0  # holds the cost fit refused under company since the last probe

    def arrived(self) -> None:
        """A request was submitted (counted when it arrives during a call)."""
        if self.busy:
            self._arrivals += 1

    def called(self, requests: int) -> None:
        """A call that scored (pieces of) ``requests`` requests has ended."""
        seen = requests + self._arrivals
        self._arrivals = 0
        if not self._calls:  # the first call is the whole estimate (no drift up from 0)
            self.company, self.seen = seen - 1.0, float(seen)
        else:
            self.company += self.decay * (seen - 1 - self.company)
            self.seen += self.decay * (seen - self.seen)
        self._calls += 1

    def assumed(self, fixed: float, per_row: float, *, rows: int) -> tuple[float, float]:
        """The (fixed, per_row) costs a hold starting with ``rows`` rows decides by: the
        fit's, except that every ``PROBE_EVERY``-th time the fit would refuse while company
        is around, the whole predicted call counts as fixed (a probe: the larger batch it
        makes refreshes the fit)."""
        if self.company >= 0.5 and (fixed < MIN_FIXED_S or fixed <= per_row * rows):
            self._refused += 1
            if self._refused >= PROBE_EVERY:
                self._refused = 0
                return fixed + per_row * rows, 0.0
        return fixed, per_row

    def timeout(self, *, rows: int, requests: int, held: float, fixed: float, per_row: float
                ) -> float:
        """Seconds to wait for the next request with ``rows`` rows of ``requests`` requests
        queued, ``held`` seconds into the hold; 0: score them now. ``fixed`` and ``per_row``:
        the model's call cost, in seconds."""
        if (self.budget <= 0.0 or fixed < MIN_FIXED_S or fixed <= per_row * rows
                or self.company < 0.5 or requests >= round(self.seen)):
            return 0.0
        left = min(self.budget, fixed) - held
        wait = min(fixed / max(1, rows), left)
        return wait if wait >= MIN_STEP_S else 0.0
