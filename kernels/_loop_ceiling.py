"""Micro-benchmark: the sparse conv's inner loop alone, by where its input runs live.

Run: `python -m harp.kernels._loop_ceiling [--md bench/results/sparse-loop.md]`

`conv.accumulate_row` is all the sparse conv computes: for each nonzero weight,
one multiply-add per element of a contiguous run of the packed input. An
unstructured mask has no regular pattern that would let one loaded input value
serve several output channels from registers, so every multiply-add loads one
input value, and the loop's speed is set by where those runs come from. Here it
runs on one core over R runs of L floats (working set R*L*4 bytes), the runs
either starting on a 64-byte cache line (as with image groups of 16 in
line-aligned buffers) or not (image group 1, where a 3x3 conv's taps are one
float apart). Best of 5 timings of about `--budget` seconds each; GFLOP/s =
2 x multiply-adds per second. A conv of a model can approach, not pass, the row
of its working set: it also stores its output and, in a whole model, first
fetches its input from the layer before.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from .arrays import CACHE_LINE, aligned_zeros
from .conv import FASTMATH, accumulate_row

# (working set, runs R, run length L floats): one in L1 (32 KiB here), one in L2, one past it.
CASES = (("16 KiB (L1)", 16, 256), ("512 KiB (L2)", 128, 1024), ("8 MiB (L3)", 1024, 2048))


@njit(cache=True, error_model="numpy", fastmath=FASTMATH)
def _repeat(acc, packed, offsets, values, reps):
    for _ in range(reps):
        accumulate_row(acc, packed, offsets, values, 0, offsets.shape[0], 0, 1)


def loop_gflops(runs: int, length: int, aligned: bool, budget_s: float, rng: np.random.Generator) -> float:
    """GFLOP/s of `accumulate_row` on one core over `runs` shuffled runs of `length` floats."""
    lanes = CACHE_LINE // 4  # float32 per cache line
    packed = aligned_zeros(runs * length + length + lanes)
    packed[:] = rng.random(packed.shape[0], dtype=np.float32)
    starts = rng.permutation(runs).astype(np.int64) * length
    if not aligned:
        starts += rng.integers(1, lanes, runs)
    values = rng.standard_normal(runs).astype(np.float32)
    acc = aligned_zeros(length)
    _repeat(acc, packed, starts, values, 1)  # compile (or load from cache), warm the caches
    t0 = time.perf_counter()
    _repeat(acc, packed, starts, values, 1)
    reps = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _repeat(acc, packed, starts, values, reps)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * reps * runs * length / best / 1e9


def main(argv: list[str] | None = None) -> None:
    from harp.cli_errors import ScriptArgumentParser
    from harp.errors import HarpError

    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.1, help="seconds per timing")
    parser.add_argument("--md", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        raise HarpError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.md is not None and not args.md.parent.is_dir():
        raise HarpError(f"--md {args.md}: folder {args.md.parent} does not exist")

    rng = np.random.default_rng(0)
    lines = ["| working set | runs x floats | line-aligned GFLOP/s | unaligned GFLOP/s |", "|---|---|---|---|"]
    for label, runs, length in CASES:
        cells = [f"{loop_gflops(runs, length, aligned, args.budget, rng):.1f}" for aligned in (True, False)]
        lines.append(f"| {label} | {runs} x {length} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    if args.md:
        from harp.bench.machine import describe, machine_info
        from harp.io import atomic_write_bytes

        protocol = __doc__.split("\n\n")[2].strip()
        text = (f"# The sparse conv's inner loop alone, one core\n\n`python -m harp.kernels._loop_ceiling`; "
                f"{describe(machine_info(1))}.\n\n{protocol}\n\n" + "\n".join(lines) + "\n")
        atomic_write_bytes(args.md, text.encode())


if __name__ == "__main__":
    from harp.cli_errors import script_main

    sys.exit(script_main(main, "_loop_ceiling"))
