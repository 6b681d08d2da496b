"""Weight masks: computing them from scores, baking them into a model, measuring them.

A mask set is a dict from prunable-layer name (module path, e.g. "net.features.0")
to a bool tensor of that layer's weight shape; True keeps the weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import HarpError
from ..models import prunable_layers

Masks = dict[str, torch.Tensor]


def keep_count(numel: int, density: float) -> int:
    """Weights a layer keeps at this density: ceil, and never below 1."""
    return max(1, min(numel, math.ceil(density * numel - 1e-9)))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k True entries at the largest |scores| (ties broken by position)."""
    flat = scores.detach().abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def global_magnitude_masks(model: nn.Module, sparsity: float) -> Masks:
    """Keep the globally largest |w| over all prunable layers (each layer keeps at least one)."""
    check_sparsity(sparsity)
    layers = prunable_layers(model)
    weights = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
    k = keep_count(weights.numel(), 1.0 - sparsity)
    order = torch.topk(weights, k, sorted=False).indices
    keep = torch.zeros_like(weights, dtype=torch.bool)
    keep[order] = True
    masks, start = {}, 0
    for name, m in layers:
        n = m.weight.numel()
        mask = keep[start:start + n].view_as(m.weight)
        if not mask.any():  # a layer with no weight left would cut the network
            mask = topk_mask(m.weight, 1)
        masks[name] = mask
        start += n
    return masks


def layerwise_magnitude_masks(model: nn.Module, densities: dict[str, float]) -> Masks:
    """Keep the largest |w| of each layer at its own density."""
    return {name: topk_mask(m.weight, keep_count(m.weight.numel(), densities[name]))
            for name, m in prunable_layers(model)}


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero the pruned weights in place (the exporter and `harp info` read zeros)."""
    layers = dict(prunable_layers(model))
    unknown = set(masks) - set(layers)
    if unknown:
        raise HarpError(f"masks name layers the model lacks: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.mul_(mask.to(layers[name].weight.dtype))
    return model


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise HarpError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity
