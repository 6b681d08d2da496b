"""Kernel-side CSR helpers: conversion of a checked CSRTensor, and row blocks for the thread split."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.export.csr import dense_to_csr
from harp.kernels.csr import INDEX_DTYPES, balanced_blocks, kernel_csr
from harp.kernels.reference import csr_to_dense


def test_kernel_csr_converts_to_kernel_dtypes_and_round_trips():
    dense = np.array([[0, 2, 0, 3], [0, 0, 0, 0], [1, 0, 0, 4]], np.float32)
    t = dense_to_csr(dense)
    assert t.indptr.dtype == np.uint16  # the narrow dtypes the exporter and the loader use
    indptr, indices, values = kernel_csr(t)
    assert indptr.dtype == np.int64 and indices.dtype == np.uint8 and values.dtype == np.float32
    for a in (indptr, indices, values):
        assert a.flags.c_contiguous and a.flags.writeable
    np.testing.assert_array_equal(csr_to_dense(indptr, indices, values, dense.shape), dense)


def test_kernel_csr_copies_read_only_arrays():
    t = dense_to_csr(np.eye(3, dtype=np.float32))
    for a in (t.indptr, t.indices, t.values):
        a.flags.writeable = False
    indptr, indices, values = kernel_csr(t)
    assert indptr.flags.writeable and indices.flags.writeable and values.flags.writeable
    assert not np.shares_memory(values, t.values)


@pytest.mark.parametrize("dtype", INDEX_DTYPES)
def test_kernel_csr_widens_indices(dtype):
    t = dense_to_csr(np.eye(5, dtype=np.float32))
    _, indices, _ = kernel_csr(t, dtype)
    assert indices.dtype == dtype
    np.testing.assert_array_equal(indices, np.arange(5))


def test_kernel_csr_rejects_indices_too_narrow_and_non_csr():
    t = dense_to_csr(np.eye(2, 300, dtype=np.float32))
    with pytest.raises(ValueError, match="300 columns .* do not fit uint8"):
        kernel_csr(t, np.uint8)
    with pytest.raises(ValueError, match="index dtype int64"):
        kernel_csr(t, np.int64)
    with pytest.raises(TypeError, match="expected a CSRTensor"):
        kernel_csr(np.eye(2, dtype=np.float32))


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
