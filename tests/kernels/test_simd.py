"""The explicit vector type: masked loads and stores never touch lanes past `count`."""

import numpy as np
import pytest
from numba import njit

from harp.kernels.simd import (LANES, vadd, vclamp, vevens, vfma, vload, vmask, vmax, vmul, vodds, vsplat, vstore,
                               vsub, vtranspose, vzero, vzip_hi, vzip_lo)


@njit(cache=True)
def _axpy_chunk(a, x, y, start, count, out):
    """out[start:start+count] = a * x[...] + y[...], one vector, masked to count lanes."""
    r = vfma(vsplat(a), vload(x, start, count), vload(y, start, count))
    vstore(out, start, count, r)


@njit(cache=True)
def _axpy_chunk_with_mask(a, x, y, start, count, out):
    """`_axpy_chunk` with the mask made once by vmask."""
    mask = vmask(count)
    vstore(out, start, mask, vfma(vsplat(a), vload(x, start, mask), vload(y, start, mask)))


@njit(cache=True)
def _mul_add(a, x, y, out):
    """out[:16] = a * x + y with a separate multiply and add (two roundings)."""
    vstore(out, 0, LANES, vadd(vmul(vsplat(a), vload(x, 0, LANES)), vload(y, 0, LANES)))


@njit(cache=True)
def _sum_of_vectors(x, out):
    acc = vzero()
    i = 0
    while i < x.shape[0]:
        acc = vfma(vsplat(np.float32(1.0)), vload(x, i, x.shape[0] - i), acc)
        i += LANES
    vstore(out, 0, LANES, acc)


@pytest.mark.parametrize("axpy", [_axpy_chunk, _axpy_chunk_with_mask], ids=["count", "vmask"])
@pytest.mark.parametrize("count", [-3, 0, 1, 7, LANES, LANES + 5])
def test_masked_load_and_store_touch_only_count_lanes(count, axpy):
    rng = np.random.default_rng(count + 10)
    x = rng.standard_normal(LANES + 8).astype(np.float32)
    y = rng.standard_normal(LANES + 8).astype(np.float32)
    out = np.full(LANES + 8, np.nan, np.float32)
    axpy(np.float32(2.5), x, y, 4, count, out)
    n = min(max(count, 0), LANES)
    np.testing.assert_allclose(out[4 : 4 + n], 2.5 * x[4 : 4 + n] + y[4 : 4 + n], rtol=1e-5, atol=1e-6)
    assert np.isnan(out[:4]).all() and np.isnan(out[4 + n :]).all()


def test_a_load_at_the_end_of_an_array_reads_nothing_past_it():
    # 37 values: the last vector holds 5 real lanes and the rest must come back as zeros.
    x = np.arange(1, 38, dtype=np.float32)
    out = np.empty(LANES, np.float32)
    _sum_of_vectors(x, out)
    padded = np.zeros(-(-37 // LANES) * LANES, np.float32)
    padded[:37] = x
    np.testing.assert_array_equal(out, padded.reshape(-1, LANES).sum(0))


@njit(cache=True)
def _transpose(src, s0, s_step, rows, cols, dst, d0, d_step):
    vtranspose(src, s0, s_step, rows, cols, dst, d0, d_step)


@pytest.mark.parametrize("rows, cols", [(16, 16), (16, 5), (3, 16), (7, 11), (1, 1), (0, 9), (20, 18)])
def test_transpose_moves_exactly_the_block(rows, cols):
    # dst[d0 + j*d_step + i] = src[s0 + i*s_step + j] for the block, clipped to 16 x 16; nothing else is written.
    s0, s_step, d0, d_step = 3, 21, 5, 19
    src = np.random.default_rng(rows * 31 + cols).standard_normal(s0 + 16 * s_step).astype(np.float32)
    dst = np.full(d0 + 16 * d_step + LANES, np.nan, np.float32)
    _transpose(src, s0, s_step, rows, cols, dst, d0, d_step)
    expected = np.full_like(dst, np.nan)
    r, c = min(rows, LANES), min(cols, LANES)
    for i in range(r):
        for j in range(c):
            expected[d0 + j * d_step + i] = src[s0 + i * s_step + j]
    np.testing.assert_array_equal(dst, expected)


def test_mul_then_add_rounds_twice():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(LANES).astype(np.float32), rng.standard_normal(LANES).astype(np.float32)
    out = np.empty(LANES, np.float32)
    _mul_add(np.float32(1.5), x, y, out)
    np.testing.assert_array_equal(out, np.float32(1.5) * x + y)  # NumPy rounds after each op too


@njit(cache=True)
def _lane_ops(a, b, lo, hi, out):
    x, y = vload(a, 0, LANES), vload(b, 0, LANES)
    vstore(out, 0, LANES, vsub(x, y))
    vstore(out, 16, LANES, vzip_lo(x, y))
    vstore(out, 32, LANES, vzip_hi(x, y))
    vstore(out, 48, LANES, vclamp(x, lo, hi))
    vstore(out, 64, LANES, vevens(vzip_lo(x, y), vzip_hi(x, y)))  # zipping undoes the split
    vstore(out, 80, LANES, vodds(vzip_lo(x, y), vzip_hi(x, y)))
    vstore(out, 96, LANES, vmax(x, y))
    vstore(out, 112, LANES, vmax(y, x))


def test_sub_zip_clamp_and_max_lane_by_lane():
    a = np.arange(LANES, dtype=np.float32) - 8
    a[3] = np.nan
    b = np.arange(LANES, dtype=np.float32) * 10
    b[:3] = -100.0  # a wins in lanes 0-2
    out = np.zeros(8 * LANES, np.float32)
    _lane_ops(a, b, np.float32(-2.5), np.float32(4.0), out)
    np.testing.assert_array_equal(out[:16], a - b)
    zipped = np.stack([a, b], axis=1).reshape(-1)  # a0, b0, a1, b1, ...
    np.testing.assert_array_equal(out[16:48], zipped)
    np.testing.assert_array_equal(out[48:64], np.where(a < -2.5, -2.5, np.where(a > 4.0, 4.0, a)))  # NaN stays
    np.testing.assert_array_equal(out[64:80], a)
    np.testing.assert_array_equal(out[80:96], b)
    np.testing.assert_array_equal(out[96:112], np.maximum(a, b))  # NaN in lane 3 from either side
    np.testing.assert_array_equal(out[112:128], np.maximum(a, b))
