"""The base of the Prometheus collectors whose numbers live in mloop's store.

The monitor's gauges (:class:`mloop.monitoring.alerts.MonitorCollector`) and the loop's
(:class:`mloop.loop.gauges.LoopCollector`) are read from the store at scrape time, so whichever
server a scrape reaches tells the same. This base holds what they share: the collector protocol
prometheus_client calls (``describe``/``collect``, unchecked: samples exist only at scrape
time), and the rule that a read that fails logs a warning and yields nothing instead of
failing the scrape. A subclass says what to read (:meth:`StoreCollector.read`) and which
metric families it makes of it (:meth:`StoreCollector.families`). It sits below monitoring and
the loop, so the process that serves /metrics composes them without either importing the
other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    from mloop.project import Project

T = TypeVar("T")


class StoreCollector(Generic[T]):
    """A collector reading ``project``'s store at every scrape; ``what`` names it in the
    warning a failed read logs on ``log``."""

    what: ClassVar[str]
    log: ClassVar[logging.Logger]

    def __init__(self, project: Project) -> None:
        self.project = project

    def describe(self) -> list[Any]:
        return []  # unchecked collector: samples are produced at scrape time

    def collect(self) -> Iterator[Any]:
        try:
            data = self.read()
        except Exception as exc:  # a scrape must not crash the server
            self.log.warning("%s unavailable: %s", self.what, exc)
            return
        if data is not None:
            yield from self.families(data)

    def read(self) -> T | None:
        """What the families are made of, read from the store (None: nothing to report)."""
        raise NotImplementedError

    def families(self, data: T) -> Iterator[Any]:
        """The metric families of ``data``."""
        raise NotImplementedError


def gauge(name: str, helptext: str, labels: Sequence[str] = ()) -> Any:
    """A gauge family (prometheus_client is imported when the first scrape comes)."""
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, helptext, labels=list(labels))
