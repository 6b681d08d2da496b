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
from .errors import HarpError

COMMANDS = [train_command, prune_command, finetune_command, pipeline_command, eval_command, info_command, export_command,
            verify_command, run_command]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harp")
def cli() -> None:
    """harp: prune robust image classifiers to 99%+ sparsity and ship them to edge runtimes."""


for _command in COMMANDS:
    cli.add_command(_command)


def user_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean bad input, not a bug in harp."""
    errors: list[type[Exception]] = [HarpError]
    for module, name in (("harp.export.graph", "GraphError"), ("harp.export.bundle", "BundleError"),
                         ("harp.export.errors", "ExportError"), ("harp.export.csr", "CSRError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_cli(group: click.Group, args: list[str] | None = None, prog: str = "harp") -> int:
    """Invoke a click group; user errors become one line on stderr and exit status 2."""
    try:
        group.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()}", err=True)
        return 2
    except user_errors() as e:
        click.echo(f"{prog}: error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        return 130
    return 0


def main() -> None:
    sys.exit(run_cli(cli))
