"""One backend at one thread count, timed in its own process: latency per batch size and peak memory.

    python -m harp.bench.measure '{"artifact": DIR, "backend": "harp", "threads": 1, "batches": [1, 16], ...}'

prints one JSON line {"rows": [...], "memory": {...}} (or {"error": "..."} and
exit status 2). `harp-bench latency` starts one such process per (backend,
thread count), with OMP_NUM_THREADS and NUMBA_NUM_THREADS set to the thread count,
so that

- each backend imports only its own library (the harp runtime: numpy + numba),
  and its memory is not mixed with the others';
- peak memory is the process's own high-water mark (VmHWM from /proc/self/status,
  ru_maxrss where there is no /proc): `peak_rss_mb` is read after the timed
  calls of each batch size (batch sizes run in increasing order, so it is the
  peak up to and including that batch size);
  `base_rss_mb` is read after importing the backend's library and before loading
  the model, and `model_rss_mb = peak - base` is what loading, warming up and
  running the model added on top of the imported library.

Timing follows `harp.bench.latency` (seeded inputs, warm-up outside the timed
region, >= 50 timed calls, percentiles); with `seconds` the timed-call count is
chosen from the warm-up so the timed calls take about that long.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .latency import MIN_ITERS, Backend, seeded_input, time_callable


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM where /proc has it, else ru_maxrss.

    Linux carries ru_maxrss over fork and exec, so a child of a large parent would
    report the parent's peak; VmHWM belongs to the process image and starts afresh at exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def import_backend_library(backend: str) -> None:
    """Import what `backend` runs on, so that its import cost counts in the base memory, not the model's."""
    import numpy  # noqa: F401

    if backend == "torch":
        import torch  # noqa: F401
    elif backend.startswith("onnxruntime"):
        import onnxruntime  # noqa: F401
    else:
        import harp.kernels.runtime  # noqa: F401  (numba)


def build_backend(artifact: str, backend: str, threads: int) -> Backend:
    from .latency import harp_backend, onnxruntime_backend, onnxruntime_sparse_backend, torch_backend

    if backend == "harp":
        return harp_backend(artifact, threads)
    if backend == "onnxruntime":
        return onnxruntime_backend(artifact, threads)
    if backend == "onnxruntime-sparse":
        return onnxruntime_sparse_backend(artifact, threads)
    if backend == "torch":
        from harp.export.artifact import open_artifact
        from .torch_graph import load_torch_model

        return torch_backend(load_torch_model(open_artifact(artifact)), threads)
    raise ValueError(f"unknown backend {backend!r}")


def iterations_for(backend: Backend, x, warmup: int, seconds: float) -> int:
    """Timed calls that take about `seconds`, from the mean of `warmup` (>= 3) untimed calls."""
    calls = max(3, warmup)
    start = time.perf_counter()
    for _ in range(calls):
        backend.run(x)
    per_call = (time.perf_counter() - start) / calls
    return max(MIN_ITERS, int(seconds / max(per_call, 1e-9)))


def measure(artifact: str, backend: str, threads: int, batches: list[int], *, warmup: int = 10,
            iters: int = 100, seconds: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Latency rows (one per batch size) and memory of one backend in this process; see the module doc."""
    import_backend_library(backend)
    base = peak_rss_mb()
    start = time.perf_counter()
    runner = build_backend(artifact, backend, threads)
    load_s = time.perf_counter() - start
    shape = _input_shape(artifact)
    rows = []
    for batch in sorted(batches):
        x = seeded_input(shape, batch, seed)
        if backend == "harp":
            runner.info["runtime"].prepare(batch)  # kernel choice for this batch size, outside the timed region
        n = iters if seconds is None else iterations_for(runner, x, warmup, seconds)
        stats = time_callable(runner.run, x, warmup=warmup, iters=n, name=backend, threads=threads,
                              warn_busy=False)
        row = stats.to_json()
        row["peak_rss_mb"] = peak_rss_mb()
        row["threads_applied"] = runner.info["threads_applied"]
        rows.append(row)
    return {"rows": rows, "memory": {"base_rss_mb": base, "load_s": load_s}}


def _input_shape(artifact: str) -> tuple[int, int, int]:
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    return tuple(manifest["model"]["input_shape"])  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        result = measure(args["artifact"], args["backend"], args["threads"], args["batches"],
                         warmup=args.get("warmup", 10), iters=args.get("iters", 100), seconds=args.get("seconds"),
                         seed=args.get("seed", 0))
    except Exception as e:  # reported to the parent as one line; it decides what to do
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
