"""Fine-tuning: train the weights of a pruned checkpoint under its fixed masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..errors import HarpError
from ..outdir import check_out_dir, make_out_dir, writing
from ..training.distributed import init_distributed, resolve_device, shutdown_distributed
from ..training.runner import RunConfig, run_job
from ..training.train import budget_for, eval_attack
from .jobs import FinetuneJob
from .layers import GRANULARITIES
from .methods import FINETUNE_DEFAULTS, PruneOptions, _loss, _source, load_stage_data, stage_budget, stage_options


def finetune_checkpoint(src: str | Path, out: str | Path, opts: PruneOptions = PruneOptions(), *,
                        resume: bool = False, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Adversarially fine-tune the weights of pruned checkpoint `src`; masks never change."""
    out = Path(out)
    ckpt = load_checkpoint(src)
    if not ckpt.masks or "pruning" not in ckpt.meta:
        raise HarpError(f"{src} is not a pruned checkpoint (no masks); run `harp prune` first")
    granularity = ckpt.meta["pruning"].get("granularity")
    if granularity not in GRANULARITIES:
        raise HarpError(f"{src}: meta.json field 'pruning.granularity' {granularity!r} is not one of "
                        f"{', '.join(GRANULARITIES)}")
    spec = ckpt.spec
    device = resolve_device(opts.device)
    loss = _loss(ckpt, opts)
    check_out_dir(out, force=force, resume=resume, source=src)
    budget = stage_budget(FINETUNE_DEFAULTS, spec.name)
    run = RunConfig(epochs=opts.epochs or budget.epochs, batch_size=opts.batch_size or budget_for(spec).batch_size,
                    optimizer=budget.optimizer, lr=opts.lr or budget.lr, seed=opts.seed,
                    weight_decay=budget_for(spec).weight_decay,
                    # a freshly pruned model is far from robust: ramp eps as in training
                    eps_warmup_epochs=budget_for(spec).eps_warmup_epochs if opts.adv != "none" else 0.0)
    model = ckpt.build_model()
    job = FinetuneJob(model, ckpt.masks, granularity, loss)
    data = load_stage_data(spec, opts)
    meta = {"architecture": ckpt.meta["architecture"], "dataset": ckpt.meta["dataset"],
            "training": ckpt.meta.get("training"), "source": _source(ckpt), "pruning": ckpt.meta["pruning"],
            "pruning_metrics": ckpt.meta.get("metrics"),
            "finetune": stage_options(spec, opts)}
    dist = init_distributed(device)
    try:
        with writing(out, hold=dist.is_main):
            if dist.is_main:
                make_out_dir(out, force=force, resume=resume)
            dist.barrier()
            return run_job(job, run, data.train, data.val, data.test, out, meta,
                           eval_attack=eval_attack(spec, opts.eps), device=device, dist=dist, resume=resume,
                           quiet=quiet, augment=spec.augment)
    finally:
        shutdown_distributed(dist)
