"""BatchNorm recalibration after a mask change.

Running statistics describe the network they were collected on; once a pruning
step changes which weights are alive, they no longer match (a one-shot pruned
model with stale statistics can fall to chance accuracy). Recomputing them on
clean training batches, weights untouched, restores the model's function.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import ImageData


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: ImageData, device: torch.device, *,
                          batch_size: int = 256, max_examples: int = 10_000) -> nn.Module:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    was_training = model.training
    model.train()
    try:
        for x, _ in data.subset(max_examples).batches(batch_size, drop_single=True):  # BatchNorm needs >= 2
            model(x.to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model
