"""Optimisation jobs of the pruning pipeline: learned masks (HARP, HYDRA) and fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import prunable_layers
from ..training.losses import LossConfig
from ..training.runner import Job
from .flops import LayerCost, layer_costs
from .layers import bake, make_masked, make_scored
from .masks import keep_count
from .rates import project_to_budget

RATE_GRAD_CLIP = 1.0  # largest |gradient| a rate logit may take in one step
ELIGIBLE_EXCESS = 0.01  # relative excess over the target density an eligible epoch may have


class ScoreJob(Job):
    """Learn importance scores (HYDRA) and optionally per-layer rates (HARP).

    HARP's loss adds gamma * max(0, density / target - 1), where density is the
    differentiable kept fraction of parameters (weight granularity) or of FLOPs
    (channel granularity). gamma = (epoch + 1) * gamma0 until the term first
    reaches zero at an epoch's end, then stays frozen at that value.
    """

    kind = "prune"
    recalibrate_batchnorm = True  # the best epoch's masks, moved onto the exact target

    def __init__(self, model: nn.Module, loss_cfg: LossConfig, *, target_density: float, granularity: str,
                 densities: dict[str, float], a_min: float, learn_rate: bool, gamma0: float,
                 score_lr: float, rate_lr: float, input_shape: tuple[int, int, int]) -> None:
        self.loss_cfg = loss_cfg
        self.target = target_density
        self.granularity = granularity
        self.learn_rate = learn_rate
        self.gamma0 = gamma0
        self.gamma = gamma0
        self.gamma_frozen = False
        self.score_lr, self.rate_lr = score_lr, rate_lr
        self.costs: dict[str, LayerCost] = layer_costs(model, input_shape)
        # the classifier's outputs are the logits: channel pruning never removes them
        self.frozen_output = {prunable_layers(model)[-1][0]} if granularity == "channel" else set()
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers = make_scored(model, granularity, densities, a_min, learn_rate, self.frozen_output)
        self.model = model

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [m.scores for m in self.layers.values()], "lr": self.score_lr}]
        rates = [m.rate for m in self.layers.values() if m.rate.requires_grad]
        if rates:
            groups.append({"params": rates, "lr": self.rate_lr, "weight_decay": 0.0})
        return groups

    # -- density of the current masks -------------------------------------------------
    def soft_density(self) -> torch.Tensor:
        """Kept fraction of parameters (weight) or FLOPs (channel): the masks' value, fraction()'s gradient."""
        if self.granularity == "weight":
            kept = sum(m.kept_fraction() * m.weight.numel() for m in self.layers.values())
            return kept / sum(m.weight.numel() for m in self.layers.values())
        fr = {n: m.kept_fraction() for n, m in self.layers.items()}
        kept = sum(fr[n] * (fr[c.producer] if c.producer else 1.0) * c.flops for n, c in self.costs.items())
        return kept / sum(c.flops for c in self.costs.values())

    def density(self) -> float:
        """The kept fraction the masks actually have now (integer keep counts)."""
        if self.granularity == "weight":
            kept = sum(keep_count(m.scores.numel(), float(m.fraction().detach())) for m in self.layers.values())
            return kept / sum(m.weight.numel() for m in self.layers.values())
        return channel_flops_density(self.costs, {n: float(m.channel_gate().detach().mean())
                                                  for n, m in self.layers.items()})

    def before_step(self) -> None:
        # Rates follow their raw gradients, so the compression term pushes each layer in
        # proportion to its size (a 288-weight conv is cheap to keep, a 70k-weight layer
        # is not). Clipping stops one noisy straight-through sum from driving a rate into
        # the sigmoid's flat end, where the compression term could no longer pull it back.
        for m in self.layers.values():
            if m.rate.grad is not None:
                m.rate.grad.clamp_(-RATE_GRAD_CLIP, RATE_GRAD_CLIP)

    def extra_loss(self, epoch: int) -> torch.Tensor | None:
        if not self.learn_rate:
            return None
        if not self.gamma_frozen:
            self.gamma = (epoch + 1) * self.gamma0
        return self.gamma * torch.relu(self.soft_density() / self.target - 1.0)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        density = self.density()
        if self.learn_rate and not self.gamma_frozen and float(self.soft_density().detach()) <= self.target:
            self.gamma_frozen = True
        layer_density = {n: round(keep_count(m.scores.numel(), float(m.fraction().detach())) / m.scores.numel(), 5)
                         for n, m in self.layers.items()}
        return {"density": density, "gamma": self.gamma if self.learn_rate else 0.0, "layer_density": layer_density}

    def eligible(self) -> bool:
        """Whether this epoch's masks meet the target, so it may become the kept checkpoint."""
        if not self.learn_rate:  # fixed rates (HYDRA): as close to the target as whole weights or channels allow
            return True
        if self.granularity == "channel":  # saved as it is: at least the target's FLOPs removed
            return self.density() <= self.target + 1e-9
        # finalize() moves the counts onto the target: an epoch within 1% of it (or at the
        # fewest weights the layers can keep) has the masks the saved model is cut from
        numel = sum(m.weight.numel() for m in self.layers.values())
        fewest = sum(keep_count(m.weight.numel(), m.a_min) for m in self.layers.values()) / numel
        return self.density() <= max(self.target * (1 + ELIGIBLE_EXCESS), fewest)

    def state_json(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "gamma_frozen": self.gamma_frozen}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.gamma = float(state.get("gamma", self.gamma0))
        self.gamma_frozen = bool(state.get("gamma_frozen", False))

    # -- the final masks ----------------------------------------------------------------
    def finalize(self):
        if self.granularity == "weight" and self.learn_rate:
            self._fix_counts_to_target()
        plain, masks = bake(self.model, self.layers)
        return plain, masks, {}

    def _fix_counts_to_target(self) -> None:
        """Hit the target exactly: one common shift of all rate logits (see project_to_budget)."""
        numel = {n: m.weight.numel() for n, m in self.layers.items()}
        budget = keep_count(sum(numel.values()), self.target)
        a_min = next(iter(self.layers.values())).a_min
        counts = project_to_budget({n: float(m.fraction().detach()) for n, m in self.layers.items()}, numel, budget, a_min)
        for name, m in self.layers.items():  # the mask is top-k of the learned scores
            m.pin_count(counts[name])


def channel_flops_density(costs: dict[str, LayerCost], kept: dict[str, float]) -> float:
    total = sum(c.flops for c in costs.values())
    done = sum(kept[n] * (kept[c.producer] if c.producer else 1.0) * c.flops for n, c in costs.items())
    return done / total


class FinetuneJob(Job):
    """Train the weights under fixed masks with the adversarial loss."""

    kind = "finetune"

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], granularity: str,
                 loss_cfg: LossConfig) -> None:
        self.loss_cfg = loss_cfg
        self.layers = make_masked(model, masks, granularity)
        self.model = model

    def finalize(self):
        plain, masks = bake(self.model, self.layers)
        return plain, masks, {}
