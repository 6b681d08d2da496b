"""The packed input layout, element by element, against its definition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.kernels.layout import Layout
from harp.kernels.packing import bind_pack, pack_input, packed_hw, packed_size, tap_offsets


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)]), st.integers(1, 3), st.integers(1, 7),
       st.integers(1, 7), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(0, 2))
def test_pack_input_layout(batch, c, h, w, sh, sw, ph, pw):
    n, g = batch
    x = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)
    _assert_packed_as_defined(x, (sh, sw), (ph, pw), g)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (1, 3)])
def test_pack_into_an_image_group_wider_than_a_vector(stride):
    # More images than a vector has lanes, and rows longer than one vector, into the
    # image-innermost layout (the hypothesis test above stays at 3 images of 7 columns).
    x = np.random.default_rng(1).standard_normal((20, 2, 5, 37)).astype(np.float32)
    _assert_packed_as_defined(x, stride, (1, 1), 20)


@pytest.mark.parametrize("w", [32, 37, 70])
@pytest.mark.parametrize("pw", [0, 1, 2])
@pytest.mark.parametrize("stride", [(2, 2), (1, 2)])
def test_pack_stride_2_rows_longer_than_two_vectors(stride, pw, w):
    # One image per plane at column stride 2 splits each row 32 values at a time into its
    # even and odd columns; rows of 32, a partial second chunk, and 70 = 2 x 32 + 6.
    x = np.random.default_rng(w + pw).standard_normal((2, 3, 5, w)).astype(np.float32)
    _assert_packed_as_defined(x, stride, (1, pw), 1)


@pytest.mark.parametrize("g,border", [(16, 1), (16, 0), (32, 2)])
@pytest.mark.parametrize("stride,padding", [((2, 2), (1, 1)), ((1, 1), (1, 1)), ((1, 3), (2, 0)), ((2, 2), (0, 0))])
@pytest.mark.parametrize("hw", [(7, 9), (8, 8)])
def test_pack_from_a_bordered_buffer_of_the_same_image_group(g, border, stride, padding, hw):
    # Whole vectors per pixel on both sides: each pixel is copied as vectors and the padding
    # written as zero vectors in the same pass (the source's border, zero, is not relied on).
    n, c = 2 * g, 3
    x = np.random.default_rng(g + border).standard_normal((n, c, *hw)).astype(np.float32)
    lay = Layout(c, *hw, border, border, g)
    hp, wp = lay.padded_hw
    src = np.full((n // g, c, hp, wp, g), np.nan, np.float32)  # a border that is not zero must not leak
    src[:, :, border:border + hw[0], border:border + hw[1]] = x.reshape(n // g, g, c, *hw).transpose(0, 2, 3, 4, 1)
    size = packed_size(n, c, hw, stride, padding)
    out = np.full(size + 5, np.nan, np.float32)
    channels = np.array([True, False, True])
    bind_pack(src.reshape(-1), lay, n, stride, padding, g, out, channels=channels)()
    assert np.isnan(out[size:]).all()
    want = np.full(size, np.nan, np.float32).reshape(n // g, c, -1)
    want[:, channels] = pack_input(x, stride, padding, g).reshape(n // g, c, -1)[:, channels]
    np.testing.assert_array_equal(out[:size].reshape(n // g, c, -1), want)


def _assert_packed_as_defined(x, stride, padding, g):
    (n, c, h, w), (sh, sw), (ph, pw) = x.shape, stride, padding
    hq, wq = packed_hw((h, w), (sh, sw), (ph, pw))
    size = packed_size(n, c, (h, w), (sh, sw), (ph, pw))
    workspace = np.full(size + 3, np.nan, np.float32)
    packed = pack_input(x, (sh, sw), (ph, pw), g, workspace)
    if packed is workspace:
        assert np.isnan(workspace[size:]).all()  # nothing written past the packed size
    else:  # plain NCHW: a view of x, and the workspace untouched
        assert np.shares_memory(packed, x) and np.isnan(workspace).all()
    layout = packed[:size].reshape(n // g, c, sh, sw, hq, wq, g)
    xpad = np.zeros((n, c, hq * sh, wq * sw), np.float32)
    xpad[:, :, ph : ph + h, pw : pw + w] = x
    for pi in range(sh):
        for pj in range(sw):
            phase = xpad[:, :, pi::sh, pj::sw].reshape(n // g, g, c, hq, wq)
            expected = phase.transpose(0, 2, 3, 4, 1)  # (N/G, C, hq, wq, G)
            np.testing.assert_array_equal(layout[:, :, pi, pj], expected)


def test_pack_input_rejects_group_not_dividing_batch():
    with pytest.raises(ValueError, match="image group 2 does not divide batch 3"):
        pack_input(np.zeros((3, 1, 2, 2), np.float32), (1, 1), (0, 0), 2)


def test_tap_offsets_follow_phase_and_shift():
    # 3x3 taps, stride 2, dilation 1, input 6x6 padded by 1: phase planes of 4x4.
    taps = tap_offsets((3, 3), (2, 2), (1, 1), (1, 1), (6, 6))
    plane = 4 * 4
    # tap (i, j) = (2, 1): row phase 0 shifted one row, column phase 1.
    assert taps[2 * 3 + 1] == (0 * 2 + 1) * plane + 1 * 4 + 0
    assert taps[0] == 0


def test_pack_input_is_a_view_when_layout_is_nchw():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(np.float32)
    packed = pack_input(x, (1, 1), (0, 0), 1)
    assert np.shares_memory(packed, x)
    np.testing.assert_array_equal(packed, x.ravel())


@pytest.mark.parametrize("w", [7, 37])
def test_bind_pack_writes_only_the_used_channels_and_phases(w):
    n, c, h = 2, 5, 6
    x = np.random.default_rng(2).standard_normal((n, c, h, w)).astype(np.float32)
    full = pack_input(x, (2, 2), (1, 1), 1)
    channels = np.array([False, True, False, False, True])
    phases = np.array([True, False, False, True])
    size = packed_size(n, c, (h, w), (2, 2), (1, 1))
    out = np.full(size, np.nan, np.float32)
    bind_pack(x.reshape(-1), Layout(c, h, w), n, (2, 2), (1, 1), 1, out, phases, channels)()
    hq, wq = packed_hw((h, w), (2, 2), (1, 1))
    got = out.reshape(n, c, 4, hq * wq)
    want = full.reshape(n, c, 4, hq * wq)
    written = channels[None, :, None, None] & phases[None, None, :, None]
    np.testing.assert_array_equal(got[np.broadcast_to(written, got.shape)],
                                  want[np.broadcast_to(written, want.shape)])
    assert np.isnan(got[np.broadcast_to(~written, got.shape)]).all()


def test_bind_pack_rejects_a_channel_mask_of_the_wrong_size():
    x = np.zeros(2 * 3 * 3, np.float32)
    with pytest.raises(ValueError, match="channels must be 2 bools"):
        bind_pack(x, Layout(2, 3, 3), 1, (1, 1), (1, 1), 1, np.zeros(50, np.float32),
                  channels=np.ones(3, np.bool_))
