"""Generated Triton configs parse as Triton's own ModelConfig protobuf."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from serving.pbtxt import DetectorConfig, render_core_onnx, render_ensemble, render_python, render_stage


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_python_variant() -> None:
    cfg = parse(
        render_python(DetectorConfig(max_batch_size=4, instance_count=3, batch_delay_us=500, score_threshold=0.3))
    )
    assert cfg.backend == "python" and cfg.max_batch_size == 4
    assert [i.name for i in cfg.input] == ["IMAGE"]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_STRING
    assert [o.name for o in cfg.output] == ["DETECTIONS", "NUM_DETECTIONS", "IMAGE_SIZE", "MODEL_INFO", "STAGE_MS"]
    assert list(cfg.output[-1].dims) == [4]
    assert cfg.instance_group[0].count == 3
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.parameters["score_threshold"].string_value == "0.3"
    assert cfg.parameters["rect"].string_value == "true"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert parse(render_python(DetectorConfig(rect=False))).parameters["rect"].string_value == "false"


def test_fast_jpeg_decode_is_off_unless_asked_and_reaches_every_decoding_model() -> None:
    from core.settings import Settings
    from serving.publish import detector_config

    assert parse(render_python(DetectorConfig())).parameters["fast_jpeg_decode"].string_value == "false"
    assert parse(render_stage(DetectorConfig(), "preprocess")).parameters["fast_jpeg_decode"].string_value == "false"
    fast = detector_config(Settings(fast_jpeg_decode=True))
    assert parse(render_python(fast)).parameters["fast_jpeg_decode"].string_value == "true"
    assert parse(render_stage(fast, "preprocess")).parameters["fast_jpeg_decode"].string_value == "true"


def test_onnxruntime_variant_has_tensorrt_fp16_on_gpu_only() -> None:
    gpu = parse(render_core_onnx(DetectorConfig(kind="KIND_GPU")))
    assert gpu.platform == "onnxruntime_onnx"
    accel = gpu.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    assert accel.parameters["trt_engine_cache_enable"] == "1"
    cpu = parse(render_core_onnx(DetectorConfig(kind="KIND_CPU")))
    assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator


def test_ensemble_wires_stages_in_order() -> None:
    cfg = DetectorConfig(name="det")
    ensemble = parse(render_ensemble(cfg))
    steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
    assert steps == ["det_preprocess", "det_onnx", "det_postprocess"]
    produced = {v for s in ensemble.ensemble_scheduling.step for v in s.output_map.values()}
    consumed = {v for s in ensemble.ensemble_scheduling.step for v in s.input_map.values()}
    assert consumed - produced == {"IMAGE"}
    for stage in ("preprocess", "postprocess"):
        assert parse(render_stage(cfg, stage)).parameters["stage"].string_value == stage


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="stage"):
        render_stage(DetectorConfig(), "bogus")
