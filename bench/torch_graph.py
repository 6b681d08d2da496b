"""The exported graph rebuilt as a differentiable torch module: the white-box model of an artifact.

An artifact holds no torch checkpoint of its own (the manifest only names the
source checkpoint, which may be gone or on another machine). Its CSR bundle holds
the exact model that was exported: BatchNorm folded, dead channels trimmed. This
module runs that graph with torch ops, one handler per op of `graph.OPS` (the
torch twin of `harp.export.reference`), with the CSR weights densified into
frozen parameters. Gradients flow to the input, so attacks run on it.

`load_torch_model` checks the rebuilt module against the torch logits the
exporter stored in parity.npz, with the export's own parity policy
(`harp.export.verify.compare_logits`), before anyone attacks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harp.errors import HarpError
from harp.export.artifact import Artifact
from harp.export.csr import CSRTensor
from harp.export.graph import Graph, Node

Handler = Callable[[Node, list[torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


class GraphModule(nn.Module):
    """Logits (N, classes) of a harp Graph on raw pixels (N, C, H, W), computed with torch ops."""

    def __init__(self, graph: Graph):
        super().__init__()
        graph.validate()
        self.graph = graph
        self.weights = nn.ParameterDict({
            _key(name): nn.Parameter(torch.from_numpy(_dense(t)), requires_grad=False)
            for name, t in graph.tensors.items()
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_use = {v: i for i, node in enumerate(self.graph.nodes) for v in node.inputs}
        values: dict[str, torch.Tensor] = {self.graph.input_name: x}
        for i, node in enumerate(self.graph.nodes):
            params = {role: self.weights[_key(name)] for role, name in node.params.items()}
            values[node.output] = HANDLERS[node.op](node, [values[v] for v in node.inputs], params)
            for v in node.inputs:
                if last_use.get(v) == i and v != self.graph.output_name:
                    values.pop(v, None)
        return values[self.graph.output_name]


def load_torch_model(artifact: Artifact) -> GraphModule:
    """The artifact's bundle as an eval-mode GraphModule, checked against parity.npz's torch logits."""
    from harp.export.bundle import load_bundle
    from harp.export.verify import compare_logits, load_parity

    bundle = load_bundle(artifact.file("model.harpz"))
    model = GraphModule(bundle.graph).eval()
    arrays = load_parity(artifact.file("parity.npz"))
    x = np.concatenate([arrays["x_clean"], arrays["x_adv"]])
    expected = np.concatenate([arrays["logits_clean"], arrays["logits_adv"]])
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    dtype = artifact.manifest["export"].get("values_dtype", "float32")
    result = compare_logits("torch (graph rebuilt)", "torch", got, expected, dtype)
    if not result.passed:
        raise HarpError(f"{artifact.root}: the bundle rebuilt in torch does not reproduce the stored torch "
                        f"logits: {result.describe()}")
    return model


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def _dense(t: np.ndarray | CSRTensor) -> np.ndarray:
    return np.array(t.to_dense() if isinstance(t, CSRTensor) else t, dtype=np.float32)  # a writable copy


def _pair(v: Any) -> tuple[int, int]:
    return int(v[0]), int(v[1])


def _channel(v: Any, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over (N, C, H, W)."""
    return torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def _normalize(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return (xs[0] - _channel(node.attrs["mean"], xs[0])) / _channel(node.attrs["std"], xs[0])


def _affine(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return xs[0] * p["scale"].reshape(1, -1, 1, 1) + p["shift"].reshape(1, -1, 1, 1)


def _conv2d(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.conv2d(xs[0], p["weight"], p.get("bias"), _pair(a["stride"]), _pair(a["padding"]),
                    _pair(a["dilation"]), int(a["groups"]))


def _linear(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(xs[0], p["weight"], p.get("bias"))


def _relu(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.relu(xs[0])


def _clip(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return xs[0].clamp(float(node.attrs["min"]), float(node.attrs["max"]))


def _maxpool2d(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.max_pool2d(xs[0], _pair(a["kernel"]), _pair(a["stride"]), _pair(a["padding"]), _pair(a["dilation"]),
                        ceil_mode=bool(a["ceil_mode"]))


def _avgpool2d(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    return F.avg_pool2d(xs[0], _pair(a["kernel"]), _pair(a["stride"]), _pair(a["padding"]),
                        ceil_mode=bool(a["ceil_mode"]), count_include_pad=bool(a["count_include_pad"]))


def _global_avgpool(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return xs[0].mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)


def _flatten(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return xs[0].flatten(1)


def _add(node: Node, xs: list[torch.Tensor], p: dict[str, torch.Tensor]) -> torch.Tensor:
    return xs[0] + xs[1]


# One handler per op of graph.OPS, as in harp.export.reference.HANDLERS.
HANDLERS: dict[str, Handler] = {
    "normalize": _normalize,
    "affine": _affine,
    "conv2d": _conv2d,
    "linear": _linear,
    "relu": _relu,
    "clip": _clip,
    "maxpool2d": _maxpool2d,
    "avgpool2d": _avgpool2d,
    "global_avgpool": _global_avgpool,
    "flatten": _flatten,
    "add": _add,
}
