"""Compile (first run) or load from numba's on-disk cache (later runs) every kernel.

Calling `warmup()` once (e.g. when a device image is built, with NUMBA_CACHE_DIR set to
a folder the device may write) fills numba's cache for every kernel, so no later
process pays for compilation; a Runtime itself warms up by preparing and running
batch 1 (`Runtime.warmup`). Every kernel is jitted with `cache=True`; each is called
here once on tiny inputs with every argument type it is used with (uint8/16/32 CSR
indices, batch 1 and >1, with and without residual), which is the whole set of
signatures.
"""

from __future__ import annotations

import time

import numpy as np

from harp.export.csr import dense_to_csr

from .conv import sparse_conv2d
from .csr import INDEX_DTYPES, kernel_csr
from .dense import bind_dense_linear, dense_conv2d, dense_linear, plan_dense_linear
from .elementwise import add, affine, clip, relu
from .pool import avgpool2d, global_avgpool, maxpool2d
from .spmm import sparse_linear, spmm
from .winograd import winograd_conv2d


def warmup() -> dict[str, float]:
    """Run every kernel once on tiny inputs; returns seconds spent per kernel family."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)  # (N, C, H, W)
    weight = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    weight[:, :, 0] = 0.0
    timings: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    zeros = np.zeros((2, 4, 5, 5), np.float32)
    features = x[:, 0, 0]  # (N, I) = (2, 5)
    linear_weight = rng.standard_normal((3, 5)).astype(np.float32)  # (O, I)
    linear_weight[1] = 0.0
    for dtype in INDEX_DTYPES:
        indptr, indices, values = kernel_csr(dense_to_csr(weight), dtype)
        timed("sparse_conv2d", lambda: sparse_conv2d(x, indptr, indices, values, weight.shape, None,
                                                     1, 1, act="relu", residual=zeros))
        timed("sparse_conv2d", lambda: sparse_conv2d(x[:1], indptr, indices, values, weight.shape))
        timed("spmm", lambda: spmm(indptr, indices, values, rng.standard_normal((36, 3)).astype(np.float32),
                                   act="relu", residual=np.zeros((4, 3), np.float32)))
        indptr, indices, values = kernel_csr(dense_to_csr(linear_weight), dtype)
        timed("spmm", lambda: sparse_linear(features, indptr, indices, values))
    timed("dense_conv2d", lambda: dense_conv2d(x, weight, None, 2, 1, act="relu6", residual=np.zeros(
        (2, 4, 3, 3), np.float32)))
    plane = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)  # runs long enough for the pixel-major kernel
    timed("dense_conv2d", lambda: dense_conv2d(plane, weight, None, 1, 1, act="relu", residual=np.zeros(
        (1, 4, 16, 16), np.float32)))
    for m in (2, 4):  # the two tile edges have their own transform kernels
        timed("winograd_conv2d", lambda: winograd_conv2d(x[:, :, :4, :4], weight, None, act="relu", residual=np.zeros(
            (2, 4, 4, 4), np.float32), m=m))
    timed("dense_linear", lambda: dense_linear(features, linear_weight, None, act="relu",
                                               residual=np.zeros((2, 3), np.float32)))
    linear_plan = plan_dense_linear(linear_weight)
    for m in (2, 5):  # the channel-major kernel (small batch) and BLAS
        columns = rng.standard_normal((5, m)).astype(np.float32)  # feature-major (I, M)
        timed("dense_linear", bind_dense_linear(linear_plan, columns, np.zeros(3, np.float32), 0,
                                                np.float32(-np.inf), np.float32(np.inf), None,
                                                np.zeros((3, m), np.float32)))
    timed("pool", lambda: maxpool2d(x, 2, 2, 1, ceil_mode=True))
    timed("pool", lambda: avgpool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    timed("pool", lambda: global_avgpool(x))
    timed("elementwise", lambda: add(x, x, act="relu"))
    timed("elementwise", lambda: relu(x))
    timed("elementwise", lambda: clip(x, -1.0, 1.0))
    timed("elementwise", lambda: affine(x, np.ones(4, np.float32), np.zeros(4, np.float32)))
    return timings
