"""The Prometheus text the bridge exposes at /metrics."""

from __future__ import annotations

from ls_bridge.metrics import BridgeMetrics, Counter, Histogram


def test_counter_text_with_escaped_labels() -> None:
    counter = Counter("demo_total", "Things counted.")
    counter.inc(path="/predict", status="200")
    counter.inc(2, path="/predict", status="200")
    counter.inc(path='a"b\\c\nd', status="500")
    assert counter.render() == [
        "# HELP demo_total Things counted.",
        "# TYPE demo_total counter",
        'demo_total{path="/predict",status="200"} 3',
        'demo_total{path="a\\"b\\\\c\\nd",status="500"} 1',
    ]
    assert counter.value(status="200", path="/predict") == 3


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram("lat_seconds", "Latency.", buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value, stage="fetch")
    assert histogram.render() == [
        "# HELP lat_seconds Latency.",
        "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{stage="fetch",le="0.1"} 2',
        'lat_seconds_bucket{stage="fetch",le="1"} 3',
        'lat_seconds_bucket{stage="fetch",le="+Inf"} 4',
        'lat_seconds_sum{stage="fetch"} 3.65',
        'lat_seconds_count{stage="fetch"} 4',
    ]
    assert histogram.count(stage="fetch") == 4 and histogram.count(stage="infer") == 0


def test_timer_observes_also_on_error() -> None:
    histogram = Histogram("t_seconds", "Timed.")
    try:
        with histogram.time(stage="infer"):
            raise KeyError("boom")
    except KeyError:
        pass
    assert histogram.count(stage="infer") == 1


def test_bridge_metrics_render_every_family() -> None:
    metrics = BridgeMetrics()
    metrics.requests.inc(path="/health", status="200")
    text = metrics.render()
    for name in (
        "labelloop_bridge_requests_total",
        "labelloop_bridge_errors_total",
        "labelloop_bridge_tasks_total",
        "labelloop_bridge_stage_seconds",
    ):
        assert f"# TYPE {name} " in text
    assert text.endswith("\n")
