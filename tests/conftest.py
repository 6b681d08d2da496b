"""Shared fixtures: a small trained digits model, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# What a device lacks: it has numpy, numba and click (and may have onnxruntime, which is blocked too).
NOT_ON_DEVICE = ("torch", "torchvision", "onnx", "onnxruntime", "scipy", "sklearn")
_DEVICE_PRELUDE = f"""
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {NOT_ON_DEVICE!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture(scope="session", autouse=True)
def unrolled_cache(tmp_path_factory) -> Path:
    """Layers compiled by `harp.kernels.unrolled` go to a fresh directory under pytest's temporary
    root (which pytest prunes): the tests compile them as a first load does and leave the user's
    cache alone. Subprocesses inherit the variable."""
    cache = tmp_path_factory.mktemp("unrolled-cache")
    os.environ["HARP_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture
def device_python() -> Callable[..., subprocess.CompletedProcess]:
    """Run Python code in a fresh process where the packages a device lacks cannot be imported.

    Call it as device_python(code, *argv, timeout=300); the code sees the argv as sys.argv[1:].
    """

    def run(code: str, *argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _DEVICE_PRELUDE + code, *map(str, argv)],
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def device_harp(device_python) -> Callable[..., subprocess.CompletedProcess]:
    """Run the `harp` command with these arguments as on a device (see `device_python`)."""
    code = "from harp.console import harp\nsys.argv = ['harp', *sys.argv[1:]]\nharp()\n"
    return lambda *args, timeout=300: device_python(code, *args, timeout=timeout)


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory) -> Path:
    """A naturally trained small CNN on digits (a few seconds of training)."""
    from harp.training.train import TrainOptions, train

    out = tmp_path_factory.mktemp("ckpt") / "digits"
    train(TrainOptions(dataset="digits", adv="none", epochs=6), out, quiet=True)
    return out


@pytest.fixture(scope="session")
def digits_robust_ckpt(tmp_path_factory) -> Path:
    """A briefly PGD-trained small CNN on digits."""
    from harp.training.train import TrainOptions, train

    out = tmp_path_factory.mktemp("ckpt") / "digits-pgd"
    train(TrainOptions(dataset="digits", adv="pgd", epochs=8, steps=5), out, quiet=True)
    return out
