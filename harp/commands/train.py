"""`harp train`: adversarial training of a dense model."""

import click

from ..training.train import TrainOptions, train
from . import options as o
from . import training_options as t


@click.command("train")
@click.option("--dataset", default="digits", show_default=True,
              help="digits, mnist, fashion-mnist, cifar10, cifar100, svhn or imagefolder:PATH.")
@click.option("--arch", default=None, help="small_cnn, vgg16_bn, resnet18, wrn-28-4, mobilenet_v2, torchvision:NAME.")
@click.option("--out", required=True, type=click.Path(), help="Checkpoint directory to create.")
@t.adv
@o.eps
@o.steps
@o.step_size
@t.norm
@click.option("--beta", type=o.NON_NEGATIVE, default=None, help="TRADES/MART trade-off (defaults 6 / 5).")
@o.epochs
@o.batch_size
@o.lr
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None, help="Default: per dataset.")
@o.seed
@o.data_root
@o.download
@o.device
@o.subset
@o.resume
@o.force
@o.quiet
def train_command(out, resume, force, quiet, **kw):
    """Train a model (adversarially by default) and write a checkpoint directory."""
    metrics = train(TrainOptions(**kw), out, resume=resume, force=force, quiet=quiet)
    o.echo_accuracies(metrics, out, quiet)
