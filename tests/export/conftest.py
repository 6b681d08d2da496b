"""Fixtures of the export tests: a pruned digits checkpoint and one export of it (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from harp.bench.random_models import randomise_batchnorm, zero_channels_like_pruner

PRUNED_SPARSITY = 0.9


@pytest.fixture(scope="session")
def channel_pruner() -> Callable[..., dict[str, list[int]]]:
    return zero_channels_like_pruner


@pytest.fixture(scope="session")
def bn_randomiser() -> Callable[..., nn.Module]:
    return randomise_batchnorm


@pytest.fixture(scope="session")
def pruned_digits_ckpt(digits_ckpt, tmp_path_factory) -> Path:
    """digits_ckpt pruned one-shot to 90% by global magnitude, saved with a `pruning` meta block."""
    from harp.checkpoint import load_checkpoint, save_checkpoint
    from harp.pruning.masks import apply_masks, global_magnitude_masks
    from harp.sparsity import model_sparsity

    ckpt = load_checkpoint(digits_ckpt)
    model = ckpt.build_model()
    masks = global_magnitude_masks(model, PRUNED_SPARSITY)
    apply_masks(model, masks)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version", "versions", "files")}
    meta["pruning"] = {"method": "global_magnitude", "granularity": "weight", "target_sparsity": PRUNED_SPARSITY,
                       "achieved_sparsity": model_sparsity(model), "layers": sorted(masks)}
    out = tmp_path_factory.mktemp("ckpt") / "digits-pruned"
    save_checkpoint(out, model, meta, masks)
    return out


@pytest.fixture(scope="session")
def digits_export(pruned_digits_ckpt, tmp_path_factory) -> Path:
    """A full export (all formats) of the pruned digits checkpoint. Tests must not modify it: copy first."""
    from harp.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "digits"
    export_checkpoint(pruned_digits_ckpt, out, n_parity=128, n_adversarial=32)
    return out
