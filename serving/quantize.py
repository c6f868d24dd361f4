"""Post-training INT8 quantization of a detector ONNX, gated on how closely it agrees with its FP32 source.

Why: on a CPU, onnxruntime's INT8 kernels (AVX-512 VNNI, AVX2) run this detector about twice as
fast as FP32 (README, Performance). What is quantized: every convolution and activation of the
network, as QDQ nodes with per-channel weights, calibrated on images from the user's own domain.
What stays FP32: the tail of ultralytics' Detect head (DFL softmax, box decoding, class sigmoid,
the final concat). That concat mixes pixel coordinates (0-640) with class scores (0-1); one INT8
scale for both would round every score to 0 or 1.25.

The gate is label-free, so it works for ``labelloop export`` as well as for the trainer: the INT8
model's detections are matched to the FP32 model's on images kept out of calibration (same class,
IoU >= 0.5), and the F1 of that match must reach the minimum. The trainer then judges the INT8 file
itself on the held-out set, like any candidate.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from labelloop.errors import QuantizationError
from serving.export import check_onnx, save_for_triton
from serving.triton.detector_ops import (
    ImageRejected,
    Letterbox,
    decode_image,
    letterbox,
    network_input,
    postprocess,
)

__all__ = ["MATCH_IOU", "QuantizeResult", "agreement", "quantize_int8", "split_images"]

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5
# Calibration images and agreement images: enough for stable activation ranges, a few seconds each.
MAX_CALIBRATION = 64
MAX_CHECK = 64
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# ultralytics names ONNX nodes after the module path: "/model.22/cv3.0/cv3.0.2/Conv".
_MODULE = re.compile(r"^(/model\.\d+/)")
_HEAD_BRANCHES = ("cv2.", "cv3.")  # the Detect head's box and class convolutions (also one2one_cv2/3)


@dataclass(frozen=True)
class QuantizeResult:
    """An INT8 ONNX that passed the gate, and the numbers it passed with (kept in the model card)."""

    onnx: Path
    agreement: float
    min_agreement: float
    calibration_images: int
    check_images: int
    fp32_nodes: int

    def to_card(self) -> dict[str, Any]:
        data = asdict(self)
        del data["onnx"]
        return data


def split_images(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Every fourth image checks the agreement, the others calibrate; sorted, so the split is stable."""
    files = sorted(p for p in paths if p.suffix.lower() in _IMAGE_SUFFIXES)
    check = [p for i, p in enumerate(files) if i % 4 == 3][:MAX_CHECK]
    calibration = [p for i, p in enumerate(files) if i % 4 != 3][:MAX_CALIBRATION]
    return calibration, check


def _inputs(paths: Sequence[Path], imgsz: tuple[int, int]) -> Iterator[tuple[npt.NDArray[np.float32], Letterbox]]:
    """The exact tensors the Triton model would feed the network; unreadable files are skipped."""
    for path in paths:
        try:
            decoded = decode_image(path.read_bytes(), 1 << 31, 1 << 31, imgsz)
        except (OSError, ImageRejected) as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        padded, box = letterbox(decoded.pixels, imgsz, (decoded.width, decoded.height))
        yield network_input([padded]), box


def _head_tail(nodes: Sequence[Any], output_producer: str) -> list[str]:
    """Nodes of the output's module (the Detect head) that are not its box/class convolutions."""
    module = _MODULE.match(output_producer)
    if module is None:
        return []
    prefix = module.group(1)
    return [
        n.name
        for n in nodes
        if n.name.startswith(prefix) and not any(b in n.name[len(prefix) :] for b in _HEAD_BRANCHES)
    ]


def quantize_int8(
    src: Path,
    out: Path,
    calibration: Sequence[Path],
    check: Sequence[Path],
    *,
    min_agreement: float,
    conf: float,
    iou: float,
) -> QuantizeResult:
    """Write the INT8 version of ``src`` to ``out``; raise ``QuantizationError`` if it fails the gate."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = check_onnx(src)
    tensors = [x for x, _ in _inputs(calibration, meta.imgsz)]
    if not tensors:
        raise QuantizationError("INT8 needs calibration images from the model's domain; none could be read")
    if not check:
        raise QuantizationError("INT8 needs images held back to check it against FP32 (one in four: give at least 4)")

    class _Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self, name: str) -> None:
            self._feeds = iter([{name: x} for x in tensors])

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            return next(self._feeds, None)

    source = onnx.load(str(src))
    input_name = source.graph.input[0].name
    producer = next((n.name for n in source.graph.node if source.graph.output[0].name in n.output), "")
    with tempfile.TemporaryDirectory(prefix="labelloop-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            # Shape inference and onnxruntime's own fusions first, as onnxruntime recommends.
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            keep_fp32 = _head_tail(onnx.load(str(prepared)).graph.node, producer)
            quantize_static(
                str(prepared),
                str(quantized),
                _Reader(input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_fp32,
            )
            model = onnx.load(str(quantized))
        except Exception as exc:  # noqa: BLE001 - the quantizer raises anything; all mean "no INT8 model"
            raise QuantizationError(f"onnxruntime could not quantize {src.name}: {exc}") from exc
        # The Triton model reads names/imgsz from the metadata; the quantizer does not keep it.
        del model.metadata_props[:]
        model.metadata_props.extend(source.metadata_props)
        onnx.save(model, str(quantized))
        save_for_triton(quantized, out)
    check_onnx(out)
    score = agreement(src, out, check, conf=conf, iou=iou)
    result = QuantizeResult(out, round(score, 4), min_agreement, len(tensors), len(check), len(keep_fp32))
    if score < min_agreement:
        raise QuantizationError(
            f"the INT8 model agrees with FP32 on {score:.3f} of detections (F1 at IoU {MATCH_IOU}, "
            f"{len(check)} images); the minimum is {min_agreement}"
        )
    logger.info("INT8 %s: agreement %.4f with FP32 on %d images", out, score, len(check))
    return result


def agreement(reference: Path, candidate: Path, images: Sequence[Path], *, conf: float, iou: float) -> float:
    """F1 of ``candidate``'s detections against ``reference``'s (same class, IoU >= 0.5) over ``images``."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (reference, candidate)]
    name = sessions[0].get_inputs()[0].name
    imgsz = check_onnx(reference).imgsz
    matched = total = 0
    for x, box in _inputs(images, imgsz):
        ref, cand = (postprocess(s.run(None, {name: x})[0][0], box, conf, iou) for s in sessions)
        matched += _matches(ref, cand)
        total += len(ref) + len(cand)
    return 1.0 if total == 0 else 2.0 * matched / total


def _matches(ref: npt.NDArray[np.float32], cand: npt.NDArray[np.float32]) -> int:
    """Greedy one-to-one matching of ``[N, 6]`` detections, best candidate score first."""
    used = np.zeros(len(ref), bool)
    count = 0
    for row in cand[np.argsort(-cand[:, 4], kind="stable")]:
        x1 = np.maximum(ref[:, 0], row[0])
        y1 = np.maximum(ref[:, 1], row[1])
        x2 = np.minimum(ref[:, 2], row[2])
        y2 = np.minimum(ref[:, 3], row[3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        area = (ref[:, 2] - ref[:, 0]) * (ref[:, 3] - ref[:, 1]) + (row[2] - row[0]) * (row[3] - row[1])
        overlap = np.where(used | (ref[:, 5] != row[5]), 0.0, inter / np.maximum(area - inter, 1e-9))
        if len(ref) and overlap.max() >= MATCH_IOU:
            used[int(overlap.argmax())] = True
            count += 1
    return count
