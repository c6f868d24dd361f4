"""Point-supervised segmentation head on frozen DINOv3 patch tokens: train, predict, score, save, export.

The backbone is frozen and its fp16 patch-token grids ``(h, w, C)`` are cached (``trainer.features``).
People label points, not masks: each point marks its grid cell as foreground of one class or as
background. The head (``ARCH``, FIELD-NOTES §7) predicts one sigmoid channel per class:

    tokens -> per-channel standardisation (fixed, from the training tokens)
           -> conv3x3 C -> 128, BatchNorm, ReLU -> conv3x3 128 -> 64, BatchNorm, ReLU -> conv1x1 64 -> K

Loss: binary cross-entropy on the labelled cells, channel k's target 1 at k's points and 0 at
background or other classes' points, with inverse-frequency weights (foreground vs background, per
channel, counted over the training set), plus a weak pull of every cell towards background
(``_UNLABELLED_WEIGHT`` x the mean BCE against 0 over all real cells). The pull is not in §7: with
balanced points the head learns even odds, so every cell that resembles a defect at all comes out
above 0.5, while defects cover a few per cent of a surface; on the demo data §7's loss alone gave
precision 0.30-0.42 at recall 0.95-1.0 (table below). Several images go into each optimiser step (FIELD-NOTES
§10: BatchNorm with one image per step gives chance-level masks in eval mode); grids are sorted by
size so a batch is mostly one size, and mixed batches are zero-padded, with a mask that zeroes the
padding after every layer (so a padded grid gives exactly the one-grid result in eval mode) and keeps
it out of the loss.

Measured (``trainer.synthetic_blobs``, one class, 448 x 336 images, the random-init demo backbone at
long side 448, so 28 x 21 grids of 192-d tokens): 24 training images with 20 foreground and 20
background points each, mIoU on 20 other images, probabilities upsampled to the image with
``core.masks.upsample`` and thresholded at 0.5:

    split (seed)                              0      1      2      3      mean
    §7 loss alone (labelled cells only)       0.403  0.421  0.293  0.337  0.364  (precision 0.30-0.42,
                                                                                   recall 0.95-1.0)
    §7 loss + weak background pull (ARCH)     0.684  0.693  0.584  0.499  0.615  (precision 0.75-0.84,
                                                                                   recall 0.60-0.81)

Each split draws its 24 training and 20 test images from 44 and its points with ``sample_points``;
``HeadParams(batch_size=8)``, otherwise the defaults (Adam 1e-3, wd 1e-4, patience 5, min delta
0.001). Training took 60-85 epochs, 32-40 s on one torch thread (2 shared vCPUs). Points on the
training images are fitted to 0.995-1.0 balanced accuracy either way. The ceiling at this grid
(each cell's true foreground share, upsampled) is 0.92. Tried and not kept (splits 0-2, an
experimental build of this code): a 0.03 pull (0.626, 0.606, 0.410); subtracting each grid's
mean token before the standardisation, with §7's loss (0.31, 0.34, 0.28), with a 0.03 pull (0.55,
0.51, 0.48), plus a 0.3 dropout on the tokens (0.53, 0.54); half the background points in a 2-cell
ring around the blobs, with centring and §7's loss (0.34, 0.38). A per-cell linear probe on the
same points, §7's weighting: 0.38-0.58.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from core.errors import ConfigError
from core.masks import balanced_point_accuracy, miou, point_cell, upsample
from trainer.classify import ClassifierHead, HeadParams, _as_grids, _pad
from trainer.head_checkpoint import Checkpoint
from trainer.head_fit import fit

__all__ = [
    "ARCH",
    "CellPoints",
    "HeadParams",
    "SegmenterCheckpoint",
    "SegmenterHead",
    "TrainResult",
    "cell_points",
    "export_head_onnx",
    "mask_metrics",
    "point_metrics",
    "predict_proba",
    "train_head",
]

ARCH = "conv3-128-bn-conv3-64-bn-conv1"
_WIDTHS = (128, 64)
_PREDICT_BATCH = 16
# Weight of the pull of every cell towards background, relative to the labelled cells' loss.
_UNLABELLED_WEIGHT = 0.1


@dataclass(frozen=True)
class CellPoints:
    """One image's labelled grid cells: parallel int arrays; ``classes`` holds a class index or -1 (background).

    Several points may share a cell; each counts in the loss.
    """

    rows: npt.NDArray[np.int64]
    cols: npt.NDArray[np.int64]
    classes: npt.NDArray[np.int64]

    @classmethod
    def of(cls, rows: npt.ArrayLike, cols: npt.ArrayLike, classes: npt.ArrayLike) -> CellPoints:
        """From any int sequences or arrays of equal length."""
        r, c, k = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (rows, cols, classes))
        if not (r.shape == c.shape == k.shape):
            raise ValueError(f"rows, cols and classes differ in length: {r.size}, {c.size}, {k.size}")
        return cls(r, c, k)

    def __len__(self) -> int:
        return int(self.rows.size)


def cell_points(
    points: Sequence[tuple[float, float, int]], width: int, height: int, grid_h: int, grid_w: int
) -> CellPoints:
    """Pixel points (x, y, class_index or -1) of a ``width x height`` image -> the grid cells under them."""
    cells = [point_cell(x, y, width, height, grid_h, grid_w) for x, y, _ in points]
    return CellPoints.of([r for r, _ in cells], [c for _, c in cells], [k for _, _, k in points])


class SegmenterHead(nn.Module):
    """Patch tokens (B, h, w, C) float32 -> per-class logits (B, K, h, w); see the module docstring."""

    token_mean: torch.Tensor
    token_std: torch.Tensor

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.hidden, self.num_classes = hidden, num_classes
        # Buffers, not parameters: saved with the weights, so a warm start keeps the scale it learnt on.
        self.register_buffer("token_mean", torch.zeros(hidden))
        self.register_buffer("token_std", torch.ones(hidden))
        self.conv1 = nn.Conv2d(hidden, _WIDTHS[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0])
        self.conv2 = nn.Conv2d(_WIDTHS[0], _WIDTHS[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(_WIDTHS[1])
        self.out = nn.Conv2d(_WIDTHS[1], num_classes, 1)

    def fit_normalisation(self, grids: Sequence[torch.Tensor]) -> None:
        """Set the per-channel token mean and std from training grids, with the classifier's statistics."""
        # ClassifierHead owns the streamed mean/std; a throwaway one computes them (its init is not kept).
        with torch.random.fork_rng(devices=[]):
            probe = ClassifierHead(self.hidden, 2)
        probe.fit_normalisation(grids)
        self.token_mean.copy_(probe.token_mean)
        self.token_std.copy_(probe.token_std)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, h, w, 1) marks real cells of padded grids with 1; None means all cells are real."""
        x = ((tokens - self.token_mean) / self.token_std).permute(0, 3, 1, 2)
        keep = None if mask is None else mask.permute(0, 3, 1, 2)
        for conv, norm in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            if keep is not None:
                x = x * keep  # padding reads as the zeros a lone grid's conv padding would give
            x = torch.relu(norm(conv(x)))
        if keep is not None:
            x = x * keep
        logits: torch.Tensor = self.out(x)
        return logits


class SegmenterCheckpoint(Checkpoint[SegmenterHead]):
    """What rebuilds a trained segmenter head (:class:`trainer.head_checkpoint.Checkpoint`)."""

    HEAD = SegmenterHead
    DESIGN = ARCH
    WHAT = "segmenter"


@dataclass
class TrainResult:
    """`stopped_early` is True only for the patience rule; a stop by ``on_epoch`` leaves it False."""

    head: SegmenterHead
    epochs: int
    best_loss: float
    stopped_early: bool


@dataclass(frozen=True)
class _Targets:
    """One image's labelled cells as flat indices into its grid, 0/1 targets (n, K) and loss weights (n, K)."""

    cells: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def _targets(points: Sequence[CellPoints], shapes: Sequence[tuple[int, int]], k: int) -> list[_Targets]:
    """Per-image targets, weighted so each channel's foreground and background carry equal total weight."""
    encoded = []
    positives = np.zeros(k)
    negatives = np.zeros(k)
    for i, (p, (h, w)) in enumerate(zip(points, shapes, strict=True)):
        if len(p) and (p.rows.min() < 0 or p.rows.max() >= h or p.cols.min() < 0 or p.cols.max() >= w):
            raise ValueError(f"image {i}: a point lies outside its {h}x{w} grid")
        if len(p) and (p.classes.min() < -1 or p.classes.max() >= k):
            raise ValueError(f"image {i}: point classes must lie in [-1, {k})")
        target = (p.classes[:, None] == np.arange(k)[None, :]).astype(np.float32)
        positives += target.sum(0)
        negatives += (1 - target).sum(0)
        encoded.append((p.rows * w + p.cols, target))
    if positives.sum() + negatives.sum() == 0:
        raise ValueError("no labelled points")
    total = positives + negatives
    # Inverse frequency: total / (2 * count), so a balanced channel has weight 1 on both sides.
    pos_w = np.divide(total, 2 * positives, out=np.zeros(k), where=positives > 0)
    neg_w = np.divide(total, 2 * negatives, out=np.zeros(k), where=negatives > 0)
    out = []
    for cells, target in encoded:
        weight = target * pos_w[None, :] + (1 - target) * neg_w[None, :]
        out.append(_Targets(torch.from_numpy(cells), torch.from_numpy(target), torch.from_numpy(weight).float()))
    return out


def _batches(grids: Sequence[torch.Tensor], size: int, rng: np.random.Generator) -> list[npt.NDArray[np.int64]]:
    """Image indices per step: shuffled, then grouped by grid size (stable), cut into steps, steps shuffled."""
    order = rng.permutation(len(grids))
    order = np.asarray(sorted(order.tolist(), key=lambda i: tuple(grids[i].shape[:2])), dtype=np.int64)
    steps = [order[s : s + size] for s in range(0, len(order), size)]
    if len(steps) > 1 and len(steps[-1]) == 1:  # no lone image in a step: BatchNorm needs a batch
        steps[-2:] = [np.concatenate(steps[-2:])]
    return [steps[i] for i in rng.permutation(len(steps))]


def _batch_loss(head: SegmenterHead, grids: Sequence[torch.Tensor], targets: Sequence[_Targets]) -> torch.Tensor:
    """Weighted BCE over the labelled cells of a batch (weighted mean, so batch size does not scale it)."""
    batch, mask = _pad(grids)
    logits = head(batch, mask if len({tuple(g.shape[:2]) for g in grids}) > 1 else None)
    width = batch.shape[2]
    picked, wanted, weights = [], [], []
    for i, (g, t) in enumerate(zip(grids, targets, strict=True)):
        # Flat index in the padded grid: the image's own (row, col) with the padded row length.
        rows, cols = t.cells // g.shape[1], t.cells % g.shape[1]
        picked.append(logits[i].flatten(1)[:, rows * width + cols].T)
        wanted.append(t.target)
        weights.append(t.weight)
    w = torch.cat(weights)
    bce = nn.functional.binary_cross_entropy_with_logits(torch.cat(picked), torch.cat(wanted), reduction="none")
    labelled = (bce * w).sum() / w.sum().clamp_min(1e-12)
    # Every real cell, labelled or not, is weakly pulled towards background (see the module docstring).
    everywhere = nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    real = mask.permute(0, 3, 1, 2)
    prior = (everywhere * real).sum() / (real.sum() * logits.shape[1])
    total: torch.Tensor = labelled + _UNLABELLED_WEIGHT * prior
    return total


def _fit(
    head: SegmenterHead,
    grids: Sequence[torch.Tensor],
    targets: Sequence[_Targets],
    params: HeadParams,
    on_epoch: Callable[[int, float, SegmenterHead], bool] | None,
) -> tuple[int, float, bool]:
    """The labelled images' losses, batched by grid size, in the shared loop (:func:`trainer.head_fit.fit`)."""
    labelled = [i for i, t in enumerate(targets) if t.cells.numel()]

    def steps(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, int]]:
        for step in _batches([grids[i] for i in labelled], params.batch_size, rng):
            idx = [labelled[j] for j in step.tolist()]
            yield _batch_loss(head, [grids[i] for i in idx], [targets[i] for i in idx]), len(idx)

    return fit(head, params, steps, len(labelled), on_epoch)


def train_head(
    tokens: Sequence[npt.NDArray[Any]],
    points: Sequence[CellPoints],
    classes: Sequence[str],
    params: HeadParams,
    warm: SegmenterCheckpoint | None = None,
    on_epoch: Callable[[int, float, SegmenterHead], bool] | None = None,
) -> TrainResult:
    """Train a head on token grids (h, w, C) and their labelled cells; deterministic for ``params.seed``.

    Images without points are skipped (their tokens still set the normalisation). ``warm`` starts
    from a checkpoint's weights and normalisation; its classes and token width must match.
    ``on_epoch(epoch, loss, head)`` runs after every epoch (1-based, mean training loss); returning
    False ends the run there, keeping the best weights.
    """
    names = tuple(classes)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"a segmenter needs at least one class and distinct names, got {list(names)}")
    grids = _as_grids(tokens)
    if len(points) != len(grids):
        raise ValueError(f"{len(grids)} token grids but {len(points)} point sets")
    targets = _targets(points, [(int(g.shape[0]), int(g.shape[1])) for g in grids], len(names))
    hidden = int(grids[0].shape[2])
    if warm is not None:
        warm.check_warm(names, hidden)
        head = warm.to_head()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            head = SegmenterHead(hidden, len(names))
        head.fit_normalisation(grids)
    epochs, best_loss, stopped_early = _fit(head, grids, targets, params, on_epoch)
    return TrainResult(head, epochs, best_loss, stopped_early)


def predict_proba(head: SegmenterHead, tokens: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[np.float32]]:
    """Sigmoid probabilities (K, h, w) float32 per grid, in input order; same-size grids share a batch."""
    grids = _as_grids(tokens)
    head.eval()
    out: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(grids)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grids):
        by_shape.setdefault(tuple(g.shape), []).append(i)
    with torch.inference_mode():
        for idx in by_shape.values():
            for start in range(0, len(idx), _PREDICT_BATCH):
                chunk = idx[start : start + _PREDICT_BATCH]
                probs = torch.sigmoid(head(torch.stack([grids[i] for i in chunk]))).numpy().astype(np.float32)
                for i, p in zip(chunk, probs, strict=True):
                    out[i] = p
    return out


def point_metrics(probs: Sequence[npt.NDArray[Any]], points: Sequence[CellPoints], threshold: float = 0.5) -> float:
    """Balanced point accuracy over all channels: each point's own channel, or every channel for background.

    A foreground point of class k counts as a positive of channel k and a negative of the others.
    """
    at, positive = [], []
    for p, pts in zip(probs, points, strict=True):
        k = p.shape[0]
        values = np.asarray(p)[:, pts.rows, pts.cols]  # (K, n)
        at.append(values.reshape(-1))
        positive.append((pts.classes[None, :] == np.arange(k)[:, None]).reshape(-1))
    return balanced_point_accuracy(np.concatenate(at), np.concatenate(positive), threshold)


def mask_metrics(
    probs: Sequence[npt.NDArray[Any]], truth: Sequence[npt.NDArray[Any]], threshold: float = 0.5
) -> dict[str, Any]:
    """``core.masks.miou`` of grid probabilities upsampled to each label map's size and thresholded."""
    if len(probs) != len(truth):
        raise ValueError(f"{len(probs)} predictions but {len(truth)} label maps")
    if not probs:
        raise ValueError("nothing to score")
    masks = [upsample(p, t.shape[1], t.shape[0]) >= threshold for p, t in zip(probs, truth, strict=True)]
    return miou(masks, truth, int(np.asarray(probs[0]).shape[0]))


class _Probabilities(nn.Module):
    """The exported graph: sigmoid inside, so the server returns probabilities."""

    def __init__(self, head: SegmenterHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(tokens))


def export_head_onnx(head: SegmenterHead, path: Path) -> Path:
    """ONNX (opset 17, legacy exporter): "tokens" float32 (1, h, w, C), h/w dynamic -> "probs" (1, K, h, w)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head.eval()
    dummy = torch.zeros(1, 3, 4, head.hidden)
    with torch.no_grad():
        torch.onnx.export(
            _Probabilities(head),
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["tokens"],
            output_names=["probs"],
            dynamic_axes={"tokens": {1: "h", 2: "w"}, "probs": {2: "h", 3: "w"}},
        )
    return path
