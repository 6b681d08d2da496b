"""The whole job: train -> prune -> finetune -> eval -> export, one folder per stage.

    OUT/dense/      adversarially trained model
    OUT/pruned/     pruned checkpoint (masks learned or computed)
    OUT/finetuned/  fine-tuned pruned checkpoint
    OUT/artifact/   exported ONNX + CSR bundle + manifest (when harp.export is available)

Each stage that already finished (its checkpoint loads) is skipped, and a stage
that was interrupted resumes from its last finished epoch, so re-running the
pipeline after an interruption continues where it stopped. It continues only the
run --out holds: other options (what is trained, not where or on which device)
are refused rather than mixed in; --force starts over.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .data import dataset_spec
from .errors import HarpError
from .export.trace import export_problem
from .io import atomic_write_json, read_json
from .models import build_model, check_model_runs, default_arch
from .outdir import check_out_dir, make_out_dir, writing
from .pruning.finetune import finetune_checkpoint
from .pruning.methods import RESUMABLE, PruneOptions, make_config, prune_checkpoint, unread_stage_options
from .training.distributed import launched_processes
from .training.runner import STATE_DIR
from .training.train import TrainOptions, train


@dataclass(frozen=True)
class PipelineOptions:
    dataset: str = "digits"
    arch: str | None = None
    method: str = "harp"
    sparsity: float = 0.99
    granularity: str = "weight"
    adv: str = "pgd"
    train_epochs: int | None = None
    prune_epochs: int | None = None
    finetune_epochs: int | None = None
    seed: int = 0
    subset: int | None = None  # every stage on the first N train/test examples (a smoke run)
    data_root: str = "data"
    download: bool = False
    device: str = "auto"
    export: bool = True


PIPELINE_FILE = "pipeline.json"


def stage_done(path: Path) -> bool:
    """Whether a stage's checkpoint at `path` is complete (it loads), so a re-run can skip the stage."""
    try:
        load_checkpoint(path)
        return True
    except HarpError:
        return False


def run_pipeline(opts: PipelineOptions, out: str | Path, *, force: bool = False, quiet: bool = False,
                 log=print) -> dict[str, Any]:
    """Run every stage whose output is missing; returns {stage: metrics}."""
    out = Path(out)
    if opts.prune_epochs is not None and "epochs" in unread_stage_options(opts.method):  # recorded as if used
        raise HarpError(f"--method {opts.method} prunes in one shot: --prune-epochs would change nothing; drop it")
    if opts.export:
        _check_exportable(opts)
    config = make_config(opts.method, sparsity=opts.sparsity, granularity=opts.granularity, seed=opts.seed)
    if launched_processes() > 1:  # every rank would take the folder's lock and run every stage itself
        raise HarpError("harp pipeline runs in one process: run it without torchrun, or run train, prune "
                        "and finetune under torchrun one by one")
    with writing(out):  # one pipeline per folder at a time
        if force:
            check_out_dir(out, force=True, resume=False)
            make_out_dir(out, force=True, resume=False)
        else:
            check_continues(out, opts)
        existed = out.exists()
        fresh = not existed or not any(out.iterdir())
        out.mkdir(parents=True, exist_ok=True)
        # marks the directory as a pipeline's (so a later --force may clear it) and records the run
        atomic_write_json(out / PIPELINE_FILE, {"options": asdict(opts), "results": None})
        try:
            return _run_stages(opts, config, out, quiet, log)
        except BaseException:
            if fresh and [p.name for p in out.iterdir()] == [PIPELINE_FILE]:  # refused before any stage began
                (out / PIPELINE_FILE).unlink()  # (a bad --arch, missing data): a corrected run starts afresh
                if not existed:
                    out.rmdir()
            raise


def _run_stages(opts: PipelineOptions, config, out: Path, quiet: bool, log) -> dict[str, Any]:
    stage_opts = PruneOptions(adv=opts.adv, seed=opts.seed, data_root=opts.data_root, download=opts.download,
                              device=opts.device, subset=opts.subset)
    results: dict[str, Any] = {}
    dense, pruned, tuned = out / "dense", out / "pruned", out / "finetuned"
    if not stage_done(dense):
        resume = interrupted(dense)
        log(f"[1/4] adversarial training ({opts.adv}) on {opts.dataset} -> {dense}{_resuming(resume)}")
        train(TrainOptions(dataset=opts.dataset, arch=opts.arch, adv=opts.adv, epochs=opts.train_epochs,
                           seed=opts.seed, subset=opts.subset, data_root=opts.data_root, download=opts.download,
                           device=opts.device),
              dense, resume=resume, force=dense.exists() and not resume, quiet=quiet)
    results["dense"] = _stage_metrics(dense)
    if not stage_done(pruned):
        resume = interrupted(pruned) and opts.method in RESUMABLE
        log(f"[2/4] pruning with {opts.method} to {opts.sparsity:.2%} {opts.granularity} sparsity -> {pruned}"
            f"{_resuming(resume)}")
        prune_checkpoint(dense, pruned, config, replace(stage_opts, epochs=opts.prune_epochs),
                         resume=resume, force=pruned.exists() and not resume, quiet=quiet)
    results["pruned"] = _stage_metrics(pruned)
    if not stage_done(tuned):
        resume = interrupted(tuned)
        log(f"[3/4] adversarial fine-tuning -> {tuned}{_resuming(resume)}")
        finetune_checkpoint(pruned, tuned, replace(stage_opts, epochs=opts.finetune_epochs),
                            resume=resume, force=tuned.exists() and not resume, quiet=quiet)
    results["finetuned"] = _stage_metrics(tuned)
    if opts.export:
        results["artifact"] = _export(tuned, out / "artifact", opts, log)
    atomic_write_json(out / PIPELINE_FILE, {"options": asdict(opts), "results": {
        k: v for k, v in results.items() if k != "artifact"}})
    return results


def interrupted(stage: Path) -> bool:
    """Whether a stage's directory holds the saved state of an unfinished run (`--resume` continues it)."""
    return (stage / STATE_DIR / "state.json").is_file()


def _stage_metrics(stage: Path) -> dict[str, Any]:
    """The accuracies a finished stage recorded (the pipeline's table)."""
    metrics = load_checkpoint(stage).meta.get("metrics")
    if not isinstance(metrics, dict) or not all(k in metrics for k in ("natural_accuracy", "robust_accuracy")):
        raise HarpError(f"{stage}: its meta.json records no natural and robust accuracy (not a stage harp "
                        "pipeline ran?); --force runs the pipeline again")
    return metrics


def _resuming(resume: bool) -> str:
    return " (resuming the interrupted run)" if resume else ""


# Options that say where data and results live and what runs them, not what is trained: a run may
# continue with other values.
_SETTINGS = ("data_root", "download", "device", "export")


def check_continues(out: Path, opts: PipelineOptions) -> None:
    """HarpError unless `out` is new, empty, or a pipeline run made with the same options."""
    if out.exists() and not out.is_dir():
        raise HarpError(f"output {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    record = out / PIPELINE_FILE
    if not record.is_file():
        raise HarpError(f"{out} exists and is not a harp pipeline's output ({PIPELINE_FILE} is missing); "
                        "choose another --out")
    try:
        saved = read_json(record)["options"]
        if not isinstance(saved, dict):
            raise TypeError("options is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HarpError(f"{record} is not readable ({e}); pass --force to start over") from e
    defaults = asdict(PipelineOptions())  # a key an older harp did not record had its default value
    now = asdict(opts)
    before = {k: saved.get(k, defaults[k]) for k in now}
    changed = [k for k in now if k not in _SETTINGS and not _same(before[k], now[k])]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {_shown(before[k], now[k])} (now {_shown(now[k], before[k])})"
                        for k in changed)
        raise HarpError(f"{out} holds a run made with {was}; pass the same options to continue it, "
                        "or --force to start over")


def _same(saved: Any, now: Any) -> bool:
    """Equal and of one type: JSON keeps 0.9 a float and 0 an int, while `false == 0` in Python."""
    return type(saved) is type(now) and saved == now


def _shown(value: Any, other: Any) -> str:
    """An option's value as a user passes it; JSON-quoted where its type differs from `other`'s."""
    if value is None:
        return "default"
    return json.dumps(value) if type(value) is not type(other) and other is not None else str(value)


def _check_exportable(opts: PipelineOptions) -> None:
    """HarpError before any training when the last stage could not export the architecture."""
    spec = dataset_spec(opts.dataset)
    arch = opts.arch or default_arch(spec)
    model = build_model(arch, spec)
    check_model_runs(model, arch, spec)
    problem = export_problem(model, spec.input_shape)
    if problem:
        raise HarpError(f"harp cannot export --arch {arch}: {problem} (--no-export runs the other stages)")


def _export(ckpt: Path, dest: Path, opts: PipelineOptions, log) -> dict[str, Any] | None:
    try:
        from .export.exporter import export_checkpoint
    except ImportError:
        return None
    log(f"[4/4] export (ONNX, sparse ONNX, CSR bundle) with parity checks -> {dest}")
    return export_checkpoint(ckpt, dest, data_root=opts.data_root, force=True)
