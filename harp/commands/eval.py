"""`harp eval`: clean and adversarial accuracy of a checkpoint on its test set."""

import click

from ..evaluate import EVAL_ATTACKS, evaluate_checkpoint
from ..values import json_text
from . import options as o


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--attack", type=click.Choice(list(EVAL_ATTACKS)), default="pgd", show_default=True,
              help="Attack behind robust_accuracy; 'all' also reports FGSM and PGD-L2.")
@o.eps
@o.steps
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True,
              help="PGD runs from random starts.")
@click.option("--n", "n", type=o.AT_LEAST_ONE, default=None, help="Evaluate on the first N test examples.")
@o.data_root
@o.download
@o.device
@o.as_json
@o.quiet
def eval_command(checkpoint, as_json, **kw):
    """Natural and robust accuracy (PGD at the dataset's default budget unless overridden)."""
    result = evaluate_checkpoint(checkpoint, **kw)
    if as_json:
        click.echo(json_text(result))
        return
    click.echo(f"{result['architecture']} on {result['dataset']} ({result['n']} test examples), "
               f"sparsity {result['sparsity']:.2%}")
    click.echo(f"  natural accuracy   {result['natural_accuracy']:.2%}")
    for name, r in result["attacks"].items():
        click.echo(f"  {name:<18} {r['accuracy']:.2%}  (eps={r['eps']:.4g}, steps={r['steps']}, "
                   f"restarts={r['restarts']})")
