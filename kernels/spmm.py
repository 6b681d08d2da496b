"""CSR x dense matmul with the fused epilogue, and the sparse linear layer built on it.

`spmm` computes out[o, :] = act(sum_p values[p] * x[indices[p], :] + bias[o] + residual[o, :])
for a CSR matrix (O, K) and a dense x (K, M): every nonzero is one contiguous
multiply-add of a row of x into a row of out, so the inner loop vectorises over
M. Rows are split between threads in runs of equal nonzero count.

`sparse_linear` (y = x @ W.T + b, x (N, I)) transposes x to (I, N) and calls the
same kernel, so a batch of N becomes the vector width.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numba
import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .csr import INDEX_DTYPES, balanced_blocks
from .epilogue import apply_act, resolve_activation, resolve_bias, resolve_out, resolve_residual

FASTMATH = {"contract"}  # fuse a*b + c into an FMA; no reassociation
_U = np.uint64


def spmm(indptr, indices, values, x, bias=None, act="none", clip_range=None, residual=None,
         out=None) -> np.ndarray:
    """act(W @ x + bias[:, None] + residual) for CSR W (O, K) and dense float32 x (K, M) -> (O, M)."""
    op = "spmm"
    _check_csr_args(op, indptr, indices, values)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"{op}: x must be a float32 (K, M) array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n_out = indptr.shape[0] - 1
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, n_out)
    res = resolve_residual(op, residual, (n_out, x.shape[1]))[0] if residual is not None else None
    out = resolve_out(op, out, (n_out, x.shape[1]))
    bind_spmm(as_kernel_array(indptr), as_kernel_array(indices), as_kernel_array(values), as_kernel_array(x),
              bias, act_code, lo, hi, res, out)()
    return out


def bind_spmm(indptr, indices, values, x, bias, act: int, lo, hi, residual, out,
              n_threads: int | None = None) -> Callable[[], None]:
    """A no-argument callable computing `spmm` into `out` (O, M); every array contiguous, checked once.

    `act, lo, hi` come from `epilogue.resolve_activation`; `residual` is (O, M) or None.
    """
    op = "spmm"
    _check_csr_args(op, indptr, indices, values)
    for what, a in (("x", x), ("out", out)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError(f"{op}: {what} must be a contiguous float32 2-D array, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if indices.shape[0] and int(indices.max()) >= x.shape[0]:
        raise ValueError(f"{op}: column index {int(indices.max())} out of range for x with {x.shape[0]} rows")
    n_out = indptr.shape[0] - 1
    if out.shape != (n_out, x.shape[1]) or not out.flags.writeable:
        raise ValueError(f"{op}: out must be a writeable ({n_out}, {x.shape[1]}) array, got {out.shape}")
    if bias.dtype != np.float32 or bias.shape != (n_out,):
        raise ValueError(f"{op}: bias must be float32 ({n_out},), got {bias.dtype} {bias.shape}")
    res, has_res = resolve_residual(op, residual, out.shape)
    threads = numba.get_num_threads() if n_threads is None else n_threads
    blocks = balanced_blocks((np.diff(indptr) + 1).astype(np.float64), threads)
    return partial(_spmm, indptr, indices, values, x, blocks, bias, act, np.float32(lo), np.float32(hi),
                   res, has_res, out)


def sparse_linear(x, indptr, indices, values, bias=None, act="none", clip_range=None, residual=None,
                  out=None) -> np.ndarray:
    """act(x @ W.T + bias + residual) for x float32 (N, I) and CSR W (O, I) -> (N, O)."""
    op = "sparse_linear"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"{op}: input must be a float32 (N, I) array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n, n_out = x.shape[0], indptr.shape[0] - 1
    if residual is not None:
        if not isinstance(residual, np.ndarray) or residual.shape != (n, n_out):
            raise ValueError(f"{op}: residual shape {getattr(residual, 'shape', None)} does not match "
                             f"output ({n}, {n_out})")
        residual = np.ascontiguousarray(residual.T)
    out = resolve_out(op, out, (n, n_out))
    try:
        out_t = spmm(indptr, indices, values, np.ascontiguousarray(x.T), bias, act, clip_range, residual)
    except ValueError as e:
        raise ValueError(f"{op}: input {x.shape} with CSR weight of {n_out} rows: {e}") from e
    out[...] = out_t.T
    return out


def _check_csr_args(op, indptr, indices, values) -> None:
    if (not isinstance(indptr, np.ndarray) or indptr.dtype != np.int64 or indptr.ndim != 1
            or indptr.shape[0] < 1):
        raise ValueError(f"{op}: indptr must be a non-empty 1-D int64 array")
    if not isinstance(indices, np.ndarray) or indices.dtype not in INDEX_DTYPES or indices.ndim != 1:
        raise ValueError(f"{op}: indices must be 1-D uint8/uint16/uint32, "
                         f"got {getattr(indices, 'dtype', None)}")
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.shape != indices.shape:
        raise ValueError(f"{op}: values must be float32 with one entry per index, got "
                         f"{getattr(values, 'dtype', None)} {getattr(values, 'shape', None)}")
    if indptr[-1] != indices.shape[0] or indptr[0] != 0:
        raise ValueError(f"{op}: indptr runs {indptr[0]}..{indptr[-1]} "
                         f"but there are {indices.shape[0]} nonzeros")
    if np.any(np.diff(indptr) < 0):  # a row running past nnz would read out of bounds: the kernel does not check
        raise ValueError(f"{op}: indptr is not non-decreasing (row {int(np.argmax(np.diff(indptr) < 0))} ends "
                         "before it starts)")


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _spmm(indptr, indices, values, x, blocks, bias, act, lo, hi, res, has_res, out):
    m = _U(x.shape[1])
    xf = x.reshape(x.size)
    outf = out.reshape(out.size)
    resf = res.reshape(res.size)
    for block in prange(blocks.shape[0] - 1):
        for o in range(blocks[block], blocks[block + 1]):
            d = _U(o) * m
            for k in range(m):
                outf[d + k] = 0.0
            p = indptr[o]
            p1 = indptr[o + 1]
            while p + 4 <= p1:
                v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
                s0 = _U(indices[p]) * m
                s1 = _U(indices[p + 1]) * m
                s2 = _U(indices[p + 2]) * m
                s3 = _U(indices[p + 3]) * m
                for k in range(m):
                    outf[d + k] += v0 * xf[s0 + k] + v1 * xf[s1 + k] + v2 * xf[s2 + k] + v3 * xf[s3 + k]
                p += 4
            while p < p1:
                v0 = values[p]
                s0 = _U(indices[p]) * m
                for k in range(m):
                    outf[d + k] += v0 * xf[s0 + k]
                p += 1
            b = bias[o]
            if has_res:
                for k in range(m):
                    outf[d + k] = apply_act(outf[d + k] + b + resf[d + k], act, lo, hi)
            else:
                for k in range(m):
                    outf[d + k] = apply_act(outf[d + k] + b, act, lo, hi)
