"""The NumPy reference twins against torch.nn.functional."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.export.csr import dense_to_csr as export_csr
from harp.kernels.csr import kernel_csr
from harp.kernels.reference import (
    add_ref, affine_ref, avgpool2d_ref, clip_ref, conv2d_output_hw, conv2d_ref, csr_matmul_ref,
    epilogue_ref, global_avgpool_ref, linear_ref, maxpool2d_ref, relu_ref,
)


def dense_to_csr(weight, index_dtype=None):
    """Kernel CSR arrays (int64 indptr, indices of `index_dtype`, float32 values) of a dense matrix."""
    return kernel_csr(export_csr(weight), index_dtype)


SETTINGS = settings(max_examples=25, deadline=None)


def assert_close(actual, expected):
    atol = 1e-4 * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    n = draw(st.integers(1, 3))
    return n, groups, cg, og, (kh, kw), stride, padding, dilation, (h, w), draw(st.booleans())


@SETTINGS
@given(conv_cases(), st.integers(0, 2**31 - 1))
def test_conv2d_ref_matches_torch(case, seed):
    n, groups, cg, og, k, stride, padding, dilation, hw, with_bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cg * groups, *hw)).astype(np.float32)
    weight = rng.standard_normal((og * groups, cg, *k)).astype(np.float32)
    bias = rng.standard_normal(og * groups).astype(np.float32) if with_bias else None
    expected = F.conv2d(t(x), t(weight), None if bias is None else t(bias), stride, padding, dilation, groups)
    actual = conv2d_ref(x, weight, bias, stride, padding, dilation, groups)
    assert actual.dtype == np.float32
    assert actual.shape == tuple(expected.shape)
    assert_close(actual, expected.numpy())


def test_conv2d_output_hw_matches_torch():
    x = torch.zeros(1, 1, 11, 8)
    y = F.conv2d(x, torch.zeros(1, 1, 3, 2), None, (2, 3), (1, 0), (2, 1))
    assert conv2d_output_hw((11, 8), (3, 2), (2, 3), (1, 0), (2, 1)) == tuple(y.shape[2:])


def test_conv2d_ref_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        conv2d_ref(np.zeros((1, 3, 4, 4), np.float32), np.zeros((2, 2, 1, 1), np.float32), None,
                   (1, 1), (0, 0), (1, 1), 2)


def test_linear_ref_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    weight = rng.standard_normal((3, 7)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    assert_close(linear_ref(x, weight, bias), F.linear(t(x), t(weight), t(bias)).numpy())
    assert_close(linear_ref(x, weight, None), F.linear(t(x), t(weight)).numpy())


@st.composite
def pool_cases(draw, with_dilation):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if with_dilation else (1, 1)
    span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))  # torch's limit
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h = draw(st.integers(max(1, span[0] - 2 * padding[0]), 10))
    w = draw(st.integers(max(1, span[1] - 2 * padding[1]), 10))
    return (kh, kw), stride, padding, dilation, (h, w), draw(st.booleans()), draw(st.integers(1, 2))


@SETTINGS
@given(pool_cases(with_dilation=True), st.integers(0, 2**31 - 1))
def test_maxpool2d_ref_matches_torch(case, seed):
    kernel, stride, padding, dilation, hw, ceil_mode, n = case
    x = np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)
    expected = F.max_pool2d(t(x), kernel, stride, padding, dilation, ceil_mode)
    actual = maxpool2d_ref(x, kernel, stride, padding, dilation, ceil_mode)
    assert actual.shape == tuple(expected.shape)
    np.testing.assert_array_equal(actual, expected.numpy())


@SETTINGS
@given(pool_cases(with_dilation=False), st.booleans(), st.integers(0, 2**31 - 1))
def test_avgpool2d_ref_matches_torch(case, count_include_pad, seed):
    kernel, stride, padding, _, hw, ceil_mode, n = case
    x = np.random.default_rng(seed).standard_normal((n, 3, *hw)).astype(np.float32)
    expected = F.avg_pool2d(t(x), kernel, stride, padding, ceil_mode, count_include_pad)
    actual = avgpool2d_ref(x, kernel, stride, padding, ceil_mode, count_include_pad)
    assert actual.shape == tuple(expected.shape)
    assert_close(actual, expected.numpy())


def test_avgpool2d_ref_ceil_mode_divisor_case():
    # 5 wide, kernel 2, stride 2, ceil_mode: the last window covers one real column only.
    x = np.arange(10, dtype=np.float32).reshape(1, 1, 2, 5)
    for count_include_pad in (True, False):
        expected = F.avg_pool2d(t(x), 2, 2, 0, True, count_include_pad).numpy()
        assert_close(avgpool2d_ref(x, (2, 2), (2, 2), (0, 0), True, count_include_pad), expected)


def test_global_avgpool_ref_matches_torch():
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 7)).astype(np.float32)
    assert_close(global_avgpool_ref(x), F.adaptive_avg_pool2d(t(x), 1).numpy())


def test_csr_matmul_ref_matches_dense():
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((6, 9)).astype(np.float32) * (rng.random((6, 9)) < 0.4)
    dense[2] = 0.0
    x = rng.standard_normal((9, 4)).astype(np.float32)
    indptr, indices, values = dense_to_csr(dense)
    assert_close(csr_matmul_ref(indptr, indices, values, 9, x), t(dense).mm(t(x)).numpy())


def test_elementwise_refs_match_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32) * 5
    y = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    scale, shift = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    np.testing.assert_array_equal(relu_ref(x), F.relu(t(x)).numpy())
    np.testing.assert_array_equal(clip_ref(x, 0.0, 6.0), F.relu6(t(x)).numpy())
    assert_close(add_ref(x, y, relu=True), F.relu(t(x) + t(y)).numpy())
    expected = t(x) * t(scale)[:, None, None] + t(shift)[:, None, None]
    assert_close(affine_ref(x, scale, shift), expected.numpy())
    assert_close(epilogue_ref(x, "relu6", residual=y), F.relu6(t(x) + t(y)).numpy())
    assert_close(epilogue_ref(x, "clip", (-1.0, 2.0)), torch.clamp(t(x), -1.0, 2.0).numpy())
    with pytest.raises(ValueError, match="unknown activation"):
        epilogue_ref(x, "gelu")
