"""The epoch loop shared by training, pruning and fine-tuning.

A `Job` says what is optimised and how (loss, parameter groups, per-epoch hooks);
`run_job` owns everything else: optimiser and schedule, the seeded data order,
validation, resumable per-epoch state, DDP, and the final checkpoint.

Resume protocol: after every epoch the complete state (model incl. scores/rates,
optimiser, scheduler, RNG, job state, history) goes to DIR/state/ as files named
after the epoch, then state.json (written atomically, last) points at them; older
files are removed only after that. A kill at any instant leaves state.json naming
a complete set, so a run resumes from its last finished epoch, replays exactly the
same data order, and loses at most the epoch it was in.
"""

from __future__ import annotations

import json
import math
import pickle
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..attacks import AttackConfig
from ..checkpoint import check_values, save_checkpoint
from ..data import ImageData
from ..errors import HarpError
from ..evaluate import accuracy, make_attack
from ..io import atomic_save_tensors, atomic_torch_save, atomic_write_json, read_json
from ..values import is_int, is_number
from .batchnorm import recalibrate_batchnorm
from .distributed import DistContext, world_size
from .losses import LossConfig, adversarial_loss

STATE_DIR = "state"


@dataclass(frozen=True)
class RunConfig:
    epochs: int
    batch_size: int
    optimizer: str  # "sgd" or "adam"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    eps_warmup_epochs: float = 0.0  # linear ramp of the training eps (helps MNIST at eps=0.3)
    val_size: int = 1000  # examples of the validation split scored after each epoch
    select: str = "last"  # "last" epoch, or "best" validation robust accuracy among eligible epochs


class Job(ABC):
    """What an optimisation run trains; subclasses: training, pruning, fine-tuning."""

    kind: str
    model: nn.Module
    loss_cfg: LossConfig
    #: training examples replaced by adversarial ones so far (all ranks); restored on resume
    adversarial_examples: int = 0

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def loss(self, forward, x: torch.Tensor, y: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
        """The training objective of one batch: the adversarial loss unless a job defines its own (PwoA)."""
        if loss_cfg.kind != "none":
            self.adversarial_examples += len(x) * world_size()
        return adversarial_loss(self.model, forward, x, y, loss_cfg)

    def extra_loss(self, epoch: int) -> torch.Tensor | None:
        """A term added to the adversarial loss (HARP's compression term)."""
        return None

    def before_step(self) -> None:
        """Called between backward and the optimiser step (gradients may be rescaled here)."""

    def after_step(self) -> None:
        """Called after each optimiser step."""

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        """Per-epoch bookkeeping; returns numbers for the log."""
        return {}

    def eligible(self) -> bool:
        """Whether the current model may become the selected checkpoint."""
        return True

    #: finalize() changes which weights are alive, so BatchNorm statistics are recomputed
    recalibrate_batchnorm: bool = False

    def state_json(self) -> dict[str, Any]:
        return {}

    def load_state_json(self, state: dict[str, Any]) -> None:
        pass

    @abstractmethod
    def finalize(self) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
        """The plain model to checkpoint, its masks, and extra metadata."""


class _MultiForward(nn.Module):
    """One forward call over several batches, so DDP sees one forward per backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return [self.model(x) for x in xs]


def train_step(job: Job, forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_cfg: LossConfig, epoch: int) -> torch.Tensor:
    """One optimiser step of `job` on a batch (its loss plus its extra loss, backward, the job's
    hooks around the step); returns the loss. `run_job` runs it per batch, harp.bench.epoch_cost times it."""
    loss = job.loss(forward, x, y, loss_cfg)
    extra = job.extra_loss(epoch)
    if extra is not None:
        loss = loss + extra
    if not torch.isfinite(loss):
        raise HarpError(f"{job.kind}: loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    job.before_step()
    opt.step()
    job.after_step()
    return loss


def make_optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise HarpError(f"unknown optimizer {cfg.optimizer!r} (choose from sgd, adam)")


def run_job(job: Job, cfg: RunConfig, train: ImageData, val: ImageData, test: ImageData, out: Path,
            meta: dict[str, Any], *, eval_attack: AttackConfig, device: torch.device,
            dist: DistContext, resume: bool = False, quiet: bool = False, augment: bool = False,
            finish_meta: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Optimise `job` for cfg.epochs and write the selected model as a checkpoint to `out`;
    `finish_meta(model, meta)` completes the checkpoint's meta from the final (CPU) model first."""
    model = job.model.to(device)
    forward = _MultiForward(model)
    if dist.enabled:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(cfg, job.parameter_groups())
    if cfg.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise HarpError("--batch-size 1: the model's BatchNorm layers need at least 2 examples per training batch")
    steps_per_epoch = train.num_batches(cfg.batch_size, dist.world_size, drop_single=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(1, cfg.epochs * steps_per_epoch),
        pct_start=0.15, anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    state_dir = out / STATE_DIR
    if dist.is_main:
        state_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    best = {"epoch": -1, "robust": -1.0}
    start_epoch, earlier_seconds = 0, 0.0
    if resume:
        start_epoch, history, best, earlier_seconds = _load_state(state_dir, job, opt, sched, cfg, meta, device,
                                                                  processes=dist.world_size)
    else:
        torch.manual_seed(cfg.seed)

    val_attack = make_attack("pgd", eval_attack)
    val_small = val.subset(cfg.val_size)
    t_run = time.perf_counter() - earlier_seconds  # wall time counts the interrupted sessions too
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        total_loss, seen = 0.0, 0
        batches = train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                rank=dist.rank, world_size=dist.world_size, augment=augment, drop_single=True)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{job.kind} {epoch + 1}/{cfg.epochs}",
                   disable=quiet or not dist.is_main, leave=False)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            loss_cfg = _ramped(job.loss_cfg, cfg, epoch + i / steps_per_epoch)
            loss = train_step(job, forward, opt, x, y, loss_cfg, epoch)
            sched.step()
            total_loss += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
        epoch_time = time.perf_counter() - t0
        dist.sync_buffers(model)
        info = job.epoch_end(epoch)
        nat = accuracy(model, val_small, device, dist_ctx=dist)
        rob = accuracy(model, val_small, device, attack=val_attack, dist_ctx=dist)
        record = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "epoch_seconds": round(epoch_time, 2),
                  "val_natural": nat, "val_robust": rob, "adversarial_examples": job.adversarial_examples, **info}
        history.append(record)
        if cfg.select == "best" and job.eligible() and rob >= best["robust"]:
            best = {"epoch": epoch + 1, "robust": rob}
            if dist.is_main:
                atomic_save_tensors(state_dir / f"best-{epoch + 1}.safetensors", job.model.state_dict())
        if dist.is_main:
            _save_state(state_dir, epoch + 1, job, opt, sched, cfg, history, best, meta,
                        wall_seconds=time.perf_counter() - t_run, processes=dist.world_size)
            if not quiet:
                print(_format_record(job.kind, cfg.epochs, record), flush=True)
        dist.barrier()

    if cfg.select == "best":
        if best["epoch"] < 0:
            raise HarpError(f"{job.kind}: no epoch met the target; raise --epochs or --gamma0 and run again "
                            f"with --force ({out} holds the finished epochs' state)")
        best_state = _load_tensors(state_dir / f"best-{best['epoch']}.safetensors", device)
        job.model.load_state_dict(best_state)
    final_model, masks, extra_meta = job.finalize()
    final_model = final_model.to(device)
    if job.recalibrate_batchnorm:
        recalibrate_batchnorm(final_model, train, device)
        dist.sync_buffers(final_model)
    # The test scores are harp eval's numbers: one process draws PGD's random starts over the whole set (ranks
    # scoring shards would each draw them from seed 0 for their own examples, and record another accuracy).
    natural, robust = 0.0, 0.0
    if dist.is_main:
        torch.manual_seed(0)  # PGD's random starts, as `harp eval` seeds them: its number, whatever training drew
        natural = accuracy(final_model, test, device, quiet=quiet, desc="test clean")
        robust = accuracy(final_model, test, device, attack=val_attack, quiet=quiet, desc="test pgd")
    natural, robust = dist.sum([natural, robust])  # the main rank's, on every rank
    metrics = {
        "natural_accuracy": natural,
        "robust_accuracy": robust,
        "robust_attack": {"name": "pgd", **asdict(eval_attack)},
        "test_examples": len(test),
        "epochs": cfg.epochs,
        "selected_epoch": best["epoch"] if cfg.select == "best" else cfg.epochs,
        "mean_epoch_seconds": _mean([h["epoch_seconds"] for h in history]),
        "adversarial_examples": job.adversarial_examples,
        "wall_seconds": round(time.perf_counter() - t_run, 1),
    }
    identical = dist.weights_identical(final_model)
    if dist.is_main:
        full_meta = {**meta, **extra_meta, "run": asdict(cfg), "metrics": metrics, "history": history}
        if dist.enabled:
            full_meta["distributed"] = {"world_size": dist.world_size, "weights_identical": identical}
        if finish_meta is not None:  # in the one write: a stop between two had left a complete-looking stage
            full_meta = finish_meta(final_model.cpu(), full_meta)
        save_checkpoint(out, final_model.cpu(), full_meta, masks)
    dist.barrier()
    return metrics


def _ramped(loss_cfg: LossConfig, cfg: RunConfig, progress: float) -> LossConfig:
    if cfg.eps_warmup_epochs <= 0 or progress >= cfg.eps_warmup_epochs:
        return loss_cfg
    frac = max(progress / cfg.eps_warmup_epochs, 0.05)
    atk = loss_cfg.attack
    return replace(loss_cfg, attack=replace(atk, eps=atk.eps * frac, step_size=atk.step_size * frac))


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 2) if xs else math.nan


def _format_record(kind: str, epochs: int, r: dict[str, Any]) -> str:
    shown = ("epoch", "loss", "epoch_seconds", "val_natural", "val_robust")
    extras = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in r.items() if k not in shown and not isinstance(v, dict))
    return (f"{kind} epoch {r['epoch']}/{epochs}  loss {r['loss']:.4f}  val natural {r['val_natural']:.2%}  "
            f"val pgd {r['val_robust']:.2%}  {r['epoch_seconds']:.1f}s {extras}").rstrip()


def _save_state(state_dir: Path, epoch: int, job: Job, opt, sched, cfg: RunConfig,
                history: list[dict[str, Any]], best: dict[str, Any], meta: dict[str, Any], *,
                wall_seconds: float, processes: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(state_dir / f"model-{epoch}.safetensors", job.model.state_dict())
    atomic_torch_save(state_dir / f"optim-{epoch}.pt", {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                        "rng": torch.get_rng_state()})
    # state.json last: it only names files that are already complete on disk
    atomic_write_json(state_dir / "state.json", {"epoch": epoch, "kind": job.kind, "meta": _run_identity(meta),
                                                 "run": asdict(cfg),
                                                 "job": job.state_json(), "history": history, "best": best,
                                                 "wall_seconds": round(wall_seconds, 1), "processes": processes})
    keep = {f"model-{epoch}.safetensors", f"optim-{epoch}.pt", f"best-{best['epoch']}.safetensors", "state.json"}
    for f in state_dir.iterdir():  # and the temporary file of a write a SIGKILL cut short (`atomic_writer`)
        if f.name not in keep and (not f.name.startswith(".") or f.name.endswith(".tmp")):
            f.unlink(missing_ok=True)


def _load_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:  # missing or damaged saved state (state.json names the files)
        raise HarpError(f"saved weights {path} are missing or unreadable ({e})") from e
    check_values(path, state)  # as a checkpoint's: a negative variance had trained on to a wrong result
    return {k: v.to(device) for k, v in state.items()}


# The per-parameter state each optimizer of `make_optimizer` writes (Adam's max_exp_avg_sq: amsgrad only)
_STATE_KEYS = {torch.optim.Adam: {"step", "exp_avg", "exp_avg_sq"}, torch.optim.SGD: {"momentum_buffer"}}


def _check_optimizer_state(opt: torch.optim.Optimizer, before: list[dict[str, Any]]) -> None:
    """ValueError for a loaded optimizer state no run writes, which torch takes as it is and fails on (or
    trains with) mid-epoch: a setting that is no longer a number, a missing or foreign moment, one of
    another shape, NaN, a negative second moment or step count."""
    for group, old in zip(opt.param_groups, before, strict=True):
        for key, value in old.items():
            numbers = value if isinstance(value, tuple) else (value,)
            loaded = group.get(key)
            loaded = loaded if isinstance(loaded, tuple | list) else (loaded,)
            if all(is_number(v) for v in numbers) and not (len(loaded) == len(numbers)
                                                          and all(is_number(v) for v in loaded)):
                raise ValueError(f"optimizer setting {key!r} is {group.get(key)!r}, not a number")
        for param in group["params"]:
            state = opt.state.get(param, {})
            expected = _STATE_KEYS.get(type(opt), set(state))
            if state and set(state) != expected:
                raise ValueError(f"optimizer state keys {sorted(state)} are not {sorted(expected)}")
            for key, value in state.items():
                _check_moment(key, value, param)


def _check_moment(key: str, value: Any, param: torch.Tensor) -> None:
    """ValueError unless `value` is what the optimizer keeps as `key` for `param`."""
    if value is None and key == "momentum_buffer":  # SGD without momentum keeps none
        return
    if not torch.is_tensor(value):
        raise ValueError(f"optimizer state {key!r} is a {type(value).__name__}, not a tensor")
    if key == "step":
        if value.dim() != 0 or not (torch.isfinite(value) and value >= 0):
            raise ValueError(f"optimizer state 'step' is {value.tolist()}, not a step count")
        return
    if key == "exp_avg_sq" and (value < 0).any():  # its square root divides the step
        raise ValueError(f"optimizer state {key!r} holds negative second moments")
    if value.shape != param.shape:
        raise ValueError(f"optimizer state {key!r} has shape {list(value.shape)}, its parameter {list(param.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"optimizer state {key!r} holds NaN or infinite values")


def _load_optimizer_state(path: Path, device: torch.device) -> dict[str, Any]:
    """optim-N.pt as harp wrote it: tensors and plain containers only (torch's weights_only unpickler)."""
    try:
        with warnings.catch_warnings():  # its note on pickle protocols is noise next to the error below
            warnings.simplefilter("ignore", UserWarning)
            extra = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, EOFError) as e:
        raise HarpError(f"--resume: {path} is not an optimizer state written by harp (not unpickled: "
                        f"torch.load with weights_only=True refused it)") from e
    if not isinstance(extra, dict):
        raise HarpError(f"--resume: {path} is not an optimizer state written by harp")
    return extra


def read_run_state(state_dir: Path) -> dict[str, Any]:
    """DIR/state/state.json of an interrupted run, checked for every field --resume reads; HarpError otherwise."""
    path = state_dir / "state.json"
    try:
        state = read_json(path)
    except FileNotFoundError:
        raise HarpError(f"--resume: no saved state in {state_dir} (nothing to resume)") from None
    except (OSError, ValueError) as e:
        raise HarpError(f"--resume: {path} is corrupted ({e})") from e
    problem = _state_problem(state)
    if problem:
        raise HarpError(f"--resume: {path} is corrupted ({problem})")
    return state


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    for key, kind, name in (("kind", str, "string"), ("meta", dict, "object"), ("run", dict, "object"),
                            ("job", dict, "object"), ("history", list, "array"), ("best", dict, "object")):
        if not isinstance(state.get(key), kind):
            return f"{key!r} is missing or not a JSON {name}"
    epoch, history = state.get("epoch"), state["history"]
    if not is_int(epoch) or len(history) != epoch:  # one record per finished epoch
        return f"'epoch' {epoch!r} does not count the {len(history)} records of 'history'"
    counted = 0
    for i, record in enumerate(history):  # copied into the finished checkpoint's meta.json as they are
        problem = _record_problem(record, i + 1, counted)
        if problem:
            return f"'history' record {i + 1} {problem}"
        counted = record["adversarial_examples"]
    best = state["best"]
    if not (is_int(best.get("epoch")) and (best["epoch"] == -1 or 1 <= best["epoch"] <= epoch)
            and is_number(best.get("robust")) and -1 <= best["robust"] <= 1):
        return "'best' is not an epoch run so far and its robust accuracy"
    if best["epoch"] > 0 and best["robust"] != history[best["epoch"] - 1]["val_robust"]:  # later epochs beat it
        return f"'best' robust accuracy {best['robust']} is not its epoch's val_robust"
    return None


def _record_problem(record: Any, epoch: int, counted_before: int) -> str | None:
    """What is wrong with one epoch's history record, None if nothing: the fields `run_job` writes."""
    if not isinstance(record, dict) or record.get("epoch") != epoch or not is_int(record["epoch"]):
        return f"does not say epoch {epoch}"
    if not (is_number(record.get("epoch_seconds")) and record["epoch_seconds"] >= 0):
        return "lacks a non-negative epoch_seconds"
    if not (is_int(record.get("adversarial_examples")) and record["adversarial_examples"] >= counted_before):
        return "lacks a count of adversarial_examples that never falls"
    if not (isinstance(record.get("loss"), int | float) and not isinstance(record["loss"], bool)):
        return "lacks a numeric loss"  # NaN and inf are kept: a diverged loss is what happened
    if not all(is_number(record.get(k)) and 0 <= record[k] <= 1 for k in ("val_natural", "val_robust")):
        return "lacks val_natural and val_robust fractions"
    return None


# Options a resumed run may change (where the data is, which device runs it), and raw options whose
# resolved values the comparison reads instead (run, training.attack): --eps 0.2 equals the default.
RESUME_SETTINGS = ("data_root", "download", "device",
                   "epochs", "batch_size", "lr", "optimizer", "seed", "eps", "steps", "step_size")


def _run_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the saved one: the checkpoint meta it started with (model,
    dataset, source checkpoint, options, pruning config), as JSON, less RESUME_SETTINGS."""
    identity = {k: v for k, v in meta.items() if k not in ("format", "version", "versions", "files")}
    for stage in ("training", "prune", "finetune"):  # this stage's options, and the earlier stages'
        if isinstance(identity.get(stage), dict):
            identity[stage] = {k: v for k, v in identity[stage].items() if k not in RESUME_SETTINGS}
    if isinstance(identity.get("source"), dict):  # the same checkpoint by its hash, however its path is spelt
        identity["source"] = {k: v for k, v in identity["source"].items() if k != "path"}
    return json.loads(json.dumps(identity))  # tuples as lists, as state.json holds them


# RunConfig settings no option sets: they follow from the dataset, the method or another option
_DERIVED = {"run.weight_decay", "run.momentum", "run.eps_warmup_epochs", "run.val_size", "run.select"}


def _changes(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """'key saved (now new)' for every leaf that differs between two JSON objects."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [change for key in dict.fromkeys([*saved, *now])
                for change in _changes(saved.get(key), now.get(key), f"{prefix}{key}.")]
    return [] if saved == now else [f"{prefix[:-1]} {saved!r} (now {now!r})"]


def _load_state(state_dir: Path, job: Job, opt, sched, cfg: RunConfig, meta: dict[str, Any], device: torch.device,
                *, processes: int):
    state = read_run_state(state_dir)
    if state.get("kind") != job.kind:
        raise HarpError(f"--resume: {state_dir.parent} holds a {state.get('kind')!r} run, not {job.kind!r}")
    saved_meta = state["meta"] if "training" in state["meta"] else {}  # states of older harp: run options only
    saved = {"run": state["run"], **saved_meta}
    now = {"run": json.loads(json.dumps(asdict(cfg))), **(_run_identity(meta) if saved_meta else {})}
    if "processes" in state:  # torchrun's process count: each takes its share of a step's batches
        saved["processes"], now["processes"] = state["processes"], processes
    changed = _changes(saved, now)
    # settings that follow from the options (the eps ramp follows --adv): named only where no option differs
    changed = [c for c in changed if c.split(" ")[0] not in _DERIVED] or changed
    if changed:  # a resumed run would mix two runs' settings and record only the new ones
        raise HarpError(f"--resume: {state_dir.parent} was started with {'; '.join(changed[:4])}"
                        f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''}; pass the same options, or "
                        "--force to start over")
    history, epoch = state["history"], state["epoch"]
    job.adversarial_examples = history[-1]["adversarial_examples"] if history else 0
    try:
        job.load_state_json(state["job"])  # after the count above: a job may keep its own (PwoA)
        model_state = _load_tensors(state_dir / f"model-{epoch}.safetensors", device)
        job.model.load_state_dict(model_state, strict=True)
        extra = _load_optimizer_state(state_dir / f"optim-{epoch}.pt", device)
        before = [dict(group) for group in opt.param_groups]
        opt.load_state_dict(extra["optimizer"])
        _check_optimizer_state(opt, before)
        steps = extra["scheduler"]["total_steps"]
        if steps != sched.total_steps:  # its last epochs would overrun the schedule or cut its anneal short
            raise HarpError(f"--resume: {state_dir.parent} was started with a schedule of {steps} steps, this "
                            f"run has {sched.total_steps} (other data or process count); pass the same options, "
                            "or --force to start over")
        sched.load_state_dict(extra["scheduler"])
        if sched.last_epoch != epoch * (sched.total_steps // max(cfg.epochs, 1)):
            raise ValueError(f"optim-{epoch}.pt has taken {sched.last_epoch} scheduler steps, not the "
                             f"{epoch} epochs state.json records")
        torch.set_rng_state(extra["rng"].cpu())
    except (RuntimeError, OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HarpError(f"--resume: saved state in {state_dir} does not fit this run "
                        f"(architecture or method mismatch?): {first}") from e
    # states of older harp lack the wall time: their epochs' own time is the closest to it
    wall = state.get("wall_seconds")
    earlier = float(wall) if is_number(wall) and wall >= 0 \
        else sum(h["epoch_seconds"] for h in history)
    return epoch, history, state["best"], earlier
