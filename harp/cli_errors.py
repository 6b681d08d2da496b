"""One-line user errors for the `harp` and `harp-bench` commands (torch-free).

Kept apart from harp.cli, which imports every command and through them torch, so
that `harp-bench latency` on a device with only numpy, numba and onnxruntime maps
bad input to the same one line and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

import click

from .errors import HarpError


def user_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean bad input, not a bug in harp."""
    errors: list[type[Exception]] = [HarpError]
    for module, name in (("harp.export.graph", "GraphError"), ("harp.export.bundle", "BundleError"),
                         ("harp.export.errors", "ExportError"), ("harp.export.csr", "CSRError"),
                         ("harp.kernels.threads", "WaitPolicyError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_cli(group: click.Group, args: list[str] | None = None, prog: str = "harp") -> int:
    """Invoke a click group; user errors become one line on stderr and exit status 2."""
    return run_script(lambda: group.main(args=args, prog_name=prog, standalone_mode=False), prog)


def run_script(main: Callable[[], object], prog: str) -> int:
    """Run a command's main (a click group's, or an argparse benchmark script's); user errors become one
    line on stderr and exit status 2."""
    try:
        main()
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


class ScriptArgumentParser(argparse.ArgumentParser):
    """argparse for the benchmark scripts: a bad option is a HarpError, so `run_script` prints it as one line."""

    def error(self, message: str) -> NoReturn:
        raise HarpError(message)
