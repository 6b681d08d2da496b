"""Pooling kernels on NCHW float32 with torch semantics: max, average, global average.

Each (image, channel) plane is independent; planes are split between threads.
Output sizes, ceil_mode and the average divisor follow `reference` exactly.
The kernels read and write any runtime `layout` (bordered, image-grouped);
the NCHW functions are the special case the tests and simple callers use, the
`bind_*` functions what the runtime calls.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .epilogue import resolve_out
from .layout import Layout, image_row_offset, row_offset, row_stride
from .reference import pool_output_size
from .simd import LANES, vtranspose


def maxpool2d(x, kernel, stride=None, padding=(0, 0), dilation=(1, 1), ceil_mode=False,
              out=None) -> np.ndarray:
    """torch max_pool2d: padding is -inf, NaN propagates; `stride` defaults to `kernel`."""
    x = _check_input("maxpool2d", x)
    n, c, h, w = x.shape
    shape = pool2d_output_shape("maxpool2d", (c, h, w), kernel, stride, padding, dilation, ceil_mode)
    out = resolve_out("maxpool2d", out, (n, *shape))
    bind_maxpool2d(x.reshape(-1), Layout(c, h, w), n, kernel, stride, padding, dilation, ceil_mode,
                   out.reshape(-1), Layout(*shape))()
    return out


def avgpool2d(x, kernel, stride=None, padding=(0, 0), ceil_mode=False, count_include_pad=True,
              out=None) -> np.ndarray:
    """torch avg_pool2d (no divisor_override); `stride` defaults to `kernel`."""
    x = _check_input("avgpool2d", x)
    n, c, h, w = x.shape
    shape = pool2d_output_shape("avgpool2d", (c, h, w), kernel, stride, padding, (1, 1), ceil_mode)
    out = resolve_out("avgpool2d", out, (n, *shape))
    bind_avgpool2d(x.reshape(-1), Layout(c, h, w), n, kernel, stride, padding, ceil_mode, count_include_pad,
                   out.reshape(-1), Layout(*shape))()
    return out


def global_avgpool(x, out=None) -> np.ndarray:
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1)."""
    x = _check_input("global_avgpool", x)
    n, c, h, w = x.shape
    out = resolve_out("global_avgpool", out, (n, c, 1, 1))
    bind_global_avgpool(x.reshape(-1), Layout(c, h, w), n, out.reshape(-1), Layout(c, 1, 1))()
    return out


def pool2d_output_shape(op, chw, kernel, stride, padding, dilation, ceil_mode) -> tuple[int, int, int]:
    """(C, Ho, Wo) of a pooling window over per-image (C, H, W); raises on bad geometry."""
    kernel, stride, padding, dilation = _pairs(kernel, stride, padding, dilation)
    if 2 * padding[0] > kernel[0] or 2 * padding[1] > kernel[1]:
        raise ValueError(f"{op}: padding {padding} exceeds half the kernel {kernel}")
    c, h, w = chw
    ho = pool_output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = pool_output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{op}: input {tuple(chw)} gives empty output ({ho}, {wo}) for kernel {kernel}")
    return c, ho, wo


def bind_maxpool2d(src, src_layout: Layout, n: int, kernel, stride, padding, dilation, ceil_mode, out,
                   out_layout: Layout) -> Callable[[], None]:
    """A no-argument callable max-pooling a batch of n from `src` into `out` (flat, in their layouts)."""
    op = "maxpool2d"
    kernel, stride, padding, dilation = _pairs(kernel, stride, padding, dilation)
    shape = pool2d_output_shape(op, _chw(src_layout), kernel, stride, padding, dilation, ceil_mode)
    _check_buffers(op, src, src_layout, n, out, out_layout, shape)
    return partial(_maxpool, src, src_layout.params(), n, kernel[0], kernel[1], stride[0], stride[1],
                   padding[0], padding[1], dilation[0], dilation[1], out, out_layout.params(),
                   _channel_run(out_layout, n))


def bind_avgpool2d(src, src_layout: Layout, n: int, kernel, stride, padding, ceil_mode, count_include_pad,
                   out, out_layout: Layout) -> Callable[[], None]:
    """A no-argument callable average-pooling a batch of n from `src` into `out` (flat, in their layouts)."""
    op = "avgpool2d"
    kernel, stride, padding, _ = _pairs(kernel, stride, padding, (1, 1))
    shape = pool2d_output_shape(op, _chw(src_layout), kernel, stride, padding, (1, 1), ceil_mode)
    _check_buffers(op, src, src_layout, n, out, out_layout, shape)
    return partial(_avgpool, src, src_layout.params(), n, kernel[0], kernel[1], stride[0], stride[1],
                   padding[0], padding[1], bool(count_include_pad), out, out_layout.params(),
                   _channel_run(out_layout, n))


def bind_global_avgpool(src, src_layout: Layout, n: int, out, out_layout: Layout) -> Callable[[], None]:
    """A no-argument callable averaging each plane of a batch of n from `src` into `out` (C, 1, 1)."""
    op = "global_avgpool"
    c, h, w = _chw(src_layout)
    if h * w == 0:
        raise ValueError(f"{op}: empty spatial size in input {(c, h, w)}")
    _check_buffers(op, src, src_layout, n, out, out_layout, (c, 1, 1))
    return partial(_global_avgpool, src, src_layout.params(), n, out, out_layout.params(),
                   _channel_run(out_layout, n))


def _chw(layout: Layout) -> tuple[int, int, int]:
    return layout.channels, layout.height, layout.width


def _check_buffers(op, src, src_layout, n, out, out_layout, out_shape) -> None:
    if _chw(out_layout) != tuple(out_shape):
        raise ValueError(f"{op}: output layout {out_layout} does not hold a {tuple(out_shape)} output")
    for what, a, layout in (("input", src, src_layout), ("out", out, out_layout)):
        layout.check_batch(n)
        if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1
                or a.shape[0] < layout.size(n) or not a.flags.c_contiguous):
            raise ValueError(f"{op}: {what} must be a flat contiguous float32 array of >= {layout.size(n)} "
                             f"elements, got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if not out.flags.writeable or np.may_share_memory(src, out):
        raise ValueError(f"{op}: out must be writeable and must not overlap the input")


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


# Kernels: one (image block of the output, run of channels) per work item; the
# runs are as long as `_channel_run` says, so that small planes (the deep layers
# of VGG at batch 16: 512 channels of 2x2 pixels) do not pay a call per plane.
# Pixel (h, w) of image i, channel c of a buffer in layout `lay` is at
# row_offset(lay, i // G, c, h) + w*G + i % G. Each work item calls a plain
# (not inlined) njit function: loop nests written inside a prange body compile
# to code several times slower (measured 4x on maxpool).

# Output elements a work item should at least cover (a plain call costs ~0.1 µs).
RUN_ELEMS = 2048


def _channel_run(out_layout: Layout, n: int) -> int:
    """Channels per work item: about RUN_ELEMS outputs, but >= 8 items in all where possible."""
    plane = out_layout.height * out_layout.width * out_layout.group
    per_plane = -(-RUN_ELEMS // max(plane, 1))
    blocks = max(n // out_layout.group, 1)
    return max(1, min(per_plane, out_layout.channels * blocks // 8))


@njit(parallel=True, cache=True, error_model="numpy")
def _maxpool(src, sl, n, kh, kw, sh, sw, ph, pw, dh, dw, out, ol, run):
    go, c = ol[5], ol[0]
    # The VGG/ResNet case, 2x2 windows at stride 2 without padding, all inside the input, has its own loop.
    halving = (kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0 and dh == 1 and dw == 1
               and 2 * ol[1] <= sl[1] and 2 * ol[2] <= sl[2])
    runs = (c + run - 1) // run
    for item in prange((n // go) * runs):
        blk, ch0 = item // runs, (item % runs) * run
        ch1 = min(ch0 + run, c)
        if halving:
            _maxpool_2x2_channels(src, sl, blk, ch0, ch1, out, ol)
        else:
            _maxpool_channels(src, sl, blk, ch0, ch1, kh, kw, sh, sw, ph, pw, dh, dw, out, ol)


_U = np.uint64  # unsigned flat indices: numba then adds no wraparound test and LLVM vectorises


@njit(cache=True, inline="always", error_model="numpy")
def _max4(a, b, e, f):
    """max of four values, NaN if any is NaN (torch semantics); branch-free so loops vectorise."""
    m = a if a > b else b
    m2 = e if e > f else f
    m = m if m > m2 else m2
    return np.float32(np.nan) if (a != a) | (b != b) | (e != e) | (f != f) else m


@njit(cache=True, error_model="numpy")
def _maxpool_2x2_channels(src, sl, blk, ch0, ch1, out, ol):
    # Offsets are int64 and become uint64 only as indices: numba turns uint64 op int64 into float64.
    gs, go = sl[5], ol[5]
    ho, wo = ol[1], ol[2]
    if gs == go:  # same image group: the G images of a pixel are contiguous on both sides
        for ch in range(ch0, ch1):
            for oh in range(ho):
                r0 = row_offset(sl, blk, ch, 2 * oh)
                r1 = row_offset(sl, blk, ch, 2 * oh + 1)
                d = row_offset(ol, blk, ch, oh)
                if go == 1:  # plain planes: a loop over k of length 1 would not vectorise
                    for ow in range(wo):
                        j = r0 + 2 * ow
                        i = r1 + 2 * ow
                        out[_U(d + ow)] = _max4(src[_U(j)], src[_U(j + 1)], src[_U(i)], src[_U(i + 1)])
                    continue
                for ow in range(wo):
                    j = r0 + 2 * ow * go
                    i = r1 + 2 * ow * go
                    o = d + ow * go
                    for k in range(go):
                        out[_U(o + k)] = _max4(src[_U(j + k)], src[_U(j + go + k)], src[_U(i + k)],
                                               src[_U(i + go + k)])
        return
    # Different groups (e.g. a 32x32 plane per image in, 16x16 planes of 16 interleaved images out):
    # each image's output row goes to a small tile first, read from its two input rows in order,
    # then the tile is transposed, 16 x 16 values at a time, into the image-innermost output row.
    # Reading the G images' rows side by side instead took 512 µs against 161 (VGG16 at batch 16):
    # their planes, 256 KiB apart, map to the same L1 cache sets.
    tile = np.empty(go * wo, np.float32)
    starts = np.empty(go, np.int64)  # each image's row 0, found once per channel (see `layout`)
    step = row_stride(sl)
    for ch in range(ch0, ch1):
        for k in range(go):
            starts[k] = image_row_offset(sl, blk * go + k, ch, 0)
        for oh in range(ho):
            for k in range(go):
                r0 = starts[k] + 2 * oh * step
                r1 = r0 + step
                t = k * wo
                if gs == 1:  # a constant stride lets LLVM vectorise the row
                    for ow in range(wo):
                        tile[_U(t + ow)] = _max4(src[_U(r0 + 2 * ow)], src[_U(r0 + 2 * ow + 1)],
                                                 src[_U(r1 + 2 * ow)], src[_U(r1 + 2 * ow + 1)])
                    continue
                for ow in range(wo):
                    j0, j1 = 2 * ow * gs, (2 * ow + 1) * gs
                    tile[_U(t + ow)] = _max4(src[_U(r0 + j0)], src[_U(r0 + j1)], src[_U(r1 + j0)], src[_U(r1 + j1)])
            d = row_offset(ol, blk, ch, oh)
            for k0 in range(0, go, LANES):
                for ow0 in range(0, wo, LANES):
                    vtranspose(tile, k0 * wo + ow0, wo, go - k0, wo - ow0, out, d + ow0 * go + k0, go)


@njit(cache=True, error_model="numpy")
def _maxpool_channels(src, sl, blk, ch0, ch1, kh, kw, sh, sw, ph, pw, dh, dw, out, ol):
    h, w, gs = sl[1], sl[2], sl[5]
    ho, wo, go = ol[1], ol[2], ol[5]
    rows = np.empty(kh, np.int64)
    for ch in range(ch0, ch1):
        for k in range(go):
            img = blk * go + k
            s_blk, s_k = img // gs, img % gs
            for oh in range(ho):
                n_rows = 0  # the window rows inside the input, as buffer offsets
                for a in range(kh):
                    r = oh * sh - ph + a * dh
                    if 0 <= r < h:
                        rows[n_rows] = row_offset(sl, s_blk, ch, r) + s_k
                        n_rows += 1
                d = row_offset(ol, blk, ch, oh) + k
                for ow in range(wo):
                    c0 = ow * sw - pw
                    m = np.float32(-np.inf)
                    for b in range(kw):
                        col = c0 + b * dw
                        if 0 <= col < w:
                            for a in range(n_rows):
                                v = src[rows[a] + col * gs]
                                if v > m or v != v:  # NaN wins, as in torch
                                    m = v
                    out[d + ow * go] = m


@njit(parallel=True, cache=True, error_model="numpy")
def _avgpool(src, sl, n, kh, kw, sh, sw, ph, pw, count_include_pad, out, ol, run):
    go, c = ol[5], ol[0]
    runs = (c + run - 1) // run
    for item in prange((n // go) * runs):
        blk, ch0 = item // runs, (item % runs) * run
        _avgpool_channels(src, sl, blk, ch0, min(ch0 + run, c), kh, kw, sh, sw, ph, pw, count_include_pad,
                          out, ol)


@njit(cache=True, error_model="numpy")
def _avgpool_channels(src, sl, blk, ch0, ch1, kh, kw, sh, sw, ph, pw, count_include_pad, out, ol):
    h, w, gs = sl[1], sl[2], sl[5]
    ho, wo, go = ol[1], ol[2], ol[5]
    for ch in range(ch0, ch1):
        for k in range(go):
            img = blk * go + k
            s_blk, s_k = img // gs, img % gs
            for oh in range(ho):
                r0 = oh * sh - ph
                r1 = min(r0 + kh, h + ph)  # the window clipped to the padded input
                rr0, rr1 = max(r0, 0), min(r1, h)
                d = row_offset(ol, blk, ch, oh) + k
                for ow in range(wo):
                    c0 = ow * sw - pw
                    c1 = min(c0 + kw, w + pw)
                    cc0, cc1 = max(c0, 0), min(c1, w)
                    total = np.float32(0.0)
                    for r in range(rr0, rr1):
                        base = row_offset(sl, s_blk, ch, r) + s_k
                        for col in range(cc0, cc1):
                            total += src[base + col * gs]
                    if count_include_pad:
                        divisor = (r1 - r0) * (c1 - c0)
                    else:
                        divisor = (rr1 - rr0) * (cc1 - cc0)
                    out[d + ow * go] = total / np.float32(divisor)


@njit(parallel=True, cache=True, error_model="numpy")
def _global_avgpool(src, sl, n, out, ol, run):
    go, c = ol[5], ol[0]
    runs = (c + run - 1) // run
    for item in prange((n // go) * runs):
        blk, ch0 = item // runs, (item % runs) * run
        _global_avgpool_channels(src, sl, blk, ch0, min(ch0 + run, c), out, ol)


@njit(cache=True, error_model="numpy")
def _global_avgpool_channels(src, sl, blk, ch0, ch1, out, ol):
    h, w, gs = sl[1], sl[2], sl[5]
    go = ol[5]
    if gs == go > 1:  # a pixel's images are one run: add whole runs (vectorised), in the same order
        total = np.empty(go, np.float64)
        for ch in range(ch0, ch1):
            total[:] = 0.0
            for r in range(h):
                base = row_offset(sl, blk, ch, r)
                for col in range(w):
                    px = _U(base + col * go)
                    for k in range(_U(go)):
                        total[k] += src[px + k]
            d = row_offset(ol, blk, ch, 0)
            for k in range(go):
                out[d + k] = total[k] / (h * w)
        return
    for ch in range(ch0, ch1):
        for k in range(go):
            img = blk * go + k
            s_blk, s_k = img // gs, img % gs
            total = 0.0
            for r in range(h):
                base = row_offset(sl, s_blk, ch, r) + s_k
                for col in range(w):
                    total += src[base + col * gs]
            out[row_offset(ol, blk, ch, 0) + k] = total / (h * w)
