"""CSRTensor, dense_to_csr and the canonical-invariant checker check_csr."""

from __future__ import annotations

import numpy as np
import pytest

from harp.export.csr import CSRError, CSRTensor, check_csr, dense_to_csr


def sparse(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (10, 64), (4, 1, 5, 5), (1, 1), (6, 300)])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_round_trip_is_exact_and_canonical(shape: tuple[int, ...], density: float) -> None:
    w = sparse(np.random.default_rng(0), shape, density)
    t = dense_to_csr(w)
    check_csr(t, "w")
    assert t.shape == shape
    assert t.nnz == np.count_nonzero(w)
    assert t.to_dense().dtype == np.float32
    np.testing.assert_array_equal(t.to_dense(), w)


def test_matrix_view_is_rows_by_flattened_filter() -> None:
    w = np.zeros((2, 2, 1, 3), np.float32)
    w[1, 1, 0, 2] = 7.0  # row 1, column 1*3 + 2 = 5
    t = dense_to_csr(w)
    assert (t.n_rows, t.n_cols) == (2, 6)
    assert t.indptr.tolist() == [0, 0, 1]
    assert t.indices.tolist() == [5]
    assert t.values.tolist() == [7.0]


@pytest.mark.parametrize("n_cols, dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16),
                                           (65536, np.uint16), (65537, np.uint32)])
def test_indices_dtype_is_narrowest_fitting_last_column(n_cols: int, dtype: type) -> None:
    w = np.zeros((1, n_cols), np.float32)
    w[0, -1] = 1.0
    t = dense_to_csr(w)
    assert t.indices.dtype == dtype
    check_csr(t, "w")


@pytest.mark.parametrize("nnz, dtype", [(0, np.uint16), (65535, np.uint16), (65536, np.uint32)])
def test_indptr_dtype_is_narrowest_fitting_nnz(nnz: int, dtype: type) -> None:
    w = np.zeros((2, 65536), np.float32)
    w.reshape(-1)[:nnz] = 1.0
    t = dense_to_csr(w)
    assert t.indptr.dtype == dtype
    assert int(t.indptr[-1]) == nnz


def test_fp16_values_drop_underflow_and_reject_overflow() -> None:
    w = np.array([[1e-9, 0.5, 0.0], [0.0, -2.0, 1e-8]], np.float32)
    t = dense_to_csr(w, np.float16)
    assert t.values.dtype == np.float16
    assert t.indptr.tolist() == [0, 1, 2]  # 1e-9 and 1e-8 round to zero in fp16 and are dropped
    np.testing.assert_array_equal(t.to_dense(), [[0, 0.5, 0], [0, -2.0, 0]])
    with pytest.raises(CSRError, match="overflows float16"):
        dense_to_csr(np.array([[1e6]], np.float32), np.float16)


@pytest.mark.parametrize("w, match", [
    (np.ones(3, np.float32), "fewer than 2 dimensions"),
    (np.array([[np.nan]], np.float32), "non-finite"),
    (np.array([["a"]]), "not numeric"),
])
def test_dense_to_csr_rejects_bad_weights(w: np.ndarray, match: str) -> None:
    with pytest.raises(CSRError, match=match):
        dense_to_csr(w)


def _valid() -> CSRTensor:
    """3 x 5: row 0 = {1, 3}, row 1 empty, row 2 = {0, 2, 4}."""
    return CSRTensor((3, 5), np.array([0, 2, 2, 5], np.uint16), np.array([1, 3, 0, 2, 4], np.uint8),
                     np.array([1, 2, 3, 4, 5], np.float32))


def _with(**changes: object) -> CSRTensor:
    t = _valid()
    fields = {"shape": t.shape, "indptr": t.indptr, "indices": t.indices, "values": t.values, **changes}
    return CSRTensor(**fields)  # type: ignore[arg-type]


def test_valid_tensor_passes() -> None:
    check_csr(_valid(), "layer.weight")
    np.testing.assert_array_equal(_valid().to_dense()[2], [3, 0, 4, 0, 5])


@pytest.mark.parametrize("t, invariant", [
    (_with(indptr=np.array([0, 2, 2], np.uint16)), "expected rows \\+ 1"),
    (_with(indptr=np.array([1, 2, 2, 5], np.uint16)), "starts at 1"),
    (_with(indptr=np.array([0, 2, 2, 4], np.uint16)), "ends at 4"),
    (_with(indptr=np.array([0, 3, 2, 5], np.uint16)), "decreases at row 1"),
    (_with(indices=np.array([1, 3, 0, 2, 5], np.uint8)), "column index 5 .*out of range"),
    (_with(indices=np.array([3, 1, 0, 2, 4], np.uint8)), "not strictly increasing in row 0"),
    (_with(indices=np.array([1, 3, 0, 2, 2], np.uint8)), "not strictly increasing in row 2"),
    (_with(indices=np.array([1, 3, 0, 2], np.uint8)), "4 indices but 5 values"),
    (_with(values=np.array([1, 2, np.inf, 4, 5], np.float32)), "not finite"),
    (_with(values=np.array([1, 2, np.nan, 4, 5], np.float32)), "not finite"),
    (_with(values=np.arange(5, dtype=np.float64)), "values dtype"),
    (_with(indices=np.array([1, 3, 0, 2, 4], np.int64)), "indices dtype"),
    (_with(indptr=np.array([0, 2, 2, 5], np.uint8)), "indptr dtype"),
    (_with(indptr=np.array([0, 2, 2, 5], ">u2")), "indptr dtype"),
    (_with(values=np.ones((5, 1), np.float32)), "one dimension"),
    (_with(shape=(3,)), "shape"),
    (_with(shape=(3, -5)), "shape"),
    (_with(indices=[1, 3, 0, 2, 4]), "not an ndarray"),
])
def test_each_broken_invariant_is_named(t: CSRTensor, invariant: str) -> None:
    with pytest.raises(CSRError, match=f"'features.3.weight'.*{invariant}"):
        check_csr(t, "features.3.weight")


def test_row_boundaries_allow_index_to_restart() -> None:
    # Index 0 after index 3 is fine when a new row starts between them.
    t = CSRTensor((2, 4), np.array([0, 2, 3], np.uint32), np.array([1, 3, 0], np.uint16),
                  np.array([1, 1, 1], np.float16))
    check_csr(t, "w")


def test_check_csr_is_fast_on_a_large_tensor() -> None:
    import time

    t = dense_to_csr(sparse(np.random.default_rng(1), (512, 4608), 0.05))  # ~118k nonzeros
    start = time.perf_counter()
    check_csr(t, "big")
    assert time.perf_counter() - start < 0.5  # vectorised: a few ms, not a Python loop
