"""Write a harp `Graph` as an ONNX model, built directly with `onnx.helper`.

The model takes "input" float32 [N, C, H, W] (N symbolic) and returns the graph's
output [N, classes]. Each graph op maps to one to three ONNX nodes:

    normalize -> Sub, Div          affine -> Mul, Add          conv2d -> Conv
    linear    -> Gemm (transB=1)   relu   -> Relu              clip   -> Clip (min/max inputs)
    maxpool2d -> [Pad,] MaxPool   avgpool2d -> [Pad,] AveragePool   global_avgpool -> GlobalAveragePool
    flatten   -> Flatten(axis=1)   add    -> Add

Conv and linear weights are dense initializers, or with `sparse=True` ONNX
SparseTensorProtos in COO form (values + ascending int64 linear indices into the
dense shape, dims = the dense shape). Where the sparse tensors live is
`sparse_storage`:

- "constant" (default): each is the `sparse_value` of a Constant node. Its output
  is an ordinary dense tensor, so the model passes
  `onnx.checker.check_model(full_check=True)`.
- "initializer": each is a graph `sparse_initializer`. onnxruntime loads and runs
  this too (it densifies them at load), and the basic checker accepts it, but
  onnx's strict shape inference types a sparse initializer as
  sparse_tensor(float), which no standard op accepts, so full_check fails.

With `values_dtype="float16"` the weights are stored as fp16 and Cast to float32
in the graph, so all arithmetic stays fp32. Biases, BatchNorm affines and
normalisation constants are always dense float32.

`ir_version` is the smallest one the opset needs (IR 8 for the default opset
17), not onnx's own default, which can be newer than the installed runtime
accepts (onnx 1.23 writes IR 14; onnxruntime 1.31 loads at most IR 13, opset 26).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harp.export.errors import ExportError
from harp.io import atomic_write_bytes
from harp.export.graph import Graph, GraphError, Node

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Clip takes min/max as inputs and Gemm's C is optional from opset 11
SPARSE_MIN_IR_VERSION = 6  # sparse_initializer exists from IR version 6
VALUES_DTYPES = {"float32": np.float32, "float16": np.float16}
SPARSE_STORAGES = ("constant", "initializer")
BATCH_DIM = "N"


def graph_to_onnx(graph: Graph, *, sparse: bool = False, opset: int = DEFAULT_OPSET,
                  values_dtype: str = "float32", sparse_storage: str = "constant") -> onnx.ModelProto:
    """Build an ONNX model computing `graph`; conv/linear weights sparse (COO) when `sparse`.

    Raises ExportError for an invalid graph, an opset outside [11, onnx's newest], an
    unknown `values_dtype` or an unknown `sparse_storage`.
    """
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r} is not supported (expected {MIN_OPSET}..{newest})")
    if values_dtype not in VALUES_DTYPES:
        raise ExportError(f"values_dtype {values_dtype!r} is not one of {sorted(VALUES_DTYPES)}")
    if sparse_storage not in SPARSE_STORAGES:
        raise ExportError(f"sparse_storage {sparse_storage!r} is not one of {list(SPARSE_STORAGES)}")
    try:
        shapes = graph.validate()
    except GraphError as e:
        raise ExportError(f"graph cannot be written as ONNX: {e}") from e
    builder = _Builder(graph, shapes, sparse=sparse, values_dtype=np.dtype(VALUES_DTYPES[values_dtype]),
                       sparse_storage=sparse_storage)
    for node in graph.nodes:
        try:
            _OP_WRITERS[node.op](builder, node)
        except ExportError:
            raise
        except (ValueError, TypeError) as e:
            raise ExportError(f"node {node.name!r} ({node.op}): {e}") from e
    inputs = [helper.make_tensor_value_info(graph.input_name, TensorProto.FLOAT, [BATCH_DIM, *graph.input_shape])]
    outputs = [helper.make_tensor_value_info(graph.output_name, TensorProto.FLOAT,
                                             [BATCH_DIM, *shapes[graph.output_name]])]
    onnx_graph = helper.make_graph(builder.nodes, "harp", inputs, outputs, initializer=builder.initializers,
                                   sparse_initializer=builder.sparse_initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="harp")
    model.ir_version = max(helper.find_min_ir_version_for(opsets), SPARSE_MIN_IR_VERSION)
    return model


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write `model` to `path` atomically (a temp file in the same folder, then os.replace)."""
    target = Path(path)
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf refuses messages over 2 GiB
        raise ExportError(f"cannot serialise ONNX model for {target}: {e}") from e
    atomic_write_bytes(target, data)
    return target


def sparse_weights(model: onnx.ModelProto) -> dict[str, onnx.SparseTensorProto]:
    """The model's sparse tensors by stored name: its sparse initializers and Constant `sparse_value`s.

    The stored name is the graph tensor's name, or "<tensor>.float16" (Cast to <tensor>) for fp16 weights.
    """
    found = {sp.values.name: sp for sp in model.graph.sparse_initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "sparse_value":
                    found[node.output[0]] = attr.sparse_tensor
    return found


class _Builder:
    """Collects ONNX nodes and initializers; hands out names that clash with no graph name."""

    def __init__(self, graph: Graph, shapes: dict[str, tuple[int, ...]], *, sparse: bool, values_dtype: np.dtype,
                 sparse_storage: str) -> None:
        self.graph = graph
        self.shapes = shapes  # per-sample shape of every graph value
        self.sparse = sparse
        self.sparse_storage = sparse_storage
        self.values_dtype = values_dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.sparse_initializers: list[onnx.SparseTensorProto] = []
        self.taken: set[str] = {graph.input_name, *graph.tensors, *(n.output for n in graph.nodes),
                                 *(n.name for n in graph.nodes)}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], output: str, name: str, **attrs: object) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))

    def dense(self, name: str, array: np.ndarray) -> str:
        """Add a dense float32 initializer called `name` and return the name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def weight(self, tensor: str) -> str:
        """Add a conv/linear weight (sparse and/or fp16 as configured); return the float32 value's name."""
        array = self.graph.tensors[tensor]
        if self.values_dtype == np.float32:
            stored_name, stored = tensor, np.ascontiguousarray(array, dtype=np.float32)
        else:
            big = np.abs(array) > np.finfo(self.values_dtype).max
            if big.any():
                raise ExportError(f"weight {tensor!r} has values up to {np.abs(array).max():.3g}, "
                                  f"beyond {self.values_dtype.name}'s range")
            stored_name, stored = self.fresh(f"{tensor}.{self.values_dtype.name}"), array.astype(self.values_dtype)
        if self.sparse:
            coo = _coo(stored_name, stored, nonzero=array != 0)
            if self.sparse_storage == "initializer":
                self.sparse_initializers.append(coo)
            else:
                self.nodes.append(helper.make_node("Constant", [], [stored_name],
                                                   name=self.fresh(f"{stored_name}.const"), sparse_value=coo))
        else:
            self.initializers.append(numpy_helper.from_array(stored, stored_name))
        if stored_name != tensor:
            self.node("Cast", [stored_name], tensor, name=self.fresh(f"{tensor}.cast"), to=TensorProto.FLOAT)
        return tensor


def _coo(name: str, array: np.ndarray, *, nonzero: np.ndarray) -> onnx.SparseTensorProto:
    """COO sparse tensor: values at the ascending int64 linear indices where `nonzero` holds."""
    flat_index = np.flatnonzero(nonzero.ravel()).astype(np.int64)  # ascending by construction
    values = numpy_helper.from_array(np.ascontiguousarray(array.ravel()[flat_index]), name)
    indices = numpy_helper.from_array(flat_index, f"{name}.indices")
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def _channel_column(values: np.ndarray | list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)  # (C, 1, 1) broadcasts over (N, C, H, W)


def _write_normalize(b: _Builder, node: Node) -> None:
    mean = b.dense(b.fresh(f"{node.name}.mean"), _channel_column(node.attrs["mean"]))
    std = b.dense(b.fresh(f"{node.name}.std"), _channel_column(node.attrs["std"]))
    centered = b.fresh(f"{node.name}.centered")
    b.node("Sub", [node.inputs[0], mean], centered, name=b.fresh(f"{node.name}.sub"))
    b.node("Div", [centered, std], node.output, name=node.name)


def _write_affine(b: _Builder, node: Node) -> None:
    scale = b.dense(node.params["scale"], _channel_column(b.graph.tensors[node.params["scale"]]))
    shift = b.dense(node.params["shift"], _channel_column(b.graph.tensors[node.params["shift"]]))
    scaled = b.fresh(f"{node.name}.scaled")
    b.node("Mul", [node.inputs[0], scale], scaled, name=b.fresh(f"{node.name}.mul"))
    b.node("Add", [scaled, shift], node.output, name=node.name)


def _weight_and_bias(b: _Builder, node: Node) -> list[str]:
    names = [b.weight(node.params["weight"])]
    if "bias" in node.params:
        names.append(b.dense(node.params["bias"], b.graph.tensors[node.params["bias"]]))
    return names


def _write_conv2d(b: _Builder, node: Node) -> None:
    a = node.attrs
    kernel = list(b.graph.tensors[node.params["weight"]].shape[2:])
    b.node("Conv", [node.inputs[0], *_weight_and_bias(b, node)], node.output, name=node.name,
           kernel_shape=kernel, strides=list(a["stride"]), pads=[*a["padding"], *a["padding"]],
           dilations=list(a["dilation"]), group=int(a["groups"]))


def _write_linear(b: _Builder, node: Node) -> None:
    b.node("Gemm", [node.inputs[0], *_weight_and_bias(b, node)], node.output, name=node.name, transB=1)


def _write_relu(b: _Builder, node: Node) -> None:
    b.node("Relu", [node.inputs[0]], node.output, name=node.name)


def _write_clip(b: _Builder, node: Node) -> None:
    lo = b.dense(b.fresh(f"{node.name}.min"), np.array(node.attrs["min"], dtype=np.float32))
    hi = b.dense(b.fresh(f"{node.name}.max"), np.array(node.attrs["max"], dtype=np.float32))
    b.node("Clip", [node.inputs[0], lo, hi], node.output, name=node.name)


def _ceil_overhang(b: _Builder, node: Node, dilation: list[int]) -> list[int]:
    """Extra bottom/right padding that makes floor mode produce the ceil-mode windows torch keeps."""
    a = node.attrs
    in_hw = b.shapes[node.inputs[0]][1:]
    out_hw = b.shapes[node.output][1:]
    extra = []
    for size, out, k, s, p, d in zip(in_hw, out_hw, a["kernel"], a["stride"], a["padding"], dilation):
        span = d * (k - 1) + 1
        extra.append(max(0, (out - 1) * s + span - (size + 2 * p)))
    return extra


def _pad(b: _Builder, node: Node, source: str, hw_pads: list[int], value: float) -> str:
    """Pad H and W of `source` by [top, left, bottom, right] with the constant `value`; return the result."""
    top, left, bottom, right = hw_pads
    amounts = b.fresh(f"{node.name}.pads")
    b.initializers.append(numpy_helper.from_array(np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64),
                                                  amounts))
    fill = b.dense(b.fresh(f"{node.name}.pad_value"), np.array(value, dtype=np.float32))
    padded = b.fresh(f"{node.name}.padded")
    b.node("Pad", [source, amounts, fill], padded, name=b.fresh(f"{node.name}.pad"), mode="constant")
    return padded


def _write_maxpool2d(b: _Builder, node: Node) -> None:
    # ceil_mode is lowered to explicit end padding: onnx shape inference (opset < 22) and torch
    # disagree on whether a last window starting in the padding counts. MaxPool ignores padding.
    a = node.attrs
    pad = list(a["padding"])
    extra = _ceil_overhang(b, node, list(a["dilation"])) if a["ceil_mode"] else [0, 0]
    source = node.inputs[0]
    if any(p + e >= k for p, e, k in zip(pad, extra, a["kernel"])):
        # onnxruntime wants pads < kernel; a dilated window can overhang further, so pad with -inf explicitly
        source = _pad(b, node, source, [*pad, pad[0] + extra[0], pad[1] + extra[1]], -np.inf)
        pad, extra = [0, 0], [0, 0]
    b.node("MaxPool", [source], node.output, name=node.name, kernel_shape=list(a["kernel"]),
           strides=list(a["stride"]), pads=[*pad, pad[0] + extra[0], pad[1] + extra[1]],
           dilations=list(a["dilation"]), ceil_mode=0)


def _write_avgpool2d(b: _Builder, node: Node) -> None:
    # torch's ceil_mode divisor counts the symmetric padding (with count_include_pad) but never the
    # ceil overhang; onnxruntime differs, so ceil mode is lowered to floor mode: an explicit zero Pad
    # for the counted padding, then end padding for the overhang with count_include_pad=0.
    a = node.attrs
    pad, include = list(a["padding"]), bool(a["count_include_pad"])
    extra = _ceil_overhang(b, node, [1, 1]) if a["ceil_mode"] else [0, 0]
    source = node.inputs[0]
    if any(extra) and include and any(pad):
        source = _pad(b, node, source, [*pad, *pad], 0.0)
        pad, include = [0, 0], False
    elif any(extra):
        include = False  # with no symmetric padding, torch divides by the in-bounds count
    b.node("AveragePool", [source], node.output, name=node.name, kernel_shape=list(a["kernel"]),
           strides=list(a["stride"]), pads=[*pad, pad[0] + extra[0], pad[1] + extra[1]], ceil_mode=0,
           count_include_pad=int(include))


def _write_global_avgpool(b: _Builder, node: Node) -> None:
    b.node("GlobalAveragePool", [node.inputs[0]], node.output, name=node.name)


def _write_flatten(b: _Builder, node: Node) -> None:
    b.node("Flatten", [node.inputs[0]], node.output, name=node.name, axis=1)


def _write_add(b: _Builder, node: Node) -> None:
    b.node("Add", list(node.inputs), node.output, name=node.name)


_OP_WRITERS: dict[str, Callable[[_Builder, Node], None]] = {
    "normalize": _write_normalize,
    "affine": _write_affine,
    "conv2d": _write_conv2d,
    "linear": _write_linear,
    "relu": _write_relu,
    "clip": _write_clip,
    "maxpool2d": _write_maxpool2d,
    "avgpool2d": _write_avgpool2d,
    "global_avgpool": _write_global_avgpool,
    "flatten": _write_flatten,
    "add": _write_add,
}
