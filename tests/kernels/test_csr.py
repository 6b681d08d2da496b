"""CSR invariants: the canonical-form check, conversions, index dtypes, row blocks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels.csr import balanced_blocks, check_csr, dense_to_csr, index_dtype_for
from harp.kernels.reference import csr_to_dense


def sample_csr():
    dense = np.array([[0, 2, 0, 3], [0, 0, 0, 0], [1, 0, 0, 4]], np.float32)
    return dense, dense_to_csr(dense)


def test_dense_to_csr_is_canonical_and_round_trips():
    dense, (indptr, indices, values) = sample_csr()
    check_csr(indptr, indices, values, dense.shape)
    np.testing.assert_array_equal(indptr, [0, 2, 2, 4])
    np.testing.assert_array_equal(indices, [1, 3, 0, 3])
    assert indices.dtype == np.uint8 and indptr.dtype == np.int64 and values.dtype == np.float32
    np.testing.assert_array_equal(csr_to_dense(indptr, indices, values, dense.shape), dense)


@pytest.mark.parametrize("n_cols, dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16),
                                           (65536, np.uint16), (65537, np.uint32)])
def test_index_dtype_for_picks_narrowest(n_cols, dtype):
    assert index_dtype_for(n_cols) == np.dtype(dtype)


def test_index_dtype_for_rejects_huge():
    with pytest.raises(ValueError, match="uint32"):
        index_dtype_for(2**32 + 1)


def _broken(kind):
    dense, (indptr, indices, values) = sample_csr()
    indptr, indices, values = indptr.copy(), indices.copy(), values.copy()
    if kind == "indptr dtype":
        indptr = indptr.astype(np.int32)
    elif kind == "indices dtype":
        indices = indices.astype(np.int64)
    elif kind == "values dtype":
        values = values.astype(np.float64)
    elif kind == "indptr length":
        indptr = indptr[:-1]
    elif kind == "nnz":
        values = values[:-1]
    elif kind == "indptr end":
        indptr[-1] = 3
    elif kind == "decreasing":
        indptr[1], indptr[2] = 3, 2
    elif kind == "range":
        indices[-1] = 4
    elif kind == "unsorted":
        indices[0], indices[1] = 3, 1
    elif kind == "duplicate":
        indices[1] = 1
    return indptr, indices, values, dense.shape


@pytest.mark.parametrize("kind", ["indptr dtype", "indices dtype", "values dtype", "indptr length", "nnz",
                                  "indptr end", "decreasing", "range", "unsorted", "duplicate"])
def test_check_csr_rejects(kind):
    indptr, indices, values, shape = _broken(kind)
    with pytest.raises(ValueError, match="CSR layer3"):
        check_csr(indptr, indices, values, shape, name="layer3")


def test_check_csr_allows_descending_across_rows():
    dense = np.array([[0, 0, 5], [7, 0, 0]], np.float32)
    check_csr(*dense_to_csr(dense), dense.shape)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=40), st.integers(1, 8))
def test_balanced_blocks_cover_rows_in_order(counts, n_blocks):
    cost = np.asarray(counts, np.float64) + 1
    bounds = balanced_blocks(cost, n_blocks)
    assert bounds[0] == 0 and bounds[-1] == len(counts)
    assert np.all(np.diff(bounds) >= 0)
    assert len(bounds) - 1 == min(n_blocks, len(counts))
    # No block exceeds its fair share by more than one row's cost.
    block_cost = [cost[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(block_cost) <= cost.sum() / (len(bounds) - 1) + cost.max()
