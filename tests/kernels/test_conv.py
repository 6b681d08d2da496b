"""Sparse conv kernel against its reference twin, across shapes, densities and index dtypes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels import conv, packing
from harp.kernels.conv import plan_sparse_conv2d, sparse_conv2d, sparse_conv2d_workspace
from harp.export.csr import dense_to_csr as export_csr
from harp.kernels.csr import INDEX_DTYPES, kernel_csr
from harp.kernels.reference import conv2d_ref, epilogue_ref
from harp.kernels.threads import get_num_threads, max_threads, set_num_threads

ACTS = [("none", None), ("relu", None), ("relu6", None), ("clip", (-0.5, 0.75))]


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


def sparse_weight(rng, shape, density):
    weight = rng.standard_normal(shape).astype(np.float32)
    return weight * (rng.random(shape) < density)


def csr(weight, dtype=None):
    """Kernel CSR arrays of a conv weight, with indices of `dtype`."""
    return kernel_csr(export_csr(weight), dtype)


@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    cg = 1 if kind == "depthwise" else draw(st.integers(1, 4))
    groups = {"plain": 1, "grouped": draw(st.integers(2, 3)), "depthwise": draw(st.integers(1, 6))}[kind]
    og = draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 11))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 11))
    return dict(
        n=draw(st.integers(1, 4)), groups=groups, cg=cg, og=og, kernel=(kh, kw), stride=stride,
        padding=padding, dilation=dilation, hw=(h, w),
        density=draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])),
        dtype=draw(st.sampled_from(INDEX_DTYPES)), act=draw(st.sampled_from(ACTS)),
        bias=draw(st.booleans()), residual=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_case(c):
    rng = np.random.default_rng(c["seed"])
    o = c["og"] * c["groups"]
    x = rng.standard_normal((c["n"], c["cg"] * c["groups"], *c["hw"])).astype(np.float32)
    weight = sparse_weight(rng, (o, c["cg"], *c["kernel"]), c["density"])
    weight[rng.integers(o)] = 0.0  # at least one empty row
    bias = rng.standard_normal(o).astype(np.float32) if c["bias"] else None
    expected = conv2d_ref(x, weight, bias, c["stride"], c["padding"], c["dilation"], c["groups"])
    residual = rng.standard_normal(expected.shape).astype(np.float32) if c["residual"] else None
    expected = epilogue_ref(expected, c["act"][0], c["act"][1], residual)
    actual = sparse_conv2d(x, *csr(weight, c["dtype"]), weight.shape, bias, c["stride"], c["padding"],
                           c["dilation"], c["groups"], act=c["act"][0], clip_range=c["act"][1],
                           residual=residual)
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert_close(actual, expected)


@settings(max_examples=120, deadline=None)
@given(conv_cases())
def test_sparse_conv2d_matches_reference(case):
    run_case(case)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("dtype", INDEX_DTYPES)
def test_sparse_conv2d_empty_and_full_layers(density, dtype):
    run_case(dict(n=2, groups=1, cg=5, og=6, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                  hw=(7, 6), density=density, dtype=dtype, act=("relu", None), bias=True, residual=True,
                  seed=3))


@pytest.mark.parametrize("n", [1, 16])
def test_sparse_conv2d_rows_of_every_nonzero_count(n):
    # Row o has o nonzeros: the kernel's passes of 8 and 4 and its padded last pass of 1-3
    # meet every remainder, on runs with and without a partial last vector.
    rng = np.random.default_rng(n)
    weight = np.zeros((20, 3, 3, 3), np.float32)
    for o in range(20):
        weight[o].flat[rng.permutation(27)[:o]] = rng.standard_normal(o)
    x = rng.standard_normal((n, 3, 7, 9)).astype(np.float32)
    assert_close(sparse_conv2d(x, *csr(weight), weight.shape, None, 1, 1),
                 conv2d_ref(x, weight, None, (1, 1), (1, 1), (1, 1), 1))


def test_sparse_conv2d_wide_columns_uint16():
    # 40 channels x 3 x 3 = 360 columns: indices need uint16.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 40, 6, 6)).astype(np.float32)
    weight = sparse_weight(rng, (8, 40, 3, 3), 0.1)
    indptr, indices, values = csr(weight)
    assert indices.dtype == np.uint16
    assert_close(sparse_conv2d(x, indptr, indices, values, weight.shape, None, 1, 1),
                 conv2d_ref(x, weight, None, (1, 1), (1, 1), (1, 1), 1))


@pytest.mark.parametrize("min_plane_pixels", [1, 10**9])  # every image alone / whole batch interleaved
@pytest.mark.parametrize("n, stride", [(1, (1, 1)), (3, (2, 2)), (16, (1, 2))])
def test_sparse_conv2d_many_small_tiles(monkeypatch, n, stride, min_plane_pixels):
    # Tiles of a few pixels cut output rows and garbage columns at every offset.
    monkeypatch.setattr(conv, "TILE_ELEMS", 16)
    monkeypatch.setattr(packing, "MIN_PLANE_PIXELS", min_plane_pixels)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 6, 13, 11)).astype(np.float32)
    weight = sparse_weight(rng, (10, 6, 3, 3), 0.3)
    bias = rng.standard_normal(10).astype(np.float32)
    expected = conv2d_ref(x, weight, bias, stride, (1, 1), (1, 1), 1)
    residual = rng.standard_normal(expected.shape).astype(np.float32)
    actual = sparse_conv2d(x, *csr(weight), weight.shape, bias, stride, 1, act="relu", residual=residual)
    assert_close(actual, np.maximum(expected + residual, 0))


def test_sparse_conv2d_empty_batch():
    weight = np.ones((2, 3, 3, 3), np.float32)
    y = sparse_conv2d(np.zeros((0, 3, 5, 5), np.float32), *csr(weight), weight.shape, None, 1, 1)
    assert y.shape == (0, 2, 5, 5)


def test_sparse_conv2d_same_bits_for_any_thread_count():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
    weight = sparse_weight(rng, (24, 16, 3, 3), 0.2)
    args = (x, *csr(weight), weight.shape, None, 1, 1)
    before = get_num_threads()
    try:
        results = []
        for threads in sorted({1, max_threads()}):
            set_num_threads(threads)
            results.append(sparse_conv2d(*args))
    finally:
        set_num_threads(before)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_sparse_conv2d_out_may_be_the_residual():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    weight = sparse_weight(rng, (4, 4, 3, 3), 0.4)
    shortcut = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    expected = np.maximum(conv2d_ref(x, weight, None, (1, 1), (1, 1), (1, 1), 1) + shortcut, 0)
    sparse_conv2d(x, *csr(weight), weight.shape, None, 1, 1, act="relu", residual=shortcut, out=shortcut)
    assert_close(shortcut, expected)


def test_sparse_conv2d_out_may_be_the_input():
    # 1x1, stride 1, no padding: the packed input would be x itself unless copied.
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 6, 40, 40)).astype(np.float32)
    weight = sparse_weight(rng, (6, 6, 1, 1), 0.6)
    expected = conv2d_ref(x, weight, None, (1, 1), (0, 0), (1, 1), 1)
    sparse_conv2d(x, *csr(weight), weight.shape, out=x)
    assert_close(x, expected)


def test_sparse_conv2d_with_plan_workspace_and_out():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    weight = sparse_weight(rng, (5, 4, 3, 3), 0.3)
    indptr, indices, values = csr(weight)
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, (8, 8), (2, 2), (1, 1))
    workspace = np.full(sparse_conv2d_workspace(plan, 3), np.nan, np.float32)  # must be overwritten
    out = np.empty((3, 5, 4, 4), np.float32)
    for _ in range(2):
        result = sparse_conv2d(x, indptr, indices, values, weight.shape, None, (2, 2), (1, 1), out=out,
                               plan=plan, workspace=workspace)
        assert result is out
        assert_close(out, conv2d_ref(x, weight, None, (2, 2), (1, 1), (1, 1), 1))


def test_sparse_conv2d_rejects_plan_for_other_input():
    rng = np.random.default_rng(8)
    weight = sparse_weight(rng, (2, 3, 3, 3), 0.5)
    indptr, indices, values = csr(weight)
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, (8, 8), 1, 1)
    with pytest.raises(ValueError, match=r"plan is for input \(8, 8\)"):
        sparse_conv2d(np.zeros((1, 3, 9, 9), np.float32), indptr, indices, values, weight.shape, plan=plan)
    with pytest.raises(ValueError, match=r"stride \(1, 1\), padding \(1, 1\)"):
        sparse_conv2d(np.zeros((1, 3, 8, 8), np.float32), indptr, indices, values, weight.shape, None, 2, 1,
                      plan=plan)


@pytest.mark.parametrize("bad, message", [
    (dict(x=np.zeros((1, 4, 5, 5), np.float32)), "has 4 channels"),
    (dict(x=np.zeros((1, 3, 5, 5), np.float64)), "float32 NCHW"),
    (dict(bias=np.zeros(3, np.float32)), "bias shape"),
    (dict(residual=np.zeros((1, 2, 4, 4), np.float32)), "residual shape"),
    (dict(act="gelu"), "unknown activation"),
    (dict(act="clip"), "clip_range"),
    (dict(x=np.zeros((1, 3, 1, 1), np.float32)), "empty output"),
])
def test_sparse_conv2d_errors_name_the_problem(bad, message):
    weight = np.ones((2, 3, 3, 3), np.float32)
    kwargs = dict(x=np.zeros((1, 3, 5, 5), np.float32), bias=None, residual=None, act="none")
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        sparse_conv2d(kwargs.pop("x"), *csr(weight), weight.shape, **kwargs)


@pytest.mark.parametrize("bad", ["decreasing", "past_nnz", "not_from_0"])
def test_plan_rejects_an_indptr_that_is_not_0_to_nnz_non_decreasing(bad):
    weight = np.ones((2, 3, 3, 3), np.float32)
    indptr, indices, values = csr(weight)
    indptr = indptr.copy()
    if bad == "decreasing":
        indptr[1] = indptr[2] + 1
    elif bad == "past_nnz":
        indptr[-1] += 1
    else:
        indptr[0] = 1
    with pytest.raises(ValueError, match="is not 0..nnz=54 non-decreasing"):
        plan_sparse_conv2d(indptr, indices, weight.shape, (5, 5), 1, 1)


def test_plan_rejects_out_of_range_columns():
    weight = np.ones((2, 3, 3, 3), np.float32)
    indptr, indices, values = csr(weight)
    with pytest.raises(ValueError, match="column index"):
        plan_sparse_conv2d(indptr, indices, (2, 2, 3, 3), (5, 5), 1, 1)


def test_read_only_inputs_reuse_the_compiled_kernel():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    weight = sparse_weight(rng, (4, 3, 3, 3), 0.5)
    indptr, indices, values = csr(weight)
    sparse_conv2d(x, indptr, indices, values, weight.shape, None, 1, 1)
    kernels = (conv._sparse_conv, packing._pack)
    compiled = [len(k.signatures) for k in kernels]
    frozen = []
    for a in (x, indptr, indices, values):
        a = a.copy()
        a.flags.writeable = False
        frozen.append(a)
    bias = np.ones(4, np.float32)
    bias.flags.writeable = False
    actual = sparse_conv2d(*frozen, weight.shape, bias, 1, 1)
    assert [len(k.signatures) for k in kernels] == compiled
    assert_close(actual, conv2d_ref(x, weight, bias, (1, 1), (1, 1), (1, 1), 1))
