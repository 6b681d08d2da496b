"""Pruning methods as configs plus handlers, behind one entry point.

Each method is a small frozen dataclass; METHODS maps its name to (config type,
handler). `prune_checkpoint(src, out, config, options)` is the single entry point
used by the CLI, the pipeline and the tests. Learned methods (harp, hydra, pwoa) run
an optimisation job through the shared epoch loop; one-shot methods (lwm,
global-magnitude, random, mrpf) compute masks directly. Every result is a checkpoint
directory whose weights have the masks baked in. PwoA and MRPF keep their own logic
(and config dataclass) in pwoa.py and mrpf.py; their handlers here are glue.

Sparsity semantics: with granularity "weight" it is the fraction of zero weights
over all Conv/Linear layers; with "channel" it is the fraction of multiply-adds
removed (FLOPs reduction), since channel pruning exists to save compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..data import DatasetSpec
from ..errors import HarpError
from ..evaluate import accuracy, make_attack
from ..io import sha256_file
from ..models import prunable_layers
from ..outdir import check_out_dir, make_out_dir, writing
from ..sparsity import layer_densities, model_sparsity
from ..training.distributed import init_distributed, launched_processes, resolve_device, shutdown_distributed
from ..training.batchnorm import recalibrate_batchnorm
from ..training.losses import LossConfig, check_loss_kind
from ..training.runner import RunConfig, run_job
from ..training.train import SplitData, budget_for, eval_attack, load_data, train_attack
from .flops import layer_costs
from .jobs import ScoreJob, channel_flops_density
from .layers import GRANULARITIES, bake, make_masked
from .masks import Masks, check_sparsity, global_magnitude_masks, keep_count, layerwise_magnitude_masks
from .mrpf import MrpfConfig, mrpf_masks
from .pwoa import PwoAConfig, PwoAJob, pwoa_budget, resolve_config
from .rates import RATE_INITS, initial_densities


@dataclass(frozen=True)
class HarpConfig:
    sparsity: float
    granularity: str = "weight"
    gamma0: float = 0.1  # compression weight grows as (epoch + 1) * gamma0 until the target is met
    alpha: float = 0.1  # a_min = alpha * target density
    rate_init: str = "uniform"  # or "erk"
    init_density: float | None = None  # where the rates start; default sqrt(target density)
    rate_lr: float | None = None  # learning rate of the rates; default the dataset's (PRUNE_DEFAULTS)


@dataclass(frozen=True)
class HydraConfig:
    sparsity: float
    granularity: str = "weight"


@dataclass(frozen=True)
class LayerMagnitudeConfig:
    """lwm: every layer keeps its largest weights at the same (uniform) density."""

    sparsity: float
    granularity: str = "weight"


@dataclass(frozen=True)
class GlobalMagnitudeConfig:
    """Keep the largest weights over the whole model (non-uniform by construction)."""

    sparsity: float
    granularity: str = "weight"

    def __post_init__(self) -> None:  # checked with the options, before a pipeline trains for it
        if self.granularity == "channel":
            raise HarpError("global-magnitude prunes weights only; use --granularity weight")


@dataclass(frozen=True)
class RandomConfig:
    sparsity: float
    granularity: str = "weight"
    seed: int = 0


@dataclass(frozen=True)
class PruneOptions:
    """How to run a pruning or fine-tuning stage (everything but the method)."""

    epochs: int | None = None
    adv: str = "pgd"
    eps: float | None = None
    steps: int | None = None
    lr: float | None = None  # score learning rate (prune) or weight learning rate (finetune)
    batch_size: int | None = None
    seed: int = 0
    data_root: str = "data"
    download: bool | None = False  # None: the caller offers no --download, so errors do not suggest it
    device: str = "auto"
    subset: int | None = None
    test_size: int | None = None  # score only the first N test examples at the end (None: all)


def load_stage_data(spec: DatasetSpec, opts: PruneOptions) -> SplitData:
    """The train/val/test split a pruning or fine-tuning stage runs on."""
    data = load_data(spec, opts.data_root, opts.download, opts.seed, opts.subset)
    data.test = data.test.subset(opts.test_size)
    return data


@dataclass(frozen=True)
class StageRun:
    """How a prune stage treats its output folder and console (`prune_checkpoint`'s keyword flags)."""
    force: bool = False
    resume: bool = False
    quiet: bool = False


# A method's implementation: (checkpoint, config, options, out, meta, run) -> metrics. The trained methods make
# `out` themselves (under torchrun, rank 0 only); `prune_checkpoint` makes it for the one-shot ones.
Handler = Callable[[Checkpoint, Any, PruneOptions, Path, dict[str, Any], StageRun], dict[str, Any]]


@dataclass(frozen=True)
class StageBudget:
    epochs: int
    optimizer: str
    lr: float
    rate_lr: float = 0.0


# Defaults per dataset family (documented in the README).
PRUNE_DEFAULTS = {"digits": StageBudget(20, "sgd", 0.1, 0.1), "mnist": StageBudget(3, "sgd", 0.1, 0.1),
                  "fashion-mnist": StageBudget(3, "sgd", 0.1, 0.1),
                  "natural-images": StageBudget(20, "sgd", 0.1, 0.1)}
FINETUNE_DEFAULTS = {"digits": StageBudget(20, "adam", 2e-3), "mnist": StageBudget(3, "adam", 5e-4),
                     "fashion-mnist": StageBudget(3, "adam", 5e-4), "natural-images": StageBudget(20, "sgd", 0.01)}


def stage_budget(table: dict[str, StageBudget], dataset: str) -> StageBudget:
    return table.get(dataset, table["natural-images"])


# -- one-shot mask rules ------------------------------------------------------------------

def _channel_counts_for_flops(model: nn.Module, input_shape, target_density: float) -> tuple[float, dict[str, int]]:
    """The largest uniform kept-channel fraction whose whole channels keep at most the target FLOPs
    density, and the channels each layer then keeps (the classifier keeps all its outputs).

    Counted in whole channels: a fraction whose rounded-up counts overshoot the target (a
    64-channel layer rounds by up to 1/64) would leave a fixed-rate job (HYDRA) above it for good.
    """
    costs = layer_costs(model, input_shape)
    layers = prunable_layers(model)
    rows = {n: m.weight.shape[0] for n, m in layers}
    last = layers[-1][0]

    def counts(fraction: float) -> dict[str, int]:
        return {n: rows[n] if n == last else keep_count(rows[n], fraction) for n in rows}

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if channel_flops_density(costs, {n: k / rows[n] for n, k in counts(mid).items()}) > target_density:
            hi = mid
        else:
            lo = mid
    return lo, counts(lo)


def _channel_masks(model: nn.Module, keep: dict[str, int], rank: Callable[[nn.Module], torch.Tensor]) -> Masks:
    """Keep the top `keep[name]` output channels of every layer by `rank`."""
    masks = {}
    for name, m in prunable_layers(model):
        rows = m.weight.shape[0]
        chosen = torch.topk(rank(m), keep[name]).indices
        row_mask = torch.zeros(rows, dtype=torch.bool)
        row_mask[chosen] = True
        masks[name] = row_mask.view(-1, *[1] * (m.weight.dim() - 1)).expand_as(m.weight).clone()
    return masks


def _one_shot(rule: str) -> Handler:
    def handler(ckpt: Checkpoint, config, opts: PruneOptions, out: Path, meta: dict[str, Any],
                _: StageRun) -> dict[str, Any]:
        model = ckpt.build_model()
        density = 1.0 - config.sparsity
        gen = torch.Generator().manual_seed(getattr(config, "seed", 0))
        if config.granularity == "channel":
            _, keep = _channel_counts_for_flops(model, ckpt.spec.input_shape, density)
            if rule == "random":
                rank = lambda m: torch.rand(m.weight.shape[0], generator=gen)  # noqa: E731
            else:
                rank = lambda m: m.weight.detach().flatten(1).abs().sum(1)  # noqa: E731
            masks = _channel_masks(model, keep, rank)
        elif rule == "global":
            masks = global_magnitude_masks(model, config.sparsity)
        elif rule == "layer":
            masks = layerwise_magnitude_masks(model, initial_densities(model, density, "uniform"))
        else:
            masks = {n: _random_mask(m.weight, keep_count(m.weight.numel(), density), gen)
                     for n, m in prunable_layers(model)}
        data = load_stage_data(ckpt.spec, opts)
        return _bake_and_save(model, masks, ckpt, config, opts, out, meta, data)
    return handler


def _bake_and_save(model: nn.Module, masks: Masks, ckpt: Checkpoint, config, opts: PruneOptions, out: Path,
                   meta: dict[str, Any], data, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bake one-shot masks into the model, recalibrate BatchNorm on clean training data, save."""
    layers = make_masked(model, masks, config.granularity)
    plain, masks = bake(model, layers)
    recalibrate_batchnorm(plain, data.train, torch.device("cpu"))
    return _save_pruned(plain, masks, ckpt, config, opts, out, meta, data.test, extra)


def _mrpf(ckpt: Checkpoint, config: MrpfConfig, opts: PruneOptions, out: Path, meta: dict[str, Any],
          _: StageRun) -> dict[str, Any]:
    """MRPF: magnitude masks at per-layer densities allocated by robustness sensitivity (see mrpf.py)."""
    model = ckpt.build_model()
    data = load_stage_data(ckpt.spec, opts)
    attack = train_attack(ckpt.spec, opts.eps, opts.steps, None)
    masks, info = mrpf_masks(model, data.val, attack, config, seed=opts.seed, device=resolve_device(opts.device))
    return _bake_and_save(model.cpu(), masks, ckpt, config, opts, out, meta, data,
                          extra={"mrs": info, "adversarial_examples": info["adversarial_examples"]})


def _random_mask(w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.randperm(w.numel(), generator=gen)[:k]] = True
    return mask.view_as(w)


# -- learned masks --------------------------------------------------------------------------

def score_job(ckpt: Checkpoint, config, opts: PruneOptions, learn_rate: bool) -> tuple[ScoreJob, RunConfig]:
    """The HARP (learn_rate) or HYDRA job on the checkpoint's model, and its run settings."""
    spec = ckpt.spec
    budget = stage_budget(PRUNE_DEFAULTS, spec.name)
    model = ckpt.build_model()
    density = 1.0 - config.sparsity
    if config.granularity == "channel":
        frac, keep = _channel_counts_for_flops(model, spec.input_shape, density)
        # half a channel below each count: the rate's float32 round trip cannot round it up a channel
        densities = {n: (keep[n] - 0.5) / m.weight.shape[0] for n, m in prunable_layers(model)}
    elif learn_rate:
        # HARP starts above the target (a functional network) and gamma drives it down
        start = config.init_density or math.sqrt(density)
        densities = initial_densities(model, max(start, density), config.rate_init)
    else:
        densities = initial_densities(model, density, "uniform")
    a_min = getattr(config, "alpha", 0.0) * (frac if config.granularity == "channel" else density)
    job = ScoreJob(model, _loss(ckpt, opts), target_density=density, granularity=config.granularity,
                   densities=densities, a_min=a_min, learn_rate=learn_rate,
                   gamma0=getattr(config, "gamma0", 0.0), score_lr=opts.lr or budget.lr,
                   rate_lr=getattr(config, "rate_lr", None) or budget.rate_lr, input_shape=spec.input_shape)
    run = RunConfig(epochs=opts.epochs or budget.epochs, batch_size=opts.batch_size or budget_for(spec).batch_size,
                    optimizer=budget.optimizer, lr=opts.lr or budget.lr, seed=opts.seed, select="best")
    return job, run


def _learned(learn_rate: bool) -> Handler:
    def handler(ckpt: Checkpoint, config, opts: PruneOptions, out: Path, meta: dict[str, Any],
                stage: StageRun) -> dict[str, Any]:
        if isinstance(config, HarpConfig) and config.rate_lr is None:  # recorded with its default filled in
            config = replace(config, rate_lr=stage_budget(PRUNE_DEFAULTS, ckpt.spec.name).rate_lr)
        job, run = score_job(ckpt, config, opts, learn_rate)
        return _run_and_save(job, run, ckpt, config, opts, out, meta, resolve_device(opts.device), stage)
    return handler


def _pwoa(ckpt: Checkpoint, config: PwoAConfig, opts: PruneOptions, out: Path, meta: dict[str, Any],
          stage: StageRun) -> dict[str, Any]:
    """PwoA: distillation + HSIC bottleneck, ADMM then masked retraining (see pwoa.py)."""
    spec = ckpt.spec
    config = resolve_config(config, spec.name, opts.epochs)  # recorded with every default filled in
    budget = pwoa_budget(spec.name)
    job = PwoAJob(ckpt.build_model(), train_attack(spec, opts.eps, opts.steps, None), config)
    run = RunConfig(epochs=config.admm_epochs + config.retrain_epochs,
                    batch_size=opts.batch_size or budget_for(spec).batch_size, optimizer=budget.optimizer,
                    lr=opts.lr or budget.lr, seed=opts.seed, select="best")
    return _run_and_save(job, run, ckpt, config, opts, out, meta, resolve_device(opts.device), stage)


def _loss(ckpt: Checkpoint, opts: PruneOptions) -> LossConfig:
    check_loss_kind(opts.adv)
    return LossConfig(opts.adv, train_attack(ckpt.spec, opts.eps, opts.steps, None))


def _run_and_save(job, run: RunConfig, ckpt: Checkpoint, config, opts: PruneOptions, out: Path,
                  meta: dict[str, Any], device, stage: StageRun) -> dict[str, Any]:
    spec = ckpt.spec
    data = load_stage_data(spec, opts)
    dist = init_distributed(device)
    try:
        with writing(out, hold=dist.is_main):
            if dist.is_main:
                make_out_dir(out, force=stage.force, resume=stage.resume)
            dist.barrier()
            full_meta = {**meta, "pruning": _pruning_meta(config, None)}
            metrics = run_job(job, run, data.train, data.val, data.test, out, full_meta,
                              eval_attack=eval_attack(spec, opts.eps), device=device, dist=dist,
                              resume=stage.resume, quiet=stage.quiet, augment=spec.augment,
                              finish_meta=lambda model, m: _finish_pruning_meta(m, config, model, spec))
    finally:
        shutdown_distributed(dist)
    return metrics


# -- registry and entry point -------------------------------------------------------------

METHODS: dict[str, tuple[type, Handler]] = {
    "harp": (HarpConfig, _learned(learn_rate=True)),
    "hydra": (HydraConfig, _learned(learn_rate=False)),
    "lwm": (LayerMagnitudeConfig, _one_shot("layer")),
    "global-magnitude": (GlobalMagnitudeConfig, _one_shot("global")),
    "random": (RandomConfig, _one_shot("random")),
    "pwoa": (PwoAConfig, _pwoa),
    "mrpf": (MrpfConfig, _mrpf),
}
RESUMABLE = ("harp", "hydra", "pwoa")  # methods that run the epoch loop


def unread_stage_options(method: str) -> tuple[str, ...]:
    """The PruneOptions fields `method` never reads: a training loop's, for the one-shot methods (MRPF's
    sensitivity attack reads `steps`). A command refuses them when given rather than record them unused."""
    if method in RESUMABLE:
        return ()
    return ("epochs", "adv", "lr", "batch_size") + (() if method == "mrpf" else ("steps",))


def make_config(method: str, **kw: Any):
    """The config dataclass of `method` from keyword arguments (None means default)."""
    if method not in METHODS:
        raise HarpError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    cls = METHODS[method][0]
    fields = cls.__dataclass_fields__
    if "seed" not in fields:  # the run's --seed: it seeds the masks of the methods that draw them
        kw.pop("seed", None)
    unknown = [k for k, v in kw.items() if v is not None and k not in fields]
    if unknown:
        raise HarpError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in unknown)} do not apply to {method}")
    config = cls(**{k: v for k, v in kw.items() if v is not None and k in fields})
    check_sparsity(config.sparsity)
    if config.granularity not in GRANULARITIES:
        raise HarpError(f"unknown granularity {config.granularity!r} (choose from {', '.join(GRANULARITIES)})")
    if isinstance(config, HarpConfig):
        if config.rate_init not in RATE_INITS:
            raise HarpError(f"unknown rate initialisation {config.rate_init!r} (choose from {', '.join(RATE_INITS)})")
        if config.gamma0 <= 0 or not 0 <= config.alpha < 1:
            raise HarpError("--gamma0 must be > 0 and --alpha in [0, 1)")
        if config.init_density is not None and not 0 < config.init_density <= 1:
            raise HarpError("--init-density must be in (0, 1]")
        if config.rate_lr is not None and not config.rate_lr > 0:
            raise HarpError("--rate-lr must be > 0")
    return config


def method_name(config) -> str:
    for name, (cls, _) in METHODS.items():
        if type(config) is cls:
            return name
    raise HarpError(f"{type(config).__name__} is not a pruning method config")


def prune_checkpoint(src: str | Path, out: str | Path, config, opts: PruneOptions = PruneOptions(), *,
                     resume: bool = False, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Prune the model in checkpoint `src` with `config`; writes a checkpoint to `out`."""
    out = Path(out)
    ckpt = load_checkpoint(src)
    if ckpt.masks:
        raise HarpError(f"{src} is already pruned ({ckpt.meta.get('pruning', {}).get('method')}); "
                        "prune the dense checkpoint instead")
    name = method_name(config)
    check_loss_kind(opts.adv)
    resolve_device(opts.device)
    check_out_dir(out, force=force, resume=resume, source=src)
    meta = {"architecture": ckpt.meta["architecture"], "dataset": ckpt.meta["dataset"],
            "training": ckpt.meta.get("training"), "source": _source(ckpt),
            "prune": stage_options(ckpt.spec, opts)}
    handler = METHODS[name][1]
    stage = StageRun(force=force, resume=resume, quiet=quiet)
    if name in RESUMABLE:
        return handler(ckpt, config, opts, out, meta, stage)
    if resume:
        raise HarpError(f"--resume: {name} is one-shot; there is nothing to resume")
    check_not_distributed(name)
    with writing(out):
        make_out_dir(out, force=force, resume=False)
        return handler(ckpt, config, opts, out, meta, stage)


def stage_options(spec: DatasetSpec, opts: PruneOptions) -> dict[str, Any]:
    """The options of a prune or finetune stage as its meta.json records them, with the attack they resolve
    to: a resumed stage must share them (`--adv`, `--subset`, the budget), less those that may change."""
    return {**asdict(opts), "attack": asdict(train_attack(spec, opts.eps, opts.steps, None))}


def check_not_distributed(method: str) -> None:
    """One-shot methods have no training loop to share: under torchrun every rank would repeat the whole
    job and write the same output folder."""
    if method not in RESUMABLE and launched_processes() > 1:
        raise HarpError(f"{method} prunes in one shot, with no training loop to share: run it without torchrun")


def _source(ckpt: Checkpoint) -> dict[str, Any]:
    return {"path": str(ckpt.path), "meta_sha256": sha256_file(ckpt.path / "meta.json")}


def _pruning_meta(config, model: nn.Module | None, costs=None) -> dict[str, Any]:
    info: dict[str, Any] = {"method": method_name(config), "granularity": config.granularity,
                            "target_sparsity": config.sparsity, "config": asdict(config)}
    if model is not None:
        info["achieved_sparsity"] = model_sparsity(model)
        info["layers"] = [{"name": d["name"], "shape": d["shape"], "density": d["density"]}
                          for d in layer_densities(model)]
        if costs is not None:
            info["flops_reduction"] = 1.0 - flops_density(model, costs, config.granularity)
    return info


def flops_density(model: nn.Module, costs, granularity: str) -> float:
    """Kept multiply-add fraction: each layer computes only its output channels with a nonzero weight.
    Channel granularity also drops the inputs its producer's pruned channels leave (zero after their
    BatchNorm, which `bake` zeroes); with weight granularity a zero row's BatchNorm still feeds the next
    layer a constant, so that layer reads every input channel."""
    live = {n: float((m.weight.detach().flatten(1).abs().sum(1) > 0).float().mean()) for n, m in prunable_layers(model)}
    if granularity == "channel":
        return channel_flops_density(costs, live)
    return sum(live[n] * c.flops for n, c in costs.items()) / sum(c.flops for c in costs.values())


def _save_pruned(plain: nn.Module, masks: Masks, ckpt: Checkpoint, config, opts: PruneOptions, out: Path,
                 meta: dict[str, Any], test, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = ckpt.spec
    device = resolve_device(opts.device)
    atk = eval_attack(spec, opts.eps)
    plain = plain.to(device)
    torch.manual_seed(0)  # PGD's random starts, as `harp eval` seeds them: the same numbers on every run
    metrics = {
        "natural_accuracy": accuracy(plain, test, device),
        "robust_accuracy": accuracy(plain, test, device, attack=make_attack("pgd", atk)),
        "robust_attack": {"name": "pgd", **asdict(atk)}, "test_examples": len(test)}
    costs = layer_costs(plain, spec.input_shape)
    pruning = {**_pruning_meta(config, plain, costs), **(extra or {})}
    save_checkpoint(out, plain.cpu(), {**meta, "pruning": pruning, "metrics": metrics}, masks)
    return metrics


def _finish_pruning_meta(meta: dict[str, Any], config, model: nn.Module, spec) -> dict[str, Any]:
    """`meta` with what the masks achieved next to what was asked; keys a job added to meta["pruning"]
    (PwoA's adversarial-example count) are kept."""
    costs = layer_costs(model, spec.input_shape)
    return {**meta, "pruning": {**meta.get("pruning", {}), **_pruning_meta(config, model, costs)}}
