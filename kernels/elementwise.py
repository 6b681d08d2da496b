"""Elementwise kernels on float32 arrays: add (+ activation), relu, clip, per-channel affine.

`affine` is y[:, c] = x[:, c] * scale[c] + shift[c] on (N, C, ...) input; it also
serves input normalisation ((x - mean) / std is scale = 1/std, shift = -mean/std)
and BatchNorm layers that no conv absorbed. All accept `out=` (which may be the
input itself, for in-place use).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .epilogue import apply_act, resolve_activation

_U = np.uint64


def add(a, b, act="none", clip_range=None, out=None) -> np.ndarray:
    """act(a + b) for two float32 arrays of equal shape."""
    op = "add"
    a, b = _check_array(op, a), _check_array(op, b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} differ")
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    out = _resolve_out(op, out, a.shape)
    _add(a.reshape(-1), b.reshape(-1), act_code, lo, hi, out.reshape(-1))
    return out


def relu(x, out=None) -> np.ndarray:
    """max(x, 0)."""
    return clip(x, 0.0, np.inf, out)


def clip(x, lo, hi, out=None) -> np.ndarray:
    """min(max(x, lo), hi); ReLU6 is clip(x, 0, 6)."""
    op = "clip"
    x = _check_array(op, x)
    _, lo32, hi32 = resolve_activation(op, "clip", (lo, hi))
    out = _resolve_out(op, out, x.shape)
    _clamp(x.reshape(-1), lo32, hi32, out.reshape(-1))
    return out


def affine(x, scale, shift, out=None) -> np.ndarray:
    """y[:, c] = x[:, c] * scale[c] + shift[c] for x (N, C, ...) float32."""
    op = "affine"
    x = _check_array(op, x)
    if x.ndim < 2:
        raise ValueError(f"{op}: input must be (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    scale = as_kernel_array(np.asarray(scale, np.float32))
    shift = as_kernel_array(np.asarray(shift, np.float32))
    if scale.shape != (c,) or shift.shape != (c,):
        raise ValueError(f"{op}: scale {scale.shape} and shift {shift.shape} must both be ({c},) "
                         f"for input {x.shape}")
    out = _resolve_out(op, out, x.shape)
    planes = (x.shape[0], c, x.size // max(1, x.shape[0] * c))
    _affine(x.reshape(planes), scale, shift, out.reshape(planes))
    return out


def _check_array(op, x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"{op}: expected a float32 ndarray, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    return as_kernel_array(x)


def _resolve_out(op, out, shape) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape
            or not out.flags.c_contiguous):
        raise ValueError(f"{op}: out must be a C-contiguous float32 array of shape {shape}")
    return out


@njit(parallel=True, cache=True)
def _add(a, b, act, lo, hi, out):
    for i in prange(a.shape[0]):
        out[i] = apply_act(a[i] + b[i], act, lo, hi)


@njit(parallel=True, cache=True)
def _clamp(x, lo, hi, out):
    for i in prange(x.shape[0]):
        v = x[i]
        if v < lo:
            v = lo
        if v > hi:
            v = hi
        out[i] = v


@njit(parallel=True, cache=True)
def _affine(x, scale, shift, out):
    n, c, size = x.shape
    for plane in prange(n * c):
        img, ch = plane // c, plane % c
        s, t = scale[ch], shift[ch]
        src, dst = x[img, ch], out[img, ch]
        for k in range(_U(size)):
            dst[k] = src[k] * s + t
