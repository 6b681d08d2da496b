"""`harp pipeline`: train -> prune -> finetune -> eval -> export with per-dataset defaults."""

import click

from ..pipeline import PipelineOptions, run_pipeline
from ..pruning.layers import GRANULARITIES
from ..pruning.methods import METHODS
from ..training.losses import LOSSES
from . import options as o


@click.command("pipeline")
@click.option("--dataset", default="digits", show_default=True)
@click.option("--arch", default=None)
@click.option("--method", type=click.Choice(list(METHODS)), default="harp", show_default=True)
@click.option("--sparsity", type=o.FINITE, default=0.99, show_default=True)
@click.option("--granularity", type=click.Choice(list(GRANULARITIES)), default="weight", show_default=True)
@click.option("--adv", type=click.Choice(list(LOSSES)), default="pgd", show_default=True)
@click.option("--train-epochs", type=o.AT_LEAST_ONE, default=None)
@click.option("--prune-epochs", type=o.AT_LEAST_ONE, default=None)
@click.option("--finetune-epochs", type=o.AT_LEAST_ONE, default=None)
@click.option("--no-export", "export", is_flag=True, flag_value=False, default=True, help="Stop after evaluation.")
@click.option("--out", required=True, type=click.Path())
@o.seed
@o.subset
@o.data_root
@o.download
@o.device
@o.force
@o.quiet
def pipeline_command(out, force, quiet, **kw):
    """Run the whole job; stages already finished in --out are reused."""
    results = run_pipeline(PipelineOptions(**kw), out, force=force, quiet=quiet, log=click.echo)
    click.echo(f"\n{'stage':<10} {'natural':>8} {'PGD':>8}")
    for stage in ("dense", "pruned", "finetuned"):
        m = results[stage]
        click.echo(f"{stage:<10} {m['natural_accuracy']:>8.2%} {m['robust_accuracy']:>8.2%}")
    art = results.get("artifact")
    if art:
        click.echo(f"artifact: {out}/artifact")
