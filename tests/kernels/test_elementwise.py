"""Elementwise kernels against their reference twins."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels.elementwise import add, affine, clip, relu
from harp.kernels.reference import add_ref, affine_ref, clip_ref, epilogue_ref, relu_ref

SHAPES = st.sampled_from([(1, 1), (3, 5), (2, 3, 4, 5), (1, 7, 1, 1), (4, 2, 3, 3)])


@settings(max_examples=20, deadline=None)
@given(SHAPES, st.integers(0, 2**31 - 1))
def test_elementwise_match_reference(shape, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * 4).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    scale = rng.standard_normal(shape[1]).astype(np.float32)
    shift = rng.standard_normal(shape[1]).astype(np.float32)
    np.testing.assert_allclose(add(a, b), add_ref(a, b), rtol=1e-6)
    np.testing.assert_allclose(add(a, b, act="relu"), add_ref(a, b, relu=True), rtol=1e-6)
    np.testing.assert_allclose(add(a, b, act="clip", clip_range=(-1, 2)),
                               epilogue_ref(a + b, "clip", (-1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(relu(a), relu_ref(a))
    np.testing.assert_array_equal(clip(a, 0.0, 6.0), clip_ref(a, 0.0, 6.0))
    np.testing.assert_allclose(affine(a, scale, shift), affine_ref(a, scale, shift), rtol=1e-5, atol=1e-5)


def test_elementwise_in_place():
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    assert relu(x, out=x) is x
    np.testing.assert_array_equal(x, [[0.0, 2.0, 0.0]])


def test_affine_serves_normalisation():
    mean, std = np.array([0.5, 0.25], np.float32), np.array([2.0, 4.0], np.float32)
    x = np.random.default_rng(1).random((2, 2, 3, 3)).astype(np.float32)
    y = affine(x, 1 / std, -mean / std)
    np.testing.assert_allclose(y, (x - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-6)


def test_elementwise_errors():
    with pytest.raises(ValueError, match=r"add: shapes \(2,\) and \(3,\) differ"):
        add(np.zeros(2, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="clip: clip_range lower bound"):
        clip(np.zeros(2, np.float32), 1.0, 0.0)
    with pytest.raises(ValueError, match="affine: scale"):
        affine(np.zeros((1, 3, 2, 2), np.float32), np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="float32"):
        relu(np.zeros(3))
