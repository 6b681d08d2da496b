"""Kernels reading and writing runtime layouts (zero border, image groups) against their NCHW references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.export.csr import dense_to_csr
from harp.kernels import conv
from harp.kernels.conv import bind_sparse_conv2d, plan_sparse_conv2d, sparse_conv2d
from harp.kernels.csr import kernel_csr
from harp.kernels import dense
from harp.kernels.dense import bind_dense_conv2d, plan_dense_conv2d
from harp.kernels.elementwise import bind_add_act, bind_affine_act
from harp.kernels.epilogue import resolve_activation
from harp.kernels.layout import Layout, borders_are_zero, from_layout, to_layout
from harp.kernels.packing import bind_pack, pack_input, packed_size
from harp.kernels.pool import bind_avgpool2d, bind_global_avgpool, bind_maxpool2d
from harp.kernels.reference import (
    affine_ref,
    avgpool2d_ref,
    conv2d_ref,
    epilogue_ref,
    global_avgpool_ref,
    maxpool2d_ref,
)


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


def layout_of(x_shape, border, grouped):
    n, c, h, w = x_shape
    return Layout(c, h, w, border[0], border[1], n if grouped else 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2),
       st.integers(0, 2), st.booleans(), st.integers(0, 99))
def test_to_and_from_layout_round_trip_with_zero_border(n, c, h, w, bh, bw, grouped, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    layout = layout_of(x.shape, (bh, bw), grouped)
    buf = to_layout(x, layout)
    assert buf.shape == (layout.size(n),)
    assert borders_are_zero(buf, layout, n)
    np.testing.assert_array_equal(from_layout(buf, layout, n), x)


def test_layout_is_nchw_without_border_and_group():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(to_layout(x, Layout(3, 2, 2)), x.reshape(-1))
    with pytest.raises(ValueError, match="does not divide batch 3"):
        Layout(3, 2, 2, group=2).check_batch(3)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 7), st.integers(2, 7), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 1), st.booleans(), st.booleans(), st.integers(0, 99))
def test_pack_from_a_layout_matches_pack_of_nchw(n, c, h, w, stride, padding, border, src_grouped, grouped, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    src_layout = layout_of(x.shape, (border, border), src_grouped)
    group = n if grouped else 1
    size = packed_size(n, c, (h, w), (stride, stride), (padding, padding))
    out = np.full(size, np.nan, np.float32)
    bind_pack(to_layout(x, src_layout), src_layout, n, (stride, stride), (padding, padding), group, out)()
    expected = pack_input(x, (stride, stride), (padding, padding), group, allow_view=False)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("stride, padding, border", [((2, 2), (1, 1), 0), ((2, 2), (0, 0), 1), ((3, 2), (1, 0), 2),
                                                     ((1, 2), (2, 1), 0)])
def test_pack_of_a_strided_conv_within_one_image_group(stride, padding, border):
    """Grouped source and packed input with the same group, strided columns (ResNet's downsampling convs)."""
    x = np.random.default_rng(sum(stride) + border).standard_normal((4, 3, 7, 6)).astype(np.float32)
    src_layout = Layout(3, 7, 6, border, border, 4)
    out = np.full(packed_size(4, 3, (7, 6), stride, padding), np.nan, np.float32)
    bind_pack(to_layout(x, src_layout), src_layout, 4, stride, padding, 4, out)()
    np.testing.assert_array_equal(out, pack_input(x, stride, padding, 4, allow_view=False))


@st.composite
def layout_conv_cases(draw):
    depthwise = draw(st.booleans())
    c = draw(st.integers(1, 4))
    o = c if depthwise else draw(st.integers(1, 5))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, k // 2))
    return dict(
        n=draw(st.integers(1, 3)), c=c, o=o, groups=c if depthwise else 1, k=k, stride=stride, padding=padding,
        hw=(draw(st.integers(k, 7)), draw(st.integers(k, 7))),
        # A stride-1 conv reads its input in place when the border is wide enough; else it repacks.
        in_border=padding + draw(st.integers(0, 1)) if stride == 1 else draw(st.integers(0, 1)),
        # A repack may be made with a wider padding (a pack shared with another conv of the input).
        pack_border=padding + draw(st.integers(0, 1)),
        in_grouped=draw(st.booleans()), grouped=draw(st.booleans()),
        out_border=draw(st.integers(0, 2)), res_border=draw(st.sampled_from([None, 0, 1])),
        act=draw(st.sampled_from([("none", None), ("relu", None), ("clip", (-0.5, 0.5))])),
        density=draw(st.sampled_from([0.0, 0.3, 1.0])), kernel=draw(st.sampled_from(["sparse", "dense pixel-major", "dense channel-major"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=80, deadline=None)
@given(layout_conv_cases())
def test_conv_between_layouts_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    n, c, o, k, groups = case["n"], case["c"], case["o"], case["k"], case["groups"]
    stride, padding = (case["stride"],) * 2, (case["padding"],) * 2
    x = rng.standard_normal((n, c, *case["hw"])).astype(np.float32)
    weight = (rng.standard_normal((o, c // groups, k, k)) * (rng.random((o, c // groups, k, k)) < case["density"])
              ).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    expected = conv2d_ref(x, weight, bias, stride, padding, (1, 1), groups)
    ho, wo = expected.shape[2:]
    group = n if case["grouped"] else 1
    out_layout = Layout(o, ho, wo, case["out_border"], case["out_border"], group)
    residual = res = res_layout = None
    if case["res_border"] is not None:
        residual = rng.standard_normal(expected.shape).astype(np.float32)
        res_layout = Layout(o, ho, wo, case["res_border"], case["res_border"], n if case["in_grouped"] else 1)
        res = to_layout(residual, res_layout)
    expected = epilogue_ref(expected, *case["act"], residual)

    in_layout = layout_of(x.shape, (case["in_border"],) * 2, case["in_grouped"])
    buf = to_layout(x, in_layout)
    if stride == (1, 1) and in_layout.group == group:  # read in place, shifted taps
        packed, border = buf, (in_layout.pad_h, in_layout.pad_w)
    else:
        border = (case["pack_border"],) * 2
        packed = np.empty(packed_size(n, c, case["hw"], stride, border), np.float32)
        bind_pack(buf, in_layout, n, stride, border, group, packed)()
    act, lo, hi = resolve_activation("test", *case["act"])
    out = np.zeros(out_layout.size(n), np.float32)
    if case["kernel"] == "sparse":
        indptr, indices, values = kernel_csr(dense_to_csr(weight))
        plan = plan_sparse_conv2d(indptr, indices, weight.shape, case["hw"], stride, padding, 1, groups, border=border)
        run = bind_sparse_conv2d(plan, indptr, values, packed, n, group, bias, act, lo, hi, res, res_layout, out,
                                 out_layout)
    else:
        plan = plan_dense_conv2d(weight, case["hw"], stride, padding, 1, groups, border=border)
        pixel_major = case["kernel"] == "dense pixel-major"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dense, "MIN_PIXEL_RUN", 0 if pixel_major else 10**9)
            run = bind_dense_conv2d(plan, packed, n, group, bias, act, lo, hi, res, res_layout, out, out_layout)
    run()
    assert borders_are_zero(out, out_layout, n)
    assert_close(from_layout(out, out_layout, n), expected)


def test_conv_writes_in_place_over_its_residual():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    weight = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    residual = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    layout = Layout(3, 5, 5, 1, 1, 2)
    buf, res = to_layout(x, layout), to_layout(residual, layout)
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, (5, 5), 1, 1, border=(1, 1))
    act, lo, hi = resolve_activation("test", "relu")
    bind_sparse_conv2d(plan, indptr, values, buf, 2, 2, np.zeros(3, np.float32), act, lo, hi, res, layout, res,
                       layout)()
    expected = epilogue_ref(conv2d_ref(x, weight, None, (1, 1), (1, 1), (1, 1), 1), "relu", None, residual)
    assert_close(from_layout(res, layout, 2), expected)


@settings(max_examples=60, deadline=None)
@given(depthwise=st.booleans(), c=st.integers(1, 5), o=st.integers(1, 6), k=st.sampled_from([1, 2, 3]),
       stride=st.sampled_from([(2, 2), (3, 2), (2, 1)]), dilation=st.integers(1, 2), data=st.data())
def test_strided_conv_reads_a_layout_buffer_in_place(depthwise, c, o, k, stride, dilation, data):
    """With 16 or 32 images per group a strided sparse conv reads the bordered buffer itself, no pack.

    Its result must be the reference's, and bit for bit the pack's (the same sums in
    the same order), for any border >= padding, output border and residual layout,
    tiles that start and end mid-row, empty rows and all-zero or dense weights.
    """
    n, groups = data.draw(st.sampled_from([16, 32]), label="images"), (c if depthwise else 1)
    o = c if depthwise else o
    padding = data.draw(st.integers(0, (k * dilation) // 2), label="padding")
    smallest = max(1, (k - 1) * dilation + 1 - 2 * padding)  # one output pixel
    hw = (data.draw(st.integers(smallest, 9)), data.draw(st.integers(smallest, 9)))
    border = (padding + data.draw(st.integers(0, 1)), padding + data.draw(st.integers(0, 2)))
    density = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="density")
    out_border, res_border = data.draw(st.integers(0, 1)), data.draw(st.sampled_from([None, 0, 1]))
    tile = data.draw(st.sampled_from([16 * 3, 16 * 5, 2048]), label="tile")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    shape = (o, c // groups, k, k)
    weight = (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    expected = conv2d_ref(x, weight, bias, stride, (padding, padding), (dilation, dilation), groups)
    out_layout = Layout(o, *expected.shape[2:], out_border, out_border, n)
    res = res_layout = residual = None
    if res_border is not None:
        residual = rng.standard_normal(expected.shape).astype(np.float32)
        res_layout = Layout(o, *expected.shape[2:], res_border, res_border, n)
        res = to_layout(residual, res_layout)
    expected = epilogue_ref(expected, "relu", None, residual)
    in_layout = Layout(c, *hw, *border, n)
    buf = to_layout(x, in_layout)
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    act, lo, hi = resolve_activation("test", "relu")
    geometry = (stride, (padding, padding), (dilation, dilation), groups)
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, hw, *geometry, border=border, in_place=True)
    assert plan.strided_rows
    out = np.zeros(out_layout.size(n), np.float32)
    with pytest.MonkeyPatch.context() as mp:  # the tile size is read when binding
        mp.setattr(conv, "TILE_ELEMS", tile)
        bind_sparse_conv2d(plan, indptr, values, buf, n, n, bias, act, lo, hi, res, res_layout, out, out_layout)()
    assert borders_are_zero(out, out_layout, n)
    assert_close(from_layout(out, out_layout, n), expected)
    # The same conv from a pack of the buffer.
    packed_plan = plan_sparse_conv2d(indptr, indices, weight.shape, hw, *geometry)
    packed = np.empty(packed_size(n, c, hw, stride, (padding, padding)), np.float32)
    bind_pack(buf, in_layout, n, stride, (padding, padding), n, packed)()
    from_pack = np.zeros_like(out)
    bind_sparse_conv2d(packed_plan, indptr, values, packed, n, n, bias, act, lo, hi, res, res_layout, from_pack,
                       out_layout)()
    np.testing.assert_array_equal(out, from_pack)
    np.testing.assert_array_equal(plan.used_channels(), packed_plan.used_channels())


def test_strided_in_place_plans_need_whole_vectors_per_pixel():
    weight = np.ones((2, 3, 3, 3), np.float32)
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, (6, 6), 2, 1, border=(1, 1), in_place=True)
    layout, out_layout = Layout(3, 6, 6, 1, 1, 4), Layout(2, 3, 3, 0, 0, 4)
    act, lo, hi = resolve_activation("test", "none")
    with pytest.raises(ValueError, match="needs an image group that is a multiple of 16"):
        bind_sparse_conv2d(plan, indptr, values, np.zeros(layout.size(4), np.float32), 4, 4,
                           np.zeros(2, np.float32), act, lo, hi, None, None, np.zeros(out_layout.size(4), np.float32),
                           out_layout)
    with pytest.raises(ValueError, match="reads a layout buffer in place"):
        sparse_conv2d(np.zeros((1, 3, 6, 6), np.float32), indptr, indices, values, weight.shape, stride=2,
                      padding=1, plan=plan_sparse_conv2d(indptr, indices, weight.shape, (6, 6), 2, 1, in_place=True))


def test_bind_rejects_overlapping_out_and_mismatched_layouts():
    weight = np.ones((2, 1, 1, 1), np.float32)
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, (3, 3))
    layout = Layout(2, 3, 3)
    buf = np.zeros(layout.size(1), np.float32)
    act, lo, hi = resolve_activation("test", "none")
    with pytest.raises(ValueError, match="output layout"):
        bind_sparse_conv2d(plan, indptr, values, np.zeros(9, np.float32), 1, 1, np.zeros(2, np.float32), act, lo, hi,
                           None, None, buf, Layout(3, 3, 3))
    shifted = np.zeros(layout.size(1) + 1, np.float32)
    with pytest.raises(ValueError, match="must not overlap"):
        bind_sparse_conv2d(plan, indptr, values, np.zeros(9, np.float32), 1, 1, np.zeros(2, np.float32), act, lo, hi,
                           shifted[1:], layout, shifted[:-1], layout)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 8), st.integers(2, 8), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 1), st.booleans(), st.integers(0, 2), st.booleans(), st.integers(0, 1),
       st.booleans(), st.booleans(), st.integers(0, 99))
def test_pools_between_layouts_match_reference(n, c, h, w, kernel, stride, padding, ceil_mode, in_border, in_grouped,
                                               out_border, grouped, count_include_pad, seed):
    kernel = max(kernel, 2 * padding)
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    in_layout = layout_of(x.shape, (in_border, in_border), in_grouped)
    buf = to_layout(x, in_layout)
    k2, s2, p2 = (kernel, kernel), (stride, stride), (padding, padding)
    for name, ref, bind in (
            ("max", maxpool2d_ref(x, k2, s2, p2, (1, 1), ceil_mode),
             lambda out, lay: bind_maxpool2d(buf, in_layout, n, k2, s2, p2, (1, 1), ceil_mode, out, lay)),
            ("avg", avgpool2d_ref(x, k2, s2, p2, ceil_mode, count_include_pad),
             lambda out, lay: bind_avgpool2d(buf, in_layout, n, k2, s2, p2, ceil_mode, count_include_pad, out, lay)),
            ("global", global_avgpool_ref(x),
             lambda out, lay: bind_global_avgpool(buf, in_layout, n, out, lay))):
        if ref.shape[2] < 1 or ref.shape[3] < 1:
            continue
        out_layout = Layout(c, ref.shape[2], ref.shape[3], out_border, out_border, n if grouped else 1)
        out = np.zeros(out_layout.size(n), np.float32)
        bind(out, out_layout)()
        assert borders_are_zero(out, out_layout, n), name
        assert_close(from_layout(out, out_layout, n), ref)


@pytest.mark.parametrize("n, in_group, out_group", [(1, 1, 1), (3, 1, 1), (4, 4, 4), (4, 1, 4), (4, 4, 1),
                                                   (4, 2, 4), (4, 4, 2), (20, 1, 20)])
@pytest.mark.parametrize("hw", [(2, 2), (7, 5), (8, 8), (6, 38)])
def test_maxpool_halving_between_layouts_matches_reference_with_nan(n, in_group, out_group, hw):
    """The 2x2 stride-2 fast path for every pairing of image groups, NaN included (VGG's case)."""
    x = np.random.default_rng(sum(hw) + 10 * n + in_group).standard_normal((n, 5, *hw)).astype(np.float32)
    x[0, 1, 0, 1] = np.nan
    x[-1, 4, -1, -1] = np.nan
    in_layout = Layout(5, *hw, 1, 1, in_group)
    expected = maxpool2d_ref(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    out_layout = Layout(5, expected.shape[2], expected.shape[3], 1, 0, out_group)
    out = np.zeros(out_layout.size(n), np.float32)
    bind_maxpool2d(to_layout(x, in_layout), in_layout, n, 2, 2, 0, 1, False, out, out_layout)()
    assert borders_are_zero(out, out_layout, n)
    np.testing.assert_array_equal(from_layout(out, out_layout, n), expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2),
       st.integers(0, 2), st.integers(0, 2), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 99))
def test_elementwise_between_layouts_match_reference(n, c, h, w, ba, bb, bo, ga, gb, go, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, c, h, w)).astype(np.float32)
    b = rng.standard_normal((n, c, h, w)).astype(np.float32)
    scale, shift = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    la, lb, lo_ = layout_of(a.shape, (ba, ba), ga), layout_of(a.shape, (bb, bb), gb), layout_of(a.shape, (bo, bo), go)
    act, lo, hi = resolve_activation("test", "clip", (-0.3, 0.8))
    out = np.zeros(lo_.size(n), np.float32)
    bind_affine_act(to_layout(a, la), la, n, scale, shift, act, lo, hi, out, lo_)()
    assert borders_are_zero(out, lo_, n)
    assert_close(from_layout(out, lo_, n), epilogue_ref(affine_ref(a, scale, shift), "clip", (-0.3, 0.8)))
    out = np.zeros(lo_.size(n), np.float32)
    bind_add_act(to_layout(a, la), la, to_layout(b, lb), lb, n, act, lo, hi, out, lo_)()
    assert borders_are_zero(out, lo_, n)
    assert_close(from_layout(out, lo_, n), epilogue_ref(a + b, "clip", (-0.3, 0.8)))


def test_elementwise_in_place_in_a_layout():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    layout = Layout(3, 4, 4, 1, 1, 2)
    buf = to_layout(x, layout)
    act, lo, hi = resolve_activation("test", "relu")
    bind_affine_act(buf, layout, 2, None, None, act, lo, hi, buf, layout)()
    np.testing.assert_array_equal(from_layout(buf, layout, 2), np.maximum(x, 0))
    assert borders_are_zero(buf, layout, 2)
    with pytest.raises(ValueError, match="must not overlap"):
        bind_affine_act(buf, layout, 2, None, None, act, lo, hi, buf, Layout(3, 4, 4, 1, 1, 1))
