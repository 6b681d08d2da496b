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

from .cli_errors import exit_without_collecting, print_warnings_as_one_line, run_cli
from .lazy_group import LazyCommand, LazyGroup

# In the order of the workflow; each summary is the first line of its command's help.
TORCH = ("torch",)
COMMANDS: dict[str, LazyCommand] = {
    "train": LazyCommand("harp.commands.train", "train_command",
                         "Train a model (adversarially by default) and write a checkpoint directory.", TORCH),
    "prune": LazyCommand("harp.commands.prune", "prune_command",
                         "Prune a dense checkpoint to a target sparsity (HARP by default).", TORCH),
    "finetune": LazyCommand("harp.commands.prune", "finetune_command",
                            "Adversarially fine-tune the weights of a pruned checkpoint; its masks stay fixed.", TORCH),
    "pipeline": LazyCommand("harp.commands.pipeline", "pipeline_command",
                            "Run the whole job; stages already finished in --out are reused.", TORCH),
    "eval": LazyCommand("harp.commands.eval", "eval_command",
                        "Natural and robust accuracy (PGD at the dataset's default budget unless overridden).", TORCH),
    "info": LazyCommand("harp.commands.info", "info_command",
                        "Architecture, dataset, sparsity and per-layer densities of a checkpoint or an exported "
                        "artifact."),
    "export": LazyCommand("harp.commands.export", "export_command",
                          "Export CHECKPOINT to --out and check every format against the torch model's logits.",
                          ("torch", "onnx")),
    "verify": LazyCommand("harp.commands.verify", "verify_command",
                          "Check DIRECTORY's file hashes and re-run every format on the stored parity inputs."),
    "run": LazyCommand("harp.commands.run", "run_command",
                       "Run an exported model (artifact dir or model.harpz) on a batch with the numba runtime."),
}


@click.group(cls=LazyGroup, commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harp")
def cli() -> None:
    """harp: prune robust image classifiers to 99%+ sparsity and ship them to edge runtimes."""


def main() -> None:
    print_warnings_as_one_line("harp")
    code = run_cli(cli)
    exit_without_collecting()
    sys.exit(code)
