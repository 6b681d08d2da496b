"""Thread settings of the kernels: numba's parallel regions and the BLAS of dense linear layers.

Call `init_threads` once, before the first kernel runs (a runtime does it at load
time, before `warmup()`). It picks how idle kernel threads wait between parallel
regions (numba's OpenMP layer reads the setting once, when it starts; later calls
cannot change it):

- "spin" (default): spin for about SPIN_COUNT pause instructions (well under a
  millisecond), then sleep. The steps of one run follow each other within
  microseconds, so the threads never fall asleep mid-run: waking a sleeping
  thread costs ~50 µs per parallel region on a virtual machine whose idle core
  has halted (measured: VGG16 at 99%, batch 1, 0.83 ms instead of 1.7 ms).
- "passive": sleep at once. For a machine shared with other busy processes.
- "active": spin forever. Only on a dedicated machine: a spinning thread holds
  the core the thread it waits for needs on a busy one (measured on a loaded
  2-core host: 12-24 ms per conv instead of 0.1 ms), and it slows whatever else
  runs in the process (onnxruntime took 14 ms instead of 5.5 ms next to it).

The environment variable HARP_WAIT_POLICY sets the default.

numba's thread count is per calling thread: set it from the thread that runs the
kernels. BLAS (used by dense linear layers at batch > `dense.SMALL_BATCH`) is the
other thread pool: OpenBLAS workers spin for a long time after each call, which
on a 2-core host starves numba's threads (a dense product measured 24 ms instead
of 1.6 ms). So when
`threadpoolctl` is installed (it is optional), `set_num_threads` pins BLAS to
one thread and dense linear layers split each matrix product across `n` plain
Python threads themselves (`dense_split`); without it, BLAS keeps its own
threads and each product calls it once.

numba failing to start with this process's environment (`check_numba_environment`,
the thread pool) or its on-disk kernel cache failing (`numba_cache_error`) is a
NumbaSetupError, which the harp CLIs print as one line.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

WAIT_POLICIES = ("spin", "passive", "active")

# Pause instructions an idle thread spins for under the "spin" policy (libgomp's GOMP_SPINCOUNT).
SPIN_COUNT = 30000

# How many ways the dense kernels split a BLAS call; 1 unless BLAS is pinned to one thread.
_dense_split = 1


def max_threads() -> int:
    """The most threads numba can use in this process (NUMBA_NUM_THREADS)."""
    import numba  # here, not at the top: checking a policy or an option needs no numba

    return int(numba.config.NUMBA_NUM_THREADS)


class WaitPolicyError(ValueError):
    """An unknown wait policy; the harp CLIs report it as one line (it is the user's setting)."""


class NumbaSetupError(ValueError):
    """numba cannot start with this process's environment; the harp CLIs report it as one line."""


def check_numba_environment() -> None:
    """NumbaSetupError for a NUMBA_NUM_THREADS that makes `import numba` itself raise (reads the
    environment only: called before anything imports numba)."""
    value = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    try:
        count = int(value) if value else 1
    except ValueError:  # not a number: numba warns and uses its default
        return
    if count < 1:
        raise NumbaSetupError(f"NUMBA_NUM_THREADS={value}: numba needs at least one thread "
                              f"(unset it, or set 1..{os.cpu_count()})")


def numba_cache_error(error: BaseException) -> NumbaSetupError | None:
    """`error` as a NumbaSetupError if numba's on-disk kernel cache raised it, else None.

    Two ways the cache fails whatever harp does: no folder numba may write (a read-only install with
    HOME and NUMBA_CACHE_DIR unwritable: every `cache=True` kernel refuses to compile, a warm cache
    shipped with the package included), and a damaged cache file (cut short by a power loss: numba's
    unpickling fails, an EOFError that click would report as Ctrl-C).
    """
    if not any(Path(frame.filename).parts[-3:] == ("numba", "core", "caching.py")
               for frame in traceback.extract_tb(error.__traceback__)):
        return None
    if isinstance(error, RuntimeError) and "cannot cache function" in str(error):
        return NumbaSetupError("numba has no writable folder for its kernel cache: set NUMBA_CACHE_DIR to one")
    where = os.environ.get("NUMBA_CACHE_DIR") or "harp/kernels/__pycache__, or numba's folder in ~/.cache"
    return NumbaSetupError(f"numba's kernel cache is damaged ({type(error).__name__}: {error}): delete its "
                           f".nbi and .nbc files ({where}) and run again")


def _start_pool() -> None:
    """Start numba's thread pool now, where a threading layer that cannot load (NUMBA_THREADING_LAYER
    unknown, or tbb not installed) is one NumbaSetupError, not a traceback from the first kernel."""
    from numba.np.ufunc import parallel

    try:
        parallel._launch_threads()
    except ValueError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        layer = os.environ.get("NUMBA_THREADING_LAYER")
        raise NumbaSetupError(f"numba cannot start its threads{f' (NUMBA_THREADING_LAYER={layer})' if layer else ''}"
                              f": {first}") from None


def env_wait_policy() -> str:
    """The wait policy $HARP_WAIT_POLICY names, "spin" when it is unset; WaitPolicyError for anything else."""
    policy = os.environ.get("HARP_WAIT_POLICY", "spin")
    if policy not in WAIT_POLICIES:
        raise WaitPolicyError(f"HARP_WAIT_POLICY must be one of {', '.join(WAIT_POLICIES)}, got {policy!r}")
    return policy


def init_threads(n: int | None = None, wait_policy: str | None = None) -> bool:
    """Set the wait policy (if numba's thread pool has not started yet) and, if given, `n` threads.

    wait_policy: one of WAIT_POLICIES; default $HARP_WAIT_POLICY, else "spin".
    Returns True when the wait policy took effect, False when the pool was already
    running with whatever policy it started with.
    """
    if wait_policy is None:
        wait_policy = env_wait_policy()
    if wait_policy not in WAIT_POLICIES:
        raise WaitPolicyError(f"init_threads: wait_policy must be one of {WAIT_POLICIES}, got {wait_policy!r}")
    applied = not _pool_started()
    if applied:
        # libgomp reads these when numba loads it, at the first parallel kernel call.
        if wait_policy == "spin":
            os.environ.pop("OMP_WAIT_POLICY", None)
            os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        else:
            os.environ["OMP_WAIT_POLICY"] = wait_policy.upper()
        _start_pool()
    if n is not None:
        set_num_threads(n)
    return applied


def set_num_threads(n: int) -> None:
    """Use `n` threads in numba kernels and in the dense kernels' BLAS calls (see module doc)."""
    global _dense_split
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_threads():
        raise ValueError(f"set_num_threads: expected an int in 1..{max_threads()}, got {n!r}")
    import numba

    numba.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        _dense_split = 1
        return
    threadpool_limits(limits=1, user_api="blas")
    _dense_split = n


def dense_split() -> int:
    """Ways the dense kernels split a BLAS call across Python threads (BLAS itself runs on one)."""
    return _dense_split


def get_num_threads() -> int:
    """Threads numba kernels started from this thread will use."""
    import numba

    return int(numba.get_num_threads())


def _pool_started() -> bool:
    from numba.np.ufunc import parallel

    return bool(getattr(parallel, "_is_initialized", True))
