"""Per-layer densities: initial strategies and the exact-budget projection."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import torch
from torch import nn

from ..errors import HarpError
from ..models import prunable_layers
from .masks import keep_count

RATE_INITS = ("uniform", "erk")


def initial_densities(model: nn.Module, density: float, strategy: str) -> dict[str, float]:
    """Starting density of every prunable layer with the model's total at `density`."""
    layers = prunable_layers(model)
    if strategy == "uniform":
        return {name: density for name, _ in layers}
    if strategy == "erk":
        return _erk(layers, density)
    raise HarpError(f"unknown rate initialisation {strategy!r} (choose from {', '.join(RATE_INITS)})")


def _erk(layers: list[tuple[str, nn.Module]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel: density proportional to (sum of dims) / (product of dims), capped at 1."""
    numel = {name: m.weight.numel() for name, m in layers}
    raw = {name: sum(m.weight.shape) / m.weight.numel() for name, m in layers}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:  # layers that would exceed 1 are made dense and the rest rescaled
        budget = density * total - sum(numel[n] for n in dense)
        free = sum(raw[n] * numel[n] for n in raw if n not in dense)
        scale = budget / free
        over = {n for n in raw if n not in dense and raw[n] * scale > 1.0}
        if not over:
            return {n: 1.0 if n in dense else raw[n] * scale for n in raw}
        dense |= over


def project_to_budget(fractions: dict[str, float], numel: dict[str, int], budget: int,
                      a_min: float, fixed: AbstractSet[str] = frozenset()) -> dict[str, int]:
    """Integer keep counts with the same allocation shape and a total of `budget` (or as close as possible).

    Shifts every layer's rate logit by one common offset (binary search), which keeps
    the learned ordering of layers while hitting the exact global target.
    """
    logits = {n: torch.logit(torch.tensor((f - a_min) / (1 - a_min)).clamp(1e-6, 1 - 1e-6)).item()
              for n, f in fractions.items()}

    def counts(shift: float) -> dict[str, int]:
        out = {}
        for n, lg in logits.items():
            frac = 1.0 if n in fixed else a_min + (1 - a_min) / (1 + torch.exp(torch.tensor(-(lg + shift))).item())
            out[n] = keep_count(numel[n], frac)
        return out

    lo, hi = -60.0, 60.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(counts(mid).values()) > budget:
            hi = mid
        else:
            lo = mid
    return counts(lo)
