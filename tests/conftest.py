"""Shared fixtures: a small trained digits model, built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Layers compiled by `harp.kernels.unrolled` go to a fresh directory: the tests compile
# them (as a first load does) and leave the user's cache alone.
os.environ["HARP_CACHE_DIR"] = tempfile.mkdtemp(prefix="harp-test-unrolled-")


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
