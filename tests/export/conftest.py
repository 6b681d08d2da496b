"""Fixtures of the export tests: a pruned digits checkpoint and one export of it (built once per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

PRUNED_SPARSITY = 0.9


def zero_channels_like_pruner(model: nn.Module, fraction: float, seed: int = 0) -> dict[str, list[int]]:
    """Zero `fraction` of the output channels of every dense conv / hidden linear, in place, the way
    harp's channel pruning leaves them: weight rows zero and, where a BatchNorm is the layer's only
    reader, that BatchNorm's weight and bias zero (else the layer's bias). Returns the zeroed rows."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    nodes = [n for n in fx.symbolic_trace(model).graph.nodes
             if n.op == "call_module" and isinstance(modules[str(n.target)], nn.Conv2d | nn.Linear)]
    zeroed = {}
    with torch.no_grad():
        for node in nodes[:-1]:  # never the classifier
            layer = modules[str(node.target)]
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                continue
            rows = layer.weight.shape[0]
            drop = torch.randperm(rows, generator=gen)[: int(rows * fraction)]
            layer.weight[drop] = 0
            users = list(node.users)
            bn = modules.get(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module" else None
            if isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d):
                bn.weight[drop] = 0
                bn.bias[drop] = 0
            elif layer.bias is not None:
                layer.bias[drop] = 0
            zeroed[str(node.target)] = sorted(drop.tolist())
    return zeroed


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) * 0.6 - 0.3)
    return model


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
