"""CSR x dense matmul and the sparse linear layer against their reference twins."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.export.csr import dense_to_csr as export_csr
from harp.kernels.csr import INDEX_DTYPES, kernel_csr
from harp.kernels.reference import csr_matmul_ref, epilogue_ref, linear_ref
from harp.kernels.spmm import sparse_linear, spmm


def dense_to_csr(weight, index_dtype=None):
    """Kernel CSR arrays (int64 indptr, indices of `index_dtype`, float32 values) of a dense matrix."""
    return kernel_csr(export_csr(weight), index_dtype)


ACTS = [("none", None), ("relu", None), ("relu6", None), ("clip", (-0.5, 0.75))]
DENSITIES = [0.0, 0.05, 0.3, 1.0]


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


def sparse_matrix(rng, shape, density):
    dense = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < density)
    dense[rng.integers(shape[0])] = 0.0  # an empty row
    return dense


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 300), st.integers(1, 40), st.sampled_from(DENSITIES),
       st.sampled_from(INDEX_DTYPES), st.sampled_from(ACTS), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_spmm_matches_reference(o, k, m, density, dtype, act, with_bias, with_residual, seed):
    if k > 256 and dtype == np.uint8:
        dtype = np.uint16
    rng = np.random.default_rng(seed)
    weight = sparse_matrix(rng, (o, k), density)
    x = rng.standard_normal((k, m)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32) if with_bias else None
    residual = rng.standard_normal((o, m)).astype(np.float32) if with_residual else None
    indptr, indices, values = dense_to_csr(weight, dtype)
    expected = csr_matmul_ref(indptr, indices, values, k, x)
    if bias is not None:
        expected = expected + bias[:, None]
    expected = epilogue_ref(expected, act[0], act[1], residual)
    assert_close(spmm(indptr, indices, values, x, bias, act[0], act[1], residual), expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 17), st.integers(1, 300), st.integers(1, 30), st.sampled_from(DENSITIES),
       st.sampled_from(INDEX_DTYPES), st.sampled_from(ACTS), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_sparse_linear_matches_reference(n, i, o, density, dtype, act, with_bias, with_residual, seed):
    if i > 256 and dtype == np.uint8:
        dtype = np.uint16
    rng = np.random.default_rng(seed)
    weight = sparse_matrix(rng, (o, i), density)
    x = rng.standard_normal((n, i)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32) if with_bias else None
    residual = rng.standard_normal((n, o)).astype(np.float32) if with_residual else None
    expected = epilogue_ref(linear_ref(x, weight, bias), act[0], act[1], residual)
    out = np.empty((n, o), np.float32)
    result = sparse_linear(x, *dense_to_csr(weight, dtype), bias, act[0], act[1], residual, out=out)
    assert result is out
    assert_close(out, expected)


def test_sparse_linear_uint32_indices():
    rng = np.random.default_rng(1)
    weight = sparse_matrix(rng, (3, 70000), 0.001)
    x = rng.standard_normal((2, 70000)).astype(np.float32)
    indptr, indices, values = dense_to_csr(weight)
    assert indices.dtype == np.uint32
    assert_close(sparse_linear(x, indptr, indices, values), linear_ref(x, weight, None))


def test_spmm_rejects_out_of_range_index():
    indptr, indices, values = dense_to_csr(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="column index 3 out of range"):
        spmm(indptr, indices, values, np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("indptr, message", [
    ([0, 200000, 3], "indptr is not non-decreasing"),  # had read far past the arrays and returned NaN
    ([0, 3, 1, 3], "indptr is not non-decreasing"),
    ([1, 2, 3], "indptr runs 1..3"),
    ([0, 2, 2], "indptr runs 0..2 but there are 3 nonzeros"),
])
def test_spmm_rejects_an_indptr_that_is_not_0_to_nnz_non_decreasing(indptr, message):
    indices, values = np.array([0, 1, 2], np.uint8), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=message):
        spmm(np.array(indptr, np.int64), indices, values, np.ones((3, 2), np.float32))


def test_sparse_linear_error_names_layer_shapes():
    indptr, indices, values = dense_to_csr(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"sparse_linear: input \(2, 3\)") as info:
        sparse_linear(np.zeros((2, 3), np.float32), indptr, indices, values)
    assert isinstance(info.value.__cause__, ValueError)
