"""The console scripts `harp` and `harp-bench` (pyproject.toml), and `python -m harp`.

They import their click CLI here, so that a device that installed only numpy and numba for the
runtime gets one line saying click is missing, not a traceback from the first import.
"""

from __future__ import annotations

import importlib
import sys


def harp() -> None:
    _main("harp.cli", "harp")


def harp_bench() -> None:
    _main("harp.bench.cli", "harp-bench")


def _main(module: str, prog: str) -> None:
    try:
        cli = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != "click":
            raise
        print(f"{prog}: error: the {prog} command needs click, which is not installed here "
              "(pip install click; the Python API harp.kernels.runtime does not need it)", file=sys.stderr)
        sys.exit(2)
    cli.main()
