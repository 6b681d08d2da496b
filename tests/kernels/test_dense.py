"""Dense fallback conv and linear against their reference twins."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels import dense, packing
from harp.kernels.dense import dense_conv2d, dense_linear
from harp.kernels.epilogue import resolve_activation
from harp.kernels.layout import Layout, borders_are_zero, from_layout, to_layout
from harp.kernels.reference import conv2d_ref, epilogue_ref, linear_ref
from harp.kernels.threads import get_num_threads, max_threads, set_num_threads

ACTS = [("none", None), ("relu", None), ("relu6", None), ("clip", (-0.5, 0.75))]


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cg, og = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 11))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 11))
    return (draw(st.integers(1, 4)), groups, cg, og, (kh, kw), stride, padding, dilation, (h, w),
            draw(st.sampled_from(ACTS)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("min_pixel_run", [0, 10**9], ids=["pixel-major", "channel-major"])
@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_dense_conv2d_matches_reference(min_pixel_run, case):
    n, groups, cg, og, kernel, stride, padding, dilation, hw, (act, clip_range), with_residual, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cg * groups, *hw)).astype(np.float32)
    weight = rng.standard_normal((og * groups, cg, *kernel)).astype(np.float32)
    bias = rng.standard_normal(og * groups).astype(np.float32)
    expected = conv2d_ref(x, weight, bias, stride, padding, dilation, groups)
    residual = rng.standard_normal(expected.shape).astype(np.float32) if with_residual else None
    expected = epilogue_ref(expected, act, clip_range, residual)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dense, "MIN_PIXEL_RUN", min_pixel_run)
        actual = dense_conv2d(x, weight, bias, stride, padding, dilation, groups, act=act, clip_range=clip_range,
                              residual=residual)
    assert_close(actual, expected)


@pytest.mark.parametrize("min_pixel_run", [0, 10**9], ids=["pixel-major", "channel-major"])
@pytest.mark.parametrize("min_plane_pixels", [1, 10**9])  # every image alone / whole batch interleaved
@pytest.mark.parametrize("n", [1, 5])
def test_dense_conv2d_blocking_edges(monkeypatch, n, min_plane_pixels, min_pixel_run):
    # 70 output channels: two slabs of 64 (the second mostly padding), and 11 blocks
    # of 6 and a last one of 4 (pixel-major); K = 7 * 9 = 63 columns, not a multiple
    # of 4; several pixel tiles of 40 elements, each one chunk of 64 only partly
    # filled; and a last element quad of 1-3 elements (channel-major).
    monkeypatch.setattr(dense, "MIN_PIXEL_RUN", min_pixel_run)
    monkeypatch.setattr(dense, "PIXEL_TILE_ELEMS", 40)
    monkeypatch.setattr(dense, "CHANNEL_SLAB", 64)
    monkeypatch.setattr(packing, "MIN_PLANE_PIXELS", min_plane_pixels)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 7, 9, 7)).astype(np.float32)
    weight = rng.standard_normal((70, 7, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(70).astype(np.float32)
    out = np.empty((n, 70, 9, 7), np.float32)
    residual = rng.standard_normal(out.shape).astype(np.float32)
    assert dense_conv2d(x, weight, bias, 1, 1, act="relu", residual=residual, out=out) is out
    assert_close(out, np.maximum(conv2d_ref(x, weight, bias, (1, 1), (1, 1), (1, 1), 1) + residual, 0))


def test_dense_conv2d_out_may_be_the_input():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 40, 40)).astype(np.float32)
    weight = rng.standard_normal((6, 6, 1, 1)).astype(np.float32)
    expected = conv2d_ref(x, weight, None, (1, 1), (0, 0), (1, 1), 1)
    dense_conv2d(x, weight, out=x)
    assert_close(x, expected)


def test_dense_conv2d_rejects_bad_weight():
    with pytest.raises(ValueError, match="dense_conv2d: weight must be a float32"):
        dense_conv2d(np.zeros((1, 2, 4, 4), np.float32), np.zeros((2, 2, 3, 3)), None)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 17), st.integers(1, 40), st.integers(1, 20), st.sampled_from(ACTS), st.booleans(),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_dense_linear_matches_reference(n, i, o, act, with_bias, with_residual, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, i)).astype(np.float32)
    weight = rng.standard_normal((o, i)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32) if with_bias else None
    residual = rng.standard_normal((n, o)).astype(np.float32) if with_residual else None
    expected = epilogue_ref(linear_ref(x, weight, bias), act[0], act[1], residual)
    assert_close(dense_linear(x, weight, bias, act[0], act[1], residual), expected)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])  # up to SMALL_BATCH columns: numba kernel; more: BLAS
@pytest.mark.parametrize("o", [10, 300])  # one slab padded to 16 channels; two slabs, the last partial
def test_bound_dense_linear_matches_reference(o, m):
    rng = np.random.default_rng(o * 100 + m)
    k = 37
    weight = rng.standard_normal((o, k)).astype(np.float32)
    x = rng.standard_normal((k, m)).astype(np.float32)  # feature-major, as the runtime keeps it
    bias = rng.standard_normal(o).astype(np.float32)
    residual = rng.standard_normal((o, m)).astype(np.float32)
    out = np.full((o, m), np.nan, np.float32)
    act, lo, hi = resolve_activation("test", "clip", (-0.5, 0.75))
    dense.bind_dense_linear(dense.plan_dense_linear(weight), x, bias, act, lo, hi, residual, out)()
    expected = epilogue_ref(linear_ref(x.T, weight, bias), "clip", (-0.5, 0.75), residual.T).T
    assert_close(out, expected)


def test_dense_linear_rejects_mismatch():
    with pytest.raises(ValueError, match=r"input \(2, 3\) does not match weight \(4, 5\)"):
        dense_linear(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))


@pytest.mark.parametrize("parts", [2, 3])
def test_split_dot_matches_single_product(monkeypatch, parts):
    monkeypatch.setattr(dense, "dense_split", lambda: parts)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((37, 20)).astype(np.float32)
    b = rng.standard_normal((20, 11)).astype(np.float32)
    out = np.full((37, 11), np.nan, np.float32)
    dense.split_dot(a, b, out)
    assert_close(out, a @ b)


def test_split_dot_keeps_the_callers_floating_point_settings_in_its_threads(monkeypatch):
    # The pool threads ran under numpy's default settings: `harp run` printed "invalid value
    # encountered in dot" before refusing an overflowing input in one line.
    import warnings

    monkeypatch.setattr(dense, "dense_split", lambda: 2)
    a = np.ones((40, 8), np.float32)
    a[30:] = np.inf  # rows of the second thread's part
    b = np.zeros((8, 3), np.float32)  # inf * 0: invalid
    out = np.empty((40, 3), np.float32)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
        warnings.simplefilter("error")
        dense.split_dot(a, b, out)
    assert np.isnan(out[30:]).all()
    with np.errstate(invalid="raise"), pytest.raises(FloatingPointError):
        dense.split_dot(a, b, out)


def test_dense_conv2d_with_all_threads():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    weight = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    before = get_num_threads()
    try:
        set_num_threads(max_threads())
        actual = dense_conv2d(x, weight, None, 1, 1)
    finally:
        set_num_threads(before)
    assert_close(actual, conv2d_ref(x, weight, None, (1, 1), (1, 1), (1, 1), 1))


@pytest.mark.parametrize("channel_blocks, threads, tiles", [(11, 2, 2), (22, 2, 1), (12, 4, 1), (11, 1, 1)])
def test_pixel_major_split_evens_out_channel_blocks(channel_blocks, threads, tiles):
    # A 32x32 plane at batch 1 (1086 packed pixels) is one tile unless the channel blocks do
    # not divide among the threads: 64 channels are 11 blocks of 6, so two threads get half
    # the plane each instead of 6 and 5 blocks.
    tile_pix, runs = dense.pixel_major_split(1086, 1, 1, 1, channel_blocks, threads)
    assert -(-1086 // tile_pix) == tiles and 1 <= runs <= channel_blocks


def test_dense_conv2d_split_into_tiles_matches_reference():
    # 64 output channels at batch 1 on two threads: the plane in two tiles, as above.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 16, 32, 32)).astype(np.float32)
    weight = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    before = get_num_threads()
    try:
        set_num_threads(min(2, max_threads()))
        actual = dense_conv2d(x, weight, bias, 1, 1, act="relu")
    finally:
        set_num_threads(before)
    assert_close(actual, np.maximum(conv2d_ref(x, weight, bias, (1, 1), (1, 1), (1, 1), 1), 0))


@pytest.mark.parametrize("l_pix, tile_pix, group, wq, wo, cut", [
    (1086, 1086, 1, 34, 32, "rows"),  # 32x32 at batch 1: 2 vectors a row, 64 instead of 68
    (1086, 543, 1, 34, 32, "rows"),  # the same in two tiles of 16 rows each
    (286, 150, 1, 18, 16, "rows"),  # 16x16, tiles cutting a row in the middle
    (22, 22, 16, 6, 4, "rows"),  # 4x4 at batch 16: a vector per pixel, none for the garbage
    (78, 78, 1, 10, 8, "straight"),  # 8x8 at batch 1: half-vector rows would take 8 instead of 5
    (45, 20, 3, 9, 7, "straight"),
    (78, 2, 2000, 10, 8, "rows"),  # 8x8 at batch 2000: tiles of 2 pixels, one of them garbage only
])
def test_tile_vectors_cover_every_output_element_once(l_pix, tile_pix, group, wq, wo, cut):
    vectors, _ = dense.tile_vectors(l_pix, tile_pix, group, wq, wo)
    for tile, vec in enumerate(vectors):
        q0 = tile * tile_pix
        length = (min(q0 + tile_pix, l_pix) - q0) * group
        covered = np.zeros(length, np.int64)
        for offset, count in vec[vec[:, 1] > 0]:
            assert 1 <= count <= 16
            covered[offset:offset + count] += 1
        column = (q0 + np.arange(length) // group) % wq
        assert (covered[column < wo] == 1).all()  # every output element exactly once
        straight = -(-length // 16)
        if cut == "rows":  # fewer vectors where the tile holds garbage columns
            assert (covered[column >= wo] == 0).all()
            assert (vec[:, 1] > 0).sum() < straight if (column >= wo).any() else (vec[:, 1] > 0).sum() == straight
        else:
            assert (vec[:, 1] > 0).sum() == straight


def test_dense_conv2d_large_image_group():
    # 2000 images of 8x8 in one group cut the padded plane into tiles of 2 pixels; the
    # tile of columns 8-9 holds no output and computes nothing.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2000, 1, 8, 8)).astype(np.float32)
    weight = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    assert_close(dense_conv2d(x, weight, bias, 1, 1), conv2d_ref(x, weight, bias, (1, 1), (1, 1), (1, 1), 1))


def test_dense_conv2d_row_cut_leaves_the_border_zero():
    # A 4x4 plane at batch 16 is cut into one vector per pixel: the garbage columns are
    # never computed, and the store writes the whole tile onto an output whose border
    # takes them, so it must zero that border again.
    rng = np.random.default_rng(6)
    n, c, o = 16, 5, 8
    x = rng.standard_normal((n, c, 4, 4)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    residual = rng.standard_normal((n, o, 4, 4)).astype(np.float32)
    layout = Layout(o, 4, 4, 1, 1, n)
    plan = dense.plan_dense_conv2d(weight, (4, 4), 1, 1)
    packed = packing.pack_input(x, (1, 1), (1, 1), n)
    out = np.full(layout.size(n), np.nan, np.float32)
    out[:] = to_layout(np.zeros((n, o, 4, 4), np.float32), layout)
    act, lo, hi = resolve_activation("test", "relu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dense, "MIN_PIXEL_RUN", 0)
        dense.bind_dense_conv2d(plan, packed, n, n, bias, act, lo, hi, to_layout(residual, layout), layout, out,
                                layout)()
    assert borders_are_zero(out, layout, n)
    expected = np.maximum(conv2d_ref(x, weight, bias, (1, 1), (1, 1), (1, 1), 1) + residual, 0)
    assert_close(from_layout(out, layout, n), expected)
