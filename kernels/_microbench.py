"""Micro-benchmark: sparse conv vs dense conv kernel vs torch conv2d on VGG16-CIFAR layers.

Run: `python -m harp.kernels._microbench [--threads 2] [--budget 0.15]`

Protocol: seeded random inputs and random unstructured sparse weights (density
1% and 10%, i.e. 99% and 90% sparsity) for every VGG16-CIFAR 3x3 conv shape;
batch 1 and 16; numba, BLAS and torch on the same thread count and the same
OpenMP wait policy (`--wait-policy`, default spin); each function
runs 3 times untimed (compilation, caches), then is timed repeatedly for about
`--budget` seconds (at least 5 runs) and the median is reported in microseconds.
The sparse kernel gets its plan, workspace and output buffer prepared outside the
timed region, as a runtime would at load time; every kernel adds bias.
Not a test: torch is imported here only to time the baseline.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from harp.cli_errors import ScriptArgumentParser, script_main
from harp.errors import HarpError
from harp.export.csr import dense_to_csr

from .conv import plan_sparse_conv2d, sparse_conv2d, sparse_conv2d_workspace
from .csr import kernel_csr
from .dense import dense_conv2d
from .threads import WAIT_POLICIES, init_threads, max_threads

# (in channels, out channels, spatial size) of the 3x3, stride 1, padding 1 convs.
VGG16_CIFAR_CONVS = (
    (3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
    (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2),
)


def median_us(fn, budget_s: float) -> float:
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench_layer(c, o, hw, batch, density, budget_s, rng):
    import torch

    x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    weight *= rng.random(weight.shape) < density
    bias = rng.standard_normal(o).astype(np.float32)
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, (hw, hw), 1, 1)
    workspace = np.empty(sparse_conv2d_workspace(plan, batch), np.float32)
    out = np.empty((batch, o, hw, hw), np.float32)
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias)

    def run_torch():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, bt, 1, 1)

    sparse = median_us(lambda: sparse_conv2d(x, indptr, indices, values, weight.shape, bias, 1, 1,
                                             out=out, plan=plan, workspace=workspace), budget_s)
    dense = median_us(lambda: dense_conv2d(x, weight, bias, 1, 1, out=out), budget_s)
    ref = median_us(run_torch, budget_s)
    return sparse, dense, ref


def main(argv: list[str] | None = None) -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.15, help="seconds of timed runs per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--wait-policy", choices=WAIT_POLICIES, default="spin",
                        help="idle-thread policy of numba's and torch's OpenMP pools (both get it)")
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= max_threads():
        raise HarpError(f"--threads must be in 1..{max_threads()} (NUMBA_NUM_THREADS), got {args.threads}")
    if args.budget < 0:
        raise HarpError(f"--budget must be >= 0 seconds, got {args.budget}")
    if any(batch < 1 for batch in args.batches):
        raise HarpError(f"--batches must be >= 1, got {args.batches}")
    if any(not 0 < density <= 1 for density in args.densities):
        raise HarpError(f"--densities must be in (0, 1], got {args.densities}")

    init_threads(args.threads, args.wait_policy)  # before torch loads its OpenMP runtime
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads={args.threads}, wait policy {args.wait_policy}; medians in microseconds; "
          f"speedup = torch / sparse")
    header = f"{'layer':>16} {'N':>3} {'dens':>5} {'sparse':>9} {'dense':>9} {'torch':>9} {'speedup':>8}"
    print(header)
    totals: dict[tuple[int, float], list[float]] = {}
    for batch in args.batches:
        for density in args.densities:
            for c, o, hw in VGG16_CIFAR_CONVS:
                sparse, dense, ref = bench_layer(c, o, hw, batch, density, args.budget, rng)
                acc = totals.setdefault((batch, density), [0.0, 0.0, 0.0])
                acc[0] += sparse
                acc[1] += dense
                acc[2] += ref
                name = f"{c}->{o}@{hw}"
                print(f"{name:>16} {batch:>3} {density:>5.2f} {sparse:>9.1f} {dense:>9.1f} {ref:>9.1f} "
                      f"{ref / sparse:>7.1f}x", flush=True)
    for (batch, density), (sparse, dense, ref) in totals.items():
        print(f"{'sum of 9 layers':>16} {batch:>3} {density:>5.2f} {sparse:>9.1f} {dense:>9.1f} {ref:>9.1f} "
              f"{ref / sparse:>7.1f}x")


if __name__ == "__main__":
    sys.exit(script_main(main, "_microbench"))
