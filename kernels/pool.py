"""Pooling kernels on NCHW float32 with torch semantics: max, average, global average.

Each (image, channel) plane is independent; planes are split between threads.
Output sizes, ceil_mode and the average divisor follow `reference` exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .reference import pool_output_size


def maxpool2d(x, kernel, stride=None, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
              out=None) -> np.ndarray:
    """torch max_pool2d: padding is -inf, NaN propagates; `stride` defaults to `kernel`."""
    op = "maxpool2d"
    kernel, stride, padding, dilation = _pairs(kernel, stride, padding, dilation)
    x = _check_input(op, x)
    if 2 * padding[0] > kernel[0] or 2 * padding[1] > kernel[1]:
        raise ValueError(f"{op}: padding {padding} exceeds half the kernel {kernel}")
    out = _resolve_out(op, x, kernel, stride, padding, dilation, ceil_mode, out)
    _maxpool(x, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
             dilation[0], dilation[1], out)
    return out


def avgpool2d(x, kernel, stride=None, padding=(0, 0), ceil_mode=False, count_include_pad=True,
              out=None) -> np.ndarray:
    """torch avg_pool2d (no divisor_override); `stride` defaults to `kernel`."""
    op = "avgpool2d"
    kernel, stride, padding, _ = _pairs(kernel, stride, padding, (1, 1))
    x = _check_input(op, x)
    if 2 * padding[0] > kernel[0] or 2 * padding[1] > kernel[1]:
        raise ValueError(f"{op}: padding {padding} exceeds half the kernel {kernel}")
    out = _resolve_out(op, x, kernel, stride, padding, (1, 1), ceil_mode, out)
    _avgpool(x, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1],
             bool(count_include_pad), out)
    return out


def global_avgpool(x, out=None) -> np.ndarray:
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1)."""
    op = "global_avgpool"
    x = _check_input(op, x)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"{op}: empty spatial size in input {x.shape}")
    shape = (x.shape[0], x.shape[1], 1, 1)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{op}: out must be a C-contiguous float32 {shape} array")
    _global_avgpool(x.reshape(shape[0] * shape[1], -1), out.reshape(-1))
    return out


def _pairs(kernel, stride, padding, dilation):
    def pair(v):
        if isinstance(v, (int, np.integer)):
            return int(v), int(v)
        a, b = v
        return int(a), int(b)

    kernel = pair(kernel)
    stride = kernel if stride is None else pair(stride)
    padding, dilation = pair(padding), pair(dilation)
    if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"pool: bad kernel {kernel}, stride {stride}, padding {padding} "
                         f"or dilation {dilation}")
    return kernel, stride, padding, dilation


def _check_input(op, x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
        raise ValueError(f"{op}: input must be a float32 NCHW array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    return as_kernel_array(x)


def _resolve_out(op, x, kernel, stride, padding, dilation, ceil_mode, out) -> np.ndarray:
    n, c, h, w = x.shape
    ho = pool_output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = pool_output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{op}: input {x.shape} gives empty output ({ho}, {wo}) for kernel {kernel}")
    if out is None:
        return np.empty((n, c, ho, wo), np.float32)
    if out.shape != (n, c, ho, wo) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{op}: out must be a C-contiguous float32 {(n, c, ho, wo)} array")
    return out


@njit(parallel=True, cache=True)
def _maxpool(x, kh, kw, sh, sw, ph, pw, dh, dw, out):
    n, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for plane in prange(n * c):
        img, ch = plane // c, plane % c
        src, dst = x[img, ch], out[img, ch]
        for oh in range(ho):
            r0 = oh * sh - ph
            for ow in range(wo):
                c0 = ow * sw - pw
                m = -np.inf
                for a in range(kh):
                    r = r0 + a * dh
                    if r < 0 or r >= h:
                        continue
                    for b in range(kw):
                        col = c0 + b * dw
                        if 0 <= col < w:
                            v = src[r, col]
                            if v > m or v != v:  # NaN wins, as in torch
                                m = v
                dst[oh, ow] = m


@njit(parallel=True, cache=True)
def _avgpool(x, kh, kw, sh, sw, ph, pw, count_include_pad, out):
    n, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for plane in prange(n * c):
        img, ch = plane // c, plane % c
        src, dst = x[img, ch], out[img, ch]
        for oh in range(ho):
            r0 = oh * sh - ph
            r1 = min(r0 + kh, h + ph)  # the window clipped to the padded input
            rr0, rr1 = max(r0, 0), min(r1, h)
            for ow in range(wo):
                c0 = ow * sw - pw
                c1 = min(c0 + kw, w + pw)
                cc0, cc1 = max(c0, 0), min(c1, w)
                total = np.float32(0.0)
                for r in range(rr0, rr1):
                    for col in range(cc0, cc1):
                        total += src[r, col]
                if count_include_pad:
                    divisor = (r1 - r0) * (c1 - c0)
                else:
                    divisor = (rr1 - rr0) * (cc1 - cc0)
                dst[oh, ow] = total / np.float32(divisor)


@njit(parallel=True, cache=True)
def _global_avgpool(planes, out):
    size = planes.shape[1]
    for p in prange(planes.shape[0]):
        total = 0.0
        for k in range(size):
            total += planes[p, k]
        out[p] = total / size
