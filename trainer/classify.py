"""Image classification head on frozen DINOv3 patch tokens: train, predict, score, save, export.

The backbone is frozen and its fp16 patch-token grids ``(h, w, C)`` are cached (``trainer.features``),
so a head trains in seconds on the CPU. The head (``ARCH``):

    tokens -> per-channel standardisation (fixed, from the training tokens)
           -> per-token linear C -> 64, ReLU
           -> mean, std, max and min of each channel over the grid (padding masked out)
           -> LayerNorm -> linear -> K logits

Chosen by held-out accuracy on the random-init demo backbone at long side 448, with
``trainer.synthetic_classes``' four default classes and 60 training images (docs/classifier.md,
"Choosing the head"). Mean over five random 60-image training sets, each tested on the other 240:

    FIELD-NOTES §7 head (two 3x3 convs + BatchNorm, batched, average pool)  0.45-0.53 (60/40 splits)
    the same with mean/std/max/min pooling                                  0.70-0.78 (60/40 splits)
    linear on pooled mean/std/max/min of the raw tokens (FIELD-NOTES §10)   0.875
    this head without the LayerNorm                                         0.956
    this head                                                               0.968 (min 0.958)

On three 60/40 splits this head scores 0.925 / 0.875 / 1.0; it trains in about 75-80 epochs,
11-14 CPU seconds (2 cores). The 3x3 convs cost 3-10x more, and §7's BatchNorm would need running
statistics that differ between padded training batches and single images.

There is no BatchNorm, so nothing depends on batch composition: images in a step are zero-padded to
the largest grid of the batch, a 0/1 mask keeps the padding out of the pooled statistics, and the
only layer before pooling is per token, so padding cannot leak into valid cells. A padded batch
gives the same probabilities as one grid at a time, and the ONNX export is the graph as trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from core.errors import ConfigError
from trainer.head_checkpoint import Checkpoint
from trainer.head_fit import fit

__all__ = [
    "ARCH",
    "ClassifierHead",
    "HeadCheckpoint",
    "HeadParams",
    "TrainResult",
    "classification_metrics",
    "export_head_onnx",
    "predict_proba",
    "train_head",
]

ARCH = "token-mlp64-stats4"
_WIDTH = 64
_STATS = 4  # mean, std, max, min
_EPS = 1e-6
_PREDICT_BATCH = 32


@dataclass(frozen=True)
class HeadParams:
    """A session's training parameters (FIELD-NOTES §7's defaults: Adam 1e-3, patience 5, min delta 0.001)."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 1000
    patience: int = 5
    min_delta: float = 0.001
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.weight_decay >= 0 and self.min_delta >= 0):
            raise ConfigError(f"lr must be > 0, weight_decay and min_delta >= 0; got {self}")
        if min(self.max_epochs, self.patience, self.batch_size) < 1:
            raise ConfigError(f"max_epochs, patience and batch_size must be at least 1; got {self}")


def _pooled_stats(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, h, w, D) and a 0/1 mask (N, h, w, 1) -> (N, 4D): mean, std, max, min over the valid cells."""
    count = mask.sum(dim=(1, 2))
    mean = (x * mask).sum(dim=(1, 2)) / count
    var = (((x - mean[:, None, None, :]) ** 2) * mask).sum(dim=(1, 2)) / count
    padding = mask == 0
    high = x.masked_fill(padding, -math.inf).amax(dim=(1, 2))
    low = x.masked_fill(padding, math.inf).amin(dim=(1, 2))
    return torch.cat([mean, torch.sqrt(var + _EPS), high, low], dim=1)


class ClassifierHead(nn.Module):
    """Patch tokens (N, h, w, C) float32 -> class logits (N, K); see the module docstring for the design."""

    token_mean: torch.Tensor
    token_std: torch.Tensor

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.hidden, self.num_classes = hidden, num_classes
        # Buffers, not parameters: saved with the weights, so a warm start keeps the scale it learnt on.
        self.register_buffer("token_mean", torch.zeros(hidden))
        self.register_buffer("token_std", torch.ones(hidden))
        self.project = nn.Linear(hidden, _WIDTH)
        self.norm = nn.LayerNorm(_STATS * _WIDTH)
        self.classify = nn.Linear(_STATS * _WIDTH, num_classes)

    def fit_normalisation(self, grids: Sequence[torch.Tensor]) -> None:
        """Set the per-channel token mean and std from training grids (streamed: grids can be large)."""
        total = torch.zeros(self.hidden, dtype=torch.float64)
        squares = torch.zeros(self.hidden, dtype=torch.float64)
        count = 0
        for grid in grids:
            flat = grid.reshape(-1, self.hidden).double()
            total += flat.sum(0)
            squares += (flat * flat).sum(0)
            count += flat.shape[0]
        mean = total / count
        std = torch.sqrt(torch.clamp(squares / count - mean * mean, min=0.0)).clamp_min(_EPS)
        self.token_mean.copy_(mean.float())
        self.token_std.copy_(std.float())

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (N, h, w, 1) marks real cells of padded grids with 1; None means all cells are real."""
        if mask is None:
            mask = torch.ones_like(tokens[..., :1])
        # The standardisation folded into the projection: a 64x C product instead of two passes over the grid.
        weight = self.project.weight / self.token_std
        bias = self.project.bias - weight @ self.token_mean
        x = torch.relu(nn.functional.linear(tokens, weight, bias))
        logits: torch.Tensor = self.classify(self.norm(_pooled_stats(x, mask)))
        return logits


class HeadCheckpoint(Checkpoint[ClassifierHead]):
    """What rebuilds a trained classifier head (:class:`trainer.head_checkpoint.Checkpoint`)."""

    HEAD = ClassifierHead
    DESIGN = ARCH
    WHAT = "classifier"


@dataclass
class TrainResult:
    """`stopped_early` is True only for the patience rule; a stop by ``on_epoch`` leaves it False."""

    head: ClassifierHead
    epochs: int
    best_loss: float
    stopped_early: bool


def _as_grids(tokens: Sequence[npt.NDArray[Any]]) -> list[torch.Tensor]:
    """float32 tensors (h, w, C), checked to share one C."""
    grids = [torch.from_numpy(np.asarray(t, dtype=np.float32)) for t in tokens]
    if not grids:
        raise ValueError("no token grids")
    channels = grids[0].shape[-1]
    for i, g in enumerate(grids):
        if g.ndim != 3 or g.shape[0] * g.shape[1] == 0 or g.shape[2] != channels:
            raise ValueError(f"token grid {i} has shape {tuple(g.shape)}, expected (h, w, {channels}) with h, w >= 1")
    return grids


def _pad(grids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids padded with zeros to the largest h and w among them, and the (N, h, w, 1) mask of real cells."""
    h = max(g.shape[0] for g in grids)
    w = max(g.shape[1] for g in grids)
    batch = torch.zeros(len(grids), h, w, grids[0].shape[2])
    mask = torch.zeros(len(grids), h, w, 1)
    for i, g in enumerate(grids):
        batch[i, : g.shape[0], : g.shape[1]] = g
        mask[i, : g.shape[0], : g.shape[1]] = 1.0
    return batch, mask


def _fit(
    head: ClassifierHead,
    grids: Sequence[torch.Tensor],
    labels: torch.Tensor,
    params: HeadParams,
    on_epoch: Callable[[int, float, ClassifierHead], bool] | None,
) -> tuple[int, float, bool]:
    """Cross-entropy on padded batches of shuffled grids, in the shared loop (:func:`trainer.head_fit.fit`)."""

    def steps(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, int]]:
        permutation = rng.permutation(len(grids))
        for start in range(0, len(grids), params.batch_size):
            idx = permutation[start : start + params.batch_size]
            batch, mask = _pad([grids[i] for i in idx])
            yield nn.functional.cross_entropy(head(batch, mask), labels[idx]), len(idx)

    return fit(head, params, steps, len(grids), on_epoch)


def train_head(
    tokens: Sequence[npt.NDArray[Any]],
    labels: Sequence[int],
    classes: Sequence[str],
    params: HeadParams,
    warm: HeadCheckpoint | None = None,
    on_epoch: Callable[[int, float, ClassifierHead], bool] | None = None,
) -> TrainResult:
    """Train a head on token grids (h, w, C) with int labels in [0, len(classes)); deterministic for ``params.seed``.

    ``warm`` starts from a checkpoint's weights (and its token normalisation) instead of a fresh
    init; its classes must equal ``classes``. ``on_epoch(epoch, loss, head)`` runs after every epoch
    (1-based, mean training loss); returning False ends the run there, keeping the best weights.
    """
    names = tuple(classes)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"a classifier needs at least two distinct class names, got {list(names)}")
    grids = _as_grids(tokens)
    if len(labels) != len(grids):
        raise ValueError(f"{len(grids)} token grids but {len(labels)} labels")
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names)}), got {sorted(set(targets.tolist()))}")
    hidden = int(grids[0].shape[2])
    if warm is not None:
        warm.check_warm(names, hidden)
        head = warm.to_head()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            head = ClassifierHead(hidden, len(names))
        head.fit_normalisation(grids)
    epochs, best_loss, stopped_early = _fit(head, grids, targets, params, on_epoch)
    return TrainResult(head, epochs, best_loss, stopped_early)


def predict_proba(head: ClassifierHead, tokens: Sequence[npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """Softmax probabilities (N, K) float32; grids are batched padded and masked, which changes nothing."""
    grids = _as_grids(tokens)
    head.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(grids), _PREDICT_BATCH):
            batch, mask = _pad(grids[start : start + _PREDICT_BATCH])
            out.append(torch.softmax(head(batch, mask), dim=1))
    probs: npt.NDArray[np.float32] = torch.cat(out).numpy().astype(np.float32)
    return probs


def classification_metrics(truth: Sequence[int], predicted: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1 and the confusion matrix (rows truth, columns predicted).

    A class that occurs neither in ``truth`` nor in ``predicted`` has no defined F1: it is left out
    of ``per_class_f1`` and of the macro average, so macro-F1 averages over the classes that occur
    in the truth or in the predictions. A class that occurs only on one side scores 0.
    """
    k = len(classes)
    t = np.asarray(truth, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"truth and predicted must be equal-length non-empty lists, got {t.shape} and {p.shape}")
    if min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k:
        raise ValueError(f"class indices must lie in [0, {k})")
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    tp = np.diag(matrix)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # = 2 tp + fp + fn
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=present)
    return {
        "accuracy": float(tp.sum() / t.size),
        "macro_f1": float(f1[present].mean()),
        "per_class_f1": {classes[i]: float(f1[i]) for i in range(k) if present[i]},
        "confusion_matrix": matrix.tolist(),
    }


class _Probabilities(nn.Module):
    """The exported graph: softmax inside, so the server returns probabilities."""

    def __init__(self, head: ClassifierHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(tokens), dim=1)


def export_head_onnx(head: ClassifierHead, path: Path) -> Path:
    """ONNX (opset 17, legacy exporter): "tokens" float32 (N, h, w, C), N/h/w dynamic -> "probs" (N, K)."""
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
            dynamic_axes={"tokens": {0: "batch", 1: "h", 2: "w"}, "probs": {0: "batch"}},
        )
    return path
