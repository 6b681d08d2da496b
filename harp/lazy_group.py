"""A click group that imports each command's module only when that command is asked for.

`harp run` and `harp-bench latency` must start fast and work on a device with only
numpy, numba and click (plus onnxruntime for the benchmark): importing every command
up front would import torch (2+ s here, and absent on such a device). A command whose
module needs a package that is not installed becomes a placeholder: listed in --help
as unavailable, and one line on stderr with exit status 2 when invoked.
"""

from __future__ import annotations

import importlib

import click

from .cli_errors import missing_package
from .errors import HarpError


class LazyGroup(click.Group):
    """Commands from `commands`: name -> (module, attribute of the click command in it)."""

    def __init__(self, *args, commands: dict[str, tuple[str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return None
        module, attr = self.lazy_commands[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            package = missing_package(e)
            if package is None:
                raise
            return _unavailable(ctx, name, package)


def _unavailable(ctx: click.Context, name: str, missing: str) -> click.Command:
    """A command that takes any arguments and fails with one line: `missing` is not installed."""
    prog = ctx.find_root().info_name or "harp"

    def fail() -> None:
        raise HarpError(f"{prog} {name} needs {missing}, which is not installed here")

    return click.Command(name, callback=fail, help=f"(unavailable here: needs {missing})", add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
