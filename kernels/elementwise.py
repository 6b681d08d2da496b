"""Elementwise kernels on float32 arrays: add (+ activation), relu, clip, per-channel affine.

`affine` is y[:, c] = x[:, c] * scale[c] + shift[c] on (N, C, ...) input; it also
serves input normalisation ((x - mean) / std is scale = 1/std, shift = -mean/std)
and BatchNorm layers that no conv absorbed. All accept `out=` (which may be the
input itself, for in-place use).

The kernels read and write any runtime `layout` (only interior elements; a
border stays zero): `bind_affine_act` is y = act(x * scale + shift) per channel
(scale/shift optional), which also re-lays a value out (a copy into another
border or image group) and serves a standalone relu/clip; `bind_add_act` is
y = act(a + b). The NCHW functions are their special case.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .epilogue import apply_act, resolve_activation, resolve_out
from .layout import Layout, row_offset

_U = np.uint64


def add(a, b, act="none", clip_range=None, out=None) -> np.ndarray:
    """act(a + b) for two float32 arrays of equal shape."""
    op = "add"
    a, b = _check_array(op, a), _check_array(op, b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} differ")
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    out = resolve_out(op, out, a.shape)
    n, planes = _planes(a)
    bind_add_act(a.reshape(-1), planes, b.reshape(-1), planes, n, act_code, lo, hi, out.reshape(-1), planes)()
    return out


def relu(x, out=None) -> np.ndarray:
    """max(x, 0)."""
    return clip(x, 0.0, np.inf, out)


def clip(x, lo, hi, out=None) -> np.ndarray:
    """min(max(x, lo), hi); ReLU6 is clip(x, 0, 6)."""
    op = "clip"
    x = _check_array(op, x)
    act_code, lo32, hi32 = resolve_activation(op, "clip", (lo, hi))
    out = resolve_out(op, out, x.shape)
    n, planes = _planes(x)
    bind_affine_act(x.reshape(-1), planes, n, None, None, act_code, lo32, hi32, out.reshape(-1), planes)()
    return out


def affine(x, scale, shift, out=None) -> np.ndarray:
    """y[:, c] = x[:, c] * scale[c] + shift[c] for x (N, C, ...) float32."""
    op = "affine"
    x = _check_array(op, x)
    if x.ndim < 2:
        raise ValueError(f"{op}: input must be (N, C, ...), got shape {x.shape}")
    out = resolve_out(op, out, x.shape)
    n, planes = _planes(x)
    act_code, lo, hi = resolve_activation(op, "none")
    bind_affine_act(x.reshape(-1), planes, n, scale, shift, act_code, lo, hi, out.reshape(-1), planes)()
    return out


def bind_affine_act(src, src_layout: Layout, n: int, scale, shift, act: int, lo, hi, out,
                    out_layout: Layout) -> Callable[[], None]:
    """A no-argument callable: out = act(src * scale[c] + shift[c]) for a batch of n, flat buffers.

    `scale`/`shift` None means no affine part (a copy or a standalone activation);
    `act, lo, hi` come from `epilogue.resolve_activation`. `out` may be `src`
    only in the same layout. Checked here, once.
    """
    op = "affine"
    c = src_layout.channels
    if scale is None or shift is None:
        if (scale is None) != (shift is None):
            raise ValueError(f"{op}: give both scale and shift, or neither")
        scale_arr, shift_arr, has_affine = np.ones(c, np.float32), np.zeros(c, np.float32), False
    else:
        scale_arr = as_kernel_array(np.asarray(scale, np.float32))
        shift_arr = as_kernel_array(np.asarray(shift, np.float32))
        has_affine = True
        if scale_arr.shape != (c,) or shift_arr.shape != (c,):
            raise ValueError(f"{op}: scale {scale_arr.shape} and shift {shift_arr.shape} must both be ({c},) "
                             f"for input of {c} channels")
    _check_buffers(op, ((src, src_layout),), n, out, out_layout)
    return partial(_affine_act, src, src_layout.params(), n, scale_arr, shift_arr, has_affine, act,
                   np.float32(lo), np.float32(hi), out, out_layout.params())


def bind_add_act(a, a_layout: Layout, b, b_layout: Layout, n: int, act: int, lo, hi, out,
                 out_layout: Layout) -> Callable[[], None]:
    """A no-argument callable: out = act(a + b) for a batch of n, flat buffers in their layouts.

    `out` may be `a` or `b` only in the same layout. Checked here, once.
    """
    op = "add"
    if (a_layout.channels, a_layout.height, a_layout.width) != (b_layout.channels, b_layout.height,
                                                                b_layout.width):
        raise ValueError(f"{op}: inputs of layouts {a_layout} and {b_layout} differ in shape")
    _check_buffers(op, ((a, a_layout), (b, b_layout)), n, out, out_layout)
    return partial(_add_act, a, a_layout.params(), b, b_layout.params(), n, act, np.float32(lo),
                   np.float32(hi), out, out_layout.params())


def _check_buffers(op, inputs, n, out, out_layout) -> None:
    shape = (out_layout.channels, out_layout.height, out_layout.width)
    for what, a, layout in [("input", a, lay) for a, lay in inputs] + [("out", out, out_layout)]:
        if (layout.channels, layout.height, layout.width) != shape:
            raise ValueError(f"{op}: {what} layout {layout} does not match output layout {out_layout}")
        layout.check_batch(n)
        if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1
                or a.shape[0] < layout.size(n) or not a.flags.c_contiguous):
            raise ValueError(f"{op}: {what} must be a flat contiguous float32 array of >= {layout.size(n)} "
                             f"elements, got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if not out.flags.writeable:
        raise ValueError(f"{op}: out is read-only")
    for a, layout in inputs:
        if np.may_share_memory(a, out) and (layout != out_layout or a.ctypes.data != out.ctypes.data):
            raise ValueError(f"{op}: out may be an input itself, in the same layout, but must not overlap it "
                             f"otherwise")


def _planes(x) -> tuple[int, Layout]:
    """(N, layout) viewing an (N, C, ...) array as N images of C planes of one row, NCHW."""
    if x.ndim < 2 or x.size == 0:
        return 1, Layout(1, 1, x.size)
    return x.shape[0], Layout(x.shape[1], 1, x.size // (x.shape[0] * x.shape[1]))


def _check_array(op, x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ValueError(f"{op}: expected a float32 ndarray, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    return as_kernel_array(x)


# Work item = (image block, channel) of the output. When every buffer uses the output's
# image group, each interior row is one contiguous run of W*G values in all of them;
# otherwise the images of the block are visited one by one.


@njit(parallel=True, cache=True, error_model="numpy")
def _affine_act(src, sl, n, scale, shift, has_affine, act, lo, hi, out, ol):
    c, h, w, g = ol[0], ol[1], ol[2], ol[5]
    gs = sl[5]
    for item in prange((n // g) * c):
        blk, ch = item // c, item % c
        s, t = scale[ch], shift[ch]
        if not has_affine:
            s, t = np.float32(1.0), np.float32(0.0)
        for r in range(h):
            if gs == g:
                a0 = _U(row_offset(sl, blk, ch, r))
                d0 = _U(row_offset(ol, blk, ch, r))
                for j in range(_U(w * g)):
                    out[d0 + j] = apply_act(src[a0 + j] * s + t, act, lo, hi)
            else:
                for k in range(g):
                    img = blk * g + k
                    a0 = _U(row_offset(sl, img // gs, ch, r) + img % gs)
                    d0 = _U(row_offset(ol, blk, ch, r) + k)
                    for j in range(_U(w)):
                        out[d0 + j * _U(g)] = apply_act(src[a0 + j * _U(gs)] * s + t, act, lo, hi)


@njit(parallel=True, cache=True, error_model="numpy")
def _add_act(a, la, b, lb, n, act, lo, hi, out, ol):
    c, h, w, g = ol[0], ol[1], ol[2], ol[5]
    ga, gb = la[5], lb[5]
    for item in prange((n // g) * c):
        blk, ch = item // c, item % c
        for r in range(h):
            if ga == g and gb == g:
                a0 = _U(row_offset(la, blk, ch, r))
                b0 = _U(row_offset(lb, blk, ch, r))
                d0 = _U(row_offset(ol, blk, ch, r))
                for j in range(_U(w * g)):
                    out[d0 + j] = apply_act(a[a0 + j] + b[b0 + j], act, lo, hi)
            else:
                for k in range(g):
                    img = blk * g + k
                    a0 = _U(row_offset(la, img // ga, ch, r) + img % ga)
                    b0 = _U(row_offset(lb, img // gb, ch, r) + img % gb)
                    d0 = _U(row_offset(ol, blk, ch, r) + k)
                    for j in range(_U(w)):
                        out[d0 + j * _U(g)] = apply_act(a[a0 + j * _U(ga)] + b[b0 + j * _U(gb)], act, lo, hi)
