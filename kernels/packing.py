"""Padded, stride-phase-split copy of a conv input ("packed input"), images interleaved in groups.

Both conv kernels (sparse and dense) read their input from this layout instead of
NCHW, because in it every kernel tap (i, j) of every input channel c turns a
convolution into one contiguous multiply-add over the whole output plane. With
the batch cut into N/G blocks of G images,

    packed[blk, c, pi, pj, a, b, k] = xpad[blk*G + k, c, a*sh + pi, b*sw + pj]

where xpad is the zero-padded input, (pi, pj) the stride phase and (a, b) the
position inside that phase plane of shape (hq, wq) = (ceil(Hp/sh), ceil(Wp/sw)).
Flattening (a, b, k) puts output pixel (oh, ow) of image k of a block at
position (oh*wq + ow)*G + k, and tap (i, j) reads that position shifted by the
constant (((i*dh)//sh)*wq + (j*dw)//sw)*G inside phase plane
((i*dh)%sh, (j*dw)%sw). The price is wq - wo garbage columns per output row,
computed and then dropped.

G = 1 keeps each image's planes contiguous (a plain padded copy, cheap to make
and to write back); G = N makes runs N times longer, which small planes need to
keep the inner loops vectorised. `image_group` picks between them.

The source of a pack is any buffer in a runtime `layout` (NCHW is one). A conv
can read a packed input whose border is wider than its own padding, with shifted
tap offsets (`tap_offsets(..., border=)`). So a stride-1 conv needs no pack at all
when the input buffer already has the conv's image group and a border at least
as wide as its padding: that buffer is the packed input. And two convs of one
input with the same stride share one pack, made with the wider padding: a 1x1
stride-2 shortcut reads phase (1, 1) of the pack of the 3x3 conv beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from numba import njit, prange

from .layout import Layout, image_row_offset, row_offset, row_stride
from .simd import LANES, vevens, vload, vodds, vstore, vzero


def packed_hw(in_hw, stride, padding) -> tuple[int, int]:
    """(hq, wq): height and width of one stride-phase plane of the padded input."""
    hp = in_hw[0] + 2 * padding[0]
    wp = in_hw[1] + 2 * padding[1]
    return -(-hp // stride[0]), -(-wp // stride[1])


# Below this many pixels per output plane (incl. garbage columns), interleave the batch. 2048
# takes in 32x32 planes: at batch 16 their runs are then 16x longer and line-aligned, and
# ResNet's first stride-2 conv packs from 16 images interleaved, not from one per plane
# (HARP ResNet18 at batch 16: 11.75 -> 11.01 ms, VGG16 5.82 -> 5.50 ms; at 512 before).
MIN_PLANE_PIXELS = 2048


def image_group(n: int, out_plane_pixels: int) -> int:
    """G for a batch of n whose output planes span `out_plane_pixels` packed pixels."""
    return n if 0 < out_plane_pixels < MIN_PLANE_PIXELS and n > 0 else 1


def packed_size(n: int, channels: int, in_hw, stride, padding) -> int:
    """Number of float32 elements of the packed input (the same for every G)."""
    hq, wq = packed_hw(in_hw, stride, padding)
    return channels * stride[0] * stride[1] * hq * wq * n


def tap_offsets(kernel_hw, stride, padding, dilation, in_hw, border=None) -> np.ndarray:
    """Offset in pixels, from a channel's packed block start, of each tap t = i*kw + j.

    `border` is the padding the packed input really has, when it is at least
    `padding`: each tap then reads (border - padding) padded rows and columns
    further on, which at stride s is another phase plane and fewer rows down.
    """
    kh, kw = kernel_hw
    sh, sw = stride
    dh, dw = dilation
    border = padding if border is None else border
    if border[0] < padding[0] or border[1] < padding[1]:
        raise ValueError(f"tap_offsets: a border {tuple(border)} narrower than the padding {tuple(padding)}")
    hq, wq = packed_hw(in_hw, stride, border)
    # Padded coordinates of tap (i, j) for output pixel (0, 0), in the packed input's own padding.
    i = np.repeat(np.arange(kh, dtype=np.int64), kw) * dh + (border[0] - padding[0])
    j = np.tile(np.arange(kw, dtype=np.int64), kh) * dw + (border[1] - padding[1])
    phase = (i % sh) * sw + (j % sw)
    return phase * (hq * wq) + (i // sh) * wq + (j // sw)


def pack_input(x: np.ndarray, stride, padding, group: int, out: np.ndarray | None = None,
               allow_view: bool = True) -> np.ndarray:
    """Pack NCHW float32 `x` into a flat float32 array, `group` images interleaved (see above).

    Without padding or stride and with G = 1 the layout is NCHW itself: then,
    if `allow_view`, the result is a flat view of (C-contiguous) `x`, not a copy.
    """
    n, c, h, w = x.shape
    if group < 1 or n % group:
        raise ValueError(f"pack_input: image group {group} does not divide batch {n}")
    nchw = group == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    if allow_view and nchw and x.flags.c_contiguous:
        return x.reshape(-1)
    out = _resolve_workspace(out, packed_size(n, c, (h, w), stride, padding))
    bind_pack(np.ascontiguousarray(x).reshape(-1), Layout(c, h, w), n, stride, padding, group, out)()
    return out


def bind_pack(src: np.ndarray, src_layout: Layout, n: int, stride, padding, group: int,
              out: np.ndarray, phases: np.ndarray | None = None,
              channels: np.ndarray | None = None) -> Callable[[], None]:
    """A no-argument callable packing the batch of n held in `src` (in `src_layout`) into `out`.

    Checks everything once; the callable only runs the kernel (the runtime calls it
    every time). `out` needs `packed_size(...)` elements. `phases` (from
    `used_phases`) leaves the stride phases no tap reads unwritten, e.g. three of
    the four of a 1x1 stride-2 conv; `channels` (one bool per input channel, e.g.
    `SparseConvPlan.used_channels`) does the same for the input channels no
    nonzero weight reads, most of them in a 99%-sparse layer.
    """
    c, h, w = src_layout.channels, src_layout.height, src_layout.width
    src_layout.check_batch(n)
    if group < 1 or n % group:
        raise ValueError(f"pack_input: image group {group} does not divide batch {n}")
    if src.dtype != np.float32 or src.ndim != 1 or src.shape[0] < src_layout.size(n):
        raise ValueError(f"pack_input: source must be flat float32 with >= {src_layout.size(n)} elements, "
                         f"got {src.dtype} {src.shape}")
    _resolve_workspace(out, packed_size(n, c, (h, w), stride, padding))
    hq, wq = packed_hw((h, w), stride, padding)
    if phases is None:
        phases = np.ones(int(stride[0]) * int(stride[1]), np.bool_)
    elif phases.dtype != np.bool_ or phases.shape != (int(stride[0]) * int(stride[1]),):
        raise ValueError(f"pack_input: phases must be {int(stride[0]) * int(stride[1])} bools, got "
                         f"{phases.dtype} {phases.shape}")
    if channels is None:
        channels = np.ones(c, np.bool_)
    elif channels.dtype != np.bool_ or channels.shape != (c,):
        raise ValueError(f"pack_input: channels must be {c} bools, got {channels.dtype} {channels.shape}")
    return partial(_pack, src, src_layout.params(), n, int(padding[0]), int(padding[1]), int(stride[0]),
                   int(stride[1]), hq, wq, int(group), phases, np.flatnonzero(channels).astype(np.int64), out)


def _resolve_workspace(out, size: int) -> np.ndarray:
    if out is None:
        return np.empty(size, np.float32)
    if out.dtype != np.float32 or out.ndim != 1 or out.shape[0] < size or not out.flags.writeable:
        raise ValueError(f"pack_input: workspace must be 1-D writeable float32 with >= {size} elements, "
                         f"got {out.dtype} {out.shape}")
    return out


# Hot loops index flat arrays with uint64: numba then skips the negative-index
# wraparound test it adds to signed indices, which otherwise blocks vectorisation.
_U = np.uint64


@njit(parallel=True, cache=True, error_model="numpy")
def _pack(src, lay, n, ph, pw, sh, sw, hq, wq, g, phases, channels, packed):
    c, h, w = lay[0], lay[1], lay[2]
    n_used = channels.shape[0]
    plane = hq * wq * g
    # Rows a in [a_lo, a_hi) and columns b in [b_lo, b_hi) of phase plane (pi, pj)
    # hold input pixels (not padding); integer division is slow, so do it once here.
    a_lo, a_hi = np.empty(sh, np.int64), np.empty(sh, np.int64)
    b_lo, b_hi = np.empty(sw, np.int64), np.empty(sw, np.int64)
    for pi in range(sh):
        a_lo[pi] = min(max(-(-(ph - pi) // sh), 0), hq)
        a_hi[pi] = min(max(-(-(h + ph - pi) // sh), a_lo[pi]), hq)
    for pj in range(sw):
        b_lo[pj] = min(max(-(-(pw - pj) // sw), 0), wq)
        b_hi[pj] = min(max(-(-(w + pw - pj) // sw), b_lo[pj]), wq)
    # One image per plane on both sides at column stride 2: both column phases of a row at once.
    pairs = sw == 2 and g == 1 and lay[5] == 1
    for item in prange((n // g) * n_used):  # unused channels and phases stay unwritten
        blk = item // n_used
        ch = channels[item - blk * n_used]
        for pi in range(sh):
            base = ((blk * c + ch) * sh + pi) * sw * plane
            if pairs:
                if phases[pi * 2] or phases[pi * 2 + 1]:
                    _pack_plane_pair(src, lay, blk, ch, pi, ph, pw, sh, wq, a_lo[pi], a_hi[pi], hq, base,
                                     phases[pi * 2], phases[pi * 2 + 1], packed)
                continue
            for pj in range(sw):
                if not phases[pi * sw + pj]:
                    continue
                if lay[5] == g and g % LANES == 0:
                    _pack_plane_vectors(src, lay, blk, ch, pi, pj, ph, pw, sh, sw, wq, g, a_lo[pi], a_hi[pi],
                                        b_lo[pj], b_hi[pj], hq, base + pj * plane, packed)
                else:
                    _pack_plane(src, lay, blk, ch, pi, pj, ph, pw, sh, sw, wq, g, a_lo[pi], a_hi[pi], b_lo[pj],
                                b_hi[pj], hq, base + pj * plane, packed)


@njit(cache=True, error_model="numpy")
def _pack_plane_pair(src, lay, blk, ch, pi, ph, pw, sh, wq, a_lo, a_hi, hq, base, used0, used1, packed):
    """Column phases pj = 0 and 1 (those used) of row phase pi of one channel, stride 2, one image per plane.

    Each input row is read once, 32 values at a time, and split into its even and
    odd columns in registers (`simd.vevens`, `vodds`): input column 2t lands in
    phase pw % 2 at column t + pw // 2, column 2t + 1 in the other phase at
    t + (pw + 1) // 2. Going through `_pack_plane` one phase at a time read
    every row twice, one strided value after another: ResNet's stride-2 packs
    at batch 1 (64ch 32x32, 128ch 16x16, 256ch 8x8) took 23-46 µs each that
    way, 10-21 µs now (alternating in one process; the range is the host's).
    """
    plane = hq * wq
    for pj in range(2):  # a phase no tap reads stays unwritten
        if used1 if pj else used0:
            for j in range(_U(plane)):
                packed[_U(base + pj * plane) + j] = 0.0
    w = lay[2]
    even = base + (pw % 2) * plane + pw // 2
    odd = base + ((pw + 1) % 2) * plane + (pw + 1) // 2
    even_used, odd_used = (used1, used0) if pw % 2 else (used0, used1)
    for a in range(a_lo, a_hi):
        s0 = row_offset(lay, blk, ch, a * sh + pi - ph)
        for t in range(0, w, 2 * LANES):
            count = w - t
            x0 = vload(src, s0 + t, count)
            x1 = vload(src, s0 + t + LANES, count - LANES)
            if even_used:
                vstore(packed, even + a * wq + t // 2, (count + 1) // 2, vevens(x0, x1))
            if odd_used:
                vstore(packed, odd + a * wq + t // 2, count // 2, vodds(x0, x1))


@njit(cache=True, error_model="numpy")
def _pack_plane_vectors(src, lay, blk, ch, pi, pj, ph, pw, sh, sw, wq, g, a_lo, a_hi, b_lo, b_hi, hq, base, packed):
    """`_pack_plane` where source and pack have the same image group G, a multiple of 16.

    A pixel is then G/16 whole vectors in both: each is copied as such, and the
    padding is written once, as zero vectors, instead of zeroing the plane and
    then overwriting most of it. ResNet18's stride-2 packs at batch 16 (64
    channels of 32x32, 128 of 16x16, 256 of 8x8, from bordered buffers of 16
    images) took 190, 113 and 73 µs that way, 115, 78 and 57 now (alone,
    alternating in one process; in the model, with the source out of cache,
    the first takes 600-750 µs).
    """
    zero = vzero()
    pixel = g // LANES  # vectors per pixel
    for a in range(hq):
        d = base + a * wq * g
        if a < a_lo or a >= a_hi:
            for v in range(wq * pixel):
                vstore(packed, d + v * LANES, LANES, zero)
            continue
        for v in range(b_lo * pixel):
            vstore(packed, d + v * LANES, LANES, zero)
        s = row_offset(lay, blk, ch, a * sh + pi - ph) + (b_lo * sw + pj - pw) * g
        for b in range(b_lo, b_hi):
            for v in range(pixel):
                vstore(packed, d + b * g + v * LANES, LANES, vload(src, s + v * LANES, LANES))
            s += sw * g
        for v in range(b_hi * pixel, wq * pixel):
            vstore(packed, d + v * LANES, LANES, zero)


@njit(cache=True, error_model="numpy")
def _pack_plane(src, lay, blk, ch, pi, pj, ph, pw, sh, sw, wq, g, a_lo, a_hi, b_lo, b_hi, hq, base, packed):
    """One phase plane of one channel of one image block: input rows copied in, padding zeroed.

    A plain (not inlined) function: the same loops written inside the prange body
    of `_pack` compile to slower code. Where the source has another image group,
    each image's position is found once per plane, not once per row (see `layout`).
    """
    gs = lay[5]
    ug = _U(g)
    w0 = b_lo * sw + pj - pw
    width = _U(max(b_hi - b_lo, 0))
    for j in range(_U(hq * wq * g)):  # zero the plane (one contiguous run), then copy the rows in
        packed[_U(base) + j] = 0.0
    if width == 0:
        return
    row_step = row_stride(lay)
    if gs == g:
        first = row_offset(lay, blk, ch, 0) + w0 * gs
    else:  # where each image of this block starts in the source
        starts = np.empty(g, np.int64)
        for k in range(g):
            starts[k] = image_row_offset(lay, blk * g + k, ch, 0) + w0 * gs
        first = starts[0]  # all a block of one image needs
    for a in range(a_lo, a_hi):
        h_in = a * sh + pi - ph
        d0 = _U(base + (a * wq + b_lo) * g)
        if gs == g and sw == 1:  # same image group, unit stride: one run of width*g values
            s0 = _U(first + h_in * row_step)
            for j in range(width * ug):
                packed[d0 + j] = src[s0 + j]
        elif g == 1:  # one image, strided columns (a loop over runs of one value would cost 5x)
            s0 = _U(first + h_in * row_step)
            step = _U(sw * gs)
            for j in range(width):
                packed[d0 + j] = src[s0 + j * step]
        elif gs == g:  # same image group, strided columns: each column's g images are one contiguous run
            s0 = first + h_in * row_step
            for b in range(width):
                d = d0 + b * ug
                src_col = _U(s0) + b * _U(sw * gs)
                for k in range(ug):
                    packed[d + k] = src[src_col + k]
        else:
            step = _U(sw * gs)
            for k in range(g):
                s0 = _U(starts[k] + h_in * row_step)
                for j in range(width):
                    packed[d0 + _U(k) + j * ug] = src[s0 + j * step]


def used_phases(kernel_hw, stride, dilation, shift=(0, 0)) -> np.ndarray:
    """Which stride phases (pi*sw + pj) some tap of the kernel reads; a pack may skip the others.

    `shift` = border - padding, when the conv reads a pack made with a wider padding.
    """
    kh, kw = kernel_hw
    sh, sw = stride
    dh, dw = dilation
    phases = np.zeros(sh * sw, np.bool_)
    for i in range(kh):
        for j in range(kw):
            phases[(i * dh + shift[0]) % sh * sw + (j * dw + shift[1]) % sw] = True
    return phases
