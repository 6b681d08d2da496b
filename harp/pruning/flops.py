"""Multiply-add counts of prunable layers and which layer feeds each one's input channels.

Channel pruning's compression term and its FLOPs reduction need both: a layer's cost
scales with its kept output channels times the kept output channels of the layer
producing its input (when that producer's channels reach it unchanged, through
ReLU, BatchNorm, pooling or flatten, not through an add or the model input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..models import prunable_layers

_CHANNEL_PRESERVING = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.BatchNorm2d, nn.BatchNorm1d, nn.MaxPool2d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class LayerCost:
    flops: int  # multiply-adds of the dense layer for one input
    producer: str | None  # prunable layer whose output channels are this layer's inputs


def layer_costs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, LayerCost]:
    names = [n for n, _ in prunable_layers(model)]
    out_hw: dict[str, int] = {}
    hooks = []
    for name, layer in prunable_layers(model):
        def record(_m, _i, out, name=name):
            out_hw[name] = out[0, 0].numel() if out.dim() == 4 else 1
        hooks.append(layer.register_forward_hook(record))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    producers = _producers(model, set(names))
    layers = dict(prunable_layers(model))
    return {n: LayerCost(layers[n].weight.numel() * out_hw[n], producers.get(n)) for n in names}


def _producers(model: nn.Module, prunable: set[str]) -> dict[str, str]:
    from .layers import trace_layers

    try:
        gm = trace_layers(model)
    except Exception:  # noqa: BLE001 - without a graph every layer counts its inputs as dense
        return {}
    modules = dict(model.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in prunable:
            continue
        layer = modules[node.target]
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            continue  # depthwise/grouped: the channel count is tied to the producer's, not a product
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node):
            if src.op == "call_module" and src.target in prunable:
                out[node.target] = src.target
                break
            if src.op == "call_module" and isinstance(modules.get(src.target), _CHANNEL_PRESERVING):
                src = src.args[0]
            elif src.op == "call_function" and getattr(src.target, "__name__", "") in ("relu", "flatten"):
                src = src.args[0]
            elif src.op == "call_method" and src.target in ("relu", "flatten", "view"):
                src = src.args[0]
            else:
                break
    return out
