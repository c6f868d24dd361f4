"""A trained head as a file: weights, class names in output order, token width and head design.

Shared by every head kind (:mod:`trainer.classify`, :mod:`trainer.segment`): a kind's checkpoint
names its head class and design, and everything else (save, load, warm-start checks) is here.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from core.errors import ConfigError, TrainingError

__all__ = ["Checkpoint"]

H = TypeVar("H", bound=nn.Module)
C = TypeVar("C", bound="Checkpoint[Any]")


@dataclass
class Checkpoint(Generic[H]):
    """A head's checkpoint; a kind's subclass sets ``HEAD`` (built as ``HEAD(hidden, number of classes)``),
    ``DESIGN`` (the head's design name) and ``WHAT`` (its kind, for messages)."""

    HEAD: ClassVar[Any]
    DESIGN: ClassVar[str]
    WHAT: ClassVar[str]

    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    hidden: int
    arch: str = ""

    def __post_init__(self) -> None:
        self.arch = self.arch or self.DESIGN

    @classmethod
    def from_head(cls: type[C], head: H, classes: Sequence[str]) -> C:
        shape: Any = head  # a head module has ``hidden`` and ``num_classes``
        if len(classes) != shape.num_classes:
            raise ValueError(f"{len(classes)} class names for a head with {shape.num_classes} outputs")
        state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        return cls(state, tuple(classes), int(shape.hidden))

    def to_head(self) -> H:
        """The head in eval mode."""
        if self.arch != self.DESIGN:
            raise ConfigError(f"checkpoint head design {self.arch!r} is not this version's {self.DESIGN!r}")
        head: H = self.HEAD(self.hidden, len(self.classes))
        head.load_state_dict(self.state_dict)
        return head.eval()

    def check_warm(self, classes: tuple[str, ...], hidden: int) -> None:
        """A warm start must predict the same classes in the same order from tokens of the same width."""
        if self.classes != classes:
            raise ConfigError(
                f"cannot warm-start: the checkpoint's classes {list(self.classes)} differ from this session's "
                f"classes {list(classes)}; train from scratch (no warm start) after changing classes"
            )
        if self.hidden != hidden:
            raise ConfigError(
                f"cannot warm-start: the checkpoint was trained on {self.hidden}-d tokens, these are {hidden}-d "
                "(another backbone); train from scratch"
            )

    def save(self, path: Path) -> Path:
        """A plain dict (tensors, strings, ints), so ``load`` can use ``weights_only=True``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"state_dict": self.state_dict, "classes": list(self.classes), "hidden": self.hidden, "arch": self.arch}
        torch.save(data, path)
        return path

    @classmethod
    def load(cls: type[C], path: Path) -> C:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(dict(data["state_dict"]), tuple(data["classes"]), int(data["hidden"]), str(data["arch"]))
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
            raise TrainingError(f"{path}: not a readable {cls.WHAT} head checkpoint ({exc})") from exc
