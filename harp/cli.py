"""The `harp` command: a thin click layer over typed Python functions.

Commands live one per file in harp/commands/ and are registered in COMMANDS below.
Bad input raises HarpError (or a validation error of the export/bundle layers);
main() prints it as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import sys

import click

from .commands.eval import eval_command
from .commands.export import export_command
from .commands.info import info_command
from .commands.pipeline import pipeline_command
from .commands.prune import finetune_command, prune_command
from .commands.run import run_command
from .commands.train import train_command
from .commands.verify import verify_command
from .cli_errors import run_cli

COMMANDS = [train_command, prune_command, finetune_command, pipeline_command, eval_command, info_command, export_command,
            verify_command, run_command]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harp")
def cli() -> None:
    """harp: prune robust image classifiers to 99%+ sparsity and ship them to edge runtimes."""


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    sys.exit(run_cli(cli))
