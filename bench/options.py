"""Click option types shared by harp-bench commands: comma-separated lists, checked at parse time."""

from __future__ import annotations

import os
from collections.abc import Sequence

import click

from harp.errors import HarpError
from harp.io import check_output_file


class CommaList(click.ParamType):
    """'a,b,c' -> tuple of items, each converted by `item` and, with `choices`, one of them."""

    name = "list"

    def __init__(self, item: type = str, choices: Sequence[str] | None = None, minimum: int | None = None):
        self.item = item
        self.choices = tuple(choices) if choices is not None else None
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            self.fail(f"{value!r} is an empty list", param, ctx)
        out = []
        for part in parts:
            try:
                item = self.item(part)
            except ValueError:
                self.fail(f"{part!r} is not a valid {self.item.__name__}", param, ctx)
            if self.choices is not None and item not in self.choices:
                self.fail(f"unknown value {part!r} (choose from {', '.join(self.choices)})", param, ctx)
            if self.minimum is not None and item < self.minimum:
                self.fail(f"{part!r} must be >= {self.minimum}", param, ctx)
            out.append(item)
        return tuple(dict.fromkeys(out))


def shape(value: str) -> tuple[int, int, int]:
    """'3,32,32' -> (3, 32, 32); click.BadParameter otherwise."""
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise click.BadParameter(f"{value!r} is not C,H,W with positive ints (e.g. 3,32,32)")
    return dims  # type: ignore[return-value]


class OutputFile(click.ParamType):
    """A file written at the end of a run: its folder must exist and be writable when the command
    starts, so a typo fails at once instead of after the measurements. '-' is stdout where allowed."""

    name = "file"

    def __init__(self, stdout: bool = False):
        self.stdout = stdout

    def convert(self, value, param, ctx):
        if value == "-":
            if self.stdout:
                return value
            self.fail("'-' (stdout) is for --json only; name a file", param, ctx)
        try:
            check_output_file(value)
        except HarpError as e:
            self.fail(str(e), param, ctx)
        return value


json_out = click.option("--json", "json_path", type=OutputFile(stdout=True), default=None,
                        help="Write the results as JSON to this file ('-' for stdout).")
md_out = click.option("--md", "md_path", type=OutputFile(), default=None,
                      help="Write the results as Markdown to this file.")
plot_out = click.option("--plot", "plot_path", type=OutputFile(), default=None, help="Write a PNG plot.")
data_root = click.option("--data-root", default="data", show_default=True,
                         help="Folder holding torchvision datasets (MNIST: ../shared/data).")


def check_distinct_outputs(**paths: str | None) -> None:
    """UsageError if two output options name one file (the last write would replace the other)."""
    seen: dict[str, str] = {}
    for option, path in paths.items():
        if path is None or path == "-":
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise click.UsageError(f"--{seen[real]} and --{option} both write {path}")
        seen[real] = option
