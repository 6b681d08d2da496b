"""Direct sparse 2-D convolution over a CSR weight, with the fused epilogue.

No im2col: the input is packed once (see `packing`), after which every nonzero
weight v at (o, c, i, j) adds v times one contiguous run of the packed input to
output channel o's accumulator. The output domain of an image block (Ho rows of
wq pixels of G images, minus the trailing garbage columns) is cut into tiles
small enough to stay in L1; work items are (image block, tile, run of output
channels), in that order, and the channel runs are balanced by nonzero count, so
a static `prange` split gives each thread the same work and the input rows of a
tile stay in its cache.

At batch 16 a 64-channel 32x32 layer's tile reads ~800 KiB of input, so its
runs stream from L2 (`_loop_ceiling`'s L2 row). Blocking the other way round,
8 vectors of output in registers and a few input channels at a time so the
input sits in L1 while every output channel uses it, was measured slower:
64 channels at 9% density, batch 16, 1.9-2.4 ms against 1.5-1.6; even with
the whole input in L1 (4 channels of 8x8) it only matched this loop, 42
against 44 GFLOP/s on one core. Long runs from L2, which the prefetcher
streams, are as fast as short ones from L1.

A strided conv whose input buffer holds a multiple of 16 images per group (whole
vectors per pixel) can skip the pack (`plan_sparse_conv2d(..., in_place=True)`): it reads the
bordered runtime buffer itself, each output row one run whose vectors are the
stride apart (`accumulate_rows`). Alone this is slower than the conv on a pack
(64->128 channels, 32x32 -> 16x16 at 7%, batch 16: 1.0-1.4 ms against 0.7-0.8,
with every other 64-byte line of a run unread, from L3), but the pack it saves
cost 0.1-0.6 ms in the model, and a block's output can now overwrite its residual:
HARP ResNet18 at batch 16 took 13.97 ms against 14.84 (medians of 100 runs,
alternating in one process).

`plan_sparse_conv2d` decodes the CSR columns into packed-input offsets once per
(weight, input size); `sparse_conv2d` validates, packs and runs the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numba
import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .csr import INDEX_DTYPES, balanced_blocks
from .epilogue import apply_act, resolve_conv_epilogue
from .layout import Layout, row_offset, row_stride
from .packing import image_group, pack_input, packed_hw, packed_size, tap_offsets
from .reference import conv2d_output_hw
from .simd import LANES, vadd, vfma, vload, vmask, vmul, vsplat, vstore

_U = np.uint64

# Accumulator tile, in float32 elements (images x pixels): 8 KiB sits in L1 with room
# for the input runs streaming past it.
TILE_ELEMS = 2048

# Only let LLVM fuse a*b + c into one FMA (one rounding instead of two); no
# reassociation, so results stay deterministic and NaN/inf behave as in IEEE.
FASTMATH = {"contract"}


@dataclass(frozen=True)
class SparseConvPlan:
    """What a sparse conv needs beyond the CSR arrays, for one input size.

    `offsets[p]` is the position, in pixels of one image block of the packed input,
    where nonzero p's run starts (multiplied by the image group G at run time).
    With `in_place` and a stride > 1 the input is not a pack but a runtime layout
    buffer of border `border`, read at the stride (`packed_hw` is then its padded
    size, and each output row one run). Channel runs for the work split are
    cached per thread count.
    """

    weight_shape: tuple[int, int, int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    packed_hw: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    border: tuple[int, int]  # the padding of the packed input (>= padding)
    offsets: np.ndarray
    row_cost: np.ndarray
    in_place: bool = False
    _blocks: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def strided_rows(self) -> bool:
        """Whether the input is a layout buffer read in place at a stride > 1, one output row at a time."""
        return self.in_place and self.stride != (1, 1)

    @property
    def channel_pixels(self) -> int:
        """Pixels of one input channel of one image block in the input the kernel reads."""
        phases = 1 if self.strided_rows else self.stride[0] * self.stride[1]
        return phases * self.packed_hw[0] * self.packed_hw[1]

    def used_channels(self) -> np.ndarray:
        """One bool per input channel: does some nonzero weight read it (see `packing.bind_pack`)."""
        used = np.zeros(self.weight_shape[1] * self.groups, np.bool_)
        used[self.offsets // self.channel_pixels] = True
        return used

    def blocks(self, n_threads: int) -> np.ndarray:
        """Boundaries of `n_threads` runs of output channels with about equal work."""
        if n_threads not in self._blocks:
            self._blocks[n_threads] = balanced_blocks(self.row_cost, n_threads)
        return self._blocks[n_threads]


def plan_sparse_conv2d(indptr, indices, weight_shape, in_hw, stride=(1, 1), padding=(0, 0),
                       dilation=(1, 1), groups=1, border=None, in_place=False) -> SparseConvPlan:
    """Decode a CSR conv weight's columns into packed-input offsets for inputs of `in_hw`.

    `border` >= `padding`: the packed input has this padding, e.g. a runtime
    `layout` buffer read in place (stride 1) or a pack shared with another conv.
    `in_place`: the input is a runtime layout buffer with that border, read as it
    is at any stride; with a stride > 1 this needs an image group that is a
    multiple of 16 (whole vectors per pixel, see `bind_sparse_conv2d`).
    """
    o, cg, kh, kw = (int(d) for d in weight_shape)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    in_hw = _pair(in_hw)
    border = padding if border is None else _pair(border)
    _check_geometry("sparse_conv2d", o, cg, kh, kw, stride, padding, dilation, groups)
    if indices.dtype not in INDEX_DTYPES or indptr.dtype != np.int64 or indptr.shape != (o + 1,):
        raise ValueError(
            f"sparse_conv2d: CSR weight {weight_shape} needs int64 indptr of {o + 1} entries and "
            f"uint8/16/32 indices, got indptr {indptr.dtype} {indptr.shape}, indices {indices.dtype}"
        )
    out_hw = conv2d_output_hw(in_hw, (kh, kw), stride, padding, dilation)
    if out_hw[0] <= 0 or out_hw[1] <= 0:
        raise ValueError(f"sparse_conv2d: input {in_hw} gives empty output {out_hw} "
                         f"for weight {weight_shape}")
    strided_rows = in_place and stride != (1, 1)
    if strided_rows:  # a layout buffer: one plane per channel, taps at their padded coordinates
        hq, wq = in_hw[0] + 2 * border[0], in_hw[1] + 2 * border[1]
        chan_pix = hq * wq
        taps = tap_offsets((kh, kw), (1, 1), padding, dilation, in_hw, border=border)
    else:
        hq, wq = packed_hw(in_hw, stride, border)
        chan_pix = stride[0] * stride[1] * hq * wq
        taps = tap_offsets((kh, kw), stride, padding, dilation, in_hw, border=border)
    counts = np.diff(indptr)
    if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(counts < 0):
        raise ValueError(f"sparse_conv2d: indptr of weight {weight_shape} is not 0..nnz={indices.shape[0]} "
                         f"non-decreasing")
    cols = indices.astype(np.int64)
    if cols.size and int(cols.max()) >= cg * kh * kw:
        raise ValueError(f"sparse_conv2d: column index {int(cols.max())} out of range for weight "
                         f"{weight_shape} ({cg * kh * kw} columns)")
    rows = np.repeat(np.arange(o, dtype=np.int64), counts)
    channel = (rows // (o // groups)) * cg + cols // (kh * kw)
    offsets = channel * chan_pix + taps[cols % (kh * kw)]
    return SparseConvPlan(
        weight_shape=(o, cg, kh, kw), in_hw=in_hw, out_hw=out_hw, packed_hw=(hq, wq),
        stride=stride, padding=padding, dilation=dilation, groups=int(groups), border=border,
        offsets=np.ascontiguousarray(offsets, np.int64), row_cost=(counts + 1).astype(np.float64),
        in_place=bool(in_place),
    )


def sparse_conv2d(x, indptr, indices, values, weight_shape, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), groups=1, act="none", clip_range=None, residual=None, out=None,
                  plan: SparseConvPlan | None = None, workspace=None) -> np.ndarray:
    """act(conv2d(x, W) + bias + residual) for a CSR weight W of logical `weight_shape`.

    x: (N, C, H, W) float32. Pass a `plan` from `plan_sparse_conv2d` (for this
    weight, geometry and input size; `indices` is then not read) to skip decoding
    the weight, and a float32 `workspace` of `sparse_conv2d_workspace(plan, N)`
    elements to skip allocating the packed input. `out` may be `x` or `residual`
    (the input is copied before the first write, and each output element reads its
    residual right before overwriting it).
    """
    op = "sparse_conv2d"
    x = _check_input(op, x, weight_shape, groups)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    if plan is None:
        plan = plan_sparse_conv2d(indptr, indices, weight_shape, x.shape[2:], *geometry)
    elif (plan.in_hw, plan.weight_shape) != (tuple(x.shape[2:]), tuple(weight_shape)) or (
            plan.stride, plan.padding, plan.dilation, plan.groups) != geometry or plan.border != plan.padding:
        raise ValueError(f"{op}: plan is for input {plan.in_hw}, weight {plan.weight_shape}, stride "
                         f"{plan.stride}, padding {plan.padding} (border {plan.border}), dilation "
                         f"{plan.dilation}, groups {plan.groups}; got input {x.shape[2:]}, weight "
                         f"{tuple(weight_shape)}, stride/padding/dilation/groups {geometry}")
    if plan.strided_rows:
        raise ValueError(f"{op}: the plan reads a layout buffer in place at stride {plan.stride}; this function "
                         f"packs its input, so pass a plan made without in_place (or use bind_sparse_conv2d)")
    n = x.shape[0]
    o = plan.weight_shape[0]
    ho, wo = plan.out_hw
    act_code, lo, hi, bias, out, out_layout, residual, res_layout = resolve_conv_epilogue(
        op, (n, o, ho, wo), act, clip_range, bias, residual, out)
    group = image_group(n, (ho - 1) * plan.packed_hw[1] + wo)
    packed = pack_input(x, plan.stride, plan.padding, group, workspace,
                        allow_view=not np.may_share_memory(out, x))
    run = bind_sparse_conv2d(plan, indptr, values, packed, n, group, bias, act_code, lo, hi,
                             residual, res_layout, out.reshape(-1), out_layout)
    run()
    return out


def bind_sparse_conv2d(plan: SparseConvPlan, indptr, values, packed, n: int, group: int, bias, act: int,
                       lo, hi, residual, res_layout: Layout | None, out, out_layout: Layout,
                       n_threads: int | None = None) -> Callable[[], None]:
    """A no-argument callable computing the conv of `plan` from a packed input into `out`.

    packed: flat float32, the packed input (or a runtime layout buffer) of a batch
    of n images in groups of `group`, laid out for `plan` (border included);
    out / residual: flat float32 buffers in `out_layout` / `res_layout` (the
    output geometry; any border and image group). `act, lo, hi` come from
    `epilogue.resolve_activation`. Everything is checked here, once; the callable
    only runs the kernel, so the runtime can call it on every request.
    """
    op = "sparse_conv2d"
    o, cg, _, _ = plan.weight_shape
    ho, wo = plan.out_hw
    hq, wq = plan.packed_hw
    channels = cg * plan.groups
    if group < 1 or n % group:
        raise ValueError(f"{op}: image group {group} does not divide batch {n}")
    if plan.strided_rows and group % LANES:
        raise ValueError(f"{op}: reading a layout buffer in place at stride {plan.stride} needs an image "
                         f"group that is a multiple of {LANES}, got {group}")
    block_elems = channels * plan.channel_pixels * group
    _check_flat(op, "packed input", packed, block_elems * (n // group))
    if values.dtype != np.float32 or values.shape != plan.offsets.shape or not values.flags.c_contiguous:
        raise ValueError(f"{op}: values must be contiguous float32 with one entry per nonzero "
                         f"({plan.offsets.shape[0]}), got {values.dtype} {values.shape}")
    if indptr.dtype != np.int64 or indptr.shape != (o + 1,):
        raise ValueError(f"{op}: indptr must be int64 of {o + 1} entries, got {indptr.dtype} {indptr.shape}")
    res_params, has_res = _check_output_layouts(op, (o, ho, wo), n, out, out_layout, residual, res_layout)
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    # A strided in-place read has no garbage columns: its output pixels are numbered ho x wo.
    out_wq, row_pix, col_step = (wo, plan.stride[0] * wq, plan.stride[1]) if plan.strided_rows else (wq, 0, 0)
    tile_pix = equal_tiles((ho - 1) * out_wq + wo, max(1, TILE_ELEMS // group))
    threads = numba.get_num_threads() if n_threads is None else n_threads
    res = residual if has_res else _NO_RES
    return partial(_sparse_conv, packed, block_elems, plan.offsets, as_kernel_array(indptr),
                   as_kernel_array(values), n, group, ho, wo, out_wq, tile_pix, plan.blocks(threads), bias,
                   act, np.float32(lo), np.float32(hi), res, res_params, has_res, out, out_layout.params(),
                   row_pix, col_step)


def equal_tiles(length: int, most: int) -> int:
    """The tile size cutting `length` into as few tiles of at most `most` as possible, all about equal.

    Equal tiles keep a static split of the work items balanced: 286 pixels in tiles
    of 128 would leave one thread two full tiles and the other a full one and 30 pixels.
    """
    count = -(-length // most)
    return -(-length // count)


def _check_flat(op, what, a, size) -> None:
    if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 1 or a.shape[0] < size
            or not a.flags.c_contiguous):
        raise ValueError(f"{op}: {what} must be a flat contiguous float32 array of >= {size} elements, "
                         f"got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")


_NO_RES = np.zeros(1, np.float32)


def _check_output_layouts(op, chw, n, out, out_layout, residual, res_layout) -> tuple[np.ndarray, bool]:
    """Check the output and residual buffers of an epilogue; (residual layout params, has residual)."""
    if (out_layout.channels, out_layout.height, out_layout.width) != tuple(chw):
        raise ValueError(f"{op}: output layout {out_layout} does not hold a {tuple(chw)} output")
    out_layout.check_batch(n)
    _check_flat(op, "out", out, out_layout.size(n))
    if not out.flags.writeable:
        raise ValueError(f"{op}: out is read-only")
    if residual is None:
        return out_layout.params(), False
    if res_layout is None or (res_layout.channels, res_layout.height, res_layout.width) != tuple(chw):
        raise ValueError(f"{op}: residual layout {res_layout} does not hold a {tuple(chw)} output")
    res_layout.check_batch(n)
    _check_flat(op, "residual", residual, res_layout.size(n))
    if np.may_share_memory(out, residual) and (res_layout != out_layout or out.ctypes.data != residual.ctypes.data):
        raise ValueError(f"{op}: out may be the residual buffer itself, in the same layout, "
                         f"but must not overlap it otherwise")
    return res_layout.params(), True


def sparse_conv2d_workspace(plan: SparseConvPlan, n: int) -> int:
    """float32 elements of the workspace `sparse_conv2d` needs for batch `n`."""
    return packed_size(n, plan.weight_shape[1] * plan.groups, plan.in_hw, plan.stride, plan.padding)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _sparse_conv(packed, block_elems, offsets, indptr, values, n, g, ho, wo, wq, tile_pix, blocks,
                 bias, act, lo, hi, res, res_lay, has_res, out, out_lay, row_pix, col_step):
    # Work item = (image block, tile of output pixels, run of output channels), in that
    # order, so each thread gets consecutive tiles and their input rows stay cached.
    # col_step 0: a packed input, where a tile is one run; else a layout buffer read in
    # place, output row oh at input pixel oh*row_pix, its pixels col_step apart (wq = wo).
    l_pix = (ho - 1) * wq + wo
    n_tiles = (l_pix + tile_pix - 1) // tile_pix
    n_blocks = blocks.shape[0] - 1
    per_image_block = n_tiles * n_blocks
    for item in prange((n // g) * per_image_block):
        img_block, block, q0, q1 = work_item(item, per_image_block, n_blocks, tile_pix, l_pix)
        acc = np.empty((q1 - q0) * g, np.float32)
        start = img_block * block_elems + (q0 * g if col_step == 0 else 0)
        row_q, row_src = tile_rows(q0, q1, wo, row_pix, col_step, g)
        for o in range(blocks[block], blocks[block + 1]):
            if col_step == 0:
                accumulate_row(acc, packed, offsets, values, indptr[o], indptr[o + 1], start, g)
            else:
                accumulate_rows(acc, packed, offsets, values, indptr[o], indptr[o + 1], start, g, q0, row_q,
                                row_src, col_step)
            store_tile(acc, o, q0, q1, img_block, g, ho, wq, wo, bias[o], act, lo, hi,
                       res, res_lay, has_res, out, out_lay)


@njit(cache=True, inline="always", error_model="numpy")
def work_item(item, per_image_block, n_blocks, tile_pix, l_pix):
    """(image block, channel block, first and end pixel of the tile) of work item `item`, blocks innermost."""
    img_block = item // per_image_block
    rest = item - img_block * per_image_block
    tile = rest // n_blocks
    q0 = tile * tile_pix
    return img_block, rest - tile * n_blocks, q0, min(q0 + tile_pix, l_pix)


@njit(cache=True, inline="always", error_model="numpy")
def accumulate_row(acc, packed, offsets, values, p0, p1, start, g):
    """acc[k] = sum over nonzeros p in [p0, p1) of values[p] * packed[offsets[p]*g + start + k].

    Eight (then four, then the last 1-3: `_last3`) nonzeros per pass over acc
    cut its loads and stores, and the first pass assigns instead of adding to
    zeros. Each pass runs on explicit vectors (`simd`), the last one masked:
    LLVM's own vectorisation of this loop left a tail of up to 15 values to
    4-lane and scalar loops (256 channels of an 8x8 plane at batch 1, runs of
    78 values, 18% dense: 264-414 µs that way, 230-307 µs now).
    """
    length = acc.shape[0]
    full = length - length % LANES
    tail = vmask(length - full)
    p = p0
    first = True
    while p + 8 <= p1:
        s0, s1, s2, s3, s4, s5, s6, s7 = _starts8(offsets, p, g, start)
        w0, w1, w2, w3, w4, w5, w6, w7 = _weights8(values, p)
        for k in range(0, full, LANES):
            _add8(acc, k, LANES, first, packed, k, s0, s1, s2, s3, s4, s5, s6, s7, w0, w1, w2, w3, w4, w5, w6, w7)
        if full < length:
            _add8(acc, full, tail, first, packed, full, s0, s1, s2, s3, s4, s5, s6, s7, w0, w1, w2, w3, w4, w5, w6, w7)
        first = False
        p += 8
    if p + 4 <= p1:
        s0, s1, s2, s3 = _starts4(offsets, p, g, start)
        w0, w1, w2, w3 = _weights4(values, p)
        for k in range(0, full, LANES):
            _add4(acc, k, LANES, first, packed, k, s0, s1, s2, s3, w0, w1, w2, w3)
        if full < length:
            _add4(acc, full, tail, first, packed, full, s0, s1, s2, s3, w0, w1, w2, w3)
        first = False
        p += 4
    if p < p1:  # the last 1-3 nonzeros in one pass
        s0, s1, s2, w0, w1, w2 = _last3(offsets, values, p, p1, g, start)
        for k in range(0, full, LANES):
            _add3(acc, k, LANES, first, packed, k, s0, s1, s2, w0, w1, w2)
        if full < length:
            _add3(acc, full, tail, first, packed, full, s0, s1, s2, w0, w1, w2)
        first = False
    if first:  # an empty row
        acc[:] = 0.0


@njit(cache=True, inline="always", error_model="numpy")
def tile_rows(q0, q1, wo, row_pix, col_step, g):
    """The output rows of tile q0..q1 for `accumulate_rows`: (row_q, row_src).

    Row r of the tile is output pixels row_q[r]..row_q[r + 1]; row_src[r] is
    where its first pixel's input starts, in floats from the image block's start.
    (Two empty arrays for a packed input, col_step 0.)
    """
    rows = (q1 - 1) // wo - q0 // wo + 1 if col_step else 0
    row_q = np.empty(rows + 1, np.int64)
    row_src = np.empty(rows, np.int64)
    row_q[0] = q0
    for r in range(rows):
        oh = row_q[r] // wo
        row_q[r + 1] = min(q1, (oh + 1) * wo)
        row_src[r] = (oh * row_pix + (row_q[r] - oh * wo) * col_step) * g
    return row_q, row_src


@njit(cache=True, inline="always", error_model="numpy")
def accumulate_rows(acc, packed, offsets, values, p0, p1, start, g, q0, row_q, row_src, col_step):
    """`accumulate_row` for a tile of an input read in place at a stride, image group g a multiple of 16.

    Output pixel q is acc[(q - q0)*g :][:g]; pixel j of row r of the tile
    (`tile_rows`) reads packed[offsets[p]*g + start + row_src[r] + j*col_step*g :][:g],
    g/16 whole vectors, no tail. The rows are walked inside each group of
    nonzeros, so a group's offsets and weights are loaded once per tile.
    """
    rows = row_src.shape[0]
    step = col_step * g
    vectors = g // LANES
    p = p0
    first = True
    while p + 8 <= p1:
        s0, s1, s2, s3, s4, s5, s6, s7 = _starts8(offsets, p, g, start)
        w0, w1, w2, w3, w4, w5, w6, w7 = _weights8(values, p)
        for r in range(rows):
            for j in range(row_q[r + 1] - row_q[r]):
                for v in range(vectors):
                    _add8(acc, (row_q[r] - q0 + j) * g + v * LANES, LANES, first, packed,
                          row_src[r] + j * step + v * LANES, s0, s1, s2, s3, s4, s5, s6, s7,
                          w0, w1, w2, w3, w4, w5, w6, w7)
        first = False
        p += 8
    if p + 4 <= p1:
        s0, s1, s2, s3 = _starts4(offsets, p, g, start)
        w0, w1, w2, w3 = _weights4(values, p)
        for r in range(rows):
            for j in range(row_q[r + 1] - row_q[r]):
                for v in range(vectors):
                    _add4(acc, (row_q[r] - q0 + j) * g + v * LANES, LANES, first, packed,
                          row_src[r] + j * step + v * LANES, s0, s1, s2, s3, w0, w1, w2, w3)
        first = False
        p += 4
    if p < p1:
        s0, s1, s2, w0, w1, w2 = _last3(offsets, values, p, p1, g, start)
        for r in range(rows):
            for j in range(row_q[r + 1] - row_q[r]):
                for v in range(vectors):
                    _add3(acc, (row_q[r] - q0 + j) * g + v * LANES, LANES, first, packed,
                          row_src[r] + j * step + v * LANES, s0, s1, s2, w0, w1, w2)
        first = False
    if first:  # an empty row
        acc[:] = 0.0


@njit(cache=True, inline="always", error_model="numpy")
def _starts4(offsets, p, g, start):
    """Where the runs of nonzeros p..p+3 start in the packed input."""
    return offsets[p] * g + start, offsets[p + 1] * g + start, offsets[p + 2] * g + start, offsets[p + 3] * g + start


@njit(cache=True, inline="always", error_model="numpy")
def _starts8(offsets, p, g, start):
    """`_starts4` for nonzeros p..p+7."""
    return _starts4(offsets, p, g, start) + _starts4(offsets, p + 4, g, start)


@njit(cache=True, inline="always", error_model="numpy")
def _weights4(values, p):
    """The weights of nonzeros p..p+3, each in every lane of a vector."""
    return vsplat(values[p]), vsplat(values[p + 1]), vsplat(values[p + 2]), vsplat(values[p + 3])


@njit(cache=True, inline="always", error_model="numpy")
def _weights8(values, p):
    """`_weights4` for nonzeros p..p+7."""
    return _weights4(values, p) + _weights4(values, p + 4)


@njit(cache=True, inline="always", error_model="numpy")
def _add8(acc, k, mask, first, packed, kx, s0, s1, s2, s3, s4, s5, s6, s7, w0, w1, w2, w3, w4, w5, w6, w7):
    """acc[k : k + 16] (=, or += unless first) w0 x0 + ... + w7 x7, x_i = packed[s_i + kx :], left to right.

    mask: LANES, or a `vmask` for the last, partial vector.
    """
    t = vmul(w0, vload(packed, s0 + kx, mask))
    t = vfma(w1, vload(packed, s1 + kx, mask), t)
    t = vfma(w2, vload(packed, s2 + kx, mask), t)
    t = vfma(w3, vload(packed, s3 + kx, mask), t)
    t = vfma(w4, vload(packed, s4 + kx, mask), t)
    t = vfma(w5, vload(packed, s5 + kx, mask), t)
    t = vfma(w6, vload(packed, s6 + kx, mask), t)
    t = vfma(w7, vload(packed, s7 + kx, mask), t)
    vstore(acc, k, mask, t if first else vadd(vload(acc, k, mask), t))


@njit(cache=True, inline="always", error_model="numpy")
def _add4(acc, k, mask, first, packed, kx, s0, s1, s2, s3, w0, w1, w2, w3):
    """`_add8` for four nonzeros."""
    t = vmul(w0, vload(packed, s0 + kx, mask))
    t = vfma(w1, vload(packed, s1 + kx, mask), t)
    t = vfma(w2, vload(packed, s2 + kx, mask), t)
    t = vfma(w3, vload(packed, s3 + kx, mask), t)
    vstore(acc, k, mask, t if first else vadd(vload(acc, k, mask), t))


@njit(cache=True, inline="always", error_model="numpy")
def _last3(offsets, values, p, p1, g, start):
    """Starts and weights of the last 1-3 nonzeros p..p1-1, padded to three with weight 0 at p's run.

    One pass over the accumulator for them, not one each (the padding reads a
    line already in L1). Alone, batch 16: ResNet18's 64->128 1x1 stride-2
    shortcut at 11% took 326 µs against 363, others within 0-8% (layers whose
    rows are mostly groups of 8 gain least). A padded product is 0 x a finite
    input value; an infinite one would give NaN where the exact sum is inf.
    """
    s0 = offsets[p] * g + start
    s1 = offsets[p + 1] * g + start if p + 1 < p1 else s0
    s2 = offsets[p + 2] * g + start if p + 2 < p1 else s0
    w1 = values[p + 1] if p + 1 < p1 else np.float32(0.0)
    w2 = values[p + 2] if p + 2 < p1 else np.float32(0.0)
    return s0, s1, s2, vsplat(values[p]), vsplat(w1), vsplat(w2)


@njit(cache=True, inline="always", error_model="numpy")
def _add3(acc, k, mask, first, packed, kx, s0, s1, s2, w0, w1, w2):
    """`_add8` for three nonzeros."""
    t = vmul(w0, vload(packed, s0 + kx, mask))
    t = vfma(w1, vload(packed, s1 + kx, mask), t)
    t = vfma(w2, vload(packed, s2 + kx, mask), t)
    vstore(acc, k, mask, t if first else vadd(vload(acc, k, mask), t))


@njit(cache=True, inline="always", error_model="numpy")
def store_tile(acc, o, q0, q1, blk, g, ho, wq, wo, b, act, lo, hi, res, res_lay, has_res, out, out_lay):
    """out = act(acc + b + res) for output channel o, packed pixels q0..q1 of image block blk.

    Pixel q is (oh, ow) = divmod(q, wq); columns ow >= wo are garbage and dropped.
    acc holds (q1 - q0) pixels of g images each, image innermost. `out` and `res`
    are flat buffers in layouts `out_lay` and `res_lay` (see `layout`); `res` is
    read only when `has_res`. When both use image group g, each output row is one
    contiguous run; otherwise images are written one by one. When, in addition,
    their rows are wq pixels apart (a border of (wq - wo) / 2, the next stride-1
    conv's padding), the whole tile is one run: the garbage columns land on the
    border, which is zeroed again afterwards (32 rows of 32 values cost more as
    rows: the 3->64 first conv at batch 16 took 283 µs that way, 199 as one run).
    """
    same = out_lay[5] == g and (not has_res or res_lay[5] == g)
    pitch = wq * g
    if same and row_stride(out_lay) == pitch and (not has_res or row_stride(res_lay) == pitch):
        _store_run(acc, o, q0, q1, blk, g, wq, wo, b, act, lo, hi, res, res_lay, has_res, out, out_lay)
        return
    oh = q0 // wq
    row_start = oh * wq
    while row_start < q1 and oh < ho:
        c0 = max(q0 - row_start, 0)
        c1 = min(q1 - row_start, wo)
        width = max(c1 - c0, 0)
        src0 = (row_start + c0 - q0) * g
        if same:
            src = _U(src0)
            dst = _U(row_offset(out_lay, blk, o, oh) + c0 * g)
            run = _U(width * g)
            if has_res:
                r = _U(row_offset(res_lay, blk, o, oh) + c0 * g)
                for j in range(run):
                    out[dst + j] = apply_act(acc[src + j] + b + res[r + j], act, lo, hi)
            else:
                for j in range(run):
                    out[dst + j] = apply_act(acc[src + j] + b, act, lo, hi)
        else:
            gd = out_lay[5]
            gr = res_lay[5]
            for k in range(g):
                img = blk * g + k
                src = _U(src0 + k)
                dst = _U(row_offset(out_lay, img // gd, o, oh) + c0 * gd + img % gd)
                if has_res:
                    r = _U(row_offset(res_lay, img // gr, o, oh) + c0 * gr + img % gr)
                    for j in range(_U(width)):
                        out[dst + j * _U(gd)] = apply_act(acc[src + j * _U(g)] + b + res[r + j * _U(gr)],
                                                          act, lo, hi)
                else:
                    for j in range(_U(width)):
                        out[dst + j * _U(gd)] = apply_act(acc[src + j * _U(g)] + b, act, lo, hi)
        oh += 1
        row_start += wq


@njit(cache=True, inline="always", error_model="numpy")
def _store_run(acc, o, q0, q1, blk, g, wq, wo, b, act, lo, hi, res, res_lay, has_res, out, out_lay):
    """`store_tile` where packed pixel q of the tile is element q*g of channel o's plane in `out`."""
    dst = _U(row_offset(out_lay, blk, o, 0) + q0 * g)
    run = _U((q1 - q0) * g)
    if has_res:
        r = _U(row_offset(res_lay, blk, o, 0) + q0 * g)
        for j in range(run):
            out[dst + j] = apply_act(acc[j] + b + res[r + j], act, lo, hi)
    else:
        for j in range(run):
            out[dst + j] = apply_act(acc[j] + b, act, lo, hi)
    zero_garbage(out, dst, q0, q1, wq, wo, g)


@njit(cache=True, inline="always", error_model="numpy")
def zero_garbage(out, dst, q0, q1, wq, wo, g):
    """Zero the garbage columns of packed pixels q0..q1 stored as one run from out[dst].

    Columns wo..wq-1 of a row are the right border of that row and the left one of the next.
    """
    garbage = (q0 // wq) * wq + wo
    while garbage < q1:
        for j in range(_U((max(garbage, q0) - q0) * g), _U((min(garbage + wq - wo, q1) - q0) * g)):
            out[_U(dst) + j] = 0.0
        garbage += wq


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _check_geometry(op, o, cg, kh, kw, stride, padding, dilation, groups):
    if groups < 1 or o % groups or min(o, cg, kh, kw) < 1:
        raise ValueError(f"{op}: weight ({o}, {cg}, {kh}, {kw}) does not fit groups={groups}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: bad stride {stride}, padding {padding} or dilation {dilation}")


def _check_input(op, x, weight_shape, groups) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
        raise ValueError(f"{op}: input must be a float32 NCHW array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if x.shape[1] != weight_shape[1] * groups:
        raise ValueError(f"{op}: input {x.shape} has {x.shape[1]} channels, weight {tuple(weight_shape)} "
                         f"with groups={groups} expects {weight_shape[1] * groups}")
    return as_kernel_array(x)
