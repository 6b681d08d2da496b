"""Sparsity of a model's prunable weights (every Conv2d and Linear weight)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import prunable_layers


def layer_densities(model: nn.Module) -> list[dict[str, Any]]:
    out = []
    for name, layer in prunable_layers(model):
        w = layer.weight.detach()
        out.append({"name": name, "shape": list(w.shape), "params": w.numel(),
                    "nonzero": int(torch.count_nonzero(w)), "density": float(torch.count_nonzero(w)) / w.numel()})
    return out


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all prunable layers."""
    layers = layer_densities(model)
    total = sum(layer["params"] for layer in layers)
    return 1.0 - sum(layer["nonzero"] for layer in layers) / max(total, 1)
