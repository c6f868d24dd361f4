"""One deadline budget across every Triton retry: no attempt outlives it and no retry starts after it.

The fault (a Triton that answers DEADLINE_EXCEEDED or UNAVAILABLE) is injected in place of the gRPC
call; a Triton that never answers, end to end through /predict, is in
tests/integration/test_bridge_security.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from tritonclient.utils import InferenceServerException

from core.errors import TritonUnavailableError
from serving.client import DetectorClient


class HangingTriton:
    """Each call waits out its own ``client_timeout``, then fails the way gRPC does."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.timeouts: list[float] = []

    async def __call__(self, *args: Any, client_timeout: float, **kwargs: Any) -> Any:
        self.timeouts.append(client_timeout)
        await asyncio.sleep(client_timeout if self.status.endswith("DEADLINE_EXCEEDED") else 0.0)
        raise InferenceServerException("injected", status=self.status)


def _detect_with(fault: HangingTriton, budget_s: float | None, retries: int = 20) -> tuple[float, str]:
    async def run() -> tuple[float, str]:
        client = DetectorClient("127.0.0.1:1", "m", timeout_s=0.3, retries=retries, backoff_s=0.05)
        client._client.infer = fault  # type: ignore[method-assign]
        started = time.monotonic()
        deadline = None if budget_s is None else started + budget_s
        try:
            with pytest.raises(TritonUnavailableError) as failed:
                await client.detect(b"image", deadline=deadline)
            return time.monotonic() - started, str(failed.value)
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.mark.parametrize("status", ["StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE"])
def test_retries_stop_when_the_budget_is_spent(status: str) -> None:
    fault = HangingTriton(status)
    elapsed, message = _detect_with(fault, budget_s=1.0)
    assert elapsed < 1.0 + 0.15
    assert 1 < len(fault.timeouts) < 21  # it did retry, and it stopped long before retries ran out
    assert "time budget" in message
    assert all(t <= 0.3 for t in fault.timeouts)
    if status.endswith("DEADLINE_EXCEEDED"):
        assert sum(fault.timeouts) <= 1.0  # the attempts together fit the budget: the last one was cut short
        assert fault.timeouts[-1] < 0.3


def test_without_a_deadline_every_retry_runs() -> None:
    fault = HangingTriton("StatusCode.UNAVAILABLE")
    _detect_with(fault, budget_s=None, retries=3)
    assert fault.timeouts == [0.3] * 4


def test_a_spent_budget_makes_no_call() -> None:
    fault = HangingTriton("StatusCode.UNAVAILABLE")
    _, message = _detect_with(fault, budget_s=-0.1)
    assert fault.timeouts == [] and "time budget was spent before Triton answered" in message
