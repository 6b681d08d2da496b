"""Robustness curves: white-box accuracy as the attack budget grows, for three threat models.

- linf: PGD L-inf (`harp.attacks.pgd`) at eps = LINF_SCALES x the dataset's eps;
- l2:   PGD L2 at eps = L2_SCALES x the dataset's L2 eps;
- l0:   the greedy pixel attack (`sparse_attack`) at L0_BUDGETS pixels (capped at H*W).

PGD runs `steps` steps of 2.5 * eps / steps with a random start, torch seed
`seed` before every budget. Budget 0 is the clean accuracy. Each curve is
{"budgets": [...], "accuracy": [...]} plus its settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from harp.attacks import AttackConfig, pgd

from .sparse_attack import accuracy_by_budget, greedy_pixel_attack

LINF_SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
L2_SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
L0_BUDGETS = (0, 1, 2, 4, 8, 16)
BATCH = 256


def batched(attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            batch: int = BATCH) -> torch.Tensor:
    """attack(x, y) applied BATCH examples at a time."""
    return torch.cat([attack(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.cat([model(x[i:i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)]).eq(y)
                 .double().mean())  # float64, as numpy's mean of the backends' hits


def pgd_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budgets: list[float], norm: str, steps: int,
              seed: int = 0) -> dict[str, Any]:
    accuracy = []
    for eps in budgets:
        if eps == 0:
            accuracy.append(torch_accuracy(model, x, y))
            continue
        cfg = AttackConfig(eps=eps, step_size=2.5 * eps / steps, steps=steps, norm=norm)
        torch.manual_seed(seed)
        accuracy.append(torch_accuracy(model, batched(lambda a, b: pgd(model, a, b, cfg), x, y), y))
    return {"budgets": list(budgets), "accuracy": accuracy, "attack": f"PGD-{norm}", "steps": steps}


def l0_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budgets: list[int]) -> dict[str, Any]:
    max_pixels = max(budgets)
    fooled = torch.cat([greedy_pixel_attack(model, x[i:i + BATCH], y[i:i + BATCH], max_pixels)[1]
                        for i in range(0, len(x), BATCH)])
    return {"budgets": list(budgets), "accuracy": accuracy_by_budget(fooled, budgets),
            "attack": "greedy pixel (L0)", "steps": max_pixels}


def robustness_curves(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, l2_eps: float,
                      steps: int, seed: int = 0, kinds: tuple[str, ...] = ("linf", "l2", "l0")) -> dict[str, Any]:
    """{kind: curve} for the kinds asked; see the module doc for the budgets."""
    curves: dict[str, Any] = {}
    if "linf" in kinds:
        curves["linf"] = pgd_curve(model, x, y, [s * eps for s in LINF_SCALES], "linf", steps, seed)
    if "l2" in kinds:
        curves["l2"] = pgd_curve(model, x, y, [s * l2_eps for s in L2_SCALES], "l2", steps, seed)
    if "l0" in kinds:
        pixels = x.shape[2] * x.shape[3]
        curves["l0"] = l0_curve(model, x, y, sorted({min(k, pixels) for k in L0_BUDGETS}))
    return curves
