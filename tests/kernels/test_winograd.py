"""Winograd F(2x2, 3x3) and F(4x4, 3x3) against the reference conv: plain NCHW, image groups, borders, bands,
bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels import winograd
from harp.kernels.arrays import aligned_zeros
from harp.kernels.epilogue import resolve_activation
from harp.kernels.layout import Layout, borders_are_zero, from_layout, to_layout
from harp.kernels.reference import conv2d_ref, epilogue_ref, maxpool2d_ref
from harp.kernels.winograd import bind_winograd, plan_winograd, supports_winograd, tile_edge, winograd_conv2d

ACTS = [("none", None), ("relu", None), ("relu6", None), ("clip", (-0.5, 0.75))]


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


def reference(x, weight, bias, act, clip_range, residual):
    return epilogue_ref(conv2d_ref(x, weight, bias, (1, 1), (1, 1), (1, 1), 1), act, clip_range, residual)


@pytest.mark.parametrize("m", [2, 4])
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 12), o=st.integers(1, 12), h=st.integers(1, 5),
       w=st.integers(1, 19), act=st.sampled_from(ACTS), with_residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_winograd_conv2d_matches_reference(m, n, c, o, h, w, act, with_residual, seed):
    # Up to 19 tiles a row: rows of more than 16 tiles take two vectors, the second one partial.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, m * h, m * w)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    residual = rng.standard_normal((n, o, m * h, m * w)).astype(np.float32) if with_residual else None
    actual = winograd_conv2d(x, weight, bias, act=act[0], clip_range=act[1], residual=residual, m=m)
    assert_close(actual, reference(x, weight, bias, *act, residual))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("n", [2, 16, 21])  # image groups of under one, one, and over one vector
@pytest.mark.parametrize("border", [1, 2])  # a wider border than the conv's padding is read in place
@pytest.mark.parametrize("bands", [False, True])
def test_winograd_on_interleaved_images(monkeypatch, m, n, border, bands):
    if bands:  # one tile row per band: five bands, each its own three calls
        monkeypatch.setattr(winograd, "BAND_BYTES", 1)
        monkeypatch.setattr(winograd, "MIN_PIXEL_RUN", 1)
    rng = np.random.default_rng(n)
    c, o, h, w = 5, 7, 5 * m, 3 * m
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    residual = rng.standard_normal((n, o, h, w)).astype(np.float32)
    x_layout, out_layout = Layout(c, h, w, border, border, n), Layout(o, h, w, 1, 1, n)
    plan = plan_winograd(weight, (h, w), m)
    assert len(range(0, h // m, plan.band_rows(n))) == (5 if bands else 1)
    out = aligned_zeros(out_layout.size(n))
    act, lo, hi = resolve_activation("test", "relu")
    calls = bind_winograd(plan, to_layout(x, x_layout), x_layout, n, aligned_zeros(plan.scratch_size(n)), bias,
                          act, lo, hi, to_layout(residual, out_layout), out_layout, out, out_layout)
    assert len(calls) == 3 * (5 if bands else 1)
    for call in calls:
        call()
    assert_close(from_layout(out, out_layout, n), reference(x, weight, bias, "relu", None, residual))
    assert borders_are_zero(out, out_layout, n)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("n", [1, 2, 16, 21])  # image group 1 (tiles across lanes), and under/one/over a vector
@pytest.mark.parametrize("act", ACTS[1:])
def test_winograd_pooled_output_is_conv_then_maxpool(m, n, act):
    # 17 tiles a row at n = 1: the pooled row takes two vectors, the second a single lane.
    rng = np.random.default_rng(n + m)
    c, o, h, w = 5, 7, 2 * m, (17 if n == 1 else 3) * m
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    x[0, 0, 1, 1] = np.nan  # the max pooling propagates it, as torch's does
    x_layout, out_layout = Layout(c, h, w, 1, 1, n), Layout(o, h // 2, w // 2, 1, 1, n)
    plan = plan_winograd(weight, (h, w), m)
    out = aligned_zeros(out_layout.size(n) + 64)
    out[out_layout.size(n):] = 7.0
    code, lo, hi = resolve_activation("test", act[0], act[1])
    for call in bind_winograd(plan, to_layout(x, x_layout), x_layout, n, aligned_zeros(plan.scratch_size(n)), bias,
                              code, lo, hi, None, None, out, out_layout, pool=True):
        call()
    expected = maxpool2d_ref(reference(x, weight, bias, *act, None), (2, 2), (2, 2), (0, 0), (1, 1), False)
    actual = from_layout(out, out_layout, n)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)) and np.isnan(expected).any()
    assert_close(np.nan_to_num(actual), np.nan_to_num(expected))
    assert borders_are_zero(out, out_layout, n) and (out[out_layout.size(n):] == 7.0).all()


def test_winograd_pooled_output_rejects_a_residual_and_a_full_size_output():
    weight = np.zeros((2, 3, 3, 3), np.float32)
    plan = plan_winograd(weight, (4, 4))
    act, lo, hi = resolve_activation("test", "none")
    x_layout, full = Layout(3, 4, 4, 1, 1), Layout(2, 4, 4)
    x, scratch = aligned_zeros(x_layout.size(1)), aligned_zeros(plan.scratch_size(1))
    with pytest.raises(ValueError, match="no residual"):
        bind_winograd(plan, x, x_layout, 1, scratch, np.zeros(2, np.float32), act, lo, hi, aligned_zeros(32), full,
                      aligned_zeros(8), Layout(2, 2, 2), pool=True)
    with pytest.raises(ValueError, match="does not hold"):
        bind_winograd(plan, x, x_layout, 1, scratch, np.zeros(2, np.float32), act, lo, hi, None, None,
                      aligned_zeros(32), full, pool=True)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_writes_nothing_past_the_output(m):
    rng = np.random.default_rng(0)
    w = 17 * m  # 17 tiles a row: a 1-tile second vector
    x = rng.standard_normal((1, 3, 4, w)).astype(np.float32)
    weight = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    plan = plan_winograd(weight, (4, w), m)
    x_layout, out_layout = Layout(3, 4, w, 1, 1), Layout(2, 4, w)
    out = np.full(out_layout.size(1) + 64, 7.0, np.float32)
    act, lo, hi = resolve_activation("test", "none")
    for call in bind_winograd(plan, to_layout(x, x_layout), x_layout, 1, aligned_zeros(plan.scratch_size(1)),
                              np.zeros(2, np.float32), act, lo, hi, None, None, out, out_layout):
        call()
    assert (out[out_layout.size(1):] == 7.0).all()
    assert_close(out[:out_layout.size(1)].reshape(1, 2, 4, w), reference(x, weight, None, "none", None, None))


@pytest.mark.parametrize("geometry, ok", [
    (((8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, (6, 4)), True),
    (((8, 4, 3, 3), (2, 2), (1, 1), (1, 1), 1, (6, 4)), False),  # stride 2
    (((8, 4, 3, 3), (1, 1), (2, 2), (2, 2), 1, (6, 4)), False),  # dilated
    (((8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 2, (6, 4)), False),  # grouped
    (((8, 4, 5, 5), (1, 1), (2, 2), (1, 1), 1, (6, 4)), False),  # 5x5
    (((8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, (5, 4)), False),  # odd output height
    (((8, 4, 3, 3), (1, 1), (0, 0), (1, 1), 1, (6, 4)), False),  # no padding
])
def test_supports_winograd(geometry, ok):
    assert supports_winograd(*geometry) is ok


@pytest.mark.parametrize("out_hw, group, m", [
    ((32, 32), 1, 4), ((16, 16), 1, 2), ((16, 16), 16, 4), ((4, 4), 16, 2), ((8, 12), 16, 4), ((6, 8), 16, 2)])
def test_tile_edge_is_4_where_the_products_stay_long(out_hw, group, m):
    assert tile_edge(out_hw, group) == m


def test_winograd_rejects_what_it_cannot_compute():
    weight = np.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="even output size"):
        winograd_conv2d(np.zeros((1, 3, 5, 4), np.float32), weight)
    with pytest.raises(ValueError, match="tile edge 4"):
        winograd_conv2d(np.zeros((1, 3, 6, 4), np.float32), weight, m=4)
    with pytest.raises(ValueError, match="expects 3"):
        winograd_conv2d(np.zeros((1, 4, 4, 4), np.float32), weight)
    plan = plan_winograd(weight, (4, 4))
    act, lo, hi = resolve_activation("test", "none")
    bias = np.zeros(2, np.float32)
    out_layout = Layout(2, 4, 4, 0, 0, 2)
    out = aligned_zeros(out_layout.size(2))
    x_layout = Layout(3, 4, 4, 1, 1, 2)
    x = aligned_zeros(x_layout.size(2))
    scratch = aligned_zeros(plan.scratch_size(2))
    with pytest.raises(ValueError, match="border of 1"):
        bind_winograd(plan, x, Layout(3, 4, 4, 0, 0, 2), 2, scratch, bias, act, lo, hi, None, None, out, out_layout)
    with pytest.raises(ValueError, match="image group 2"):
        bind_winograd(plan, x, x_layout, 2, scratch, bias, act, lo, hi, aligned_zeros(64), Layout(2, 4, 4), out,
                      out_layout)
    with pytest.raises(ValueError, match="scratch"):
        bind_winograd(plan, x, x_layout, 2, scratch[:-1], bias, act, lo, hi, None, None, out, out_layout)
