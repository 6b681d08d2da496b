"""The explicit vector type: masked loads and stores never touch lanes past `count`."""

import numpy as np
import pytest
from numba import njit

from harp.kernels.simd import LANES, vfma, vload, vsplat, vstore, vzero


@njit(cache=True)
def _axpy_chunk(a, x, y, start, count, out):
    """out[start:start+count] = a * x[...] + y[...], one vector, masked to count lanes."""
    r = vfma(vsplat(a), vload(x, start, count), vload(y, start, count))
    vstore(out, start, count, r)


@njit(cache=True)
def _sum_of_vectors(x, out):
    acc = vzero()
    i = 0
    while i < x.shape[0]:
        acc = vfma(vsplat(np.float32(1.0)), vload(x, i, x.shape[0] - i), acc)
        i += LANES
    vstore(out, 0, LANES, acc)


@pytest.mark.parametrize("count", [-3, 0, 1, 7, LANES, LANES + 5])
def test_masked_load_and_store_touch_only_count_lanes(count):
    rng = np.random.default_rng(count + 10)
    x = rng.standard_normal(LANES + 8).astype(np.float32)
    y = rng.standard_normal(LANES + 8).astype(np.float32)
    out = np.full(LANES + 8, np.nan, np.float32)
    _axpy_chunk(np.float32(2.5), x, y, 4, count, out)
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
