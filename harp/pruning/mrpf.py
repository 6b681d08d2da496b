"""MRPF: per-layer densities from Module Robustness Sensitivity (Bai, Tabia, Santos-Rodriguez, 2024).

MRS of a prunable layer = the increase of the model's adversarial loss (cross-entropy
on PGD examples crafted against the model, on a fixed batch of held-out training
data) when that layer alone is perturbed:
  * "prune": the layer keeps only its largest |w| at the target density;
  * "noise": Gaussian noise of std noise_scale * std(w) is added to the layer.
PGD is re-run against every perturbed model with the same seed (common random
numbers), so the differences measure the layer, not the attack's random start.
BatchNorm statistics are left as they are while measuring.

Allocation (the rule the paper leaves open), r_l = (MRS_l / max MRS)^temperature
(negative MRS counts as 0, floored at 1e-6 of the largest):
  * "count" (default): layer l keeps clip(c * r_l * N_kept, floor * n_l, n_l) weights,
    i.e. its share of the kept weights follows its sensitivity. This minimises
    sum_l MRS_l * log(1 / density_l) under the budget: each layer's damage grows with
    the log of its compression, weighted by how sensitive it is. A small sensitive
    layer (the first conv) stays nearly dense, as HARP learns it should.
  * "density": density_l = clip(c * r_l, floor, 1): the kept *fraction* follows the
    sensitivity, whatever the layer's size. At 99% on small CNNs this starves the small
    layers (pruning a large layer alone raises the adversarial loss most) and the
    network collapses, which is why it is not the default.
floor = FLOOR_FRACTION * target density, and c is found by bisection so the kept
weights sum to keep_count(total, target density). Integer counts then follow by
largest remainder (ties to the more sensitive layer): they sum exactly to the budget
and are monotone up to one weight of rounding: in "count", a more sensitive layer
keeps at least as many weights (unless it is whole); in "density", it keeps at least
the same fraction. temperature 0 is the uniform (lwm) allocation under "density" and
an equal count per layer under "count"; larger values follow the sensitivities more
closely.

The masks keep each layer's largest |w| at its count. The paper's adversarial
fine-tuning is the separate `harp finetune --adv trades` stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import AttackConfig, eval_mode, pgd
from ..data import ImageData
from ..errors import HarpError
from ..models import prunable_layers
from .masks import Masks, keep_count, topk_mask

SENSITIVITIES = ("prune", "noise")
ALLOCATIONS = ("count", "density")
FLOOR_FRACTION = 0.1  # no layer falls below 0.1 x the target density (HARP's a_min = alpha * k, alpha 0.1)
DEFAULT_NOISE_SCALE = 0.5  # --sensitivity noise: noise std / weight std


@dataclass(frozen=True)
class MrpfConfig:
    """mrpf: magnitude masks at per-layer densities allocated by robustness sensitivity."""

    sparsity: float
    granularity: str = "weight"
    sensitivity: str = "prune"  # how a layer is perturbed: "prune" or "noise"
    temperature: float = 1.0  # allocation proportional to sensitivity ** temperature
    allocation: str = "count"  # what follows the sensitivity: kept weights ("count") or kept fraction ("density")
    noise_scale: float | None = None  # "noise": std of the noise relative to the layer's weight std (0.5)
    mrs_examples: int = 256  # held-out training examples in the fixed batch

    def __post_init__(self) -> None:
        if self.granularity == "channel":
            raise HarpError("mrpf prunes single weights; use --granularity weight")
        if self.sensitivity not in SENSITIVITIES:
            raise HarpError(f"unknown sensitivity {self.sensitivity!r} (choose from {', '.join(SENSITIVITIES)})")
        if self.allocation not in ALLOCATIONS:
            raise HarpError(f"unknown allocation {self.allocation!r} (choose from {', '.join(ALLOCATIONS)})")
        if self.temperature < 0:
            raise HarpError(f"--temperature must be >= 0, got {self.temperature}")
        if self.sensitivity != "noise":
            if self.noise_scale is not None:  # it would be recorded as if it had been used
                raise HarpError("--noise-scale applies to --sensitivity noise only")
        elif self.noise_scale is None:
            object.__setattr__(self, "noise_scale", DEFAULT_NOISE_SCALE)  # recorded with the default filled in
        elif not self.noise_scale > 0:
            raise HarpError(f"--noise-scale must be > 0, got {self.noise_scale}")
        if self.mrs_examples < 2:
            raise HarpError(f"--mrs-examples must be at least 2, got {self.mrs_examples}")


# -- sensitivity ---------------------------------------------------------------------------------

def adversarial_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, seed: int) -> float:
    """Mean cross-entropy on PGD examples against `model` (eval mode), with a seeded random start."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        x_adv = pgd(model, x, y, attack)
    with eval_mode(model), torch.no_grad():
        return float(F.cross_entropy(model(x_adv), y))


def module_sensitivities(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackConfig, *,
                         mode: str, density: float, noise_scale: float = DEFAULT_NOISE_SCALE,
                         seed: int = 0) -> tuple[float, dict[str, float]]:
    """The unperturbed adversarial loss and every prunable layer's MRS (loss increase); weights are restored."""
    if mode not in SENSITIVITIES:
        raise HarpError(f"unknown sensitivity {mode!r} (choose from {', '.join(SENSITIVITIES)})")
    base = adversarial_ce(model, x, y, attack, seed)
    gen = torch.Generator().manual_seed(seed)
    mrs = {}
    for name, layer in prunable_layers(model):
        w = layer.weight
        saved = w.detach().clone()
        with torch.no_grad():
            if mode == "prune":
                w.mul_(topk_mask(w, keep_count(w.numel(), density)))
            else:
                noise = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
                w.add_(noise * noise_scale * saved.std().clamp_min(1e-12))
        try:
            mrs[name] = adversarial_ce(model, x, y, attack, seed) - base
        finally:
            with torch.no_grad():
                w.copy_(saved)
    return base, mrs


# -- allocation ------------------------------------------------------------------------------------

def continuous_densities(sensitivity: dict[str, float], numel: dict[str, int], budget: int,
                         temperature: float, floor: float, allocation: str = "count") -> dict[str, float]:
    """density_l = clip(c * w_l, floor, 1) with sum density_l * numel_l = budget (c by bisection),
    w_l = r_l ("density") or r_l / numel_l ("count": kept weights proportional to r_l)."""
    top = max(max(sensitivity.values()), 0.0)
    if top <= 0.0 or temperature == 0.0:
        r = {n: 1.0 for n in numel}
    else:
        r = {n: max(sensitivity[n] / top, 1e-6) ** temperature for n in numel}
    if allocation == "count":
        r = {n: r[n] / numel[n] for n in numel}

    def kept(c: float) -> float:
        return sum(min(max(c * r[n], floor), 1.0) * numel[n] for n in numel)

    lo, hi = 0.0, 1.0
    while kept(hi) < budget and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < budget else (lo, mid)
    return {n: min(max(hi * r[n], floor), 1.0) for n in numel}


def allocate(sensitivity: dict[str, float], numel: dict[str, int], density: float, temperature: float,
             floor: float | None = None, allocation: str = "count") -> dict[str, int]:
    """Integer keep counts per layer summing exactly to keep_count(total, density), monotone in sensitivity
    (counts under "count", fractions under "density"; see the module doc)."""
    if set(sensitivity) != set(numel):
        raise HarpError("allocate: sensitivities and layer sizes name different layers")
    budget = keep_count(sum(numel.values()), density)
    if budget < len(numel):
        raise HarpError(f"a density of {density} keeps {budget} weights, fewer than the {len(numel)} layers")
    floor = FLOOR_FRACTION * density if floor is None else floor
    dens = continuous_densities(sensitivity, numel, budget, temperature, floor, allocation)
    exact = {n: dens[n] * numel[n] for n in numel}
    counts = {n: min(numel[n], max(1, math.floor(exact[n] + 1e-9))) for n in numel}
    # largest remainder first; ties (equal up to float rounding in dens * numel) go to the more sensitive layer
    order = sorted(numel, key=lambda n: (round(exact[n] - counts[n], 9), sensitivity[n]), reverse=True)
    while sum(counts.values()) < budget:
        grow = [n for n in order if counts[n] < numel[n]]
        for n in grow[:budget - sum(counts.values())]:
            counts[n] += 1
    while sum(counts.values()) > budget:
        shrink = [n for n in reversed(order) if counts[n] > 1]
        for n in shrink[:sum(counts.values()) - budget]:
            counts[n] -= 1
    return counts


# -- the method ----------------------------------------------------------------------------------------

def mrpf_masks(model: nn.Module, heldout: ImageData, attack: AttackConfig, config: MrpfConfig, *,
               seed: int, device: torch.device) -> tuple[Masks, dict[str, Any]]:
    """Masks of `model` at the config's sparsity with MRS-allocated per-layer densities, and what was measured."""
    density = 1.0 - config.sparsity
    x, y = next(heldout.subset(config.mrs_examples).batches(config.mrs_examples))
    model = model.to(device)
    base, mrs = module_sensitivities(model, x.to(device), y.to(device), attack, mode=config.sensitivity,
                                     density=density, noise_scale=config.noise_scale, seed=seed)
    layers = prunable_layers(model)
    numel = {n: m.weight.numel() for n, m in layers}
    counts = allocate(mrs, numel, density, config.temperature, allocation=config.allocation)
    masks = {n: topk_mask(m.weight, counts[n]).cpu() for n, m in layers}
    info = {"sensitivity": config.sensitivity, "allocation": config.allocation, "examples": len(y), "baseline_adversarial_loss": base,
            # one PGD run on the batch for the unperturbed model and one per perturbed layer
            "adversarial_examples": len(y) * (len(layers) + 1),
            "attack": {"eps": attack.eps, "step_size": attack.step_size, "steps": attack.steps},
            "layers": {n: {"mrs": mrs[n], "density": counts[n] / numel[n], "keep": counts[n]} for n in numel}}
    return masks, info
