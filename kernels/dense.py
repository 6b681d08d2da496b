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

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, prange

from .conv import _check_geometry, _check_input, _pair, store_row
from .epilogue import apply_act, resolve_activation, resolve_bias, resolve_out, resolve_residual
from .packing import image_group, pack_input, packed_hw, tap_offsets
from .reference import conv2d_output_hw
from .threads import dense_split

# Upper bound on the im2col slice, in float32 elements (16 MiB).
IM2COL_ELEMS = 4 << 20


def dense_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                 act="none", clip_range=None, residual=None, out=None) -> np.ndarray:
    """act(conv2d(x, weight) + bias + residual) with a dense float32 weight (O, C/groups, kh, kw)."""
    op = "dense_conv2d"
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 4:
        raise ValueError(f"{op}: weight must be a float32 (O, C/groups, kh, kw) array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    o, cg, kh, kw = weight.shape
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    _check_geometry(op, o, cg, kh, kw, stride, padding, dilation, groups)
    x = _check_input(op, x, weight.shape, groups)
    n, c, h, w = x.shape
    ho, wo = conv2d_output_hw((h, w), (kh, kw), stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{op}: input {x.shape} gives empty output ({ho}, {wo}) for weight {weight.shape}")
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, o)
    res, has_res = resolve_residual(op, residual, (n, o, ho, wo))
    out = resolve_out(op, out, (n, o, ho, wo))

    hq, wq = packed_hw((h, w), stride, padding)
    group = image_group(n, (ho - 1) * wq + wo)
    packed = pack_input(x, stride, padding, group, allow_view=not np.may_share_memory(out, x))
    chan_pix = stride[0] * stride[1] * hq * wq
    taps = tap_offsets((kh, kw), stride, padding, dilation, (h, w))
    k_rows = cg * kh * kw
    og = o // groups
    # Output rows per slice, so that the im2col slice stays under IM2COL_ELEMS.
    rows_per_slice = max(1, min(ho, IM2COL_ELEMS // (k_rows * wo * group)))
    cols_buf = np.empty(k_rows * rows_per_slice * wo * group, np.float32)
    prod_buf = np.empty(og * rows_per_slice * wo * group, np.float32)
    w2d = np.ascontiguousarray(weight.reshape(o, k_rows))
    for blk in range(n // group):
        for g in range(groups):
            # Row r = c*kh*kw + t of the im2col matrix reads from this packed pixel on.
            chans = blk * c + g * cg + np.arange(cg, dtype=np.int64)
            src = (chans[:, None] * chan_pix + taps[None, :]).reshape(-1)
            for oh0 in range(0, ho, rows_per_slice):
                oh1 = min(oh0 + rows_per_slice, ho)
                cols = (oh1 - oh0) * wo * group
                im2col = cols_buf[: k_rows * cols].reshape(k_rows, cols)
                prod = prod_buf[: og * cols].reshape(og, cols)
                _im2col(packed, src, group, wq, wo, oh0, oh1, im2col)
                split_dot(w2d[g * og : (g + 1) * og], im2col, prod)
                # prod's columns are (oh, ow, image): a packed domain with wq == wo, no garbage.
                _store_rows(prod, g * og, oh0 * wo, oh1 * wo, blk * group, group, ho, wo, bias,
                            act_code, lo, hi, res, has_res, out)
    return out


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
def _store_rows(prod, o0, q0, q1, img0, g, ho, wo, bias, act, lo, hi, res, has_res, out):
    n_ch = out.shape[1]
    out_flat = out.reshape(out.size)
    res_flat = res.reshape(res.size)
    for r in prange(prod.shape[0]):
        o = o0 + r
        store_row(prod[r], o, q0, q1, img0, g, n_ch, ho, wo, wo, bias[o], act, lo, hi, res_flat, has_res,
                  out_flat)


@njit(cache=True, error_model="numpy")
def _epilogue_2d(y, bias, act, lo, hi, res, has_res):
    n, o = y.shape
    for i in range(n):
        for j in range(o):
            v = y[i, j] + bias[j]
            if has_res:
                v += res[i, j]
            y[i, j] = apply_act(v, act, lo, hi)
