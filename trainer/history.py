"""The trainer's history: one JSON line per run, appended after the run's decision, never rewritten.

It is what the ΔmAP50 rule reads: "the served model's mAP50 at its previous evaluation". The
seed project wrote the new evaluation first and read it back, so its Δ was always 0. A run's
record is written by :meth:`History.append_run` and read back by :meth:`History.previous_map50`,
side by side, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `labelloop status` reads the history without the evaluation stack behind the rules
    from core.settings import Settings
    from trainer.rules import Decision, MetricDecision

__all__ = ["HISTORY_FILE", "HOLDOUT_SET", "History", "trainer_dir"]

logger = logging.getLogger(__name__)

HOLDOUT_SET = "holdout"
HISTORY_FILE = "history.jsonl"


def trainer_dir(settings: Settings) -> Path:
    """The trainer's folder under the state folder (here so that `labelloop status` reads it without the pipeline)."""
    return settings.state_dir / "trainer"


def _metric(entry: Mapping[str, Any], metric: str) -> float | None:
    value = entry.get(metric, (entry.get("metrics") or {}).get(metric))
    return float(value) if value is not None else None


class History:
    """``history.jsonl``: readable by anyone, appended by the one training run holding the lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first; a torn last line (a crash mid-write) is skipped."""
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    logger.warning("%s line %d is not JSON; skipped", self.path, number)
                    continue
                if isinstance(record, dict):
                    yield record

    def previous_map50(self, version: int) -> float | None:
        """mAP50 of ``version`` at its latest evaluation on the held-out set (as served, or as the candidate)."""
        return self.previous_metric(version, "map50")

    def previous_metric(self, version: int, metric: str) -> float | None:
        """``metric`` of ``version`` at its latest evaluation on the held-out set (as served, or as the candidate).

        A record's ``served`` and ``candidate`` hold the metric either flat or under ``metrics``.
        """
        found: float | None = None
        for record in self.records():
            if record.get("set") != HOLDOUT_SET:
                continue
            served = record.get("served") or {}
            candidate = record.get("candidate") or {}
            value = _metric(served, metric)
            if served.get("version") == version and value is not None:
                found = value
            value = _metric(candidate, metric)
            if record.get("published_version") == version and value is not None:
                found = value
        return found

    def append_run(
        self,
        kind: str,
        *,
        served_version: int | None,
        served: Mapping[str, Any] | None,
        candidate: Mapping[str, Any] | None,
        decision: Decision | MetricDecision,
        published_version: int | None,
        **context: Any,
    ) -> None:
        """Append one run on the held-out set: metrics of the served version and of the candidate, and the decision.

        ``served`` and ``candidate`` hold at least ``map50``; ``candidate`` counts as the evaluation
        of ``published_version`` when it was published. ``context`` (run id, dataset hash, error) is kept as is.
        """
        self.append(
            {
                "kind": kind,
                "set": HOLDOUT_SET,
                **context,
                "served": None if served is None else {"version": served_version, **served},
                "candidate": None if candidate is None else dict(candidate),
                "decision": decision.to_dict(),
                "published_version": published_version,
            }
        )

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (with a UTC timestamp) as a single write, then fsync."""
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # a torn last line (a crash mid-write) must not swallow this record
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
