"""Prometheus text exposition for the bridge, without a client library.

labelloop_bridge_requests_total{path,status}   HTTP requests answered
labelloop_bridge_errors_total{where,error}     failed requests and failed tasks, by error class
labelloop_bridge_tasks_total{outcome}          tasks predicted (ok) or answered empty (failed)
labelloop_bridge_stage_seconds{stage}          latency histogram of fetch, infer and format, per image
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["BridgeMetrics", "Counter", "Histogram"]

LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = [*labels, extra] if extra else list(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Counter:
    """A monotonically increasing count per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_render_labels(k)} {_number(v)}" for k, v in items]
        return lines


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value

    @contextmanager
    def time(self, **labels: str) -> Iterator[None]:
        """Observe the wall time of the block, also when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started, **labels)

    def count(self, **labels: str) -> int:
        series = self._series.get(tuple(sorted(labels.items())))
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self._series.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total) in items:
            cumulative = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                cumulative += n
                le = "+Inf" if bound == float("inf") else _number(bound)
                lines.append(f"{self.name}_bucket{_render_labels(key, ('le', le))} {cumulative}")
            lines.append(f"{self.name}_sum{_render_labels(key)} {_number(total)}")
            lines.append(f"{self.name}_count{_render_labels(key)} {cumulative}")
        return lines


class BridgeMetrics:
    """The bridge's counters and histograms; one instance per app."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.requests = Counter("labelloop_bridge_requests_total", "HTTP requests answered, by path and status.")
        self.errors = Counter(
            "labelloop_bridge_errors_total", "Failed requests (where=request) and tasks (where=task), by error class."
        )
        self.tasks = Counter("labelloop_bridge_tasks_total", "Tasks answered, with pre-labels (ok) or empty (failed).")
        self.stages = Histogram("labelloop_bridge_stage_seconds", "Per-image latency of fetch, infer and format.")

    def render(self) -> str:
        lines = [*self.requests.render(), *self.errors.render(), *self.tasks.render(), *self.stages.render()]
        return "\n".join(lines) + "\n"
