"""Click options shared by several commands (one definition each).

Torch-free, so that `harp verify` runs on a device; the options that list losses
and attack norms import torch and live in `training_options`.
"""

import math
from typing import Any

import click

from ..values import FLOAT32_MAX, json_text


class FiniteFloat(click.FloatRange):
    """A float option that also refuses nan and inf, which pass every range check (they compare False),
    and magnitudes beyond float32's, which torch refuses mid-run (`--lr 1e308` had been a traceback)."""

    name = "float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        if abs(value) > FLOAT32_MAX:
            self.fail(f"{value:g} is beyond float32's range (3.4e38)", param, ctx)
        return value

    def _describe_range(self) -> str:
        """No range in --help where there is none (click would show `x<=None`)."""
        return "" if self.min is None and self.max is None else super()._describe_range()


FINITE = FiniteFloat()
NON_NEGATIVE = FiniteFloat(min=0)
POSITIVE = FiniteFloat(min=0, min_open=True)
AT_LEAST_ONE = click.IntRange(min=1)

quiet = click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
device = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
data_root = click.option("--data-root", default="data", show_default=True,
                         help="Folder holding torchvision datasets (MNIST: ../shared/data).")
download = click.option("--download", is_flag=True, help="Let torchvision download the dataset into --data-root.")
SEED = click.IntRange(0, 2**63 - 1)  # what torch.manual_seed takes
seed = click.option("--seed", type=SEED, default=0, show_default=True)
force = click.option("--force", is_flag=True, help="Overwrite an existing output directory written by harp.")
resume = click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last epoch.")
as_json = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
epochs = click.option("--epochs", type=AT_LEAST_ONE, default=None, help="Default: per dataset (see README).")
eps = click.option("--eps", type=NON_NEGATIVE, default=None, help="Attack budget in pixel space. Default: per dataset.")
steps = click.option("--steps", type=click.IntRange(min=0), default=None,
                     help="PGD steps. Default: per dataset.")
step_size = click.option("--step-size", type=NON_NEGATIVE, default=None, help="PGD step size. Default: 2.5*eps/steps.")
subset = click.option("--subset", type=AT_LEAST_ONE, default=None,
                      help="Use only the first N train/test examples (smoke runs).")
batch_size = click.option("--batch-size", type=click.IntRange(min=2), default=None,
                          help="Training batch size (BatchNorm needs 2 or more). Default: per dataset.")
lr = click.option("--lr", type=POSITIVE, default=None, help="Peak learning rate. Default: per dataset.")


def echo_accuracies(metrics: dict[str, Any], out: str, quiet: bool) -> None:
    """The closing line of train, prune and finetune: text, or under --quiet one JSON object."""
    if quiet:
        click.echo(json_text({k: metrics[k] for k in ("natural_accuracy", "robust_accuracy")}))
    else:
        click.echo(f"natural accuracy {metrics['natural_accuracy']:.2%}  "
                   f"PGD accuracy {metrics['robust_accuracy']:.2%}  -> {out}")


def split_formats(formats: str) -> list[str]:
    """The formats a comma-separated --formats value names ("onnx, csr" -> ["onnx", "csr"])."""
    return [f.strip() for f in formats.split(",") if f.strip()]
