"""How the runtime stores an activation between two steps: zero-bordered, image-grouped NCHW.

A batch of N activations of per-image shape (C, H, W) lives in one flat float32
buffer of N/G blocks; with (ph, pw) the border and G the image group,

    buf[blk, c, ph + h, pw + w, k] = x[blk*G + k, c, h, w]      blk < N/G, k < G

and every border element is zero. (ph, pw) = (0, 0), G = 1 is plain NCHW. Why:

- a stride-1 conv with padding (p, q) <= (ph, pw) reads its input straight from
  such a buffer (it is exactly the packed input of `packing`), so the producer's
  epilogue writes the next conv's input and no copy happens between them;
- G = N for small planes keeps the kernels' inner loops long (`packing.image_group`);
- a flat (features,) value is stored as (F, 1, 1) with G = N, i.e. feature-major
  (F, N), which is the operand layout of `spmm`; a (C, H, W) value with no border
  and G = N flattens to it without a copy.

Kernels never write a border: buffers are zeroed once when allocated and the
runtime only reuses a bordered buffer for values of the same geometry.
In numba kernels a layout is an int64 array `lay` = [C, H, W, ph, pw, G];
`row_offset(lay, blk, c, h)` is where the interior row h of channel c of block
blk starts; that row holds W*G contiguous values (pixel-major, image innermost).
`image_row_offset` is the same for one image, `row_stride` the step to the next
row (kernels that cross image groups compute an image's position once and step
by rows: the divisions by the runtime group cost more than a small row's copy).

Caveat for editors: `row_offset` is inlined into kernels of other files, and
numba's on-disk cache keys a kernel on its own file only: after editing it,
delete kernels/__pycache__/*.nbi and *.nbc (as for `epilogue.apply_act`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit


@dataclass(frozen=True)
class Layout:
    """Geometry of one activation buffer (see the module docstring)."""

    channels: int
    height: int
    width: int
    pad_h: int = 0
    pad_w: int = 0
    group: int = 1

    @property
    def padded_hw(self) -> tuple[int, int]:
        return self.height + 2 * self.pad_h, self.width + 2 * self.pad_w

    def size(self, n: int) -> int:
        """float32 elements of the buffer for a batch of n (a multiple of the group)."""
        hp, wp = self.padded_hw
        return n * self.channels * hp * wp

    def params(self) -> np.ndarray:
        """The int64 [C, H, W, ph, pw, G] array numba kernels take."""
        return np.array([self.channels, self.height, self.width, self.pad_h, self.pad_w, self.group], np.int64)

    def check_batch(self, n: int) -> None:
        if n < 0 or n % self.group:
            raise ValueError(f"layout {self}: image group {self.group} does not divide batch {n}")


def to_layout(x: np.ndarray, layout: Layout) -> np.ndarray:
    """NumPy reference: the flat buffer holding NCHW `x` in `layout` (borders zero)."""
    n, c, h, w = x.shape
    if (c, h, w) != (layout.channels, layout.height, layout.width):
        raise ValueError(f"to_layout: input {x.shape} does not match {layout}")
    layout.check_batch(n)
    g = layout.group
    hp, wp = layout.padded_hw
    buf = np.zeros((n // g, c, hp, wp, g), np.float32)
    blocks = x.reshape(n // g, g, c, h, w).transpose(0, 2, 3, 4, 1)  # (blk, C, H, W, G)
    buf[:, :, layout.pad_h:layout.pad_h + h, layout.pad_w:layout.pad_w + w, :] = blocks
    return buf.reshape(-1)


def from_layout(buf: np.ndarray, layout: Layout, n: int) -> np.ndarray:
    """NumPy reference: the NCHW (n, C, H, W) array a buffer in `layout` holds."""
    layout.check_batch(n)
    g = layout.group
    c, h, w = layout.channels, layout.height, layout.width
    hp, wp = layout.padded_hw
    blocks = np.asarray(buf)[: layout.size(n)].reshape(n // g, c, hp, wp, g)
    inner = blocks[:, :, layout.pad_h:layout.pad_h + h, layout.pad_w:layout.pad_w + w, :]
    return np.ascontiguousarray(inner.transpose(0, 4, 1, 2, 3).reshape(n, c, h, w))


def borders_are_zero(buf: np.ndarray, layout: Layout, n: int) -> bool:
    """True when every border element of the buffer is zero (a test invariant)."""
    g = layout.group
    hp, wp = layout.padded_hw
    blocks = np.asarray(buf)[: layout.size(n)].reshape(n // g, layout.channels, hp, wp, g)
    inner = np.zeros(blocks.shape, bool)
    inner[:, :, layout.pad_h:layout.pad_h + layout.height, layout.pad_w:layout.pad_w + layout.width, :] = True
    return not blocks[~inner].any()


@njit(cache=True, inline="always")
def row_offset(lay, blk, c, h):
    """Start of interior row h of channel c of image block blk in a buffer of layout `lay`."""
    hp = lay[1] + 2 * lay[3]
    wp = lay[2] + 2 * lay[4]
    return (((blk * lay[0] + c) * hp + h + lay[3]) * wp + lay[4]) * lay[5]


@njit(cache=True, inline="always")
def image_row_offset(lay, img, c, h):
    """Start of row h of channel c of image img (not image block) in a buffer of layout `lay`;
    the row's W values follow G apart."""
    return row_offset(lay, img // lay[5], c, h) + img % lay[5]


@njit(cache=True, inline="always")
def row_stride(lay):
    """Elements from one row of a channel to the next in a buffer of layout `lay`."""
    return (lay[2] + 2 * lay[4]) * lay[5]
