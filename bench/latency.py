"""Latency measurement of exported models: one protocol, several backends.

Protocol (what every number of a harp latency report means):
- inputs are seeded uniform [0, 1) pixels (`seeded_input`), the same for every backend;
- every backend runs with the same thread count: harp's numba kernels
  (`load_runtime(threads=n)`), onnxruntime (intra_op_num_threads=n,
  inter_op_num_threads=1, sequential execution), torch (set_num_threads(n));
- models are loaded, compiled and warmed up outside the timed region
  (`warmup` untimed calls, default 10), then `iters` calls (default and minimum
  50) are timed one by one with time.perf_counter;
- we report the median and the 90th/99th percentiles (and min, mean), in ms;
- the machine's 1-minute load average is read before timing; when it exceeds
  the cores left free by the benchmark (cpu_count - threads) a warning is
  issued and the stats carry busy=True, since the timings are then inflated by
  other processes.

`time_callable` is backend-agnostic; the `*_backend` factories build the callables
(x -> logits) for one artifact dir (`measure.build_backend` maps the names `harp-bench
latency` accepts to them).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_ITERS = 50
DEFAULT_WARMUP = 10


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of one backend on one input batch, in milliseconds."""

    backend: str
    batch: int
    threads: int
    iters: int
    warmup: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    load_before: float  # 1-minute load average read just before timing
    busy: bool  # load_before exceeded the cores the benchmark left free

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Backend:
    """A named callable x (N, C, H, W) float32 -> logits (N, classes) with its settings; info's
    "threads_applied" is the thread count read back from the library, not the one asked for."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    threads: int
    info: dict[str, Any]


def machine_load() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def is_busy(threads: int, load: float | None = None) -> bool:
    """True when other processes use more cores than the benchmark leaves free."""
    load = machine_load() if load is None else load
    return load > max(0, (os.cpu_count() or 1) - threads) + 0.5


def seeded_input(shape: tuple[int, int, int], batch: int, seed: int = 0) -> np.ndarray:
    """float32 (batch, *shape) uniform [0, 1) pixels from a seeded generator."""
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def time_callable(fn: Callable[[np.ndarray], Any], x: np.ndarray, *, warmup: int = DEFAULT_WARMUP,
                  iters: int = MIN_ITERS, name: str = "", threads: int = 1, warn_busy: bool = True) -> LatencyStats:
    """Time fn(x): `warmup` untimed calls, then `iters` (>= 50) timed calls; see the module protocol."""
    if iters < MIN_ITERS:
        raise ValueError(f"time_callable: iters must be >= {MIN_ITERS}, got {iters}")
    for _ in range(warmup):
        fn(x)
    load = machine_load()
    busy = is_busy(threads, load)
    if busy and warn_busy:
        warnings.warn(f"machine load {load:.2f} on {os.cpu_count()} cores: {name or 'the'} timings with "
                      f"{threads} threads are inflated by other processes", RuntimeWarning, stacklevel=2)
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        fn(x)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return LatencyStats(backend=name, batch=int(x.shape[0]), threads=threads, iters=iters, warmup=warmup,
                        median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
                        p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()), min_ms=float(ms.min()),
                        load_before=load, busy=busy)


def best_of(stats: list[LatencyStats]) -> LatencyStats:
    """The repetition with the lowest median (repeating a block guards against a burst of load)."""
    return min(stats, key=lambda s: s.median_ms)


# ---------------------------------------------------------------- backends


def harp_backend(artifact: str | os.PathLike[str], threads: int, *, fallback: str = "auto") -> Backend:
    """harp's numba runtime on the artifact's model.harpz (or a bundle file)."""
    from harp.kernels.runtime import load_runtime

    start = time.perf_counter()
    runtime = load_runtime(artifact, threads=threads, fallback=fallback)
    return Backend("harp", runtime.run, threads,
                   {"fallback": fallback, "load_s": time.perf_counter() - start, "runtime": runtime,
                    "threads_applied": runtime.threads})


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session, name


def onnxruntime_backend(artifact: str | os.PathLike[str], threads: int, *, file: str = "model.onnx") -> Backend:
    """onnxruntime (CPU, all graph optimisations) on the artifact's dense model.onnx."""
    import onnxruntime as ort

    session, name = _ort_session(_artifact_file(artifact, file), threads)
    return Backend("onnxruntime", lambda x: session.run(None, {name: x})[0], threads,
                   {"file": file, "version": ort.__version__,
                    "threads_applied": session.get_session_options().intra_op_num_threads})


def onnxruntime_sparse_backend(artifact: str | os.PathLike[str], threads: int) -> Backend:
    """onnxruntime on model.sparse.onnx (sparse initializers; ORT densifies them at load)."""
    backend = onnxruntime_backend(artifact, threads, file="model.sparse.onnx")
    backend.name = "onnxruntime-sparse"
    return backend


def torch_backend(model: Any, threads: int) -> Backend:
    """An eval-mode torch nn.Module (the exported model before export) under inference_mode."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before torch's first parallel work
        pass
    model = model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return Backend("torch", run, threads, {"version": torch.__version__, "threads_applied": torch.get_num_threads()})


def _artifact_file(artifact: str | os.PathLike[str], file: str) -> Path:
    p = Path(artifact)
    path = p / file if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path

