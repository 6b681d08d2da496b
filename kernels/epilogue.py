"""The fused epilogue shared by conv and matmul kernels: y = act(acc + bias + residual).

Public entry points take `act` as a name ("none", "relu", "relu6", "clip" with
`clip_range=(lo, hi)`) and optional `bias`/`residual`; the helpers here turn
those into the plain arguments the numba kernels take (an activation code, two
float32 bounds, a bias array that is zeros when absent, and a residual array plus
a flag), so every kernel keeps a single compiled signature.

Caveat for editors: numba's on-disk cache keys a compiled kernel on its own
source file only. After editing a helper that other files inline (`apply_act`
here, `conv.store_tile`), delete kernels/__pycache__/*.nbi and *.nbc so the
kernels using it recompile.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .arrays import as_kernel_array
from .layout import Layout

ACT_NONE = 0
ACT_CLAMP = 1

_NAMED_CLAMPS = {"relu": (0.0, np.inf), "relu6": (0.0, 6.0)}
ACTIVATIONS = ("none", "relu", "relu6", "clip")


def resolve_activation(op: str, act: str, clip_range=None) -> tuple[int, np.float32, np.float32]:
    """(code, lo, hi) for the kernels; `op` names the caller in errors."""
    if act == "none":
        return ACT_NONE, np.float32(-np.inf), np.float32(np.inf)
    if act in _NAMED_CLAMPS:
        lo, hi = _NAMED_CLAMPS[act]
    elif act == "clip":
        if clip_range is None or len(clip_range) != 2:
            raise ValueError(f"{op}: act='clip' needs clip_range=(lo, hi), got {clip_range!r}")
        lo, hi = float(clip_range[0]), float(clip_range[1])
        if not lo <= hi:
            raise ValueError(f"{op}: clip_range lower bound {lo} exceeds upper bound {hi}")
    else:
        raise ValueError(f"{op}: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return ACT_CLAMP, np.float32(lo), np.float32(hi)


def resolve_bias(op: str, bias, n_out: int) -> np.ndarray:
    """A contiguous float32 (n_out,) bias; zeros when `bias` is None."""
    if bias is None:
        return np.zeros(n_out, np.float32)
    bias = as_kernel_array(np.asarray(bias, dtype=np.float32))
    if bias.shape != (n_out,):
        raise ValueError(f"{op}: bias shape {bias.shape} does not match {n_out} output channels")
    return bias


_NO_RESIDUAL = {ndim: np.zeros((1,) * ndim, np.float32) for ndim in (2, 4)}


def resolve_residual(op: str, residual, out_shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """(array, present) for the kernels; a tiny placeholder of the right rank when absent."""
    if residual is None:
        return _NO_RESIDUAL[len(out_shape)], False
    if not isinstance(residual, np.ndarray) or residual.dtype != np.float32:
        raise ValueError(f"{op}: residual must be a float32 ndarray, got {type(residual).__name__}"
                         f" {getattr(residual, 'dtype', '')}")
    if residual.shape != tuple(out_shape):
        raise ValueError(f"{op}: residual shape {residual.shape} does not match output {tuple(out_shape)}")
    return as_kernel_array(residual), True


def resolve_out(op: str, out, shape: tuple[int, ...]) -> np.ndarray:
    """`out` checked to be a contiguous float32 array of `shape`, or a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != tuple(shape)
            or not out.flags.c_contiguous):
        raise ValueError(f"{op}: out must be a C-contiguous float32 array of shape {tuple(shape)}, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def resolve_conv_epilogue(op: str, out_shape: tuple[int, int, int, int], act: str, clip_range, bias, residual,
                          out) -> tuple[int, np.float32, np.float32, np.ndarray, np.ndarray, Layout,
                                        np.ndarray | None, Layout | None]:
    """The epilogue arguments of a conv's NCHW entry point, resolved for its `bind_*` function:
    (act code, lo, hi, bias, out, out's plain NCHW layout, flat residual or None, its layout or None)."""
    _, o, h, w = out_shape
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, o)
    out = resolve_out(op, out, out_shape)
    out_layout = Layout(o, h, w)
    res_layout = None
    if residual is not None:
        res_layout = out_layout
        residual = resolve_residual(op, residual, out_shape)[0].reshape(-1)
    return act_code, lo, hi, bias, out, out_layout, residual, res_layout


@njit(cache=True, inline="always")
def apply_act(v, act, lo, hi):
    """Clamp `v` to [lo, hi] when act == ACT_CLAMP (relu is lo=0, hi=inf)."""
    if act == ACT_CLAMP:
        if v < lo:
            v = lo
        if v > hi:
            v = hi
    return v
