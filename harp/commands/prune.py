"""`harp prune` and `harp finetune`: the pruning stages of the pipeline."""

import click

from ..pruning.finetune import finetune_checkpoint
from ..pruning.layers import GRANULARITIES
from ..pruning.methods import METHODS, PruneOptions, make_config, prune_checkpoint
from ..pruning.rates import RATE_INITS
from . import options as o

_stage_options = [o.epochs, o.adv, o.eps, o.steps, o.lr, o.batch_size, o.seed, o.data_root, o.download, o.device,
                  o.subset, o.resume, o.force, o.quiet]


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


def _report(metrics, out):
    click.echo(f"natural accuracy {metrics['natural_accuracy']:.2%}  PGD accuracy {metrics['robust_accuracy']:.2%}"
               f"  -> {out}")


@click.command("prune")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Pruned checkpoint directory to create.")
@click.option("--method", type=click.Choice(list(METHODS)), default="harp", show_default=True)
@click.option("--sparsity", type=float, default=0.99, show_default=True,
              help="Fraction of weights removed (channel granularity: fraction of FLOPs removed).")
@click.option("--granularity", type=click.Choice(list(GRANULARITIES)), default="weight", show_default=True)
@click.option("--gamma0", type=float, default=None, help="HARP: step of the compression weight (default 0.1).")
@click.option("--alpha", type=float, default=None, help="HARP: a_min = alpha * target density (default 0.1).")
@click.option("--rate-init", type=click.Choice(list(RATE_INITS)), default=None, help="HARP: initial rates.")
@click.option("--rate-lr", type=float, default=None, help="HARP: learning rate of the per-layer rates.")
@_with(_stage_options)
def prune_command(checkpoint, out, method, sparsity, granularity, gamma0, alpha, rate_init, rate_lr,
                  resume, force, quiet, **kw):
    """Prune a dense checkpoint to a target sparsity (HARP by default)."""
    config = make_config(method, sparsity=sparsity, granularity=granularity, gamma0=gamma0, alpha=alpha,
                         rate_init=rate_init)
    metrics = prune_checkpoint(checkpoint, out, config, PruneOptions(rate_lr=rate_lr, **kw),
                               resume=resume, force=force, quiet=quiet)
    _report(metrics, out)


@click.command("finetune")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Fine-tuned checkpoint directory to create.")
@_with(_stage_options)
def finetune_command(checkpoint, out, resume, force, quiet, **kw):
    """Adversarially fine-tune the weights of a pruned checkpoint; its masks stay fixed."""
    metrics = finetune_checkpoint(checkpoint, out, PruneOptions(**kw), resume=resume, force=force, quiet=quiet)
    _report(metrics, out)
