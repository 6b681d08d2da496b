"""Dense fallbacks for layers too dense for the sparse kernels: conv and linear on BLAS.

The conv packs its input like the sparse kernel (see `packing`), so each row
(channel, tap) of a group's im2col matrix is Ho contiguous copies of Wo*G values
out of the packed input; NumPy's `np.dot` (OpenBLAS) multiplies
it by the weight and the shared epilogue writes NCHW. Output rows are processed
in slices so the im2col buffer stays under 16 MiB.

Threads: once `threads.set_num_threads(n)` has pinned BLAS to one thread, each
product is split by output rows across n Python threads (np.dot releases the
GIL); see `threads` for why BLAS's own threads are avoided.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .conv import _check_flat, _check_geometry, _check_input, _check_output_layouts, _pair, store_tile
from .epilogue import apply_act, resolve_activation, resolve_bias, resolve_out, resolve_residual
from .layout import Layout
from .packing import image_group, pack_input, packed_hw, tap_offsets
from .reference import conv2d_output_hw
from .threads import dense_split

# Upper bound on the im2col slice, in float32 elements (16 MiB).
IM2COL_ELEMS = 4 << 20


@dataclass(frozen=True)
class DenseConvPlan:
    """A dense conv weight as one (O, K) matrix plus where each im2col row starts.

    `src[grp, r]` is the packed-input pixel (from an image block's start, times G
    at run time) where row r = (c*kh + i)*kw + j of group grp's im2col matrix
    starts; `border` is the padding of the packed input (see `packing`).
    """

    weight2d: np.ndarray
    src: np.ndarray
    weight_shape: tuple[int, int, int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    packed_hw: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    border: tuple[int, int]


def plan_dense_conv2d(weight, in_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                      border=None) -> DenseConvPlan:
    """Plan a dense conv of `weight` (O, C/groups, kh, kw) float32 on inputs of `in_hw`."""
    op = "dense_conv2d"
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 4:
        raise ValueError(f"{op}: weight must be a float32 (O, C/groups, kh, kw) array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    o, cg, kh, kw = weight.shape
    stride, padding, dilation, in_hw = _pair(stride), _pair(padding), _pair(dilation), _pair(in_hw)
    border = padding if border is None else _pair(border)
    _check_geometry(op, o, cg, kh, kw, stride, padding, dilation, groups)
    ho, wo = conv2d_output_hw(in_hw, (kh, kw), stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{op}: input {in_hw} gives empty output ({ho}, {wo}) for weight {weight.shape}")
    hq, wq = packed_hw(in_hw, stride, border)
    chan_pix = stride[0] * stride[1] * hq * wq
    taps = tap_offsets((kh, kw), stride, padding, dilation, in_hw, border=border)
    chans = np.arange(groups, dtype=np.int64)[:, None] * cg + np.arange(cg, dtype=np.int64)[None, :]
    src = (chans[:, :, None] * chan_pix + taps[None, None, :]).reshape(groups, cg * kh * kw)
    return DenseConvPlan(
        weight2d=np.ascontiguousarray(weight.reshape(o, cg * kh * kw)), src=np.ascontiguousarray(src),
        weight_shape=(o, cg, kh, kw), in_hw=in_hw, out_hw=(ho, wo), packed_hw=(hq, wq), stride=stride,
        padding=padding, dilation=dilation, groups=int(groups), border=border,
    )


def dense_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                 act="none", clip_range=None, residual=None, out=None) -> np.ndarray:
    """act(conv2d(x, weight) + bias + residual) with a dense float32 weight (O, C/groups, kh, kw)."""
    op = "dense_conv2d"
    plan = plan_dense_conv2d(weight, _check_input_hw(op, x), stride, padding, dilation, groups)
    x = _check_input(op, x, weight.shape, groups)
    n = x.shape[0]
    o = plan.weight_shape[0]
    ho, wo = plan.out_hw
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, o)
    out = resolve_out(op, out, (n, o, ho, wo))
    out_layout = Layout(o, ho, wo)
    res_layout = None
    if residual is not None:
        res_layout = out_layout
        residual = resolve_residual(op, residual, (n, o, ho, wo))[0].reshape(-1)
    group = image_group(n, (ho - 1) * plan.packed_hw[1] + wo)
    packed = pack_input(x, plan.stride, plan.padding, group, allow_view=not np.may_share_memory(out, x))
    scratch = np.empty(dense_conv2d_scratch(plan, n, group), np.float32)
    bind_dense_conv2d(plan, packed, n, group, bias, act_code, lo, hi, residual, res_layout,
                      out.reshape(-1), out_layout, scratch)()
    return out


def dense_conv2d_scratch(plan: DenseConvPlan, n: int, group: int) -> int:
    """float32 elements of scratch space a bound dense conv needs (im2col and product slices)."""
    o, cg, kh, kw = plan.weight_shape
    ho, wo = plan.out_hw
    k_rows = cg * kh * kw
    rows = _rows_per_slice(k_rows, ho, wo, group)
    return (k_rows + o // plan.groups) * rows * wo * group


def _rows_per_slice(k_rows, ho, wo, group) -> int:
    """Output rows per slice, so that the im2col slice stays under IM2COL_ELEMS."""
    return max(1, min(ho, IM2COL_ELEMS // (k_rows * wo * group)))


def bind_dense_conv2d(plan: DenseConvPlan, packed, n: int, group: int, bias, act: int, lo, hi, residual,
                      res_layout: Layout | None, out, out_layout: Layout, scratch) -> Callable[[], None]:
    """A no-argument callable computing the conv of `plan` from a packed input into `out`.

    Arguments as for `conv.bind_sparse_conv2d`; `scratch` holds
    `dense_conv2d_scratch(plan, n, group)` float32 elements (it may be shared by
    convs that never run at the same time).
    """
    op = "dense_conv2d"
    o, cg, kh, kw = plan.weight_shape
    ho, wo = plan.out_hw
    hq, wq = plan.packed_hw
    channels = cg * plan.groups
    if group < 1 or n % group:
        raise ValueError(f"{op}: image group {group} does not divide batch {n}")
    block_elems = channels * plan.stride[0] * plan.stride[1] * hq * wq * group
    _check_flat(op, "packed input", packed, block_elems * (n // group))
    _check_flat(op, "scratch", scratch, dense_conv2d_scratch(plan, n, group))
    res_params, has_res = _check_output_layouts(op, (o, ho, wo), n, out, out_layout, residual, res_layout)
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    res = residual if has_res else np.zeros(1, np.float32)
    out_params = out_layout.params()
    k_rows = cg * kh * kw
    og = o // plan.groups
    rows_per_slice = _rows_per_slice(k_rows, ho, wo, group)
    lo, hi = np.float32(lo), np.float32(hi)
    slices = [(oh0, min(oh0 + rows_per_slice, ho)) for oh0 in range(0, ho, rows_per_slice)]

    def run() -> None:
        for blk in range(n // group):
            base = blk * block_elems // group  # in pixels of the packed input
            for grp in range(plan.groups):
                src = plan.src[grp] + base
                for oh0, oh1 in slices:
                    cols = (oh1 - oh0) * wo * group
                    im2col = scratch[: k_rows * cols].reshape(k_rows, cols)
                    prod = scratch[k_rows * cols: (k_rows + og) * cols].reshape(og, cols)
                    _im2col(packed, src, group, wq, wo, oh0, oh1, im2col)
                    split_dot(plan.weight2d[grp * og: (grp + 1) * og], im2col, prod)
                    # prod's columns are (oh, ow, image): a packed domain with wq == wo, no garbage.
                    _store_rows(prod, grp * og, oh0 * wo, oh1 * wo, blk, group, ho, wo, bias, act, lo, hi,
                                res, res_params, has_res, out, out_params)

    return run


def _check_input_hw(op, x) -> tuple[int, int]:
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"{op}: input must be a float32 NCHW array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    return x.shape[2], x.shape[3]


def dense_linear(x, weight, bias=None, act="none", clip_range=None, residual=None, out=None) -> np.ndarray:
    """act(x @ weight.T + bias + residual); x (N, I), weight dense float32 (O, I)."""
    op = "dense_linear"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"{op}: input must be a float32 (N, I) array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 2:
        raise ValueError(f"{op}: weight must be a float32 (O, I) array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: input {x.shape} does not match weight {weight.shape}")
    n, o = x.shape[0], weight.shape[0]
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, o)
    res, has_res = resolve_residual(op, residual, (n, o))
    out = resolve_out(op, out, (n, o))
    np.dot(x, weight.T, out=out)
    _epilogue_2d(out, bias, act_code, lo, hi, res, has_res)
    return out


def bind_dense_linear(weight, x, bias, act: int, lo, hi, residual, out) -> Callable[[], None]:
    """A no-argument callable: out = act(weight @ x + bias[:, None] + residual), feature-major.

    weight (O, K), x (K, M), out and residual (O, M), all contiguous float32; the
    runtime keeps flat values as (features, batch) (see `layout`). `act, lo, hi`
    come from `epilogue.resolve_activation`. Checked here, once.
    """
    op = "dense_linear"
    for what, a in (("weight", weight), ("input", x), ("out", out)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError(f"{op}: {what} must be a contiguous float32 2-D array, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    o, k = weight.shape
    if x.shape[0] != k or out.shape != (o, x.shape[1]):
        raise ValueError(f"{op}: weight {weight.shape}, input {x.shape} and out {out.shape} do not fit")
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    res, has_res = resolve_residual(op, residual, out.shape)
    lo, hi = np.float32(lo), np.float32(hi)

    def run() -> None:
        split_dot(weight, x, out)
        _epilogue_rows(out, bias, act, lo, hi, res, has_res)

    return run


# Fewest rows of the product worth giving to one thread.
MIN_SPLIT_ROWS = 8
_pools: dict[int, ThreadPoolExecutor] = {}


def split_dot(a, b, out) -> None:
    """out = a @ b, its rows split across `threads.dense_split()` threads (the caller runs one part)."""
    parts = min(dense_split(), a.shape[0] // MIN_SPLIT_ROWS)
    if parts <= 1:
        np.dot(a, b, out=out)
        return
    if parts - 1 not in _pools:
        _pools[parts - 1] = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="harp-dense")
    bounds = [a.shape[0] * i // parts for i in range(parts + 1)]
    futures = [_pools[parts - 1].submit(np.dot, a[r0:r1], b, out[r0:r1])
               for r0, r1 in zip(bounds[1:-1], bounds[2:])]
    np.dot(a[: bounds[1]], b, out[: bounds[1]])
    for future in futures:
        future.result()


@njit(parallel=True, cache=True, error_model="numpy")
def _im2col(packed, src, n, wq, wo, oh0, oh1, im2col):
    """Row r: for output rows oh0..oh1, the wo*n packed values from pixel src[r] + oh*wq."""
    run = np.uint64(wo * n)
    for r in prange(im2col.shape[0]):
        row = im2col[r]
        for oh in range(oh0, oh1):
            s = np.uint64((src[r] + oh * wq) * n)
            d = np.uint64((oh - oh0) * wo * n)
            for k in range(run):
                row[d + k] = packed[s + k]


@njit(parallel=True, cache=True, error_model="numpy")
def _store_rows(prod, o0, q0, q1, blk, g, ho, wo, bias, act, lo, hi, res, res_lay, has_res, out, out_lay):
    for r in prange(prod.shape[0]):
        o = o0 + r
        store_tile(prod[r], o, q0, q1, blk, g, ho, wo, wo, bias[o], act, lo, hi, res, res_lay, has_res,
                   out, out_lay)


@njit(cache=True, error_model="numpy")
def _epilogue_2d(y, bias, act, lo, hi, res, has_res):
    n, o = y.shape
    for i in range(n):
        for j in range(o):
            v = y[i, j] + bias[j]
            if has_res:
                v += res[i, j]
            y[i, j] = apply_act(v, act, lo, hi)


@njit(cache=True, error_model="numpy")
def _epilogue_rows(y, bias, act, lo, hi, res, has_res):
    o, m = y.shape
    for i in range(o):
        b = bias[i]
        for j in range(m):
            v = y[i, j] + b
            if has_res:
                v += res[i, j]
            y[i, j] = apply_act(v, act, lo, hi)
