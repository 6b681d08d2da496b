"""Training objectives: natural, PGD-AT (Madry), TRADES (Zhang et al.), MART (Wang et al.).

Each takes the model (used to craft adversarial examples, with BatchNorm in eval
mode), a `forward` callable for the training pass, a clean batch and the config.
`forward(*batches)` returns one logits tensor per batch in a single call, so under
DistributedDataParallel every step is exactly one forward and one backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackConfig, eval_mode, perturb, pgd
from ..errors import HarpError


@dataclass(frozen=True)
class LossConfig:
    kind: str  # one of LOSSES
    attack: AttackConfig
    beta: float | None = None  # TRADES / MART trade-off; None picks the method's default


Forward = Callable[..., list[torch.Tensor]]
LossFn = Callable[[nn.Module, Forward, torch.Tensor, torch.Tensor, LossConfig], torch.Tensor]
DEFAULT_BETA = {"trades": 6.0, "mart": 5.0}


def natural_loss(model, forward, x, y, cfg):
    (logits,) = forward(x)
    return F.cross_entropy(logits, y)


def pgd_at_loss(model, forward, x, y, cfg):
    x_adv = pgd(model, x, y, cfg.attack)
    (logits_adv,) = forward(x_adv)
    return F.cross_entropy(logits_adv, y)


def trades_loss(model, forward, x, y, cfg):
    beta = DEFAULT_BETA["trades"] if cfg.beta is None else cfg.beta
    with eval_mode(model), torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    kl = lambda logits: F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="batchmean")  # noqa: E731
    with eval_mode(model):
        # TRADES starts from a tiny Gaussian perturbation, not a uniform one
        x_adv = perturb(model, x, kl, cfg.attack, start=0.001 * torch.randn_like(x))
    logits, logits_adv = forward(x, x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * robust


def mart_loss(model, forward, x, y, cfg):
    beta = DEFAULT_BETA["mart"] if cfg.beta is None else cfg.beta
    x_adv = pgd(model, x, y, cfg.attack)
    logits, logits_adv = forward(x, x_adv)
    p_adv = F.softmax(logits_adv, 1)
    # boosted CE: push the true class up and the strongest wrong class down
    wrong = p_adv.clone()
    wrong.scatter_(1, y[:, None], -1.0)
    top_wrong = wrong.argmax(1)
    bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - p_adv.gather(1, top_wrong[:, None]).squeeze(1)).mean()
    p_clean = F.softmax(logits, 1)
    true_prob = p_clean.gather(1, y[:, None]).squeeze(1)
    kl = (F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(1) * (1.0 - true_prob)).mean()
    return bce + beta * kl


LOSSES: dict[str, LossFn] = {"none": natural_loss, "pgd": pgd_at_loss, "trades": trades_loss, "mart": mart_loss}


def check_loss_kind(kind: str) -> str:
    if kind not in LOSSES:
        raise HarpError(f"unknown adversarial loss {kind!r} (choose from {', '.join(LOSSES)})")
    return kind


def adversarial_loss(model: nn.Module, forward: Forward, x: torch.Tensor, y: torch.Tensor,
                     cfg: LossConfig) -> torch.Tensor:
    return LOSSES[check_loss_kind(cfg.kind)](model, forward, x, y, cfg)
