"""What a benchmark ran on: CPU model, vector ISA, cores, OS, library versions, and how busy it was.

Everything is read without importing the heavy libraries (versions come from the
installed distributions' metadata), so this runs on a device with only numpy,
numba and onnxruntime. `machine_info` is stored with every harp-bench result.
"""

from __future__ import annotations

import os
import platform
import warnings
from importlib import metadata
from typing import Any

from .latency import is_busy, machine_load

LIBRARIES = ("harp", "numpy", "numba", "llvmlite", "onnxruntime", "onnx", "torch", "pyautoattack")
# ISA features reported, as /proc/cpuinfo names them (x86 "flags", ARM "Features").
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512_vnni": "AVX-512 VNNI",
             "asimd": "NEON", "sve": "SVE"}


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else the architecture."""
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if key in info:
            return info[key]
    if platform.system() == "Darwin":
        try:
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  check=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def isa_features() -> list[str]:
    """Vector ISA extensions of this CPU among ISA_FLAGS (e.g. ['AVX2', 'FMA'] or ['NEON'])."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    found = [label for flag, label in ISA_FLAGS.items() if flag in flags]
    if not flags and platform.machine().lower() in ("arm64", "aarch64"):
        found = ["NEON"]  # every ARMv8-A core has Advanced SIMD; macOS has no /proc/cpuinfo
    return found


def library_versions() -> dict[str, str | None]:
    """Installed version of each library in LIBRARIES, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info(threads: int = 1, *, warn: bool = True) -> dict[str, Any]:
    """The machine block of a harp-bench result; warns (RuntimeWarning) when the machine is busy."""
    load = machine_load()
    busy = is_busy(threads, load)
    if busy and warn:
        warnings.warn(f"machine is busy: 1-minute load {load:.2f} on {os.cpu_count()} cores while benchmarking "
                      f"with {threads} thread(s); timings will be inflated", RuntimeWarning, stacklevel=2)
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "isa": isa_features(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "load_average_start": load,
        "busy": busy,
    }


def describe(info: dict[str, Any]) -> str:
    """One line for terminals and reports."""
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v and k != "harp")
    isa = "/".join(info["isa"]) or "no AVX2/AVX-512/NEON found"
    busy = " (BUSY: timings inflated)" if info["busy"] else ""
    return (f"{info['cpu']} ({info['arch']}, {isa}), {info['cores']} cores, {info['os']}; Python {info['python']}, "
            f"{libs}; load average {info['load_average_start']:.2f} at start{busy}")


def _cpuinfo() -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo ({} where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in out:
                    out[key.strip()] = value.strip()
    except OSError:
        pass
    return out
