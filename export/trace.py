"""Trace an eval-mode torch classifier into a harp `Graph` with torch.fx.

`trace_model` is the public entry point (`export_problem` asks whether it would
succeed). It works on a deep copy of the
model in eval mode, so the caller's model is never touched:

1. symbolic tracing (`Normalize` and the torch.nn layers are leaves; custom
   modules such as residual blocks are traced through);
2. shape propagation on a dummy batch, so every value has a known per-sample
   shape (pooling and reshape decisions need it);
3. one pass over the fx nodes in order, mapping each onto graph ops:
   a BatchNorm that directly follows a Conv2d / Linear (and is its only user) is
   folded into that layer's weight and bias; a standalone BatchNorm2d becomes
   `affine`; Dropout, Identity and no-op reshapes disappear;
4. the value the model returns is renamed "logits", nodes that do not feed it
   are dropped, and the graph is validated.

Anything outside the graph op set raises `ExportError` naming the layer path
and its type. Handlers are registered in `_MODULE_HANDLERS`, `_FUNCTION_HANDLERS`
and `_METHOD_HANDLERS`; supporting a new construct means one handler plus one line.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from harp.export.errors import ExportError
from harp.export.graph import Graph, GraphError, Node
from harp.models.normalize import Normalize
from harp.values import is_int

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def trace_model(model: nn.Module, input_shape: tuple[int, int, int]) -> Graph:
    """Convert `model` (applied to per-sample inputs of shape (C, H, W)) into a validated Graph.

    Raises ExportError naming the layer when the model uses anything the graph op set
    cannot express.
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"trace_model expects a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ExportError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    work = copy.deepcopy(model).eval()
    gm = _symbolic_trace(work)
    _check_supported(gm, type(model).__name__)  # before running it, so an unsupported layer is named first
    _propagate_shapes(gm, work, shape)  # type: ignore[arg-type]
    graph = _Converter(gm, type(model).__name__, shape).run()  # type: ignore[arg-type]
    try:
        graph.validate()
    except GraphError as e:
        raise ExportError(f"traced graph of {type(model).__name__} is invalid: {e}") from e
    return graph


def export_problem(model: nn.Module, input_shape: tuple[int, int, int]) -> str | None:
    """Why `trace_model` would refuse `model` (the ExportError's message), None when it can be exported."""
    try:
        trace_model(model, input_shape)
    except ExportError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------
# tracing and shapes


class _Tracer(fx.Tracer):
    """fx tracer that keeps `Normalize` whole and names the module a tracing failure happened in."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except ExportError:
            raise
        except Exception as e:
            path = self.path_of_module(m)
            raise ExportError(f"cannot trace layer '{path}' ({type(m).__name__}): {e}") from e


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"cannot trace model ({type(model).__name__}): {e}") from e


def _check_supported(gm: fx.GraphModule, model_type: str) -> None:
    """Raise ExportError for the first layer, function or method that no handler covers."""
    converter = _Converter(gm, model_type, (1, 1, 1))
    for fxnode in gm.graph.nodes:
        converter.current = fxnode
        if fxnode.op == "call_module":
            mod = converter.modules[str(fxnode.target)]
            if not any(isinstance(mod, cls) for cls, _ in _MODULE_HANDLERS):
                raise ExportError(f"unsupported layer '{fxnode.target}' ({type(mod).__name__})")
        elif fxnode.op == "call_function" and fxnode.target not in _FUNCTION_HANDLERS and fxnode.target not in _INT_OPS:
            raise converter._unsupported(_function_label(fxnode.target))
        elif fxnode.op == "call_method" and fxnode.target not in _METHOD_HANDLERS:
            raise converter._unsupported(f"Tensor.{fxnode.target}")


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    dummy = torch.zeros((2, *input_shape), dtype=dtype, device=device)  # (N, C, H, W)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(dummy)
    except Exception as e:
        raise ExportError(f"model {type(model).__name__} does not run on input shape {list(input_shape)}: {e}") from e


# ---------------------------------------------------------------------------
# values seen while converting


class _Batch:
    """The symbolic batch size (what x.size(0) / x.shape[0] evaluate to)."""

    def __repr__(self) -> str:
        return "N"


BATCH = _Batch()


@dataclass(frozen=True)
class _Value:
    """A graph value: its name, per-sample shape, and the value it is a reshaped view of."""

    name: str
    shape: tuple[int, ...]
    base: str | None = None  # set for flatten results (they share storage with the source)

    @property
    def storage(self) -> str:
        return self.base or self.name


@dataclass(frozen=True)
class _Constant:
    """A tensor read with get_attr; no graph op accepts one."""

    target: str


# ---------------------------------------------------------------------------
# the converter


class _Converter:
    def __init__(self, gm: fx.GraphModule, model_type: str, input_shape: tuple[int, int, int]) -> None:
        self.gm = gm
        self.model_type = model_type
        self.input_shape = input_shape
        self.modules = dict(gm.named_modules())
        self.index = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.env: dict[fx.Node, Any] = {}
        self.folded: set[fx.Node] = set()  # BatchNorm nodes already folded into their conv/linear
        self.nodes: list[Node] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.node_names: set[str] = set()
        self.value_names: set[str] = {INPUT_NAME, OUTPUT_NAME}
        self.current: fx.Node | None = None

    # -- driver ------------------------------------------------------------

    def run(self) -> Graph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ExportError(f"model {self.model_type} takes {len(placeholders)} inputs, "
                              "expected exactly one image batch")
        output: _Value | None = None
        for fxnode in self.gm.graph.nodes:
            self.current = fxnode
            if fxnode in self.folded:
                continue
            if fxnode.op == "placeholder":
                self.env[fxnode] = _Value(INPUT_NAME, tuple(self.input_shape))
            elif fxnode.op == "get_attr":
                self.env[fxnode] = _Constant(str(fxnode.target))
            elif fxnode.op == "call_module":
                self.env[fxnode] = self._call_module(fxnode)
            elif fxnode.op == "call_function":
                self.env[fxnode] = self._call_function(fxnode)
            elif fxnode.op == "call_method":
                self.env[fxnode] = self._call_method(fxnode)
            elif fxnode.op == "output":
                result = self.env.get(fxnode.args[0]) if isinstance(fxnode.args[0], fx.Node) else fxnode.args[0]
                if not isinstance(result, _Value):
                    raise ExportError(f"model {self.model_type} returns {type(fxnode.args[0]).__name__}, "
                                      "expected one logits tensor")
                output = result
        if output is None:
            raise ExportError(f"model {self.model_type} has no output")
        if output.name == INPUT_NAME:
            raise ExportError(f"model {self.model_type} returns its input unchanged; there is nothing to export")
        return self._finish(output.name)

    def _finish(self, output_value: str) -> Graph:
        def rename(v: str) -> str:
            return OUTPUT_NAME if v == output_value else v

        nodes = [replace(n, inputs=tuple(rename(v) for v in n.inputs), output=rename(n.output)) for n in self.nodes]
        needed = {OUTPUT_NAME}
        kept: list[Node] = []
        for node in reversed(nodes):  # drop nodes whose result never reaches the output
            if node.output in needed:
                kept.append(node)
                needed.update(node.inputs)
        kept.reverse()
        used = {t for n in kept for t in n.params.values()}
        tensors = {k: v for k, v in self.tensors.items() if k in used}
        return Graph(INPUT_NAME, tuple(self.input_shape), OUTPUT_NAME, kept, tensors)  # type: ignore[arg-type]

    # -- dispatch ----------------------------------------------------------

    def _call_module(self, fxnode: fx.Node) -> Any:
        mod = self.modules[str(fxnode.target)]
        for cls, handler in _MODULE_HANDLERS:
            if isinstance(mod, cls):
                return handler(self, fxnode, mod)
        raise ExportError(f"unsupported layer '{fxnode.target}' ({type(mod).__name__})")

    def _call_function(self, fxnode: fx.Node) -> Any:
        args = [self._resolve(a) for a in fxnode.args]
        if fxnode.target in _INT_OPS and args and all(is_int(a) for a in args):
            return _INT_OPS[fxnode.target](*args)  # shape arithmetic, e.g. x.size(1) * x.size(2)
        handler = _FUNCTION_HANDLERS.get(fxnode.target)  # type: ignore[arg-type]
        if handler is None:
            raise self._unsupported(_function_label(fxnode.target))
        return handler(self, fxnode)

    def _call_method(self, fxnode: fx.Node) -> Any:
        handler = _METHOD_HANDLERS.get(str(fxnode.target))
        if handler is None:
            raise self._unsupported(f"Tensor.{fxnode.target}")
        return handler(self, fxnode)

    # -- helpers used by handlers --------------------------------------------

    def _resolve(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, list | tuple):
            return type(arg)(self._resolve(a) for a in arg)
        return arg

    def _tensor(self, arg: Any, what: str = "input") -> _Value:
        value = self._resolve(arg)
        if isinstance(value, _Constant):
            raise self._error(f"{what} is the stored tensor '{value.target}', "
                              "which the graph cannot hold as an activation")
        if not isinstance(value, _Value):
            raise self._error(f"{what} must be a tensor, got {value!r}")
        return value

    def _bind(self, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
        """Map the current node's positional and keyword arguments onto parameter names."""
        fxnode = self.current
        assert fxnode is not None
        args = list(fxnode.args)
        if len(args) > len(names):
            raise self._error(f"takes at most {len(names)} arguments, got {len(args)}")
        bound = dict(zip(names, args))
        for key, value in fxnode.kwargs.items():
            if key not in names:
                raise self._error(f"argument {key!r} is not supported")
            bound[key] = value
        for name in names:
            if name not in bound:
                if name not in defaults:
                    raise self._error(f"argument {name!r} is missing")
                bound[name] = defaults[name]
        return {k: (v if k == "input" else self._resolve(v)) for k, v in bound.items()}

    def _out_shape(self, fxnode: fx.Node) -> tuple[int, ...]:
        meta = fxnode.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise self._error("does not produce a single tensor")
        return tuple(int(s) for s in meta.shape[1:])

    def _node_name(self, fxnode: fx.Node) -> str:
        """Module path for module calls; '<enclosing module path>.<function>' otherwise (not yet unique)."""
        if fxnode.op == "call_module":
            return str(fxnode.target)
        fn = str(fxnode.target) if fxnode.op == "call_method" else getattr(fxnode.target, "__name__", fxnode.name)
        path = self._enclosing(fxnode)[0]
        return f"{path}.{fn}" if path else fn

    def _enclosing(self, fxnode: fx.Node) -> tuple[str, str]:
        """(path, type name) of the innermost module whose forward created `fxnode`."""
        stack = fxnode.meta.get("nn_module_stack") or {}
        if not stack:
            return "", self.model_type
        path, cls = list(stack.values())[-1]
        return str(path), getattr(cls, "__name__", str(cls))

    def _label(self) -> str:
        fxnode = self.current
        assert fxnode is not None
        if fxnode.op == "call_module":
            return f"layer '{fxnode.target}' ({type(self.modules[str(fxnode.target)]).__name__})"
        path, cls = self._enclosing(fxnode)
        what = _function_label(fxnode.target) if fxnode.op == "call_function" else f"Tensor.{fxnode.target}"
        where = f"layer '{path}' ({cls})" if path else f"the forward of {cls}"
        return f"{what} in {where}"

    def _error(self, reason: str) -> ExportError:
        return ExportError(f"{self._label()}: {reason}")

    def _unsupported(self, what: str) -> ExportError:
        assert self.current is not None
        path, cls = self._enclosing(self.current)
        where = f"layer '{path}' ({cls})" if path else f"the forward of {cls}"
        return ExportError(f"unsupported operation {what} in {where}")

    def _emit(self, op: str, inputs: Sequence[_Value], shape: tuple[int, ...], *, attrs: dict[str, Any] | None = None,
              tensors: dict[str, np.ndarray] | None = None, suffix: str = "") -> _Value:
        assert self.current is not None
        base = self._node_name(self.current)
        name = _unique(f"{base}.{suffix}" if suffix else base, self.node_names)
        params = {}
        for role, array in (tensors or {}).items():
            tensor_name = f"{name}.{role}"
            self.tensors[tensor_name] = np.ascontiguousarray(array, dtype=np.float32)
            params[role] = tensor_name
        value = _unique(name, self.value_names)
        self.nodes.append(Node(op=op, name=name, inputs=tuple(v.name for v in inputs), output=value,
                               attrs=dict(attrs or {}), params=params))
        return _Value(value, shape)

    def _in_place(self, old: _Value, new: _Value) -> _Value:
        """Record that the current op overwrote `old`: later readers of any alias of it see `new`."""
        assert self.current is not None
        now = self.index[self.current]
        for fxnode, value in list(self.env.items()):
            if not isinstance(value, _Value):
                continue
            if value.name == old.name:
                self.env[fxnode] = new
            elif value.storage == old.storage and any(self.index[u] > now for u in fxnode.users):
                raise self._error("modifies in place a tensor that is read later through a reshaped view; "
                                  "use the out-of-place op")
        return new

    # -- BatchNorm folding -------------------------------------------------

    def _sole_batchnorm_user(self, fxnode: fx.Node, kind: type[nn.Module]) -> tuple[fx.Node, nn.Module] | None:
        users = list(fxnode.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        user = users[0]
        mod = self.modules[str(user.target)]
        if not isinstance(mod, kind) or user.args != (fxnode,) or user.kwargs:
            return None
        return user, mod


# ---------------------------------------------------------------------------
# module handlers


def _normalize(cv: _Converter, fxnode: fx.Node, mod: Normalize) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if len(x.shape) != 3:
        raise cv._error(f"expects (C, H, W) input, got {x.shape}")
    mean = mod.mean.detach().cpu().double().flatten().tolist()
    std = mod.std.detach().cpu().double().flatten().tolist()
    channels = x.shape[0]
    mean = mean * channels if len(mean) == 1 else mean
    std = std * channels if len(std) == 1 else std
    if len(mean) != channels or len(std) != channels:
        raise cv._error(f"mean/std of length {len(mean)}/{len(std)} do not fit {channels} input channels")
    return cv._emit("normalize", [x], x.shape, attrs={"mean": mean, "std": std})


def _conv2d(cv: _Converter, fxnode: fx.Node, mod: nn.Conv2d) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if mod.padding_mode != "zeros":
        raise cv._error(f"padding_mode={mod.padding_mode!r} is not supported (only 'zeros')")
    if len(x.shape) != 3:
        raise cv._error(f"expects (C, H, W) input, got {x.shape}")
    padding = _conv_padding(cv, mod)
    weight = _array(mod.weight)
    bias = None if mod.bias is None else _array(mod.bias)
    shape = cv._out_shape(fxnode)
    bn = cv._sole_batchnorm_user(fxnode, nn.BatchNorm2d)
    if bn is not None:
        bn_node, bn_mod = bn
        weight, bias = _fold_batchnorm(bn_mod, str(bn_node.target), weight, bias)
        shape = cv._out_shape(bn_node)
    tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    value = cv._emit("conv2d", [x], shape, tensors=tensors, attrs={
        "stride": [int(s) for s in mod.stride],
        "padding": padding,
        "dilation": [int(d) for d in mod.dilation],
        "groups": int(mod.groups),
    })
    if bn is not None:
        cv.folded.add(bn[0])
        cv.env[bn[0]] = value
    return value


def _conv_padding(cv: _Converter, mod: nn.Conv2d) -> list[int]:
    if mod.padding == "valid":
        return [0, 0]
    if mod.padding == "same":
        pads = []
        for k, d in zip(mod.kernel_size, mod.dilation):
            total = d * (k - 1)
            if total % 2:
                raise cv._error(f"padding='same' with kernel {tuple(mod.kernel_size)} and dilation "
                                f"{tuple(mod.dilation)} pads asymmetrically, which the graph cannot express")
            pads.append(total // 2)
        return pads
    return [int(p) for p in mod.padding]  # type: ignore[union-attr]


def _linear(cv: _Converter, fxnode: fx.Node, mod: nn.Linear) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if len(x.shape) != 1:
        raise cv._error(f"expects a flat input, got per-sample shape {x.shape}; flatten first")
    weight = _array(mod.weight)
    bias = None if mod.bias is None else _array(mod.bias)
    shape = cv._out_shape(fxnode)
    bn = cv._sole_batchnorm_user(fxnode, nn.BatchNorm1d)
    if bn is not None:
        bn_node, bn_mod = bn
        weight, bias = _fold_batchnorm(bn_mod, str(bn_node.target), weight, bias)
        shape = cv._out_shape(bn_node)
    tensors = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    value = cv._emit("linear", [x], shape, tensors=tensors)
    if bn is not None:
        cv.folded.add(bn[0])
        cv.env[bn[0]] = value
    return value


def _batchnorm_scale_shift(mod: nn.Module, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) in float64 with bn(x) == x * scale + shift in eval mode."""
    if mod.running_mean is None or mod.running_var is None:  # type: ignore[union-attr]
        raise ExportError(f"layer '{path}' ({type(mod).__name__}) has no running statistics "
                          "(track_running_stats=False uses batch statistics even in eval mode)")
    mean, var = _float64(mod.running_mean), _float64(mod.running_var)  # type: ignore[arg-type]
    gamma = np.ones_like(mean) if mod.weight is None else _float64(mod.weight)  # type: ignore[arg-type]
    beta = np.zeros_like(mean) if mod.bias is None else _float64(mod.bias)  # type: ignore[arg-type]
    scale = gamma / np.sqrt(var + float(mod.eps))  # type: ignore[arg-type]
    return scale, beta - mean * scale


def _fold_batchnorm(bn: nn.Module, path: str, weight: np.ndarray,
                    bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval BatchNorm into the preceding layer; scaling each output row keeps zeros zero."""
    scale, shift = _batchnorm_scale_shift(bn, path)
    if scale.shape != (weight.shape[0],):
        raise ExportError(f"layer '{path}' ({type(bn).__name__}) has {scale.shape[0]} channels, "
                          f"its input has {weight.shape[0]}")
    folded = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    return folded.astype(np.float32), (b * scale + shift).astype(np.float32)


def _batchnorm(cv: _Converter, fxnode: fx.Node, mod: nn.Module) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if not isinstance(mod, nn.BatchNorm2d) or len(x.shape) != 3:
        raise cv._error(f"on per-sample shape {x.shape} is only supported directly after a Linear "
                        "(folded) or as a BatchNorm2d on (C, H, W)")
    scale, shift = _batchnorm_scale_shift(mod, str(fxnode.target))
    if scale.shape != (x.shape[0],):
        raise cv._error(f"has {scale.shape[0]} channels, input has {x.shape[0]}")
    return cv._emit("affine", [x], x.shape, tensors={"scale": scale, "shift": shift})


def _relu_module(cv: _Converter, fxnode: fx.Node, mod: nn.ReLU) -> _Value:
    return _relu(cv, fxnode.args[0], mod.inplace)


def _hardtanh_module(cv: _Converter, fxnode: fx.Node, mod: nn.Hardtanh) -> _Value:
    return _clip(cv, fxnode.args[0], mod.min_val, mod.max_val, mod.inplace)


def _maxpool_module(cv: _Converter, fxnode: fx.Node, mod: nn.MaxPool2d) -> _Value:
    return _maxpool(cv, fxnode, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                    mod.return_indices)


def _avgpool_module(cv: _Converter, fxnode: fx.Node, mod: nn.AvgPool2d) -> _Value:
    return _avgpool(cv, fxnode, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                    mod.divisor_override)


def _adaptive_avg_module(cv: _Converter, fxnode: fx.Node, mod: nn.AdaptiveAvgPool2d) -> _Value:
    return _adaptive(cv, fxnode, mod.output_size, "avg")


def _adaptive_max_module(cv: _Converter, fxnode: fx.Node, mod: nn.AdaptiveMaxPool2d) -> _Value:
    if mod.return_indices:
        raise cv._error("return_indices=True is not supported")
    return _adaptive(cv, fxnode, mod.output_size, "max")


def _flatten_module(cv: _Converter, fxnode: fx.Node, mod: nn.Flatten) -> _Value:
    return _flatten(cv, fxnode.args[0], mod.start_dim, mod.end_dim)


def _passthrough_module(cv: _Converter, fxnode: fx.Node, mod: nn.Module) -> _Value:
    return cv._tensor(fxnode.args[0])  # Dropout / Identity: the identity in eval mode


_MODULE_HANDLERS: list[tuple[type[nn.Module], Callable[..., Any]]] = [
    (Normalize, _normalize),
    (nn.Conv2d, _conv2d),
    (nn.Linear, _linear),
    (nn.BatchNorm1d, _batchnorm),
    (nn.BatchNorm2d, _batchnorm),
    (nn.ReLU, _relu_module),
    (nn.Hardtanh, _hardtanh_module),  # ReLU6 is a Hardtanh(0, 6)
    (nn.MaxPool2d, _maxpool_module),
    (nn.AvgPool2d, _avgpool_module),
    (nn.AdaptiveAvgPool2d, _adaptive_avg_module),
    (nn.AdaptiveMaxPool2d, _adaptive_max_module),
    (nn.Flatten, _flatten_module),
    (nn.modules.dropout._DropoutNd, _passthrough_module),
    (nn.Identity, _passthrough_module),
]


# ---------------------------------------------------------------------------
# shared op builders (modules, functions and methods all land here)


def _relu(cv: _Converter, arg: Any, inplace: bool) -> _Value:
    x = cv._tensor(arg)
    y = cv._emit("relu", [x], x.shape)
    return cv._in_place(x, y) if inplace else y


def _clip(cv: _Converter, arg: Any, lo: Any, hi: Any, inplace: bool) -> _Value:
    x = cv._tensor(arg)
    for bound in (lo, hi):
        finite = isinstance(bound, int | float) and not isinstance(bound, bool) and math.isfinite(bound)
        if bound is not None and not finite:
            raise cv._error(f"clamp bounds must be finite numbers, got {bound!r}")
    if lo is None and hi is None:
        raise cv._error("clamp needs min or max")
    if hi is None:
        if lo != 0:
            raise cv._error(f"clamp(min={lo}) without max is only supported for min=0 (ReLU)")
        y = cv._emit("relu", [x], x.shape)
    else:
        if lo is None:
            raise cv._error("clamp(max=...) without min is not supported")
        if lo > hi:
            raise cv._error(f"clamp min {lo} exceeds max {hi}")
        y = cv._emit("clip", [x], x.shape, attrs={"min": float(lo), "max": float(hi)})
    return cv._in_place(x, y) if inplace else y


def _pair(cv: _Converter, value: Any, what: str) -> list[int]:
    items = [value, value] if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise cv._error(f"{what} must be an int or a pair of ints, got {value!r}")
    return [int(v) for v in items]


def _maxpool(cv: _Converter, fxnode: fx.Node, kernel: Any, stride: Any, padding: Any, dilation: Any,
             ceil_mode: bool, return_indices: bool) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if return_indices:
        raise cv._error("return_indices=True is not supported")
    if len(x.shape) != 3:
        raise cv._error(f"expects (C, H, W) input, got {x.shape}")
    k = _pair(cv, kernel, "kernel_size")
    return cv._emit("maxpool2d", [x], cv._out_shape(fxnode), attrs={
        "kernel": k,
        "stride": k if stride is None or stride == [] or stride == () else _pair(cv, stride, "stride"),
        "padding": _pair(cv, padding, "padding"),
        "dilation": _pair(cv, dilation, "dilation"),
        "ceil_mode": bool(ceil_mode),
    })


def _avgpool(cv: _Converter, fxnode: fx.Node, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
             count_include_pad: bool, divisor_override: Any) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if divisor_override is not None:
        raise cv._error("divisor_override is not supported")
    if len(x.shape) != 3:
        raise cv._error(f"expects (C, H, W) input, got {x.shape}")
    k = _pair(cv, kernel, "kernel_size")
    return cv._emit("avgpool2d", [x], cv._out_shape(fxnode), attrs={
        "kernel": k,
        "stride": k if stride is None or stride == [] or stride == () else _pair(cv, stride, "stride"),
        "padding": _pair(cv, padding, "padding"),
        "ceil_mode": bool(ceil_mode),
        "count_include_pad": bool(count_include_pad),
    })


def _adaptive(cv: _Converter, fxnode: fx.Node, output_size: Any, kind: str) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if len(x.shape) != 3:
        raise cv._error(f"expects (C, H, W) input, got {x.shape}")
    c, h, w = x.shape
    sizes = [output_size, output_size] if isinstance(output_size, int) else list(output_size)
    if len(sizes) != 2:
        raise cv._error(f"output_size {output_size!r} is not an int or a pair")
    oh, ow = (h if sizes[0] is None else sizes[0]), (w if sizes[1] is None else sizes[1])
    if kind == "avg" and (oh, ow) == (1, 1):
        return cv._emit("global_avgpool", [x], (c, 1, 1))
    if (oh, ow) == (h, w):
        return x
    if h % oh or w % ow:
        raise cv._error(f"adaptive pooling of {h}x{w} to {oh}x{ow} has unequal windows, which the graph cannot express")
    k = [h // oh, w // ow]
    if kind == "avg":
        return cv._emit("avgpool2d", [x], (c, oh, ow), attrs={
            "kernel": k, "stride": k, "padding": [0, 0], "ceil_mode": False, "count_include_pad": True})
    return cv._emit("maxpool2d", [x], (c, oh, ow), attrs={
        "kernel": k, "stride": k, "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False})


def _flatten(cv: _Converter, arg: Any, start_dim: int, end_dim: int) -> _Value:
    x = cv._tensor(arg)
    ndim = len(x.shape) + 1
    start, end = start_dim % ndim, end_dim % ndim
    if start == end:
        return x
    if start != 1 or end != ndim - 1:
        raise cv._error(f"flatten(start_dim={start_dim}, end_dim={end_dim}) of per-sample shape {x.shape} "
                        "is only supported as flatten(x, 1)")
    return _flat(cv, x)


def _flat(cv: _Converter, x: _Value, suffix: str = "") -> _Value:
    if len(x.shape) == 1:
        return x
    y = cv._emit("flatten", [x], (int(np.prod(x.shape)),), suffix=suffix)
    return replace(y, base=x.storage)


def _add(cv: _Converter, a: Any, b: Any, alpha: Any, inplace: bool) -> _Value:
    x, y = cv._tensor(a, "first operand"), cv._tensor(b, "second operand")
    if alpha != 1:
        raise cv._error(f"add with alpha={alpha!r} is not supported")
    if x.shape != y.shape:
        raise cv._error(f"adds per-sample shapes {x.shape} and {y.shape}; only equal shapes are supported")
    z = cv._emit("add", [x, y], x.shape)
    return cv._in_place(x, z) if inplace else z


def _mean(cv: _Converter, fxnode: fx.Node, dim: Any, keepdim: bool, dtype: Any) -> _Value:
    x = cv._tensor(fxnode.args[0])
    if dtype is not None:
        raise cv._error("mean with dtype is not supported")
    dims = [dim] if isinstance(dim, int) else list(dim) if dim is not None else None
    if len(x.shape) != 3 or dims is None or sorted(d % 4 for d in dims) != [2, 3]:
        raise cv._error(f"mean over dims {dim!r} of per-sample shape {x.shape} is only supported over (2, 3)")
    y = cv._emit("global_avgpool", [x], (x.shape[0], 1, 1))
    return y if keepdim else _flat(cv, y, suffix="flatten")


def _reshape(cv: _Converter, fxnode: fx.Node, dims: Sequence[Any]) -> _Value:
    x = cv._tensor(fxnode.args[0])
    dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], list | tuple) else list(dims)
    total = int(np.prod(x.shape))
    if not dims:
        raise cv._error("reshape to a scalar is not supported")
    head, rest = dims[0], dims[1:]
    if not all(is_int(d) for d in rest):
        raise cv._error(f"reshape to {dims} mixes the batch size into per-sample dimensions")
    if head is BATCH:
        if rest.count(-1) > 1:
            raise cv._error(f"reshape to {dims} has more than one -1")
        known = int(np.prod([d for d in rest if d != -1]))
        if -1 in rest:
            if known == 0 or total % known:
                raise cv._error(f"cannot reshape per-sample shape {x.shape} to {dims}")
            rest = [total // known if d == -1 else d for d in rest]
    elif head == -1:
        if -1 in rest or int(np.prod(rest)) != total:
            raise cv._error(f"reshape to {dims} does not keep the batch axis of per-sample shape {x.shape}")
    else:
        raise cv._error(f"reshape to {dims} hard-codes the batch size; use x.size(0) or -1")
    if tuple(rest) == x.shape:
        return x
    if len(rest) == 1 and rest[0] == total:
        return _flat(cv, x)
    raise cv._error(f"reshape of per-sample shape {x.shape} to {tuple(rest)} is not supported (only flattening)")


def _shape_of(cv: _Converter, arg: Any) -> tuple[Any, ...]:
    return (BATCH, *cv._tensor(arg).shape)


# ---------------------------------------------------------------------------
# function and method handlers


def _fn_relu(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "inplace"), {"inplace": False})
    return _relu(cv, a["input"], bool(a["inplace"]))


def _fn_relu_(cv: _Converter, fxnode: fx.Node) -> _Value:
    return _relu(cv, cv._bind(("input",), {})["input"], True)


def _fn_torch_relu(cv: _Converter, fxnode: fx.Node) -> _Value:
    return _relu(cv, cv._bind(("input",), {})["input"], False)


def _fn_relu6(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "inplace"), {"inplace": False})
    return _clip(cv, a["input"], 0.0, 6.0, bool(a["inplace"]))


def _fn_hardtanh(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0, "inplace": False})
    return _clip(cv, a["input"], a["min_val"], a["max_val"], bool(a["inplace"]))


def _fn_hardtanh_(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0})
    return _clip(cv, a["input"], a["min_val"], a["max_val"], True)


def _fn_clamp(inplace: bool) -> Callable[[_Converter, fx.Node], _Value]:
    def handler(cv: _Converter, fxnode: fx.Node) -> _Value:
        a = cv._bind(("input", "min", "max"), {"min": None, "max": None})
        return _clip(cv, a["input"], a["min"], a["max"], inplace)
    return handler


def _fn_max_pool2d(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                 {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    return _maxpool(cv, fxnode, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                    a["return_indices"])


def _fn_avg_pool2d(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                 {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None})
    return _avgpool(cv, fxnode, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                    a["divisor_override"])


def _fn_adaptive_avg_pool2d(cv: _Converter, fxnode: fx.Node) -> _Value:
    return _adaptive(cv, fxnode, cv._bind(("input", "output_size"), {})["output_size"], "avg")


def _fn_adaptive_max_pool2d(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "output_size", "return_indices"), {"return_indices": False})
    if a["return_indices"]:
        raise cv._error("return_indices=True is not supported")
    return _adaptive(cv, fxnode, a["output_size"], "max")


def _fn_dropout(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    if a["training"] and a["p"] != 0:
        raise cv._error("dropout with training=True is active even in eval mode; pass training=self.training")
    return cv._tensor(a["input"])


def _fn_flatten(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return _flatten(cv, a["input"], a["start_dim"], a["end_dim"])


def _fn_mean(cv: _Converter, fxnode: fx.Node) -> _Value:
    a = cv._bind(("input", "dim", "keepdim", "dtype"), {"dim": None, "keepdim": False, "dtype": None})
    return _mean(cv, fxnode, a["dim"], bool(a["keepdim"]), a["dtype"])


def _fn_add(inplace: bool) -> Callable[[_Converter, fx.Node], _Value]:
    def handler(cv: _Converter, fxnode: fx.Node) -> _Value:
        a = cv._bind(("input", "other", "alpha"), {"alpha": 1})
        return _add(cv, a["input"], a["other"], a["alpha"], inplace)
    return handler


def _fn_operator_add(inplace: bool) -> Callable[[_Converter, fx.Node], _Value]:
    def handler(cv: _Converter, fxnode: fx.Node) -> _Value:
        a = cv._bind(("input", "other"), {})
        return _add(cv, a["input"], a["other"], 1, inplace)
    return handler


def _fn_reshape(cv: _Converter, fxnode: fx.Node) -> _Value:
    if "shape" in fxnode.kwargs:
        return _reshape(cv, fxnode, [cv._resolve(fxnode.kwargs["shape"])])
    return _reshape(cv, fxnode, [cv._resolve(a) for a in fxnode.args[1:]])


def _fn_getattr(cv: _Converter, fxnode: fx.Node) -> Any:
    obj, attr = fxnode.args[0], fxnode.args[1]
    if attr != "shape":
        raise cv._unsupported(f"attribute access .{attr}")
    return _shape_of(cv, obj)


def _fn_getitem(cv: _Converter, fxnode: fx.Node) -> Any:
    container, index = cv._resolve(fxnode.args[0]), cv._resolve(fxnode.args[1])
    if not isinstance(container, tuple):
        raise cv._unsupported("indexing a tensor")
    try:
        return container[index]
    except (IndexError, TypeError) as e:
        raise cv._error(f"index {index!r} into shape {container}: {e}") from e


def _m_size(cv: _Converter, fxnode: fx.Node) -> Any:
    a = cv._bind(("input", "dim"), {"dim": None})
    shape = _shape_of(cv, a["input"])
    if a["dim"] is None:
        return shape
    if not is_int(a["dim"]) or not -len(shape) <= a["dim"] < len(shape):
        raise cv._error(f"size({a['dim']!r}) is out of range for {len(shape)} dims")
    return shape[a["dim"]]


def _m_contiguous(cv: _Converter, fxnode: fx.Node) -> _Value:
    return cv._tensor(fxnode.args[0])


def _function_label(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module.startswith("torch.nn.functional") or target is getattr(F, name, None):
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


_INT_OPS: dict[Any, Callable[[int, int], int]] = {
    operator.mul: operator.mul,
    operator.floordiv: operator.floordiv,
    operator.add: operator.add,
    operator.sub: operator.sub,
}

_FUNCTION_HANDLERS: dict[Any, Callable[[_Converter, fx.Node], Any]] = {
    F.relu: _fn_relu,
    torch.relu: _fn_torch_relu,
    torch.relu_: _fn_relu_,
    F.relu6: _fn_relu6,
    F.hardtanh: _fn_hardtanh,
    F.hardtanh_: _fn_hardtanh_,
    torch.clamp: _fn_clamp(False),
    torch.clip: _fn_clamp(False),
    torch.clamp_: _fn_clamp(True),
    torch.clip_: _fn_clamp(True),
    F.max_pool2d: _fn_max_pool2d,
    F.avg_pool2d: _fn_avg_pool2d,
    F.adaptive_avg_pool2d: _fn_adaptive_avg_pool2d,
    F.adaptive_max_pool2d: _fn_adaptive_max_pool2d,
    F.dropout: _fn_dropout,
    F.dropout1d: _fn_dropout,
    F.dropout2d: _fn_dropout,
    F.alpha_dropout: _fn_dropout,
    F.feature_alpha_dropout: _fn_dropout,
    torch.flatten: _fn_flatten,
    torch.mean: _fn_mean,
    torch.add: _fn_add(False),
    # `a += b` in a traced forward is recorded as operator.add (a Proxy has no __iadd__), so other
    # aliases of `a` do not see the update there; an explicit operator.iadd call is in place.
    operator.add: _fn_operator_add(False),
    operator.iadd: _fn_operator_add(True),
    torch.reshape: _fn_reshape,
    getattr: _fn_getattr,
    operator.getitem: _fn_getitem,
}

_METHOD_HANDLERS: dict[str, Callable[[_Converter, fx.Node], Any]] = {
    "relu": _fn_torch_relu,
    "relu_": _fn_relu_,
    "clamp": _fn_clamp(False),
    "clip": _fn_clamp(False),
    "clamp_": _fn_clamp(True),
    "clip_": _fn_clamp(True),
    "flatten": _fn_flatten,
    "mean": _fn_mean,
    "add": _fn_add(False),
    "add_": _fn_add(True),
    "view": _fn_reshape,
    "reshape": _fn_reshape,
    "size": _m_size,
    "contiguous": _m_contiguous,
}


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy()


def _float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name
