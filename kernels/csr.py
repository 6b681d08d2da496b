"""CSR weights as the kernels take them, converted from the one CSR type of the project.

The canonical CSR type, its invariant check and the dense -> CSR conversion live
in `harp.export.csr` (`CSRTensor`, `check_csr`, `dense_to_csr`); the bundle
loader checks every weight with it before a kernel sees one. This module only
adapts a checked `CSRTensor` to the kernels' conventions and keeps the helpers
that only kernels need.

Kernel conventions: a weight is a CSR matrix `(indptr, indices, values)`;
conv (O, C/groups, kh, kw) has O rows and (C/groups)*kh*kw columns, column
(c*kh + i)*kw + j; linear (O, I) has O rows and I columns. `indptr` is int64,
`indices` uint8, uint16 or uint32, `values` float32, all C-contiguous and
writeable (see `arrays`). NumPy only.
"""

from __future__ import annotations

import numpy as np

from harp.export.csr import INDICES_DTYPES, CSRTensor

INDEX_DTYPES = INDICES_DTYPES  # uint8, uint16, uint32: the index dtypes every kernel accepts


def kernel_csr(t: CSRTensor, index_dtype=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64, indices, values float32) copies of a checked CSRTensor, ready for the kernels.

    `index_dtype` (one of INDEX_DTYPES) re-types the column indices, e.g. to
    exercise every kernel signature in tests; it must hold the widest column.
    """
    if not isinstance(t, CSRTensor):
        raise TypeError(f"kernel_csr: expected a CSRTensor, got {type(t).__name__}")
    dtype = t.indices.dtype if index_dtype is None else np.dtype(index_dtype)
    if dtype not in INDEX_DTYPES:
        raise ValueError(f"kernel_csr: index dtype {dtype} is not one of {[d.name for d in INDEX_DTYPES]}")
    if t.n_cols and t.n_cols - 1 > np.iinfo(dtype).max:
        raise ValueError(f"kernel_csr: {t.n_cols} columns of weight {t.shape} do not fit {dtype} indices")
    indptr = np.array(t.indptr, dtype=np.int64, order="C")
    indices = np.array(t.indices, dtype=dtype, order="C")
    values = np.array(t.values, dtype=np.float32, order="C")
    return indptr, indices, values


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
