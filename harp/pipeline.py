"""The whole job: train -> prune -> finetune -> eval -> export, one folder per stage.

    OUT/dense/      adversarially trained model
    OUT/pruned/     pruned checkpoint (masks learned or computed)
    OUT/finetuned/  fine-tuned pruned checkpoint
    OUT/artifact/   exported ONNX + CSR bundle + manifest (when harp.export is available)

Each stage that already finished (its checkpoint loads) is skipped, so re-running
the pipeline after an interruption continues where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .data import dataset_spec
from .errors import HarpError
from .export.trace import export_problem
from .io import atomic_write_json
from .models import build_model, check_model_runs, default_arch
from .outdir import check_out_dir, make_out_dir
from .pruning.finetune import finetune_checkpoint
from .pruning.methods import PruneOptions, make_config, prune_checkpoint
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
    if opts.export:
        _check_exportable(opts)
    config = make_config(opts.method, sparsity=opts.sparsity, granularity=opts.granularity)
    if force:
        check_out_dir(out, force=True, resume=False)
        make_out_dir(out, force=True, resume=False)
    out.mkdir(parents=True, exist_ok=True)
    # marks the directory as a pipeline's (so a later --force may clear it) and records the run
    atomic_write_json(out / PIPELINE_FILE, {"options": asdict(opts), "results": None})
    stage_opts = PruneOptions(adv=opts.adv, seed=opts.seed, data_root=opts.data_root, download=opts.download,
                              device=opts.device)
    results: dict[str, Any] = {}
    dense, pruned, tuned = out / "dense", out / "pruned", out / "finetuned"
    if not stage_done(dense):
        log(f"[1/4] adversarial training ({opts.adv}) on {opts.dataset} -> {dense}")
        train(TrainOptions(dataset=opts.dataset, arch=opts.arch, adv=opts.adv, epochs=opts.train_epochs,
                           seed=opts.seed, data_root=opts.data_root, download=opts.download, device=opts.device),
              dense, force=dense.exists(), quiet=quiet)
    results["dense"] = load_checkpoint(dense).meta["metrics"]
    if not stage_done(pruned):
        log(f"[2/4] pruning with {opts.method} to {opts.sparsity:.2%} {opts.granularity} sparsity -> {pruned}")
        prune_checkpoint(dense, pruned, config, replace(stage_opts, epochs=opts.prune_epochs),
                         force=pruned.exists(), quiet=quiet)
    results["pruned"] = load_checkpoint(pruned).meta["metrics"]
    if not stage_done(tuned):
        log(f"[3/4] adversarial fine-tuning -> {tuned}")
        finetune_checkpoint(pruned, tuned, replace(stage_opts, epochs=opts.finetune_epochs),
                            force=tuned.exists(), quiet=quiet)
    results["finetuned"] = load_checkpoint(tuned).meta["metrics"]
    if opts.export:
        results["artifact"] = _export(tuned, out / "artifact", opts, log)
    atomic_write_json(out / PIPELINE_FILE, {"options": asdict(opts), "results": {
        k: v for k, v in results.items() if k != "artifact"}})
    return results


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
