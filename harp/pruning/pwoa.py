"""PwoA: pruning a robust network without adversarial examples (Jian et al., ICDM 2022).

The robust dense model is a frozen teacher; the student starts as a copy of it and
minimises, per batch,

    T^2 * KL(softmax(teacher / T) || softmax(student / T))            self-distillation
    + sum_l lambda_x * HSIC(X, Z_l) - lambda_y * HSIC(Y, Z_l)          HSIC bottleneck
    + sum_l rho / 2 * |W_l - Z_l + U_l|^2                              ADMM (first phase only)

Z_l here are the outputs of every prunable layer (forward hooks on each Conv2d and
Linear, before any BatchNorm; the last one is the logits). HSIC uses a Gaussian
kernel on the input pixels and on each Z_l, a linear kernel on one-hot labels
(see harp.pruning.hsic).

Two phases in one run of the shared epoch loop:
  * ADMM (admm_epochs): weights are dense; after every epoch the auxiliary variable
    is projected, Z = top-k(W + U) ("layer": every layer at the target density, as in
    the authors' code; "global": the largest |W + U| over all layers), the dual
    variable updated, U += W - Z, and rho multiplied by RHO_GROWTH (capped at 1).
  * masked retraining (retrain_epochs): at the end of the last ADMM epoch the
    weights are hard-pruned by the same projection of W; the masks then stay fixed
    and training continues under the same loss without the ADMM term. Only these
    epochs can become the kept checkpoint (best validation PGD accuracy).

No adversarial examples are made unless mix_ratio p > 0: then a deterministic
fraction p of batches (batch b is adversarial when floor((b+1)p) > floor(bp)) is
replaced by PGD examples against the student. The job counts every adversarial
example it crafts; the count goes to meta["pruning"]["adversarial_examples"].
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackConfig, pgd
from ..errors import HarpError
from ..models import prunable_layers
from ..training.distributed import world_size
from ..training.losses import LossConfig
from ..training.runner import Job
from .hsic import gaussian_kernel, hsic, linear_kernel
from .layers import bake, make_masked
from .masks import keep_count, topk_mask

PROJECTIONS = ("layer", "global")
RHO_GROWTH = 1.35  # the authors' multi-rho schedule: rho grows at every ADMM update, capped at 1


@dataclass(frozen=True)
class PwoAConfig:
    """pwoa: self-distillation + HSIC bottleneck, ADMM pruning, masked retraining.

    Fields left None take the dataset's value from PWOA_DEFAULTS.
    """

    sparsity: float
    granularity: str = "weight"
    distill_temperature: float | None = None  # T
    lambda_x: float | None = None
    lambda_y: float | None = None
    rho: float | None = None  # initial ADMM penalty
    mix_ratio: float = 0.0  # fraction of batches replaced by PGD examples
    admm_epochs: int | None = None
    retrain_epochs: int | None = None
    hsic_sigma: float | None = None  # None: median heuristic per batch
    projection: str = "layer"  # or "global"

    def __post_init__(self) -> None:
        if self.granularity == "channel":
            raise HarpError("pwoa prunes single weights; use --granularity weight")
        if self.projection not in PROJECTIONS:
            raise HarpError(f"unknown projection {self.projection!r} (choose from {', '.join(PROJECTIONS)})")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise HarpError(f"--mix-ratio must be in [0, 1], got {self.mix_ratio}")
        for name in ("distill_temperature", "rho", "hsic_sigma"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise HarpError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("lambda_x", "lambda_y", "admm_epochs", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise HarpError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


@dataclass(frozen=True)
class PwoABudget:
    admm_epochs: int
    retrain_epochs: int
    optimizer: str
    lr: float
    lambda_x: float
    lambda_y: float
    rho: float
    distill_temperature: float


# Defaults per dataset family (documented in the README). T, rho and the optimisers
# follow the authors' scripts. The lambdas are for the plain trace(KHLH)/(n-1)^2
# estimator used here (summed over layers, HSIC(Y, Z) is about 0.1 and the
# distillation term about 0.4 on digits), chosen so the bottleneck is a small
# regulariser as in the authors' runs; they are not tuned. The epoch counts fit two
# CPU cores, except natural-images, which keeps the paper's 50 ADMM + 100 retrain.
PWOA_DEFAULTS = {
    "digits": PwoABudget(10, 10, "adam", 2e-3, 0.01, 0.1, 0.01, 30.0),
    "mnist": PwoABudget(3, 3, "adam", 5e-4, 0.01, 0.1, 0.01, 30.0),
    "fashion-mnist": PwoABudget(3, 3, "adam", 5e-4, 0.01, 0.1, 0.01, 30.0),
    "natural-images": PwoABudget(50, 100, "sgd", 0.01, 0.01, 0.1, 0.01, 30.0),
}


def pwoa_budget(dataset: str) -> PwoABudget:
    return PWOA_DEFAULTS.get(dataset, PWOA_DEFAULTS["natural-images"])


def resolve_config(config: PwoAConfig, dataset: str, epochs: int | None) -> PwoAConfig:
    """The config with every None field set from the dataset's defaults.

    `epochs` (the stage's --epochs) is the total of both phases: an explicit phase
    count keeps its value and the other phase gets the rest; with neither given the
    total is split in the default table's proportion (at least one ADMM epoch).
    """
    b = pwoa_budget(dataset)
    admm, retrain = config.admm_epochs, config.retrain_epochs
    if epochs is not None:
        if epochs < 1:
            raise HarpError(f"--epochs must be positive, got {epochs}")
        if admm is not None and retrain is not None and admm + retrain != epochs:
            raise HarpError(f"pwoa: --admm-epochs {admm} + --retrain-epochs {retrain} != --epochs {epochs}")
        if admm is None and retrain is None:
            admm = min(epochs, max(1, round(epochs * b.admm_epochs / (b.admm_epochs + b.retrain_epochs))))
        admm = epochs - retrain if admm is None else admm
        retrain = epochs - admm if retrain is None else retrain
        if admm < 0 or retrain < 0:
            raise HarpError(f"pwoa: a phase is longer than --epochs {epochs}")
    admm = b.admm_epochs if admm is None else admm
    retrain = b.retrain_epochs if retrain is None else retrain
    if admm + retrain < 1:
        raise HarpError("pwoa: --admm-epochs + --retrain-epochs must be at least 1")
    pick = lambda name: getattr(b, name) if getattr(config, name) is None else getattr(config, name)  # noqa: E731
    return replace(config, admm_epochs=admm, retrain_epochs=retrain,
                   **{n: pick(n) for n in ("distill_temperature", "lambda_x", "lambda_y", "rho")})


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                            log_target=True)


def project(tensors: dict[str, torch.Tensor], density: float, mode: str) -> dict[str, torch.Tensor]:
    """Masks of the largest |values| at `density`: per layer ("layer") or over all layers ("global").

    Under "global" a layer left without any weight keeps its largest one.
    """
    if mode == "layer":
        return {n: topk_mask(t, keep_count(t.numel(), density)) for n, t in tensors.items()}
    flat = torch.cat([t.detach().abs().flatten() for t in tensors.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, keep_count(flat.numel(), density), sorted=False).indices] = True
    masks, start = {}, 0
    for name, t in tensors.items():
        mask = keep[start:start + t.numel()].view_as(t)
        masks[name] = mask if mask.any() else topk_mask(t, 1)
        start += t.numel()
    return masks


class PwoAJob(Job):
    """Distil the frozen dense teacher into an ADMM-pruned, then masked, student."""

    kind = "prune"
    recalibrate_batchnorm = True  # the kept epoch's masks differ from the teacher's dense net

    def __init__(self, model: nn.Module, attack: AttackConfig, config: PwoAConfig) -> None:
        if config.admm_epochs is None or config.lambda_x is None:
            raise HarpError("PwoAJob needs a resolved config (see resolve_config)")
        self.cfg = config
        self.loss_cfg = LossConfig("pgd", attack)  # only the attack is used: mixed batches
        self.density = 1.0 - config.sparsity
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.layers = make_masked(model, {n: torch.ones_like(m.weight, dtype=torch.bool)
                                          for n, m in prunable_layers(model)}, "weight")
        self.model = model
        self.rho = config.rho
        self.pruned = False
        self.retrained = False  # whether the last epoch ran under the masks (eligible to be kept)
        self.batches = 0
        for layer in self.layers.values():  # buffers, so resume restores them with the weights
            layer.register_buffer("admm_u", torch.zeros_like(layer.weight))
            layer.register_buffer("admm_z", torch.zeros_like(layer.weight))
        self._set_z({n: m.weight.detach() for n, m in self.layers.items()})  # Z0 = top-k(W), U0 = 0
        self._features: dict[str, torch.Tensor] = {}
        self._capturing = False
        self._hooks = [m.register_forward_hook(self._capture(n)) for n, m in self.layers.items()]
        if config.admm_epochs == 0:
            self._hard_prune()

    # -- the loss --------------------------------------------------------------------------
    def loss(self, forward, x: torch.Tensor, y: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
        if self._next_batch_adversarial():
            x = pgd(self.model, x, y, loss_cfg.attack)
            self.adversarial_examples += len(x) * world_size()
        self._features, self._capturing = {}, True
        try:
            (logits,) = forward(x)
        finally:
            self._capturing = False
        features, self._features = list(self._features.values()), {}
        teacher = self.teacher.to(x.device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        total = distill_kl(logits, teacher_logits, self.cfg.distill_temperature)
        if (self.cfg.lambda_x or self.cfg.lambda_y) and len(y) > 1:
            total = total + self.hsic_bottleneck(x, F.one_hot(y, logits.shape[1]), features)
        if not self.pruned:
            total = total + self.admm_penalty()
        return total

    def hsic_bottleneck(self, x: torch.Tensor, y_onehot: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """sum_l lambda_x * HSIC(X, Z_l) - lambda_y * HSIC(Y, Z_l)."""
        sigma = self.cfg.hsic_sigma
        with torch.no_grad():
            k_x = gaussian_kernel(x, sigma)  # (N, N)
            k_y = linear_kernel(y_onehot.to(x.dtype))  # (N, N)
        total = x.new_zeros(())
        for z in features:
            k_z = gaussian_kernel(z, sigma)
            total = total + self.cfg.lambda_x * hsic(k_z, k_x) - self.cfg.lambda_y * hsic(k_z, k_y)
        return total

    def admm_penalty(self) -> torch.Tensor:
        return sum(0.5 * self.rho * (m.weight - m.admm_z + m.admm_u).pow(2).sum() for m in self.layers.values())

    def _next_batch_adversarial(self) -> bool:
        b, p = self.batches, self.cfg.mix_ratio
        self.batches += 1
        return math.floor((b + 1) * p + 1e-9) > math.floor(b * p + 1e-9)

    def _capture(self, name: str):
        def hook(_module, _inputs, output):
            if self._capturing:
                self._features[name] = output
        return hook

    # -- ADMM and the hard prune ---------------------------------------------------------------
    @torch.no_grad()
    def _set_z(self, values: dict[str, torch.Tensor]) -> None:
        masks = project(values, self.density, self.cfg.projection)
        for name, m in self.layers.items():
            m.admm_z.copy_(values[name] * masks[name])

    @torch.no_grad()
    def _admm_update(self) -> None:
        self._set_z({n: m.weight + m.admm_u for n, m in self.layers.items()})  # Z = proj(W + U)
        for m in self.layers.values():
            m.admm_u.add_(m.weight - m.admm_z)  # U += W - Z
        self.rho = min(1.0, self.rho * RHO_GROWTH)

    @torch.no_grad()
    def _hard_prune(self) -> None:
        masks = project({n: m.weight for n, m in self.layers.items()}, self.density, self.cfg.projection)
        for name, m in self.layers.items():
            m.mask.copy_(masks[name].to(m.mask.dtype))
            m.weight.mul_(m.mask)
        self.pruned = True

    def admm_gap(self) -> float:
        """Relative distance of the weights from the sparse set: |W - Z|^2 / |W|^2."""
        with torch.no_grad():
            num = sum(float((m.weight - m.admm_z).pow(2).sum()) for m in self.layers.values())
            den = sum(float(m.weight.pow(2).sum()) for m in self.layers.values())
        return num / max(den, 1e-12)

    def kept_fraction(self) -> float:
        kept = sum(int(m.mask.sum()) for m in self.layers.values())
        return kept / sum(m.mask.numel() for m in self.layers.values())

    # -- Job hooks ---------------------------------------------------------------------------
    def epoch_end(self, epoch: int) -> dict[str, Any]:
        self.retrained = self.pruned  # this epoch trained under the masks
        info: dict[str, Any] = {"phase": "retrain" if self.pruned else "admm"}
        if not self.pruned:
            info.update(rho=self.rho, admm_gap=self.admm_gap())
            if epoch + 1 >= self.cfg.admm_epochs:
                self._hard_prune()
            else:
                self._admm_update()
        info.update(density=self.kept_fraction(), adversarial_examples=self.adversarial_examples)
        return info

    def eligible(self) -> bool:
        """A retraining epoch; the last ADMM epoch, hard-pruned at its end but never trained under its
        masks, only when no retraining follows."""
        return self.retrained or (self.pruned and self.cfg.retrain_epochs == 0)

    def state_json(self) -> dict[str, Any]:
        return {"rho": self.rho, "pruned": self.pruned, "adversarial_examples": self.adversarial_examples,
                "batches": self.batches}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.rho = float(state.get("rho", self.rho))
        self.pruned = bool(state.get("pruned", self.pruned))
        self.adversarial_examples = int(state.get("adversarial_examples", 0))
        self.batches = int(state.get("batches", 0))

    def finalize(self):
        for h in self._hooks:
            h.remove()
        for m in self.layers.values():
            for name in ("admm_u", "admm_z"):
                m._buffers.pop(name, None)
        plain, masks = bake(self.model, self.layers)
        info = {"adversarial_examples": self.adversarial_examples, "admm_epochs": self.cfg.admm_epochs,
                "retrain_epochs": self.cfg.retrain_epochs, "final_rho": self.rho}
        return plain, masks, {"pruning": info}
