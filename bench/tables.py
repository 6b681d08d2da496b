"""Plain-text and Markdown tables and links, shared by every harp-bench command."""

from __future__ import annotations

import os
from collections.abc import Sequence


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(value: float | None, spec: str = ".3f", none: str = "-") -> str:
    """format(value, spec), or `none` for a missing value."""
    return none if value is None else format(value, spec)


def distinct(names: Sequence[str]) -> list[str]:
    """The names with repeats numbered ('demo', 'demo-2'): labels in one table, plot or folder stay apart."""
    out: list[str] = []
    for name in names:
        label, i = name, 2
        while label in out:
            label, i = f"{name}-{i}", i + 1
        out.append(label)
    return out


def markdown_link(target: str | os.PathLike[str], markdown_file: str | os.PathLike[str]) -> str:
    """`target` as a link from the Markdown file where it is written (symlinks followed), in angle
    brackets where a space or parenthesis would end a bare link."""
    link = os.path.relpath(os.path.realpath(target), os.path.dirname(os.path.realpath(markdown_file)))
    return f"<{link}>" if any(c in link for c in " ()") else link
