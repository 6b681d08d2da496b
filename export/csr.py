"""CSR storage for pruned conv and linear weights (numpy only).

A `CSRTensor` keeps the logical shape of the weight it stands for, e.g.
(O, I/groups, kh, kw) for a conv or (O, I) for a linear layer, and stores it as
a CSR matrix of shape[0] rows and prod(shape[1:]) columns: row r holds the
flattened (C order) filter of output channel r.

Canonical form (what `dense_to_csr` produces and `check_csr` enforces):
- indptr has rows + 1 entries, starts at 0, never decreases, ends at nnz;
- within a row, indices are strictly increasing (sorted, no duplicates) and < cols;
- values are finite; len(indices) == len(values) == nnz;
- dtypes: indptr uint16/uint32/uint64, indices uint8/uint16/uint32,
  values float32/float16, all native byte order and one-dimensional.
Writers drop explicit zeros; readers do not require it (an fp16 value may round
to zero and is harmless).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INDPTR_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))
INDICES_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
VALUES_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

# The widest matrix the index dtypes can address, and a bound that keeps every
# size computation inside int64.
MAX_COLS = 1 << 32
MAX_ROWS = 1 << 62


class CSRError(ValueError):
    """A CSR tensor breaks a canonical invariant; the message names the tensor."""


@dataclass(frozen=True, eq=False)
class CSRTensor:
    """A weight of logical shape `shape`, stored as a rows x cols CSR matrix."""

    shape: tuple[int, ...]
    indptr: np.ndarray  # (rows + 1,) unsigned
    indices: np.ndarray  # (nnz,) unsigned column of each stored value
    values: np.ndarray  # (nnz,) float32 or float16

    @property
    def n_rows(self) -> int:
        return int(self.shape[0])

    @property
    def n_cols(self) -> int:
        return math.prod(int(d) for d in self.shape[1:])

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        size = self.n_rows * self.n_cols
        return self.nnz / size if size else 0.0

    def row_indices(self) -> np.ndarray:
        """The row of every stored value, int64 (assumes a checked tensor)."""
        return np.repeat(np.arange(self.n_rows), np.diff(self.indptr.astype(np.int64)))

    def to_dense(self) -> np.ndarray:
        """The full weight as a float32 array of `shape` (assumes a checked tensor)."""
        dense = np.zeros((self.n_rows, self.n_cols), dtype=np.float32)
        dense[self.row_indices(), self.indices.astype(np.int64)] = self.values.astype(np.float32)
        return dense.reshape(self.shape)


def narrowest_unsigned(max_value: int, choices: tuple[np.dtype, ...]) -> np.dtype:
    """The first dtype of `choices` (narrowest first) that holds max_value."""
    for dtype in choices:
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise CSRError(f"{max_value} does not fit any of {[d.name for d in choices]}")


def dense_to_csr(w: np.ndarray, values_dtype: np.dtype | type | str = np.float32) -> CSRTensor:
    """Canonical CSR of a dense weight of 2 or more dimensions.

    Zeros are dropped, including values that become zero once cast to
    `values_dtype`; indices and indptr get the narrowest unsigned dtypes that fit
    cols - 1 and nnz.
    """
    w = np.asarray(w)
    values_dtype = np.dtype(values_dtype)
    if values_dtype not in VALUES_DTYPES:
        raise CSRError(f"values dtype {values_dtype} is not one of {[d.name for d in VALUES_DTYPES]}")
    if w.ndim < 2:
        raise CSRError(f"weight of shape {w.shape} has fewer than 2 dimensions")
    if w.dtype.kind not in "fiu":
        raise CSRError(f"weight dtype {w.dtype} is not numeric")
    shape = tuple(int(d) for d in w.shape)
    n_rows, n_cols = shape[0], math.prod(shape[1:])
    if n_cols > MAX_COLS:
        raise CSRError(f"weight of shape {shape} has {n_cols} columns, more than {MAX_COLS}")
    if not np.isfinite(w).all():
        raise CSRError(f"weight of shape {shape} holds non-finite values")
    matrix = w.reshape(n_rows, n_cols)
    rows, cols = np.nonzero(matrix)  # C order: sorted by row, then column
    with np.errstate(over="ignore"):  # overflow is reported just below, by name
        values = matrix[rows, cols].astype(values_dtype)
    if not np.isfinite(values).all():
        raise CSRError(f"weight of shape {shape} overflows {values_dtype.name}")
    keep = values != 0
    return csr_from_entries(shape, rows[keep], cols[keep], values[keep])


def csr_from_entries(shape: tuple[int, ...], rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> CSRTensor:
    """The CSRTensor of logical `shape` holding `values` at (rows, cols), sorted by row then column,
    with the narrowest indptr and indices dtypes that fit."""
    n_rows, n_cols = int(shape[0]), math.prod(int(d) for d in shape[1:])
    indptr = np.zeros(n_rows + 1, dtype=narrowest_unsigned(int(values.shape[0]), INDPTR_DTYPES))
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    indices = np.asarray(cols).astype(narrowest_unsigned(max(n_cols - 1, 0), INDICES_DTYPES))
    return CSRTensor(tuple(int(d) for d in shape), indptr, indices, np.ascontiguousarray(values))


def check_csr(t: CSRTensor, name: str) -> None:
    """Raise CSRError naming `name` and the invariant if `t` is not canonical CSR."""
    where = f"CSR tensor {name!r}"
    if not isinstance(t, CSRTensor):
        raise CSRError(f"{where}: is a {type(t).__name__}, not a CSRTensor")
    shape = t.shape
    if (not isinstance(shape, tuple) or len(shape) < 2
            or any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0 for d in shape)):
        raise CSRError(f"{where}: shape {shape!r} is not a tuple of 2 or more non-negative integers")
    n_rows, n_cols = int(shape[0]), math.prod(int(d) for d in shape[1:])
    if n_rows > MAX_ROWS or n_cols > MAX_COLS:
        raise CSRError(f"{where}: shape {shape} gives a {n_rows}x{n_cols} matrix, beyond {MAX_ROWS}x{MAX_COLS}")
    for role, array, allowed in (("indptr", t.indptr, INDPTR_DTYPES),
                                 ("indices", t.indices, INDICES_DTYPES),
                                 ("values", t.values, VALUES_DTYPES)):
        if not isinstance(array, np.ndarray):
            raise CSRError(f"{where}: {role} is a {type(array).__name__}, not an ndarray")
        if array.dtype not in allowed or not array.dtype.isnative:
            raise CSRError(f"{where}: {role} dtype {array.dtype.str} is not one of {[d.name for d in allowed]}")
        if array.ndim != 1:
            raise CSRError(f"{where}: {role} has shape {array.shape}, expected one dimension")
    indptr, indices, values = t.indptr, t.indices, t.values
    nnz = int(values.shape[0])
    if indptr.shape[0] != n_rows + 1:
        raise CSRError(f"{where}: indptr has {indptr.shape[0]} entries, expected rows + 1 = {n_rows + 1}")
    if indices.shape[0] != nnz:
        raise CSRError(f"{where}: {indices.shape[0]} indices but {nnz} values")
    if int(indptr[0]) != 0:
        raise CSRError(f"{where}: indptr starts at {int(indptr[0])}, expected 0")
    if int(indptr[-1]) != nnz:
        raise CSRError(f"{where}: indptr ends at {int(indptr[-1])}, expected nnz = {nnz}")
    drops = np.flatnonzero(indptr[1:] < indptr[:-1])  # unsigned compare, no wrap-around
    if drops.size:
        r = int(drops[0])
        raise CSRError(f"{where}: indptr decreases at row {r} ({int(indptr[r])} -> {int(indptr[r + 1])})")
    if nnz == 0:
        return
    # indptr is now monotone within [0, nnz], so it can index the nnz positions.
    if int(indices.max()) >= n_cols:
        k = int(np.argmax(indices >= n_cols))
        raise CSRError(f"{where}: column index {int(indices[k])} at position {k} "
                       f"(row {_row_of(indptr, k)}) is out of range for {n_cols} columns")
    row_start = np.zeros(nnz, dtype=bool)
    row_start[indptr[:-1][indptr[:-1] < nnz].astype(np.intp)] = True
    bad = np.flatnonzero(~row_start[1:] & (indices[1:] <= indices[:-1]))
    if bad.size:
        k = int(bad[0]) + 1
        raise CSRError(f"{where}: indices not strictly increasing in row {_row_of(indptr, k)} "
                       f"({int(indices[k - 1])} then {int(indices[k])} at position {k})")
    if not np.isfinite(values).all():
        k = int(np.argmin(np.isfinite(values)))
        raise CSRError(f"{where}: value {values[k]} at position {k} (row {_row_of(indptr, k)}) is not finite")


def _row_of(indptr: np.ndarray, k: int) -> int:
    """The row holding stored position k (indptr must be monotone)."""
    return int(np.searchsorted(indptr, k, side="right")) - 1
