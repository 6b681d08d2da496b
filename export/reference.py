"""The NumPy reference executor: runs a `Graph` node by node, slowly and plainly.

It is the oracle the numba runtime and the ONNX export are compared against.
Conv, linear and pooling nodes call their reference twins in
`harp.kernels.reference`; the elementwise ops are written out here. CSR weights
are densified first. NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from harp.kernels.reference import (
    avgpool2d_ref,
    conv2d_ref,
    global_avgpool_ref,
    linear_ref,
    maxpool2d_ref,
)

from .csr import CSRTensor
from .graph import Graph, GraphError, Node

# A handler gets the node, its input values and its parameters (role -> dense float32).
Handler = Callable[[Node, list[np.ndarray], dict[str, np.ndarray]], np.ndarray]


def run_reference(graph: Graph, x: np.ndarray) -> np.ndarray:
    """Logits (N, classes) float32 of `graph` on raw pixels x (N, C, H, W) float32.

    Raises GraphError naming the node if the graph is invalid or a node's result
    does not have the shape the graph infers for it.
    """
    shapes = graph.validate()
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(graph.input_shape):
        raise ValueError(f"run_reference: input shape {x.shape} is not (N, *{tuple(graph.input_shape)})")
    if x.dtype != np.float32:
        raise ValueError(f"run_reference: input dtype {x.dtype} is not float32")
    return _run(graph, x, shapes)


def _run(graph: Graph, x: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    n = x.shape[0]
    dense = {name: _dense(t) for name, t in graph.tensors.items()}
    last_use = {v: i for i, node in enumerate(graph.nodes) for v in node.inputs}
    values: dict[str, np.ndarray] = {graph.input_name: x}
    for i, node in enumerate(graph.nodes):
        inputs = [values[v] for v in node.inputs]
        params = {role: dense[name] for role, name in node.params.items()}
        y = np.asarray(HANDLERS[node.op](node, inputs, params), dtype=np.float32)
        expected = (n, *shapes[node.output])
        if y.shape != expected:
            raise GraphError(f"node {node.name!r} ({node.op}): produced {y.shape}, graph infers {expected}")
        values[node.output] = y
        for v in node.inputs:  # free what no later node reads
            if last_use.get(v) == i and v != graph.output_name:
                values.pop(v, None)
    return values[graph.output_name]


def _dense(t: np.ndarray | CSRTensor) -> np.ndarray:
    return t.to_dense() if isinstance(t, CSRTensor) else np.asarray(t, dtype=np.float32)


def _pair(v: Any) -> tuple[int, int]:
    return int(v[0]), int(v[1])


def _channel(v: np.ndarray | list[float]) -> np.ndarray:
    """A per-channel vector shaped to broadcast over (N, C, H, W)."""
    return np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1)


def _normalize(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return (xs[0] - _channel(node.attrs["mean"])) / _channel(node.attrs["std"])


def _affine(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return xs[0] * _channel(p["scale"]) + _channel(p["shift"])


def _conv2d(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    a = node.attrs
    return conv2d_ref(xs[0], p["weight"], p.get("bias"), _pair(a["stride"]), _pair(a["padding"]),
                      _pair(a["dilation"]), int(a["groups"]))


def _linear(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return linear_ref(xs[0], p["weight"], p.get("bias"))


def _relu(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return np.maximum(xs[0], np.float32(0))


def _clip(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return np.clip(xs[0], np.float32(node.attrs["min"]), np.float32(node.attrs["max"]))


def _maxpool2d(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    a = node.attrs
    return maxpool2d_ref(xs[0], _pair(a["kernel"]), _pair(a["stride"]), _pair(a["padding"]),
                         _pair(a["dilation"]), bool(a["ceil_mode"]))


def _avgpool2d(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    a = node.attrs
    return avgpool2d_ref(xs[0], _pair(a["kernel"]), _pair(a["stride"]), _pair(a["padding"]),
                         bool(a["ceil_mode"]), bool(a["count_include_pad"]))


def _global_avgpool(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    n, c = xs[0].shape[:2]
    return global_avgpool_ref(xs[0]).reshape(n, c, 1, 1)


def _flatten(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return xs[0].reshape(xs[0].shape[0], -1)


def _add(node: Node, xs: list[np.ndarray], p: dict[str, np.ndarray]) -> np.ndarray:
    return xs[0] + xs[1]


# One handler per op of graph.OPS; adding an op means one function and one line.
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
