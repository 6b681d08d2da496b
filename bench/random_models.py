"""Random-init models pruned one-shot: what the size, latency and what-if benchmarks measure
when no trained model exists for an architecture."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from harp.data import DatasetSpec
from harp.errors import HarpError
from harp.models import build_model, check_model_runs, prunable_layers
from harp.pruning.masks import apply_masks, global_magnitude_masks, layerwise_magnitude_masks

PRUNING_RULES = ("global-magnitude", "uniform")


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded non-trivial BatchNorm statistics and affine parameters, so that folding them matters."""
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


def random_pruned_model(arch: str, spec: DatasetSpec, sparsity: float, rule: str = "global-magnitude",
                        seed: int = 0) -> nn.Module:
    """`arch` for `spec` with seeded random weights and BatchNorm, pruned one-shot by magnitude:
    over the whole model ("global-magnitude") or every layer alike ("uniform")."""
    torch.manual_seed(seed)
    try:
        model = randomise_batchnorm(build_model(arch, spec), seed).eval()
    except RuntimeError as e:  # an allocation beyond this machine: a what-if of 10^8 classes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        shape = "x".join(map(str, spec.input_shape))
        raise HarpError(f"--arch {arch} for {shape} inputs and {spec.classes} classes cannot be built here: "
                        f"{first}") from e
    check_model_runs(model, arch, spec)  # an input too small for its pooling, or too large for memory
    if rule == "global-magnitude":
        masks = global_magnitude_masks(model, sparsity)
    elif rule == "uniform":
        masks = layerwise_magnitude_masks(model, {name: 1.0 - sparsity for name, _ in prunable_layers(model)})
    else:
        raise ValueError(f"unknown pruning rule {rule!r} (choose from {', '.join(PRUNING_RULES)})")
    apply_masks(model, masks)
    return model


def zero_channels_like_pruner(model: nn.Module, fraction: float, seed: int = 0) -> dict[str, list[int]]:
    """Zero `fraction` of the output channels of every dense conv / hidden linear, in place: weight rows
    zero and, where a BatchNorm is the layer's only reader, that BatchNorm's weight and bias zero (else
    the layer's bias). The weights reading those channels stay, as in a model zeroed by hand or by a harp
    older than `bake`'s zeroing of them: the harder input for channel trimming. Returns the zeroed rows."""
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
