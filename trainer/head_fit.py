"""The training loop every head kind shares: Adam, early stopping on the training loss, best weights kept.

A kind supplies only its steps: for one epoch, the loss of each optimiser step and how many images
it covered (:mod:`trainer.classify`, :mod:`trainer.segment`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["fit"]

# One epoch's steps from the run's random generator: (loss of the step, images in it).
Steps = Callable[[np.random.Generator], Iterator[tuple[torch.Tensor, int]]]


def fit(
    head: nn.Module,
    params: Any,
    steps: Steps,
    images: int,
    on_epoch: Callable[[int, float, Any], bool] | None,
) -> tuple[int, float, bool]:
    """Adam until patience, ``max_epochs`` or ``on_epoch`` stops; leaves the best weights loaded.

    An epoch counts as better when its mean training loss (over ``images``) improves on the best by
    more than ``min_delta`` (as Keras' EarlyStopping); those weights are the ones kept.
    ``params`` is a ``trainer.classify.HeadParams``.
    """
    optimiser = torch.optim.Adam(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    rng = np.random.default_rng(params.seed)
    best_loss, best_state, waited = math.inf, copy.deepcopy(head.state_dict()), 0
    epoch, stopped_early = 0, False
    head.train()
    while epoch < params.max_epochs:
        epoch += 1
        total = 0.0
        for loss, count in steps(rng):
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += loss.item() * count
        epoch_loss = total / images
        if epoch_loss < best_loss - params.min_delta:
            best_loss, best_state, waited = epoch_loss, copy.deepcopy(head.state_dict()), 0
        else:
            waited += 1
        if on_epoch is not None:
            go_on = on_epoch(epoch, epoch_loss, head)
            head.train()  # the callback may have predicted with the head
            if not go_on:
                break
        if waited >= params.patience:
            stopped_early = True
            break
    head.load_state_dict(best_state)
    head.eval()
    return epoch, best_loss, stopped_early
