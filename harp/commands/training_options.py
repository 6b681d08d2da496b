"""Click options of the training commands that list harp's adversarial losses and attack norms (import torch)."""

import click

from ..attacks import NORMS
from ..training.losses import LOSSES

adv = click.option("--adv", type=click.Choice(list(LOSSES)), default="pgd", show_default=True,
                   help="Adversarial loss: PGD-AT, TRADES, MART, or none (natural training).")
norm = click.option("--norm", type=click.Choice(list(NORMS)), default="linf", show_default=True)
