"""`harp prune` and `harp finetune`: the pruning stages of the pipeline."""

import click

from ..pruning.finetune import finetune_checkpoint
from ..pruning.layers import GRANULARITIES
from ..pruning.methods import METHODS, PruneOptions, make_config, prune_checkpoint, unread_stage_options
from ..pruning.mrpf import ALLOCATIONS, SENSITIVITIES
from ..pruning.pwoa import PROJECTIONS
from ..pruning.rates import RATE_INITS
from . import options as o
from . import training_options as t

_stage_options = [o.epochs, t.adv, o.eps, o.steps, o.lr, o.batch_size, o.seed, o.data_root, o.download, o.device,
                  o.subset, o.resume, o.force, o.quiet]


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


_pwoa_options = [
    click.option("--distill-temperature", type=o.FINITE, default=None, help="PwoA: distillation temperature T."),
    click.option("--lambda-x", type=o.FINITE, default=None, help="PwoA: weight of HSIC(X, Z) (minimised)."),
    click.option("--lambda-y", type=o.FINITE, default=None, help="PwoA: weight of HSIC(Y, Z) (maximised)."),
    click.option("--rho", type=o.FINITE, default=None, help="PwoA: initial ADMM penalty."),
    click.option("--mix-ratio", type=o.FINITE, default=None, help="PwoA: share of batches made PGD (default 0)."),
    click.option("--admm-epochs", type=int, default=None, help="PwoA: epochs of the ADMM phase."),
    click.option("--retrain-epochs", type=int, default=None, help="PwoA: epochs of masked retraining."),
    click.option("--hsic-sigma", type=o.FINITE, default=None, help="PwoA: fixed kernel width (default: median)."),
    click.option("--projection", type=click.Choice(list(PROJECTIONS)), default=None,
                 help="PwoA: ADMM projection per layer (default) or global."),
]
_mrpf_options = [
    click.option("--sensitivity", type=click.Choice(list(SENSITIVITIES)), default=None,
                 help="MRPF: perturb each layer by pruning it (default) or by Gaussian noise."),
    click.option("--temperature", type=o.FINITE, default=None,
                 help="MRPF: allocation proportional to sensitivity ** temperature (default 1)."),
    click.option("--allocation", type=click.Choice(list(ALLOCATIONS)), default=None,
                 help="MRPF: sensitivity sets each layer's kept weights (count, default) or kept fraction (density)."),
    click.option("--noise-scale", type=o.FINITE, default=None, help="MRPF: noise std / weight std (default 0.5)."),
    click.option("--mrs-examples", type=int, default=None, help="MRPF: held-out examples measured (default 256)."),
]
_METHOD_KEYS = ("distill_temperature", "lambda_x", "lambda_y", "rho", "mix_ratio", "admm_epochs", "retrain_epochs",
                "hsic_sigma", "projection", "sensitivity", "temperature", "allocation", "noise_scale",
                "mrs_examples")


@click.command("prune")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Pruned checkpoint directory to create.")
@click.option("--method", type=click.Choice(list(METHODS)), default="harp", show_default=True)
@click.option("--sparsity", type=o.FINITE, default=0.99, show_default=True,
              help="Fraction of weights removed (channel granularity: fraction of FLOPs removed).")
@click.option("--granularity", type=click.Choice(list(GRANULARITIES)), default="weight", show_default=True)
@click.option("--gamma0", type=o.FINITE, default=None, help="HARP: step of the compression weight (default 0.1).")
@click.option("--alpha", type=o.FINITE, default=None, help="HARP: a_min = alpha * target density (default 0.1).")
@click.option("--rate-init", type=click.Choice(list(RATE_INITS)), default=None, help="HARP: initial rates.")
@click.option("--rate-lr", type=o.POSITIVE, default=None, help="HARP: learning rate of the per-layer rates.")
@_with(_pwoa_options + _mrpf_options)
@_with(_stage_options)
@click.pass_context
def prune_command(ctx, checkpoint, out, method, sparsity, granularity, gamma0, alpha, rate_init, rate_lr,
                  resume, force, quiet, **kw):
    """Prune a dense checkpoint to a target sparsity (HARP by default)."""
    # they had been recorded in meta.json as if a training loop had used them
    given = [f"--{name.replace('_', '-')}" for name in unread_stage_options(method)
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"--method {method} prunes in one shot, with no training loop: "
                               f"{', '.join(given)} would change nothing; drop them")
    method_kw = {name: kw.pop(name) for name in _METHOD_KEYS}
    config = make_config(method, sparsity=sparsity, granularity=granularity, gamma0=gamma0, alpha=alpha,
                         rate_init=rate_init, rate_lr=rate_lr, seed=kw["seed"], **method_kw)
    metrics = prune_checkpoint(checkpoint, out, config, PruneOptions(**kw),
                               resume=resume, force=force, quiet=quiet)
    o.echo_accuracies(metrics, out, quiet)


@click.command("finetune")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Fine-tuned checkpoint directory to create.")
@_with(_stage_options)
def finetune_command(checkpoint, out, resume, force, quiet, **kw):
    """Adversarially fine-tune the weights of a pruned checkpoint; its masks stay fixed."""
    metrics = finetune_checkpoint(checkpoint, out, PruneOptions(**kw), resume=resume, force=force, quiet=quiet)
    o.echo_accuracies(metrics, out, quiet)
