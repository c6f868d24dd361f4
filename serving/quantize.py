"""Post-training INT8 quantization of a detector ONNX, gated on how closely it agrees with its FP32 source.

Why: on this project's AVX-512 VNNI test machine, onnxruntime's INT8 kernels run the detector about
twice as fast as FP32 (docs/performance.md). What is quantized: every convolution and activation
of the network, as QDQ nodes with per-channel weights, calibrated on images from the user's own
domain. What stays FP32: the tail of ultralytics' Detect head (DFL softmax, box decoding, class
sigmoid, the final concat). That concat holds pixel coordinates (0 to imgsz) and class scores
(0-1) in one tensor; one UINT8 scale for both rounds every score to 0.

The gate is label-free, so it works for ``labelloop export`` as well as for the trainer: the INT8
model's detections are matched to the FP32 model's on images kept out of calibration (same class,
IoU >= 0.5), and the F1 of that match must reach the minimum. It runs on the machine that
quantizes. The trainer then judges the INT8 file itself on the held-out set, like any candidate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import QuantizationError
from core.image_decode import ImageRejected, decode_image
from serving.export import check_onnx, save_for_triton
from serving.triton.detector_ops import (
    Letterbox,
    letterbox,
    letterbox_stride,
    network_input,
    parse_onnx_metadata,
    postprocess,
)

__all__ = [
    "MATCH_IOU",
    "Agreement",
    "QuantizeOptions",
    "QuantizeResult",
    "agreement",
    "matched_detections",
    "quantize_int8",
    "split_images",
]

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5
# Images used at most, spread over what was given: 96 calibrate (activation ranges settle well
# before that; more only lengthens a publish) and 32 check.
MAX_IMAGES = 128
# Fewer FP32 detections than this on the check images is too little evidence to pass the gate.
MIN_DETECTIONS = 10
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# ultralytics names ONNX nodes after the module path: "/model.22/cv3.0/cv3.0.2/Conv".
_MODULE = re.compile(r"^(/model\.\d+/)")
_HEAD_BRANCHES = ("cv2.", "cv3.")  # the Detect head's box and class convolutions (also one2one_cv2/3)


@dataclass(frozen=True)
class QuantizeOptions:
    """What the quantizer and its gate take from the settings."""

    min_agreement: float
    conf: float
    iou: float
    max_image_bytes: int
    max_image_pixels: int
    rect: bool
    fast_jpeg_decode: bool = False


@dataclass(frozen=True)
class Agreement:
    """How well one model's detections match another's on the images that could be read."""

    f1: float
    images: int
    reference_detections: int


@dataclass(frozen=True)
class QuantizeResult:
    """An INT8 ONNX that passed the gate, and the numbers it passed with (kept in the model card)."""

    onnx: Path
    agreement: float
    min_agreement: float
    calibration_images: int
    check_images: int
    fp32_detections: int
    fp32_nodes: int

    def to_card(self) -> dict[str, Any]:
        data = asdict(self)
        del data["onnx"]
        return data


def split_images(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Up to ``MAX_IMAGES`` spread evenly over the sorted list (every folder gets its share); one in four checks."""
    files = sorted(p for p in paths if p.suffix.lower() in _IMAGE_SUFFIXES)
    wanted = min(len(files), MAX_IMAGES)
    picked = [files[i * len(files) // wanted] for i in range(wanted)]
    return [p for i, p in enumerate(picked) if i % 4 != 3], [p for i, p in enumerate(picked) if i % 4 == 3]


def _inputs(
    paths: Sequence[Path], session: Any, options: QuantizeOptions
) -> Iterator[tuple[npt.NDArray[np.float32], Letterbox]]:
    """The exact tensors the Triton model would feed ``session``'s network; unreadable files are skipped."""
    meta = parse_onnx_metadata(session.get_modelmeta().custom_metadata_map)
    imgsz = meta.imgsz
    stride = letterbox_stride(session.get_inputs()[0].shape, meta, options.rect)
    for path in paths:
        try:
            target = imgsz if options.fast_jpeg_decode else None
            decoded = decode_image(path.read_bytes(), options.max_image_bytes, options.max_image_pixels, target)
        except (OSError, ImageRejected) as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        padded, box = letterbox(decoded.pixels, imgsz, (decoded.width, decoded.height), stride)
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
    src: Path, out: Path, calibration: Sequence[Path], check: Sequence[Path], options: QuantizeOptions
) -> QuantizeResult:
    """Write the INT8 version of ``src`` to ``out`` only if it passes the gate; else ``QuantizationError``."""
    if not check:
        raise QuantizationError("INT8 needs images held back to check it against FP32 (one in four: give at least 4)")
    import onnxruntime as ort

    check_onnx(src)
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    tensors = [x for x, _ in _inputs(calibration, session, options)]
    if not tensors:
        raise QuantizationError("INT8 needs calibration images from the model's domain; none could be read")
    with tempfile.TemporaryDirectory(prefix="labelloop-int8-") as tmp:
        staged = Path(tmp) / "int8.onnx"
        try:
            fp32_nodes = _quantize(src, staged, tensors, Path(tmp))
            check_onnx(staged)
            score = agreement(src, staged, check, options)
        except QuantizationError:
            raise
        except Exception as exc:  # noqa: BLE001 - quantizer and onnxruntime raise anything; all mean "no INT8"
            raise QuantizationError(f"onnxruntime could not quantize {src.name}: {exc}") from exc
        if score.reference_detections < MIN_DETECTIONS:
            raise QuantizationError(
                f"FP32 finds {score.reference_detections} detections on the {score.images} check images: too few "
                f"to compare INT8 with (at least {MIN_DETECTIONS}): give more images with objects in them, or a model "
                "that finds them"
            )
        if score.f1 < options.min_agreement:
            raise QuantizationError(
                f"the INT8 model agrees with FP32 on {score.f1:.3f} of detections (F1 at IoU {MATCH_IOU}, "
                f"{score.images} images); the minimum is {options.min_agreement}"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staged, out)
    logger.info("INT8 %s: agreement %.4f with FP32 on %d images", out, score.f1, score.images)
    return QuantizeResult(
        out,
        round(score.f1, 4),
        options.min_agreement,
        len(tensors),
        score.images,
        score.reference_detections,
        fp32_nodes,
    )


def _quantize(src: Path, out: Path, tensors: Sequence[npt.NDArray[np.float32]], scratch: Path) -> int:
    """Static QDQ quantization of ``src`` with the Detect head's tail kept FP32; returns its node count."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        """One image per ``collect_data`` call (``set_range``), so the calibrator holds one image's activations."""

        def __init__(self, name: str) -> None:
            self._name = name
            self._feeds: Iterator[npt.NDArray[np.float32]] = iter(())

        def __len__(self) -> int:
            return len(tensors)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds = iter(tensors[start_index:end_index])

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            x = next(self._feeds, None)
            return None if x is None else {self._name: x}

    source = onnx.load(str(src))
    producer = next((n.name for n in source.graph.node if source.graph.output[0].name in n.output), "")
    prepared, quantized = scratch / "prepared.onnx", scratch / "quantized.onnx"
    # Shape inference and onnxruntime's own fusions first, as onnxruntime recommends.
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    keep_fp32 = _head_tail(onnx.load(str(prepared)).graph.node, producer)
    if not keep_fp32:
        raise QuantizationError(
            f"cannot find ultralytics' Detect head in {src.name} (no /model.N/ node feeds {producer or 'the output'})"
        )
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # the percentile calibrator print()s its settings
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(source.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: onnxruntime's advice for CPUs without VNNI (AVX2), where UINT8 x INT8 products
            # can saturate; the model may be served there although the gate ran elsewhere. No cost measured
            # on a VNNI CPU.
            reduce_range=True,
            nodes_to_exclude=keep_fp32,
            # Percentile ranges ignore the rare extreme activation that stretches a min/max range and
            # coarsens every other value: scores drop less, so fewer detections near ``conf`` flip
            # (docs/performance.md#int8). Striding by one image folds each image into the histograms
            # and lets it go: memory stays flat however many images calibrate, and rectangle
            # letterboxes of different shapes can share the histograms.
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibStridedMinMax": 1},
        )
    logger.debug("onnxruntime calibrator: %s", printed.getvalue().strip())
    model = onnx.load(str(quantized))
    # The Triton model reads names/imgsz from the metadata; the quantizer does not keep it.
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(quantized))
    save_for_triton(quantized, out)
    return len(keep_fp32)


def agreement(reference: Path, candidate: Path, images: Sequence[Path], options: QuantizeOptions) -> Agreement:
    """F1 of ``candidate``'s detections against ``reference``'s (same class, IoU >= 0.5) over ``images``."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (reference, candidate)]
    name = sessions[0].get_inputs()[0].name
    matched = total = read = reference_count = 0
    for x, box in _inputs(images, sessions[0], options):
        ref, cand = (postprocess(s.run(None, {name: x})[0][0], box, options.conf, options.iou) for s in sessions)
        matched += matched_detections(ref, cand)
        total += len(ref) + len(cand)
        reference_count += len(ref)
        read += 1
    if read == 0:
        raise QuantizationError("none of the check images could be read")
    return Agreement(1.0 if total == 0 else 2.0 * matched / total, read, reference_count)


def matched_detections(ref: npt.NDArray[np.float32], cand: npt.NDArray[np.float32]) -> int:
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
