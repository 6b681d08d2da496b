"""Pooling kernels against their reference twins, torch's ceil_mode and divisor rules included."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels.pool import avgpool2d, global_avgpool, maxpool2d
from harp.kernels.reference import avgpool2d_ref, global_avgpool_ref, maxpool2d_ref


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


@st.composite
def pool_cases(draw, with_dilation):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if with_dilation else (1, 1)
    span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))  # torch's limit
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    h = draw(st.integers(max(1, span[0] - 2 * padding[0]), 13))
    w = draw(st.integers(max(1, span[1] - 2 * padding[1]), 13))
    return ((kh, kw), stride, padding, dilation, (h, w), draw(st.booleans()), draw(st.integers(1, 3)),
            draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(pool_cases(with_dilation=True))
def test_maxpool2d_matches_reference(case):
    kernel, stride, padding, dilation, hw, ceil_mode, n, seed = case
    x = np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)
    expected = maxpool2d_ref(x, kernel, stride, padding, dilation, ceil_mode)
    np.testing.assert_array_equal(maxpool2d(x, kernel, stride, padding, dilation, ceil_mode), expected)


@settings(max_examples=60, deadline=None)
@given(pool_cases(with_dilation=False), st.booleans())
def test_avgpool2d_matches_reference(case, count_include_pad):
    kernel, stride, padding, _, hw, ceil_mode, n, seed = case
    x = np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)
    expected = avgpool2d_ref(x, kernel, stride, padding, ceil_mode, count_include_pad)
    assert_close(avgpool2d(x, kernel, stride, padding, ceil_mode, count_include_pad), expected)


def test_maxpool2d_propagates_nan_and_defaults_stride_to_kernel():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    y = maxpool2d(x, 2)
    assert y.shape == (1, 1, 2, 2)
    assert np.isnan(y[0, 0, 0, 0])
    np.testing.assert_array_equal(y[0, 0].ravel()[1:], [7, 13, 15])


def test_global_avgpool_matches_reference():
    x = np.random.default_rng(1).standard_normal((3, 5, 7, 6)).astype(np.float32)
    out = np.empty((3, 5, 1, 1), np.float32)
    assert global_avgpool(x, out=out) is out
    assert_close(out, global_avgpool_ref(x))


@pytest.mark.parametrize("pool", [lambda x, out: maxpool2d(x, 2, out=out), lambda x, out: avgpool2d(x, 2, out=out),
                                  lambda x, out: global_avgpool(x, out=out)])
@pytest.mark.parametrize("out", [[0.0], np.zeros((1, 1, 2, 2), np.float64), np.zeros((1, 1, 3, 3), np.float32)])
def test_pool_rejects_an_out_that_is_not_a_float32_array_of_the_output_shape(pool, out):
    # a list had been an AttributeError; every kernel shares epilogue.resolve_out's check
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array"):
        pool(np.zeros((1, 1, 4, 4), np.float32), out)


def test_pool_rejects_too_much_padding():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="maxpool2d: padding"):
        maxpool2d(x, 2, 1, 2)
    with pytest.raises(ValueError, match="avgpool2d: padding"):
        avgpool2d(x, 2, 1, 2)


@pytest.mark.parametrize("hw", [(4, 4), (5, 5), (4, 5), (3, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_maxpool2d_halving_windows_at_the_edge(hw, ceil_mode):
    # 2x2 / stride 2 has its own loop; with ceil_mode and odd sizes the last window overhangs the input.
    x = np.random.default_rng(2).standard_normal((2, 3, *hw)).astype(np.float32)
    expected = maxpool2d_ref(x, (2, 2), (2, 2), (0, 0), (1, 1), ceil_mode)
    np.testing.assert_array_equal(maxpool2d(x, 2, 2, ceil_mode=ceil_mode), expected)
