"""The bench's interactive click section on a real tritonserver: structure and sanity, no timing targets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from labelloop.bench_report import segmenter_lines
from labelloop.bench_segmenter import CLICKS, run_segmenter_bench
from tests.conftest import make_settings

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def test_segmenter_section_times_clicks_after_a_first_call(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "model_repository", tmp_path / "state")

    section = run_segmenter_bench(settings, images=2)["segmenter"]

    assert section["images"] == 2 and section["interactive_click_n"] == 2 * CLICKS
    assert set(section["click_p50_ms_by_position"]) == {str(n) for n in range(1, CLICKS + 1)}
    p50, p90 = section["interactive_click_p50_ms"], section["interactive_click_p90_ms"]
    assert 0 < p50 <= p90 <= section["interactive_click_max_ms"] and math.isfinite(p90)
    assert section["first_call_mean_ms"] > 0
    assert section["model"]["version"] == 1 and section["model"]["backbone"].startswith("dinov3 v")
    assert any("interactive_click_p50_ms" in line for line in segmenter_lines(section))
