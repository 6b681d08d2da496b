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
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def packed_hw(in_hw, stride, padding) -> tuple[int, int]:
    """(hq, wq): height and width of one stride-phase plane of the padded input."""
    hp = in_hw[0] + 2 * padding[0]
    wp = in_hw[1] + 2 * padding[1]
    return -(-hp // stride[0]), -(-wp // stride[1])


# Below this many pixels per output plane (incl. garbage columns), interleave the batch.
MIN_PLANE_PIXELS = 512


def image_group(n: int, out_plane_pixels: int) -> int:
    """G for a batch of n whose output planes span `out_plane_pixels` packed pixels."""
    return n if 0 < out_plane_pixels < MIN_PLANE_PIXELS and n > 0 else 1


def packed_size(n: int, channels: int, in_hw, stride, padding) -> int:
    """Number of float32 elements of the packed input (the same for every G)."""
    hq, wq = packed_hw(in_hw, stride, padding)
    return channels * stride[0] * stride[1] * hq * wq * n


def tap_offsets(kernel_hw, stride, padding, dilation, in_hw) -> np.ndarray:
    """Offset in pixels, from a channel's packed block start, of each tap t = i*kw + j."""
    kh, kw = kernel_hw
    sh, sw = stride
    dh, dw = dilation
    hq, wq = packed_hw(in_hw, stride, padding)
    i = np.repeat(np.arange(kh, dtype=np.int64), kw) * dh
    j = np.tile(np.arange(kw, dtype=np.int64), kh) * dw
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
    size = packed_size(n, c, (h, w), stride, padding)
    if out is None:
        out = np.empty(size, np.float32)
    elif out.dtype != np.float32 or out.ndim != 1 or out.shape[0] < size:
        raise ValueError(f"pack_input: workspace must be 1-D float32 with >= {size} elements, "
                         f"got {out.dtype} {out.shape}")
    hq, wq = packed_hw((h, w), stride, padding)
    _pack(x, padding[0], padding[1], stride[0], stride[1], hq, wq, group, out)
    return out


# Hot loops index flat arrays with uint64: numba then skips the negative-index
# wraparound test it adds to signed indices, which otherwise blocks vectorisation.
_U = np.uint64


@njit(parallel=True, cache=True, error_model="numpy")
def _pack(x, ph, pw, sh, sw, hq, wq, g, packed):
    n, c, h, w = x.shape
    xf = x.reshape(x.size)
    ug, usw = _U(g), _U(sw)
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
    for item in prange((n // g) * c):
        blk = item // c
        ch = item - blk * c
        for pi in range(sh):
            for pj in range(sw):
                base = ((item * sh + pi) * sw + pj) * plane
                w0 = b_lo[pj] * sw + pj - pw
                width = _U(b_hi[pj] - b_lo[pj])
                # Zero the whole phase plane (one contiguous run), then copy the input rows in.
                fill_zero(packed, _U(base), _U(plane))
                if width == 0:
                    continue
                for a in range(a_lo[pi], a_hi[pi]):
                    row = base + a * wq * g
                    h_in = a * sh + pi - ph
                    for k in range(g):
                        src = _U(((blk * g + k) * c + ch) * h + h_in) * _U(w) + _U(w0)
                        dst = _U(row + b_lo[pj] * g + k)
                        if g == 1 and sw == 1:
                            for j in range(width):
                                packed[dst + j] = xf[src + j]
                        else:
                            for j in range(width):
                                packed[dst + j * ug] = xf[src + j * usw]


@njit(cache=True, inline="always")
def fill_zero(a, start, count):
    """a[start : start + count] = 0 (uint64 bounds)."""
    for k in range(count):
        a[start + k] = 0.0
