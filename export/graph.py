"""The harp graph: a torch-free description of an exported model.

One `Graph` is the single type that flows from the tracer (torch → graph) to every
writer (ONNX, CSR bundle) and executor (reference, numba runtime). It only uses
numpy, so the runtime can load it on a device without torch.

Conventions
- Activations are NCHW float32; the batch axis is never part of a stored shape.
- Every node has exactly one output value; value names are unique.
- Nodes are stored in topological order (each input is the graph input or the
  output of an earlier node).
- Weights live in `Graph.tensors` as dense float32 arrays or, once loaded from a
  CSR bundle, as `CSRTensor` (conv/linear weights); writers decide how to store
  them (dense, ONNX sparse initializer, CSR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .csr import CSRTensor

GRAPH_VERSION = 1


class GraphError(ValueError):
    """A graph violates the schema: unknown op, bad attribute, inconsistent shape."""


@dataclass(frozen=True)
class OpSpec:
    """What an op takes: its number of inputs, required attributes and parameter roles."""

    n_inputs: int
    attrs: tuple[str, ...] = ()
    params: tuple[str, ...] = ()  # required parameter roles
    optional_params: tuple[str, ...] = ()


# The op set of graph version 1. Attribute meanings:
#   normalize:      y[c] = (x[c] - mean[c]) / std[c]                  mean, std: list[float] (C)
#   affine:         y[c] = x[c] * scale[c] + shift[c]; scale, shift (C,) tensors
#                   (a BatchNorm that no conv precedes, as in pre-activation blocks)
#   conv2d:         torch.nn.functional.conv2d semantics, symmetric padding
#                   stride, padding, dilation: [h, w]; groups: int; weight (O, I/groups, kh, kw)
#   linear:         y = x @ weight.T + bias; weight (O, I)
#   relu:           max(x, 0)
#   clip:           min(max(x, min), max)  (ReLU6 is clip 0..6)
#   maxpool2d:      kernel, stride, padding, dilation: [h, w]; ceil_mode: bool (padding is -inf)
#   avgpool2d:      kernel, stride, padding: [h, w]; ceil_mode, count_include_pad: bool
#   global_avgpool: mean over H and W, output (C, 1, 1)
#   flatten:        (C, H, W) -> (C*H*W,)
#   add:            elementwise sum of two values of equal shape
OPS: dict[str, OpSpec] = {
    "normalize": OpSpec(1, ("mean", "std")),
    "affine": OpSpec(1, (), ("scale", "shift")),
    "conv2d": OpSpec(1, ("stride", "padding", "dilation", "groups"), ("weight",), ("bias",)),
    "linear": OpSpec(1, (), ("weight",), ("bias",)),
    "relu": OpSpec(1),
    "clip": OpSpec(1, ("min", "max")),
    "maxpool2d": OpSpec(1, ("kernel", "stride", "padding", "dilation", "ceil_mode")),
    "avgpool2d": OpSpec(1, ("kernel", "stride", "padding", "ceil_mode", "count_include_pad")),
    "global_avgpool": OpSpec(1),
    "flatten": OpSpec(1),
    "add": OpSpec(2),
}


NODE_KEYS = ("op", "name", "inputs", "output", "attrs", "params")


@dataclass(frozen=True)
class Node:
    op: str
    name: str  # unique; the torch module path where there is one (e.g. "features.0")
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # role -> tensor name

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "name": self.name,
            "inputs": list(self.inputs),
            "output": self.output,
            "attrs": self.attrs,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Node:
        if not isinstance(obj, dict):
            raise GraphError(f"node entry is {type(obj).__name__}, expected an object")
        _known_keys(obj, NODE_KEYS, f"node {obj.get('name')!r}")
        try:
            return cls(
                op=_str(obj["op"], "op"),
                name=_str(obj["name"], "name"),
                inputs=tuple(_str(v, "inputs[]") for v in _list(obj["inputs"], "inputs")),
                output=_str(obj["output"], "output"),
                attrs=_dict(obj.get("attrs", {}), "attrs"),
                params={_str(k, "params key"): _str(v, "params value")
                        for k, v in _dict(obj.get("params", {}), "params").items()},
            )
        except KeyError as e:
            raise GraphError(f"node entry lacks field {e.args[0]!r}") from e


@dataclass
class Graph:
    """A model as a list of nodes over named values, plus its weight tensors."""

    input_name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    output_name: str
    nodes: list[Node]
    tensors: dict[str, np.ndarray | CSRTensor]  # weights and biases; only `.shape` is read here

    def structure_json(self) -> dict[str, Any]:
        """Everything but the tensor data (what a bundle header or manifest stores)."""
        return {
            "version": GRAPH_VERSION,
            "input": {"name": self.input_name, "shape": list(self.input_shape)},
            "output": {"name": self.output_name},
            "nodes": [n.to_json() for n in self.nodes],
        }

    @classmethod
    def from_structure_json(cls, obj: Any, tensors: dict[str, np.ndarray | CSRTensor]) -> Graph:
        obj = _dict(obj, "graph")
        try:
            version = obj["version"]
            if type(version) is not int or version != GRAPH_VERSION:  # not true, not 1.0
                raise GraphError(f"graph version {version!r} is not supported (expected {GRAPH_VERSION})")
            # A new field changes what the graph computes, and bumps graph.version: refuse what this reader
            # does not know rather than run without it (a conv's padding mode, a node's fused activation).
            _known_keys(obj, ("version", "input", "output", "nodes"), "graph")
            inp = _dict(obj["input"], "input")
            _known_keys(inp, ("name", "shape"), "graph input")
            _known_keys(_dict(obj["output"], "output"), ("name",), "graph output")
            shape = tuple(_int(v, "input.shape[]") for v in _list(inp["shape"], "input.shape"))
            if len(shape) != 3 or min(shape) < 1:
                raise GraphError(f"input shape {list(shape)} is not (C, H, W) with positive sizes")
            graph = cls(
                input_name=_str(inp["name"], "input.name"),
                input_shape=shape,  # type: ignore[arg-type]
                output_name=_str(_dict(obj["output"], "output")["name"], "output.name"),
                nodes=[Node.from_json(n) for n in _list(obj["nodes"], "nodes")],
                tensors=tensors,
            )
        except KeyError as e:
            raise GraphError(f"graph lacks field {e.args[0]!r}") from e
        graph.validate()
        return graph

    def node_by_name(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def validate(self) -> dict[str, tuple[int, ...]]:
        """Check the whole schema and return the per-sample shape of every value.

        Raises GraphError naming the node and the broken rule.
        """
        shapes: dict[str, tuple[int, ...]] = {self.input_name: tuple(self.input_shape)}
        names: set[str] = set()
        used_tensors: set[str] = set()
        for node in self.nodes:
            where = f"node {node.name!r} ({node.op})"
            spec = OPS.get(node.op)
            if spec is None:
                raise GraphError(f"{where}: unknown op (known: {', '.join(sorted(OPS))})")
            if node.name in names:
                raise GraphError(f"{where}: duplicate node name")
            names.add(node.name)
            if len(node.inputs) != spec.n_inputs:
                raise GraphError(f"{where}: takes {spec.n_inputs} inputs, got {len(node.inputs)}")
            for value in node.inputs:
                if value not in shapes:
                    raise GraphError(f"{where}: input {value!r} is not defined before it")
            if node.output in shapes:
                raise GraphError(f"{where}: output {node.output!r} is defined twice")
            missing = [a for a in spec.attrs if a not in node.attrs]
            if missing:
                raise GraphError(f"{where}: missing attributes {missing}")
            unknown = sorted(set(node.attrs) - set(spec.attrs))
            if unknown:
                raise GraphError(f"{where}: unknown attributes {unknown[:5]}")
            allowed = set(spec.params) | set(spec.optional_params)
            if set(node.params) - allowed or set(spec.params) - set(node.params):
                raise GraphError(f"{where}: parameters {sorted(node.params)} do not match {sorted(allowed)}")
            for tensor in node.params.values():
                if tensor not in self.tensors:
                    raise GraphError(f"{where}: tensor {tensor!r} is missing")
                used_tensors.add(tensor)
            try:
                shapes[node.output] = _infer(node, [shapes[v] for v in node.inputs], self.tensors)
            except GraphError as e:
                raise GraphError(f"{where}: {e}") from e
        if self.output_name not in shapes:
            raise GraphError(f"graph output {self.output_name!r} is not produced by any node")
        if len(shapes[self.output_name]) != 1:
            raise GraphError(f"graph output {self.output_name!r} has shape {shapes[self.output_name]}, expected (classes,)")
        unused = set(self.tensors) - used_tensors
        if unused:
            raise GraphError(f"tensors not used by any node: {sorted(unused)[:5]}")
        return shapes

    @property
    def num_classes(self) -> int:
        return self.validate()[self.output_name][0]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool = False) -> int:
    """Output length of a conv or pool along one axis (torch's formula)."""
    span = dilation * (kernel - 1) + 1
    num = size + 2 * padding - span
    out = (math.ceil(num / stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or left padding
    return out


def _pair(value: Any, what: str, minimum: int) -> tuple[int, int]:
    items = _list(value, what)
    if len(items) != 2:
        raise GraphError(f"{what} must have 2 entries, got {len(items)}")
    h, w = (_int(v, what) for v in items)
    if h < minimum or w < minimum:
        raise GraphError(f"{what} {[h, w]} must be >= {minimum}")
    return h, w


def _param_shape(node: Node, role: str, tensors: dict[str, np.ndarray | CSRTensor]) -> tuple[int, ...] | None:
    name = node.params.get(role)
    return None if name is None else tuple(tensors[name].shape)


def _infer(node: Node, ins: list[tuple[int, ...]], tensors: dict[str, np.ndarray | CSRTensor]) -> tuple[int, ...]:
    x = ins[0]
    a = node.attrs
    if node.op == "normalize":
        mean, std = _floats(a["mean"], "mean"), _floats(a["std"], "std")
        if len(x) != 3 or len(mean) != x[0] or len(std) != x[0]:
            raise GraphError(f"mean/std of length {len(mean)}/{len(std)} do not fit input {x}")
        if any(s == 0 for s in std):
            raise GraphError("std contains 0")
        return x
    if node.op == "affine":
        for role in ("scale", "shift"):
            shape = _param_shape(node, role, tensors)
            if len(x) != 3 or shape != (x[0],):
                raise GraphError(f"{role} shape {shape} does not fit input {x}")
        return x
    if node.op == "conv2d":
        if len(x) != 3:
            raise GraphError(f"input {x} is not (C, H, W)")
        w = _param_shape(node, "weight", tensors)
        groups = _int(a["groups"], "groups")
        stride = _pair(a["stride"], "stride", 1)
        padding = _pair(a["padding"], "padding", 0)
        dilation = _pair(a["dilation"], "dilation", 1)
        if w is None or len(w) != 4 or min(w) < 1:
            raise GraphError(f"weight shape {w} is not (O, I/groups, kh, kw)")
        if groups < 1 or x[0] % groups or w[0] % groups or w[1] * groups != x[0]:
            raise GraphError(f"weight {w} with groups={groups} does not fit input channels {x[0]}")
        _check_bias(node, tensors, w[0])
        h = conv_output_size(x[1], w[2], stride[0], padding[0], dilation[0])
        wd = conv_output_size(x[2], w[3], stride[1], padding[1], dilation[1])
        if h < 1 or wd < 1:
            raise GraphError(f"output spatial size {h}x{wd} is empty for input {x}")
        return (w[0], h, wd)
    if node.op == "linear":
        w = _param_shape(node, "weight", tensors)
        if len(x) != 1:
            raise GraphError(f"input {x} is not flat")
        if w is None or len(w) != 2 or w[1] != x[0] or w[0] < 1:
            raise GraphError(f"weight shape {w} does not fit input {x}")
        _check_bias(node, tensors, w[0])
        return (w[0],)
    if node.op == "relu":
        return x
    if node.op == "clip":
        lo, hi = _floats([a["min"], a["max"]], "min/max")
        if not lo <= hi:
            raise GraphError(f"clip min {lo} > max {hi}")
        return x
    if node.op in ("maxpool2d", "avgpool2d"):
        if len(x) != 3:
            raise GraphError(f"input {x} is not (C, H, W)")
        kernel = _pair(a["kernel"], "kernel", 1)
        stride = _pair(a["stride"], "stride", 1)
        padding = _pair(a["padding"], "padding", 0)
        dilation = _pair(a["dilation"], "dilation", 1) if node.op == "maxpool2d" else (1, 1)
        if not isinstance(a["ceil_mode"], bool):
            raise GraphError("ceil_mode must be a bool")
        if node.op == "avgpool2d" and not isinstance(a["count_include_pad"], bool):
            raise GraphError("count_include_pad must be a bool")
        if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
            raise GraphError(f"padding {padding} exceeds half the kernel {kernel}")
        # with padding at most the input's size, a kernel that leaves an output is at most 3x it: a
        # kernel of 2**24 (padding 2**23) on an 8x8 input had kept the pooling loops busy for hours
        if padding[0] > x[1] or padding[1] > x[2]:
            raise GraphError(f"padding {padding} is larger than the {x[1]}x{x[2]} input")
        h = conv_output_size(x[1], kernel[0], stride[0], padding[0], dilation[0], a["ceil_mode"])
        wd = conv_output_size(x[2], kernel[1], stride[1], padding[1], dilation[1], a["ceil_mode"])
        if h < 1 or wd < 1:
            raise GraphError(f"output spatial size {h}x{wd} is empty for input {x}")
        return (x[0], h, wd)
    if node.op == "global_avgpool":
        if len(x) != 3:
            raise GraphError(f"input {x} is not (C, H, W)")
        return (x[0], 1, 1)
    if node.op == "flatten":
        return (math.prod(x),)  # exact: np.prod would wrap around in int64
    if node.op == "add":
        if ins[0] != ins[1]:
            raise GraphError(f"input shapes {ins[0]} and {ins[1]} differ")
        return x
    raise GraphError("unknown op")  # unreachable: validate() checks OPS first


def _check_bias(node: Node, tensors: dict[str, np.ndarray | CSRTensor], out: int) -> None:
    b = _param_shape(node, "bias", tensors)
    if b is not None and b != (out,):
        raise GraphError(f"bias shape {b} is not ({out},)")


def _known_keys(obj: dict[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(str(k) for k in set(obj) - set(known))
    if unknown:
        raise GraphError(f"{what} has unknown fields {unknown[:5]}")


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise GraphError(f"{what} must be a non-empty string, got {v!r}")
    return v


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise GraphError(f"{what} must be an integer, got {v!r}")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise GraphError(f"{what} must be a list, got {type(v).__name__}")
    return list(v)


def _dict(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise GraphError(f"{what} must be an object, got {type(v).__name__}")
    return v


def _floats(v: Any, what: str) -> list[float]:
    out = []
    for item in _list(v, what):
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise GraphError(f"{what} must hold finite numbers, got {item!r}")
        out.append(float(item))
    return out
