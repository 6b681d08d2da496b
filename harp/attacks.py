"""White-box attacks in pixel space: FGSM and PGD (L-inf, L2), with restarts.

Attacks run the model in eval mode (BatchNorm uses running statistics, dropout off)
and restore its previous mode afterwards, so crafting never updates BN statistics.
Every adversarial example stays inside the eps-ball around x and inside [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HarpError
from .values import FLOAT32_MAX

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackConfig:
    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise HarpError(f"unknown norm {self.norm!r} (choose from {', '.join(NORMS)})")
        if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in (self.eps, self.step_size)):
            raise HarpError(f"attack budget eps={self.eps:g}, step size {self.step_size:g} is beyond float32's "
                            f"range (images are float32): give a smaller --eps")
        if self.eps < 0 or self.step_size < 0 or self.steps < 0 or self.restarts < 1:
            raise HarpError(f"attack budget must be non-negative with restarts >= 1, got {self}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / flat).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))


def _ascent_step(grad: torch.Tensor, step: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return step * grad.sign()
    g = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))
    return step * grad / g


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    d = torch.randn_like(x)
    radius = torch.rand(x.shape[0], device=x.device).view(-1, *[1] * (x.dim() - 1))
    return _project(d, 1.0, "l2") * radius * eps


def perturb(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
            cfg: AttackConfig, start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected gradient ascent on loss_fn(model(x_adv)) inside the eps-ball; one restart."""
    if start is not None:
        delta = start
    elif cfg.random_start:
        delta = _random_start(x, cfg.eps, cfg.norm)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + _project(delta, cfg.eps, cfg.norm)).clamp(0, 1) - x).detach()
    for _ in range(cfg.steps):
        delta.requires_grad_(True)
        with torch.enable_grad():  # callers may sit inside torch.no_grad()
            loss = loss_fn(model(x + delta))
            (grad,) = torch.autograd.grad(loss, delta)
        delta = _project(delta.detach() + _ascent_step(grad, cfg.step_size, cfg.norm), cfg.eps, cfg.norm)
        delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """PGD on the cross-entropy; with restarts, each example keeps a run that fools the model."""
    ce = lambda logits: F.cross_entropy(logits, y)  # noqa: E731
    with eval_mode(model):
        best = perturb(model, x, ce, cfg)
        if cfg.restarts > 1:
            with torch.no_grad():
                fooled = model(best).argmax(1) != y
            for _ in range(cfg.restarts - 1):
                if bool(fooled.all()):
                    break
                cand = perturb(model, x, ce, cfg)
                with torch.no_grad():
                    cand_fooled = model(cand).argmax(1) != y
                take = cand_fooled & ~fooled
                best[take] = cand[take]
                fooled |= cand_fooled
    return best


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps from x (no random start)."""
    return pgd(model, x, y, AttackConfig(eps=eps, step_size=eps, steps=1, random_start=False))
