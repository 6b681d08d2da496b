"""Adversarial (or natural) training of a dense model from scratch."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks import AttackConfig
from ..data import DatasetSpec, ImageData, dataset_spec, load_split
from ..errors import HarpError
from ..export.trace import export_problem
from ..models import build_model, check_model_runs, default_arch
from ..outdir import check_out_dir, make_out_dir, writing
from .distributed import init_distributed, resolve_device, shutdown_distributed
from .losses import LossConfig, check_loss_kind
from .runner import STATE_DIR, Job, RunConfig, read_run_state, run_job

VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Budget:
    """Optimisation defaults of one dataset family."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    eps_warmup_epochs: float


# Documented in the README; chosen to reach the acceptance numbers on two CPU cores.
TRAIN_DEFAULTS: dict[str, Budget] = {
    "digits": Budget(40, 64, "adam", 2e-3, 0.0, 5.0),
    "mnist": Budget(8, 128, "adam", 1e-3, 0.0, 2.0),
    "fashion-mnist": Budget(8, 128, "adam", 1e-3, 0.0, 2.0),
    "natural-images": Budget(100, 128, "sgd", 0.1, 5e-4, 0.0),  # CIFAR, SVHN, imagefolder
}


def budget_for(spec: DatasetSpec) -> Budget:
    return TRAIN_DEFAULTS.get(spec.name, TRAIN_DEFAULTS["natural-images"])


@dataclass(frozen=True)
class TrainOptions:
    dataset: str = "digits"
    arch: str | None = None
    adv: str = "pgd"
    eps: float | None = None
    steps: int | None = None
    step_size: float | None = None
    norm: str = "linf"
    beta: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    seed: int = 0
    data_root: str = "data"
    download: bool | None = False  # None: the caller offers no --download, so errors do not suggest it
    device: str = "auto"
    subset: int | None = None  # use only the first N training and test examples (smoke runs)
    test_size: int | None = None  # score only the first N test examples at the end (None: all)


def default_eps(spec: DatasetSpec, norm: str) -> float:
    """The dataset's budget for an attack of this norm."""
    return spec.l2_eps if norm == "l2" else spec.eps


def train_attack(spec: DatasetSpec, eps: float | None, steps: int | None, step_size: float | None,
                 norm: str = "linf") -> AttackConfig:
    eps = default_eps(spec, norm) if eps is None else eps
    steps = spec.train_steps if steps is None else steps
    # Madry et al.'s rule: 2.5 eps spread over the steps reaches the ball's boundary
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    return AttackConfig(eps=eps, step_size=step_size, steps=steps, norm=norm)


def eval_attack(spec: DatasetSpec, eps: float | None = None, steps: int | None = None,
                step_size: float | None = None, norm: str = "linf", restarts: int = 1) -> AttackConfig:
    eps = default_eps(spec, norm) if eps is None else eps
    steps = spec.eval_steps if steps is None else steps
    if step_size is None:
        # the dataset's step is tuned for its own budget and step count; with fewer steps it
        # could not reach the ball's boundary (5 x 0.02 covers half of digits' 0.2)
        tuned = eps == spec.eps and steps == spec.eval_steps and norm == "linf"
        step_size = spec.eval_step_size if tuned else 2.5 * eps / max(steps, 1)
    return AttackConfig(eps=eps, step_size=step_size, steps=steps, norm=norm, restarts=restarts)


@dataclass
class SplitData:
    train: ImageData
    val: ImageData
    test: ImageData


def load_data(spec: DatasetSpec, data_root: str, download: bool | None, seed: int,
              subset: int | None = None) -> SplitData:
    """Train/validation/test; the validation split is a seeded 10% of the training split. download:
    None where the caller offers no --download (as `load_split`)."""
    full = load_split(spec.name, True, root=data_root, download=download)
    test = load_split(spec.name, False, root=data_root, download=download)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(full) * VAL_FRACTION))
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = ImageData(full.images[train_idx], full.labels[train_idx])
    val = ImageData(full.images[val_idx], full.labels[val_idx])
    if subset is not None:
        train, val, test = train.subset(subset), val.subset(max(subset // 4, 1)), test.subset(subset)
    if len(train) < 2:  # one example makes no batch (BatchNorm needs two): every epoch would train nothing
        raise HarpError(f"{spec.name}: {len(train)} training example(s){f' with --subset {subset}' if subset else ''};"
                        " a training batch needs at least 2")
    return SplitData(train, val, test)


class TrainJob(Job):
    kind = "train"

    def __init__(self, model: nn.Module, loss_cfg: LossConfig) -> None:
        self.model = model
        self.loss_cfg = loss_cfg

    def finalize(self):
        return self.model, {}, {}


def base_meta(arch: str, spec: DatasetSpec, **extra: Any) -> dict[str, Any]:
    return {"architecture": arch, "dataset": spec.to_json(), **extra}


def train(opts: TrainOptions, out: str | Path, *, resume: bool = False, force: bool = False,
          quiet: bool = False) -> dict[str, Any]:
    """Train a model on a dataset and write a checkpoint directory; returns the test metrics."""
    out = Path(out)
    spec = dataset_spec(opts.dataset)
    arch = opts.arch or default_arch(spec)
    check_loss_kind(opts.adv)
    _check_attack_options(opts)
    device = resolve_device(opts.device)
    budget = budget_for(spec)
    cfg = RunConfig(epochs=opts.epochs or budget.epochs, batch_size=opts.batch_size or budget.batch_size,
                    optimizer=opts.optimizer or budget.optimizer, lr=opts.lr or budget.lr,
                    weight_decay=budget.weight_decay, seed=opts.seed,
                    eps_warmup_epochs=budget.eps_warmup_epochs if opts.adv != "none" else 0.0)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise HarpError("--epochs and --batch-size must be positive")
    if cfg.optimizer not in ("sgd", "adam"):
        raise HarpError(f"unknown optimizer {cfg.optimizer!r} (choose from sgd, adam)")
    attack = train_attack(spec, opts.eps, opts.steps, opts.step_size, opts.norm)
    torch.manual_seed(opts.seed)  # the initial weights are part of the seeded run
    model = build_model(arch, spec)
    check_model_runs(model, arch, spec)
    problem = export_problem(model, spec.input_shape)
    if problem:  # training it is fine; hours later, `harp export` would stop at this
        warnings.warn(f"--arch {arch} trains, but harp cannot export it: {problem}", stacklevel=2)
    check_out_dir(out, force=force, resume=resume)
    if resume:
        _check_resume_matches(out, arch, spec)
    data = load_data(spec, opts.data_root, opts.download, opts.seed, opts.subset)
    data.test = data.test.subset(opts.test_size)
    dist = init_distributed(device)
    try:
        with writing(out, hold=dist.is_main):
            if dist.is_main:
                make_out_dir(out, force=force, resume=resume)
            dist.barrier()
            job = TrainJob(model, LossConfig(opts.adv, attack, opts.beta))
            meta = base_meta(arch, spec, training={**asdict(opts), "attack": asdict(attack)})
            return run_job(job, cfg, data.train, data.val, data.test, out, meta,
                           eval_attack=eval_attack(spec, opts.eps if opts.norm == "linf" else None), device=device,
                           dist=dist, resume=resume, quiet=quiet, augment=spec.augment)
    finally:
        shutdown_distributed(dist)


def _check_attack_options(opts: TrainOptions) -> None:
    """Refuse attack options the chosen loss would silently ignore."""
    if opts.beta is not None and opts.adv not in ("trades", "mart"):
        raise HarpError(f"--beta weighs the robust term of --adv trades or mart; --adv {opts.adv} has none")
    if opts.adv == "none":
        unused = [name for name, given in (("--steps", opts.steps is not None),
                                           ("--step-size", opts.step_size is not None),
                                           ("--norm l2", opts.norm != "linf")) if given]
        if unused:
            raise HarpError(f"--adv none trains on clean examples: {', '.join(unused)} would be ignored "
                            "(--eps still sets the PGD budget of the accuracy checks)")


def _check_resume_matches(out: Path, arch: str, spec: DatasetSpec) -> None:
    saved = read_run_state(out / STATE_DIR)["meta"]
    dataset = saved.get("dataset")
    dataset = dataset.get("name") if isinstance(dataset, dict) else dataset  # a name in older states
    if saved and (saved.get("architecture") != arch or dataset != spec.name):
        raise HarpError(f"--resume: {out} was started with --arch {saved.get('architecture')} "
                        f"--dataset {dataset}, not --arch {arch} --dataset {spec.name}")
