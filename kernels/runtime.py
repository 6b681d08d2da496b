"""The torch-free runtime: load a CSR bundle, plan it once, run batches on the numba kernels.

    from harp.kernels.runtime import load_runtime
    rt = load_runtime("runs/export/vgg16")        # an artifact dir holding model.harpz, or the file
    logits = rt.run(x)                            # x: (N, C, H, W) raw [0, 1] pixels -> (N, classes)
    rt.plan_report()                              # per step: fused nodes, kernel, density, time

Loading goes through `harp.export.bundle.load_bundle` only, so every index,
shape and value is validated before a kernel touches it. Then, once: dead
channels are trimmed (`harp.export.channels.trim_channels`, on the CSR weights:
output channels no later layer reads, e.g. a conv feeding one whose weights
are all pruned, are not computed; a bundle exported with trim=False runs as
fast as a trimmed one, and a trimmed one is left as it is);
`plan.plan_graph` fuses the graph into steps, picks value borders and buffer
slots; `steps.EXECUTORS` turn the weights into kernel arrays. For each batch
size (kept for the last few sizes used) `prepare` allocates the buffers, lets
convs of one input share its pack (`steps.Context.share_packs`), binds
every step's kernels to them and, with `fallback="auto"`, times the candidate
kernels of every conv/linear step on its own shape and keeps the fastest: sparse,
dense, for 3x3 stride-1 convs Winograd (`winograd`), and on CPUs with AVX-512 at
batch sizes of 16k, for convs of 8% density or more and at most 8192 nonzeros, the
sparse conv compiled for the layer's pattern (`unrolled`; the first load compiles it, ~0.3 s
per 1000 nonzeros, later loads take it from the cache); layers sparser than
`SPARSE_ONLY_BELOW` skip the timing. A run is then one
input copy, one Python call per kernel, and one output copy.

Imports only numpy, numba and harp's numpy-only modules: a device needs no
torch, onnx or scipy. A Runtime owns its buffers, so it runs one batch at a time: calls from
several threads wait for each other (a lock); for parallel requests load one Runtime per thread.
A Runtime cannot be pickled or copied (its kernels are bound to its buffers): load it again.
"""

from __future__ import annotations

import functools
import gc
import math
import operator
import os
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np

from harp.export.bundle import Bundle, BundleError, load_bundle
from harp.export.channels import TrimSummary, trim_channels

from . import threads as thread_settings
from .arrays import aligned_zeros
from .plan import Plan, plan_graph
from .steps import EXECUTORS, Buffers, Call, Context, Executor, SharedPack
from .unrolled import host_has_512bit_vectors

FALLBACKS = ("auto", "sparse", "dense", "winograd", "unrolled")
BUNDLE_NAME = "model.harpz"  # the bundle's name inside an artifact dir
SPARSE_ONLY_BELOW = 0.05  # "auto" takes the sparse kernel of layers sparser than this without timing
CHOICE_REPEATS = 3  # timed rounds at most (after one untimed), the best time of each candidate kept
CHOICE_SLOW_US = 50_000.0  # no further timing round when its model runs would take longer than this each
CHOICE_DROP = 3.0  # after a timed round, a step stops timing its candidates this many times slower than its best
SERIAL_BELOW_US = 40.0  # steps faster than this are also timed on one thread (no wake-up of the others)
KEPT_BATCH_SIZES = 4  # prepared batch sizes kept (buffers and bound kernels)


class RuntimeInputError(ValueError):
    """The input of `Runtime.run` is unusable: wrong type, dtype or shape, or not finite."""

    def __init__(self, message: str, *, first_bad: tuple[int, ...] | None = None):
        super().__init__(message)
        self.first_bad = first_bad  # the index of the first NaN/inf value, when that is what is wrong


def non_finite_error(index: Any, converted: bool = False) -> RuntimeInputError:
    """The error for an input whose first NaN/inf value is at `index` (after conversion to float32)."""
    index = tuple(int(i) for i in index)
    return RuntimeInputError(f"input holds NaN or infinite values (first at index {index}"
                             f"{', after conversion to float32' if converted else ''})", first_bad=index)


@dataclass
class BoundStep:
    """One plan step bound for a batch size: the kernel chosen, why, and its calls."""

    executor: Executor
    kernel: str
    reason: str
    calls: list[Call]
    timings_us: dict[str, float] = field(default_factory=dict)  # candidate kernel -> best time
    profile_us: float | None = None  # median from the last `profile`
    threads: int = 0  # threads the step runs on


@dataclass
class Prepared:
    n: int
    buffers: Buffers
    steps: list[BoundStep]
    calls: list[Call]
    input: np.ndarray  # (N, C, H, W) view of the input buffer
    output: np.ndarray  # (classes, N) view of the output value
    shared_packs: dict[str, SharedPack]  # step name -> the pack it makes for, or reads from, other convs


def load_runtime(path: str | os.PathLike[str], *, threads: int | None = None, fallback: str = "auto",
                 warmup: bool = True, trim: bool = True) -> Runtime:
    """A ready Runtime for the bundle at `path` (a bundle file, or an artifact dir holding model.harpz).

    threads: numba (and dense BLAS) threads, default all numba may use.
    fallback: "auto" picks each layer's kernel by timing (sparse, dense, and Winograd for the 3x3
    stride-1 convs it covers, and on CPUs with AVX-512 `unrolled` code for convs it may pay off on at
    batch sizes of 16k);
    "sparse"/"dense" force one; "winograd" forces Winograd where a conv allows it and the dense
    kernel elsewhere; "unrolled" forces `unrolled` where it is offered and the sparse kernel elsewhere.
    warmup: prepare batch size 1 and run it once, so the first request pays no
    compilation, cache load or kernel choice. trim: skip the dead channels (same
    logits). Raises BundleError for a missing or invalid bundle, ValueError for bad options,
    NumbaSetupError (a ValueError) where numba's on-disk kernel cache fails (`threads.numba_cache_error`).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"load_runtime: fallback must be one of {FALLBACKS}, got {fallback!r}")
    with _collector_paused():
        start = time.perf_counter()
        source, sha256 = bundle_source(path)
        bundle = load_bundle(source, sha256=sha256)
        loaded = time.perf_counter()
        try:
            runtime = Runtime(bundle, threads=threads, fallback=fallback, trim=trim)
            runtime.load_seconds["bundle"] = loaded - start
            if warmup:
                runtime.warmup()
        except Exception as e:
            cache_error = thread_settings.numba_cache_error(e)
            if cache_error is not None:
                raise cache_error from e
            raise
    return runtime


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a load, then restore it as it was.

    A load (numba's cached kernels, the plan) allocates enough objects to set off
    full collections, each walking every object of the process, numba's and scipy's
    included. Paused, VGG16 at 99% loaded in 0.52 s instead of 0.61 (medians of 8
    fresh processes); the few cycles a load leaves are collected afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def bundle_source(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The bundle file `path` names (itself, or model.harpz inside an artifact dir) and the SHA-256 it
    must have: an export's bundle must have the size (checked here) and digest (checked by load_bundle
    on the bytes it reads) its manifest records, so one copied in from another export is refused. A
    bundle file, or a folder holding one and no manifest.json, is read as it is (digest None)."""
    try:
        p = Path(path)
    except TypeError as e:
        raise BundleError(f"bundle path must be a str or os.PathLike, got {type(path).__name__}") from e
    if p.is_dir():
        if not (p / BUNDLE_NAME).is_file():
            raise BundleError(f"artifact dir {p} holds no {BUNDLE_NAME}")
        from harp.export.verify import MANIFEST, VerifyError, check_entry, read_manifest

        if not os.path.lexists(p / MANIFEST):  # a broken symlink is a manifest that cannot be read
            return p / BUNDLE_NAME, None
        try:
            manifest = read_manifest(p)
            if BUNDLE_NAME not in manifest["files"]:
                raise VerifyError(f"{p}: the manifest does not list {BUNDLE_NAME}")
            sha256 = check_entry(p, BUNDLE_NAME, manifest["files"][BUNDLE_NAME])
        except VerifyError as e:
            raise BundleError(str(e)) from None
        return p / BUNDLE_NAME, sha256
    return p, None


def _one_at_a_time(method):
    """`method` under the runtime's lock: its buffers hold one batch, and two threads running at once
    overwrote each other's activations (wrong logits, no error)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class Runtime:
    """An executable plan of one bundle; see the module docstring."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None, fallback: str = "auto", trim: bool = True):
        if fallback not in FALLBACKS:
            raise ValueError(f"Runtime: fallback must be one of {FALLBACKS}, got {fallback!r}")
        start = time.perf_counter()
        thread_settings.init_threads()  # the idle threads' wait policy, before the first parallel kernel
        self.threads = thread_settings.max_threads() if threads is None else threads
        thread_settings.set_num_threads(self.threads)
        self.fallback = fallback
        self.meta = bundle.meta
        self.bundle_graph = bundle.graph  # as exported: the architecture of the artifact's model.onnx
        # What runs: the same function without its dead channels (`trimmed` says what went).
        self.trimmed: TrimSummary | None
        self.graph, self.trimmed = trim_channels(bundle.graph) if trim else (bundle.graph, None)
        self.plan: Plan = plan_graph(self.graph)
        self.executors = [EXECUTORS[step.op](step, self.graph.tensors, self.plan) for step in self.plan.steps]
        self.input_shape: tuple[int, int, int] = tuple(self.plan.input_shape)
        self.num_classes: int = self.plan.values[self.plan.output_name].shape[0]
        self._prepared: OrderedDict[int, Prepared] = OrderedDict()
        self._last_batch = 1
        self._lock = threading.RLock()
        self.load_seconds: dict[str, float] = {"plan": time.perf_counter() - start}

    # ------------------------------------------------------------ running

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickle, copy.copy and copy.deepcopy
        raise TypeError("a Runtime cannot be pickled or copied (its kernels are bound to its buffers); "
                        "call load_runtime(path) again")

    @_one_at_a_time
    def run(self, x: Any) -> np.ndarray:
        """Logits (N, classes) float32 for raw [0, 1] pixels x of shape (N, C, H, W).

        x may be any real dtype (converted to float32). Raises RuntimeInputError
        for a wrong type, dtype or shape, an empty batch, or NaN/inf values.
        """
        x = self._check_input(x)
        state = self._prepare(x.shape[0])
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: reported below
            np.copyto(state.input, x, casting="unsafe")
        if not np.isfinite(state.input).all():
            raise non_finite_error(np.argwhere(~np.isfinite(state.input))[0], converted=x.dtype != np.float32)
        if thread_settings.get_num_threads() != self.threads:  # numba's count is per calling thread
            thread_settings.set_num_threads(self.threads)
        for call in state.calls:
            call()
        return state.output.T.copy()

    def _check_input(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as e:
                raise RuntimeInputError(f"input is not an array: {type(x).__name__}: {e}") from e
        if x.dtype.kind not in "biuf":
            raise RuntimeInputError(f"input dtype {x.dtype} is not a real number type convertible to float32")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise RuntimeInputError(f"input shape {tuple(x.shape)} is not (N, C, H, W) = (N, "
                                    f"{', '.join(map(str, self.input_shape))})")
        if x.shape[0] < 1:
            raise RuntimeInputError("input batch is empty (N = 0)")
        return x

    def warmup(self) -> None:
        """Prepare batch size 1 and run it once (kernels compiled or loaded from numba's cache)."""
        start = time.perf_counter()
        self.prepare(1)
        prepared = time.perf_counter()
        self.run(np.zeros((1, *self.input_shape), np.float32))
        self.load_seconds["prepare"] = prepared - start
        self.load_seconds["warmup"] = time.perf_counter() - prepared

    # ------------------------------------------------------------ preparing a batch size

    @_one_at_a_time
    def prepare(self, n: int) -> Prepared:
        """Buffers and bound kernels for batch size n (made once, kept for the last few sizes)."""
        return self._prepare(n)

    def _prepare(self, n: int) -> Prepared:
        """`prepare` for the methods that already hold the lock (run takes it once per batch, not twice)."""
        try:
            count = None if isinstance(n, bool) else operator.index(n)  # an int or a numpy integer
        except TypeError:  # a float, a string
            count = None
        if count is None or count < 1:
            raise RuntimeInputError(f"batch size must be a positive int, got {n!r}")
        n = count
        if n in self._prepared:
            self._last_batch = n
            self._prepared.move_to_end(n)
            return self._prepared[n]
        if thread_settings.get_num_threads() != self.threads:
            thread_settings.set_num_threads(self.threads)
        plan = self.plan
        try:
            slots = [aligned_zeros(slot.per_image * n) for slot in plan.slots]
            buffers = Buffers(n=n, slots=slots, input=aligned_zeros(n * int(np.prod(self.input_shape))),
                              pack=aligned_zeros(0), scratch=aligned_zeros(0))
        except MemoryError as e:
            raise RuntimeInputError(f"batch of {n} needs {self.buffer_bytes(n) / 2**30:.1f} GiB of activation "
                                    f"buffers, more than this machine can allocate") from e
        ctx = Context(plan, buffers)
        ctx.share_packs(self.executors)
        candidates = [self._candidates(ex, ctx) for ex in self.executors]
        pack = max((ex.workspace(ctx, kernel) for ex, (kernels, _) in zip(self.executors, candidates)
                    for kernel in kernels), default=0)
        scratch = max((ex.scratch(ctx, kernel) for ex, (kernels, _) in zip(self.executors, candidates)
                       for kernel in kernels), default=0)
        try:
            buffers.pack, buffers.scratch = aligned_zeros(pack), aligned_zeros(scratch)
        except MemoryError as e:
            raise RuntimeInputError(f"batch of {n} needs {4 * (pack + scratch) / 2**30:.1f} GiB of kernel "
                                    f"workspace besides its activations, more than this machine can allocate") from e
        variants = [{kernel: ex.bind(ctx, kernel) for kernel in kernels} for ex, (kernels, _) in
                    zip(self.executors, candidates)]
        steps = []
        for ex, (kernels, reason), bound, timings in zip(self.executors, candidates, variants,
                                                          _timings_in_flow(variants)):
            kernel = min(timings, key=timings.get) if timings else kernels[0]
            step = BoundStep(ex, kernel, reason, bound[kernel], timings, threads=self.threads)
            if self.threads > 1 and step.calls:
                self._maybe_serial(step)
            steps.append(step)
        if len(self._prepared) >= KEPT_BATCH_SIZES:
            self._prepared.popitem(last=False)
        state = Prepared(n=n, buffers=buffers, steps=steps, calls=[c for s in steps for c in s.calls],
                         input=buffers.input.reshape(n, *self.input_shape),
                         output=ctx.matrix(plan.output_name), shared_packs=ctx.shared_packs)
        self._prepared[n] = state
        self._last_batch = n  # only once prepared: summary() and plan_report() re-prepare it
        return state

    def _maybe_serial(self, step: BoundStep) -> None:
        """Run a tiny step on one thread when that is faster: waking the other threads costs ~10 µs."""
        parallel_us = step.timings_us.get(step.kernel)
        if parallel_us is not None and parallel_us >= SERIAL_BELOW_US:
            return
        parallel_us = _best_time_us(step.calls)  # alone, as the serial variant is timed
        if parallel_us >= SERIAL_BELOW_US:
            return
        serial = [_on_one_thread(step.calls, self.threads)]
        serial_us = _best_time_us(serial)
        if serial_us < parallel_us:
            step.calls, step.threads = serial, 1
            if step.timings_us:
                step.timings_us[step.kernel] = serial_us

    def _candidates(self, ex: Executor, ctx: Context) -> tuple[tuple[str, ...], str]:
        """The kernels to bind for one step at the context's batch size, and why."""
        if len(ex.kernels) == 1:
            return ex.kernels, "only kernel"
        if self.fallback == "winograd":
            return ("winograd" if "winograd" in ex.kernels_in(ctx) else "dense",), "fallback=winograd"
        if self.fallback == "unrolled":
            return ("unrolled" if "unrolled" in ex.kernels_in(ctx) else "sparse",), "fallback=unrolled"
        if self.fallback != "auto":
            return (self.fallback,), f"fallback={self.fallback}"
        if ex.density < SPARSE_ONLY_BELOW:
            return ("sparse",), f"density < {SPARSE_ONLY_BELOW:.0%}"
        kernels = ex.kernels_in(ctx)
        if not host_has_512bit_vectors():  # no compile for a kernel that cannot win here
            kernels = tuple(k for k in kernels if k != "unrolled")
        return kernels, "timed"

    @_one_at_a_time
    def set_threads(self, n: int) -> None:
        """Use n threads from now on (prepared batch sizes are re-prepared, their work split depends on it)."""
        thread_settings.set_num_threads(n)
        self.threads = n
        self._prepared.clear()

    # ------------------------------------------------------------ reports

    @_one_at_a_time
    def profile(self, x: Any = None, *, batch: int = 1, repeats: int = 20) -> list[dict[str, Any]]:
        """Median time of every step over `repeats` runs on x (default: seeded uniform [0, 1) pixels).

        The steps run in order, as in `run`; returns `plan_report(batch)` with the times.
        """
        if x is None:
            x = np.random.default_rng(0).random((batch, *self.input_shape), dtype=np.float32)
        self.run(x)
        state = self._prepared[self._last_batch]
        samples: list[list[float]] = [[] for _ in state.steps]
        for _ in range(repeats):
            np.copyto(state.input, x, casting="unsafe")
            for i, step in enumerate(state.steps):
                start = time.perf_counter()
                for call in step.calls:
                    call()
                samples[i].append(time.perf_counter() - start)
        for step, times in zip(state.steps, samples):
            step.profile_us = statistics.median(times) * 1e6
        return self.plan_report(state.n)

    @_one_at_a_time
    def plan_report(self, batch: int | None = None) -> list[dict[str, Any]]:
        """Per step: name, op, fused nodes, kernel (sparse/dense/winograd/unrolled/-), density, why, and times in µs.

        `time_us` is the median of the last `profile`, else the kernel's time from
        the choice at prepare, else None. For the batch size used last by default.
        """
        state = self._prepare(self._last_batch if batch is None else batch)
        report = []
        for step in state.steps:
            ex = step.executor
            time_us = step.profile_us if step.profile_us is not None else step.timings_us.get(step.kernel)
            report.append({
                "name": ex.step.name, "op": ex.step.op, "nodes": list(ex.step.nodes), "kernel": step.kernel,
                "density": ex.density, "macs_per_image": ex.macs_per_image, "reason": step.reason,
                "time_us": time_us, "candidates_us": dict(step.timings_us), "in_place": ex.step.in_place,
                "threads": step.threads, "batch": state.n,
            })
        return report

    def buffer_bytes(self, n: int) -> int:
        """Bytes of the activation slots for batch size n (workspaces not included)."""
        return 4 * n * (sum(slot.per_image for slot in self.plan.slots) + int(np.prod(self.input_shape)))

    @_one_at_a_time
    def summary(self) -> dict[str, Any]:
        """Plan statistics: graph nodes, steps, kernel calls and slots (at the batch size used last)."""
        state = self._prepare(self._last_batch)
        return {
            "graph_nodes": self.plan.graph_nodes, "steps": len(self.plan.steps), "kernel_calls": len(state.calls),
            "slots": len(self.plan.slots), "values": len(self.plan.values),
            "in_place_steps": sum(1 for s in self.plan.steps if s.in_place),
            "views": sum(1 for v in self.plan.values.values() if v.view_of),
            "shared_packs": sum(1 for name, shared in state.shared_packs.items() if name != shared.maker),
            "buffer_bytes": self.buffer_bytes(state.n), "batch": state.n, "threads": self.threads,
            "channels_trimmed": self.trimmed.channels_removed if self.trimmed else 0,
        }


def _on_one_thread(calls: list[Call], threads: int) -> Call:
    """One call running `calls` with numba on a single thread, then back to `threads`."""
    def run() -> None:
        numba.set_num_threads(1)
        try:
            for call in calls:
                call()
        finally:
            numba.set_num_threads(threads)

    return run


def _timings_in_flow(variants: list[dict[str, list[Call]]]) -> list[dict[str, float]]:
    """For each step with several candidate kernels, each candidate's best time in µs; {} for the others.

    The candidates are timed inside whole runs of the model, not alone: a step
    repeated alone keeps its weights in cache, while in the model the steps
    before it have evicted them, so the kernel that streams more weight bytes
    (dense) looks faster alone than it is (ResNet18's 256->512 conv at 18%
    density, batch 1: dense 447 µs alone, 1073 µs in the model, sparse 618 µs
    alone). Every round runs all steps in order once per kernel name, each step
    that still times that kernel using it and the others their fastest so far;
    the first round is untimed.

    One timed round is not enough on a shared host, where a stall during one
    run decides: HARP ResNet18 at batch 16 took Winograd for a layer1 conv at
    3.45 ms over sparse at 3.91 (1.7 ms in its other runs), and in 1 load of 6
    Winograd for all of layer1 (41 ms a run instead of 17-19). So each step
    keeps the best of up to CHOICE_REPEATS rounds, and after each round stops
    timing the candidates over CHOICE_DROP times slower than its best: the
    later rounds then cost little more than runs of the chosen model. A round
    whose model runs would take over CHOICE_SLOW_US each (big batches) is not run.
    """
    def kernel_in(name: str, times: dict[str, float], live: set[str]) -> str:
        """The kernel a step runs in the model runs of `name`: it, or the step's fastest so far."""
        return name if name in live else min(times, key=times.get)

    names = list(dict.fromkeys(kernel for bound in variants if len(bound) > 1 for kernel in bound))
    best = [dict.fromkeys(bound, math.inf) for bound in variants]  # every step's, to estimate a round
    timing = [set(bound) if len(bound) > 1 else set() for bound in variants]  # candidates still timed
    for round_ in range(CHOICE_REPEATS + 1):
        for name in names:
            for bound, times, live in zip(variants, best, timing):
                kernel = kernel_in(name, times, live)
                start = time.perf_counter()
                for call in bound[kernel]:
                    call()
                if round_:
                    times[kernel] = min(times[kernel], (time.perf_counter() - start) * 1e6)
        if not round_:
            continue
        for times, live in zip(best, timing):
            if live:
                fastest = min(times[kernel] for kernel in live)
                live.difference_update([kernel for kernel in live if times[kernel] > CHOICE_DROP * fastest])
                if len(live) == 1:
                    live.clear()
        names = [name for name in names if any(name in live for live in timing)]  # still timed somewhere
        next_us = sum(times[kernel_in(name, times, live)] for name in names for times, live in zip(best, timing))
        if next_us > CHOICE_SLOW_US * len(names):
            break
    return [times if len(bound) > 1 else {} for bound, times in zip(variants, best)]


def _best_time_us(calls: list[Call]) -> float:
    """Best of CHOICE_REPEATS timed runs of `calls` after one warm-up run, in µs.

    A slow candidate (big batches) is timed by one run, so that preparing a
    large batch size does not take seconds.
    """
    for call in calls:
        call()
    best = float("inf")
    for _ in range(CHOICE_REPEATS):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - start)
        if best * 1e6 > CHOICE_SLOW_US:
            break
    return best * 1e6
