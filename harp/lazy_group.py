"""A click group that imports each command's module only when that command is asked for.

`harp run` and `harp-bench latency` must start fast and work on a device with only
numpy, numba and click (plus onnxruntime for the benchmark): importing every command
up front would import torch (2+ s here, and absent on such a device). So `--help` lists
the commands from their registry entries, and a command whose declared packages are not
installed becomes a placeholder: listed as unavailable, and one line on stderr with exit
status 2 when invoked. A package a module imports without declaring it ends the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import NamedTuple

import click
from click.utils import make_default_short_help

from .cli_errors import missing_package
from .errors import HarpError


class LazyCommand(NamedTuple):
    """Where a command lives, its one-line summary (the first line of its help) and the
    packages it cannot start without."""

    module: str
    attr: str
    summary: str
    needs: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """The packages in `needs` that are not installed, found without importing them."""
        return [package for package in self.needs if not is_installed(package)]


class LazyGroup(click.Group):
    """Commands from `commands`: name -> LazyCommand, listed in that order."""

    def __init__(self, *args, commands: dict[str, LazyCommand], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = self.lazy_commands.get(name)
        if entry is None:
            return None
        missing = entry.missing()
        if missing:
            return _unavailable(ctx, name, missing)
        try:
            return getattr(importlib.import_module(entry.module), entry.attr)
        except ModuleNotFoundError as e:
            package = missing_package(e)
            if package is None:
                raise
            return _unavailable(ctx, name, [package])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of --help, from the registry: importing each command would import torch."""
        limit = formatter.width - 6 - max(map(len, self.lazy_commands))
        rows = []
        for name, entry in self.lazy_commands.items():
            missing = entry.missing()
            summary = _unavailable_help(missing) if missing else make_default_short_help(entry.summary, limit)
            rows.append((name, summary))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def is_installed(package: str) -> bool:
    """Whether `package` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # an import hook that refuses the package
        return False
    except ValueError:  # imported already, without a spec
        return True


def _unavailable_help(missing: list[str]) -> str:
    return f"(unavailable here: needs {' and '.join(missing)})"


def _unavailable(ctx: click.Context, name: str, missing: list[str]) -> click.Command:
    """A command that takes any arguments and fails with one line: `missing` are not installed."""
    prog = ctx.find_root().info_name or "harp"
    packages = " and ".join(missing)
    verb = "is" if len(missing) == 1 else "are"

    def fail() -> None:
        raise HarpError(f"{prog} {name} needs {packages}, which {verb} not installed here")

    return click.Command(name, callback=fail, help=_unavailable_help(missing), add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
