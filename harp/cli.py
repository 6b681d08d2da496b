"""The `harp` command: a thin click layer over typed Python functions.

Commands live one per file in harp/commands/ and are registered in COMMANDS below;
each module is imported only when its command runs (`lazy_group`), so `harp run`
starts without torch and works on a device with only numpy, numba and click.
Bad input raises HarpError (or a validation error of the export/bundle layers);
main() prints it as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import sys

import click

from .cli_errors import exit_without_collecting, run_cli
from .lazy_group import LazyGroup

# name -> (module, click command in it), in the order of the workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("harp.commands.train", "train_command"),
    "prune": ("harp.commands.prune", "prune_command"),
    "finetune": ("harp.commands.prune", "finetune_command"),
    "pipeline": ("harp.commands.pipeline", "pipeline_command"),
    "eval": ("harp.commands.eval", "eval_command"),
    "info": ("harp.commands.info", "info_command"),
    "export": ("harp.commands.export", "export_command"),
    "verify": ("harp.commands.verify", "verify_command"),
    "run": ("harp.commands.run", "run_command"),
}


@click.group(cls=LazyGroup, commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harp")
def cli() -> None:
    """harp: prune robust image classifiers to 99%+ sparsity and ship them to edge runtimes."""


def main() -> None:
    code = run_cli(cli)
    exit_without_collecting()
    sys.exit(code)
