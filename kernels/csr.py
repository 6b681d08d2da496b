"""CSR conventions shared by the kernels: canonical-form check, index dtypes, conversions.

A weight is a CSR matrix `(indptr, indices, values)`:
- conv (O, C/groups, kh, kw): O rows, (C/groups)*kh*kw columns, column = (c*kh + i)*kw + j;
- linear (O, I): O rows, I columns.
`indptr` is int64, `indices` the narrowest unsigned dtype that holds the largest
column (uint8, uint16 or uint32), `values` float32. Canonical means indptr starts
at 0 and never decreases, indices are in range, strictly increasing within a row.
NumPy only.
"""

from __future__ import annotations

import numpy as np

INDEX_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


def index_dtype_for(n_cols: int) -> np.dtype:
    """The narrowest unsigned index dtype that can hold every column of `n_cols`."""
    for dtype in INDEX_DTYPES:
        if n_cols - 1 <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"index_dtype_for: {n_cols} columns do not fit uint32 indices")


def check_csr(indptr, indices, values, shape, name: str = "weight") -> None:
    """Raise ValueError unless (indptr, indices, values) is a canonical CSR matrix of `shape`."""
    rows, cols = shape
    where = f"CSR {name} of shape {tuple(shape)}"
    if not isinstance(indptr, np.ndarray) or indptr.dtype != np.int64 or indptr.ndim != 1:
        raise ValueError(f"{where}: indptr must be a 1-D int64 array, got {_describe(indptr)}")
    if not isinstance(indices, np.ndarray) or indices.dtype not in INDEX_DTYPES or indices.ndim != 1:
        raise ValueError(
            f"{where}: indices must be a 1-D uint8/uint16/uint32 array, got {_describe(indices)}"
        )
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
        raise ValueError(f"{where}: values must be a 1-D float32 array, got {_describe(values)}")
    if indptr.shape[0] != rows + 1:
        raise ValueError(f"{where}: indptr has {indptr.shape[0]} entries, expected {rows + 1}")
    nnz = indices.shape[0]
    if values.shape[0] != nnz:
        raise ValueError(f"{where}: {nnz} indices but {values.shape[0]} values")
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise ValueError(f"{where}: indptr must run from 0 to nnz={nnz}, got {indptr[0]}..{indptr[-1]}")
    if np.any(np.diff(indptr) < 0):
        raise ValueError(f"{where}: indptr decreases")
    if nnz and int(indices.max()) >= cols:
        raise ValueError(f"{where}: column index {int(indices.max())} out of range")
    if nnz > 1:
        steps = np.diff(indices.astype(np.int64))
        row_starts = indptr[1:-1]
        inside = np.ones(nnz - 1, bool)
        inside[row_starts[(row_starts > 0) & (row_starts < nnz)] - 1] = False
        if np.any(steps[inside] <= 0):
            raise ValueError(f"{where}: indices are not strictly increasing within a row")


def dense_to_csr(dense, index_dtype=None):
    """Canonical CSR (indptr int64, indices, values float32) of a 2-D array's nonzeros."""
    dense = np.asarray(dense)
    if dense.ndim != 2:
        raise ValueError(f"dense_to_csr: expected a 2-D array, got shape {dense.shape}")
    rows, cols = np.nonzero(dense)  # row-major order: canonical
    indptr = np.zeros(dense.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    dtype = index_dtype_for(dense.shape[1]) if index_dtype is None else np.dtype(index_dtype)
    if cols.size and cols.max() > np.iinfo(dtype).max:
        raise ValueError(f"dense_to_csr: {dense.shape[1]} columns do not fit {dtype}")
    return indptr, cols.astype(dtype), dense[rows, cols].astype(np.float32)


def balanced_blocks(row_cost: np.ndarray, n_blocks: int) -> np.ndarray:
    """int64 boundaries splitting rows into at most `n_blocks` runs of similar total cost.

    Block b is rows [bounds[b], bounds[b + 1]); kernels give each thread one block.
    """
    n_rows = row_cost.shape[0]
    n_blocks = max(1, min(n_blocks, n_rows))
    cum = np.cumsum(row_cost, dtype=np.float64)
    targets = cum[-1] * np.arange(1, n_blocks) / n_blocks if n_rows else np.zeros(0)
    inner = np.searchsorted(cum, targets, side="left") + 1
    bounds = np.concatenate(([0], np.clip(inner, 0, n_rows), [n_rows])).astype(np.int64)
    return np.maximum.accumulate(bounds)


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"ndarray {a.dtype} shape {a.shape}"
    return type(a).__name__
