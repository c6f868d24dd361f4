"""Backbone features for training: a published backbone version run in-process, cached on disk.

The trainer needs the tokens of every labelled image at every run; computing them once per image,
backbone version and long side is what makes heads train in seconds. The ONNX, the decode and the
preprocessing are the served ones (``image_decode``, ``features_ops``), so a head trains on the
features Triton will give it; only fp16 rounding differs, as the cache stores fp16.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import ImageError, RepositoryError
from core.feature_cache import DiskFeatureCache, FeatureKey
from core.image_decode import ImageRejected, decode_image
from core.settings import Settings
from serving.repository import ModelCard, ModelRepository
from serving.triton.features_ops import network_input, resize_for_backbone

__all__ = ["LocalBackbone", "features_dir"]

logger = logging.getLogger(__name__)


def features_dir(settings: Settings) -> Path:
    """Where the trainer's feature cache lives: ``<state_dir>/features``."""
    return settings.state_dir / "features"


class LocalBackbone:
    """One backbone version's ONNX in onnxruntime, with an optional on-disk feature cache."""

    def __init__(
        self,
        repo: ModelRepository,
        name: str,
        version: int | None = None,
        cache: DiskFeatureCache | None = None,
        max_image_bytes: int = 50_000_000,
        max_image_pixels: int = 60_000_000,
    ) -> None:
        import onnxruntime as ort

        version = version if version is not None else repo.latest(name)
        if version is None:
            raise RepositoryError(f"no backbone {name!r} in {repo.root}")
        self.card: ModelCard = repo.card(name, version)
        card = self.card
        if card.kind != "backbone" or card.patch_size is None or not card.image_mean or not card.image_std:
            raise RepositoryError(f"{name} version {version} is a {card.kind}, not a backbone with a full card")
        self.patch, self.mean, self.std = card.patch_size, card.image_mean, card.image_std
        self.name, self.version, self.cache = name, version, cache
        self.max_bytes, self.max_pixels = max_image_bytes, max_image_pixels
        self._session = ort.InferenceSession(str(repo.onnx_path(name, version)), providers=["CPUExecutionProvider"])
        self.computed = 0

    @classmethod
    def from_settings(cls, settings: Settings, name: str, version: int | None = None) -> LocalBackbone:
        return cls(
            ModelRepository(settings.model_repository),
            name,
            version,
            DiskFeatureCache(features_dir(settings)),
            settings.max_image_bytes,
            settings.max_image_pixels,
        )

    def features(self, data: bytes, long_side: int) -> npt.NDArray[Any]:
        """fp16 patch tokens (h, w, C) of an encoded image: from the cache, else computed and cached."""
        key = FeatureKey.for_image(data, self.name, self.version, long_side)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        try:
            pixels = decode_image(data, self.max_bytes, self.max_pixels).pixels
        except ImageRejected as exc:
            raise ImageError(str(exc)) from exc
        resized = resize_for_backbone(pixels, long_side, self.patch)
        batch = network_input([resized], self.mean, self.std)
        tokens: npt.NDArray[Any] = self._session.run(None, {"pixels": batch})[0][0].astype(np.float16)
        self.computed += 1
        if self.cache is not None:
            self.cache.put(key, tokens)
        return tokens
