"""Dense fallbacks for layers too dense for the sparse kernels, in numba (and BLAS for big linear batches).

3x3 stride-1 convs have a third kernel, `winograd`, whose products run on the pixel-major one here.

The conv reads the packed input of the sparse kernel (see `packing`): column k =
(input channel, tap) of a group's (O, K) weight matrix multiplies the contiguous
run of packed input that starts at pixel `src[grp, k]`. Two register-blocked
kernels compute the product without an im2col copy:

- pixel-major: a GEMM micro-kernel on explicit 16-lane vectors (`simd`). A
  block of 6 output channels x 4 vectors of output (24 vector accumulators)
  stays in registers for the whole sum over columns; each column costs 4
  vector loads and 6 broadcasts for 24 FMAs. The vectors are cut row by row
  where that skips the garbage columns (`tile_vectors`; 4x4 planes at batch
  16 went from 7957 to 5512 µs for 512 channels, 8x8 from 7950 to 6208 µs
  for 256). A tail of up to 3 vectors runs as one-vector passes (an 8x8
  plane at batch 1, 78 values, went from 824 to 440-550 µs for 256
  channels). For runs of at least MIN_PIXEL_RUN values.
- channel-major: 4 output pixels x 4 columns per pass, vectorised (by LLVM)
  along output channels of a transposed copy of the weight (`weight_slabs`).
  For small planes at small batch: a 4x4 plane at batch 1 has runs of 22
  values but hundreds of output channels. Its accumulators are separate
  arrays, not rows of one 2-D array: LLVM vectorises a pass only when it can
  tell the stores of the four rows apart (measured: 13 vs 70 GFLOP/s on one
  core).

Both kernels' weight copies are made once, on first use. Measured on 2 cores
against onnxruntime's conv alone: the pixel-major kernel runs at 150-185
GFLOP/s on 32x32 and 16x16 planes, about onnxruntime's speed (the
auto-vectorised kernel it replaced, 4 channels x 4 columns per pass with its
accumulators in memory, reached 110-140); the channel-major one at 105-135.
Both replaced im2col + OpenBLAS, which ran 3-10x slower on these skinny
products.

Linear layers of up to SMALL_BATCH columns run the channel-major kernel; larger
batches run NumPy's `np.dot` (OpenBLAS). Once `threads.set_num_threads(n)` has
pinned BLAS to one thread, each product is split by output rows across n Python
threads (np.dot releases the GIL); see `threads` for why BLAS's own threads are
avoided.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial

import numba
import numpy as np
from numba import njit, prange

from .conv import (FASTMATH, _NO_RES, _check_flat, _check_geometry, _check_input, _check_output_layouts, _pair,
                   equal_tiles, store_tile)
from .epilogue import apply_act, resolve_activation, resolve_bias, resolve_conv_epilogue, resolve_out, resolve_residual
from .layout import Layout, row_offset
from .packing import image_group, pack_input, packed_hw, tap_offsets
from .reference import conv2d_output_hw
from .simd import LANES, vfma, vload, vmask, vsplat, vstore, vzero
from .threads import dense_split

_U = np.uint64

# Runs (packed pixels x images of an output plane) shorter than this use the channel-major kernel
# (measured: the two are even at 78 values, an 8x8 plane at batch 1; below 64 a chunk is mostly padding).
MIN_PIXEL_RUN = 64
# Pixel-major tile, in float32 elements per output channel (a whole 32x32 plane at batch 1 is one tile).
PIXEL_TILE_ELEMS = 4096
# Pixel-major register block: BLOCK_CHANNELS output channels x 4 vectors of output elements.
BLOCK_CHANNELS = 6
# Channel-major: output channels per slab of the transposed weight (four accumulators of 1 KiB).
CHANNEL_SLAB = 256
# Work items per thread the pixel-major kernel aims for (it splits output channels to get them).
ITEMS_PER_THREAD = 4
# Dense linear layers with at most this many columns (batch) run the channel-major kernel: it
# reads the weight once per 4 columns, and skips BLAS's thread hand-off (tens of µs at batch 1).
SMALL_BATCH = 4


@dataclass(frozen=True)
class DenseConvPlan:
    """A dense conv weight as one (O, K) matrix plus where each of its columns starts.

    `src[grp, k]` is the packed-input pixel (from an image block's start, times G
    at run time) where column k = (c*kh + i)*kw + j of group grp reads; `border`
    is the padding of the packed input (see `packing`).
    """

    weight2d: np.ndarray
    src: np.ndarray
    weight_shape: tuple[int, int, int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    packed_hw: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    border: tuple[int, int]

    @cached_property
    def weight_slabs(self) -> np.ndarray:
        """The channel-major kernel's copy of the weight (see `weight_slabs`), made on first use."""
        return weight_slabs(self.weight2d, self.groups)

    @cached_property
    def weight_blocks(self) -> np.ndarray:
        """The pixel-major kernel's copy: the weight in blocks of BLOCK_CHANNELS channels, made on first use."""
        return weight_slabs(self.weight2d, self.groups, BLOCK_CHANNELS)


def weight_slabs(weight2d: np.ndarray, groups: int = 1, width: int | None = None) -> np.ndarray:
    """An (O, K) weight of `groups` groups as (groups * slabs, K, width), output channels innermost.

    Slab s of group grp holds W[grp*og + s*width + j, k] at [grp*slabs + s, k, j],
    zero beyond the group's og channels. The channel-major kernel takes the
    default width (up to CHANNEL_SLAB, a multiple of 16); the pixel-major one
    blocks of BLOCK_CHANNELS.
    """
    og = weight2d.shape[0] // groups
    if width is None:
        width = min(CHANNEL_SLAB, -(-og // 16) * 16)
    slabs = -(-og // width)
    w = np.zeros((groups, slabs * width, weight2d.shape[1]), np.float32)
    w[:, :og] = weight2d.reshape(groups, og, -1)
    return np.ascontiguousarray(w.reshape(groups, slabs, width, -1).transpose(0, 1, 3, 2)
                                .reshape(groups * slabs, -1, width))


def plan_dense_conv2d(weight, in_hw, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                      border=None) -> DenseConvPlan:
    """Plan a dense conv of `weight` (O, C/groups, kh, kw) float32 on inputs of `in_hw`."""
    op = "dense_conv2d"
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 4:
        raise ValueError(f"{op}: weight must be a float32 (O, C/groups, kh, kw) array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    o, cg, kh, kw = weight.shape
    stride, padding, dilation, in_hw = _pair(stride), _pair(padding), _pair(dilation), _pair(in_hw)
    border = padding if border is None else _pair(border)
    _check_geometry(op, o, cg, kh, kw, stride, padding, dilation, groups)
    ho, wo = conv2d_output_hw(in_hw, (kh, kw), stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{op}: input {in_hw} gives empty output ({ho}, {wo}) for weight {weight.shape}")
    hq, wq = packed_hw(in_hw, stride, border)
    chan_pix = stride[0] * stride[1] * hq * wq
    taps = tap_offsets((kh, kw), stride, padding, dilation, in_hw, border=border)
    chans = np.arange(groups, dtype=np.int64)[:, None] * cg + np.arange(cg, dtype=np.int64)[None, :]
    src = (chans[:, :, None] * chan_pix + taps[None, None, :]).reshape(groups, cg * kh * kw)
    return DenseConvPlan(
        weight2d=np.ascontiguousarray(weight.reshape(o, cg * kh * kw)), src=np.ascontiguousarray(src),
        weight_shape=(o, cg, kh, kw), in_hw=in_hw, out_hw=(ho, wo), packed_hw=(hq, wq), stride=stride,
        padding=padding, dilation=dilation, groups=int(groups), border=border,
    )


def dense_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                 act="none", clip_range=None, residual=None, out=None) -> np.ndarray:
    """act(conv2d(x, weight) + bias + residual) with a dense float32 weight (O, C/groups, kh, kw)."""
    op = "dense_conv2d"
    plan = plan_dense_conv2d(weight, _check_input_hw(op, x), stride, padding, dilation, groups)
    x = _check_input(op, x, weight.shape, groups)
    n = x.shape[0]
    o = plan.weight_shape[0]
    ho, wo = plan.out_hw
    act_code, lo, hi, bias, out, out_layout, residual, res_layout = resolve_conv_epilogue(
        op, (n, o, ho, wo), act, clip_range, bias, residual, out)
    group = image_group(n, (ho - 1) * plan.packed_hw[1] + wo)
    packed = pack_input(x, plan.stride, plan.padding, group, allow_view=not np.may_share_memory(out, x))
    bind_dense_conv2d(plan, packed, n, group, bias, act_code, lo, hi, residual, res_layout,
                      out.reshape(-1), out_layout)()
    return out


def bind_dense_conv2d(plan: DenseConvPlan, packed, n: int, group: int, bias, act: int, lo, hi, residual,
                      res_layout: Layout | None, out, out_layout: Layout,
                      n_threads: int | None = None) -> Callable[[], None]:
    """A no-argument callable computing the conv of `plan` from a packed input into `out`.

    Arguments as for `conv.bind_sparse_conv2d`. The kernel (pixel- or
    channel-major) is chosen here from the length of the output plane's runs.
    """
    op = "dense_conv2d"
    o, cg, _, _ = plan.weight_shape
    ho, wo = plan.out_hw
    hq, wq = plan.packed_hw
    channels = cg * plan.groups
    if group < 1 or n % group:
        raise ValueError(f"{op}: image group {group} does not divide batch {n}")
    block_elems = channels * plan.stride[0] * plan.stride[1] * hq * wq * group
    _check_flat(op, "packed input", packed, block_elems * (n // group))
    res_params, has_res = _check_output_layouts(op, (o, ho, wo), n, out, out_layout, residual, res_layout)
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    res = residual if has_res else _NO_RES
    lo, hi = np.float32(lo), np.float32(hi)
    epilogue = (bias, act, lo, hi, res, res_params, has_res, out, out_layout.params())
    l_pix = (ho - 1) * wq + wo
    if l_pix * group < MIN_PIXEL_RUN:
        return partial(_dense_conv_channels, packed, block_elems, plan.src, plan.weight_slabs, n, group,
                       ho, wo, wq, *epilogue)
    threads = numba.get_num_threads() if n_threads is None else n_threads
    blocks = plan.weight_blocks
    tile_pix, runs = pixel_major_split(l_pix, group, n // group, plan.groups, blocks.shape[0] // plan.groups,
                                       threads)
    vectors, n_vectors = tile_vectors(l_pix, tile_pix, group, wq, wo)
    return partial(_dense_conv_pixels, packed, block_elems, plan.src, blocks, n, group, ho, wo, wq, tile_pix, runs,
                   vectors, n_vectors, *epilogue)


def tile_vectors(l_pix: int, tile_pix: int, group: int, wq: int, wo: int) -> tuple[np.ndarray, np.ndarray]:
    """The vectors `_dense_conv_pixels` computes each tile in, and how many each tile has.

    vectors (tiles, most vectors, 2) int64: each vector's (element offset in its tile,
    count); a tile's slots past its own vectors have count 0.

    A tile is packed pixels [q0, q1) of g images each; columns wo..wq-1 of a row are
    garbage. Cut into vectors of 16 elements straight through, a tile computes
    them too; cut row by row, it does not, but a row whose length is not a
    multiple of 16 ends in a part vector. Each tile takes the cut with fewer
    vectors (rows of 32 values at batch 1: 64 instead of 68 for a 32x32 plane;
    at 16 images a vector is one pixel, so no garbage is computed at all).
    """
    lists = []
    for q0 in range(0, l_pix, tile_pix):
        q1 = min(q0 + tile_pix, l_pix)
        straight = [(e, min(LANES, (q1 - q0) * group - e)) for e in range(0, (q1 - q0) * group, LANES)]
        rows = []
        for row in range(q0 // wq * wq, q1, wq):
            c0, c1 = max(row, q0), min(row + wo, q1)
            rows += [((c0 - q0) * group + e, min(LANES, (c1 - c0) * group - e))
                     for e in range(0, max(c1 - c0, 0) * group, LANES)]
        lists.append(rows if len(rows) < len(straight) else straight)
    vectors = np.zeros((len(lists), max(map(len, lists)), 2), np.int64)
    for t, cut in enumerate(lists):  # a tile of garbage columns only (large image groups) has no vectors
        vectors[t, :len(cut)] = np.reshape(cut, (-1, 2))
    return vectors, np.array([len(cut) for cut in lists], np.int64)


def pixel_major_split(l_pix: int, group: int, image_blocks: int, groups: int, channel_blocks: int,
                      threads: int) -> tuple[int, int]:
    """(tile_pix, runs) for `_dense_conv_pixels`: the split whose busiest thread has the least work.

    Work items are (image block, pixel tile, group, run of channel blocks), and numba's
    static schedule gives each thread an equal share of consecutive items. Channel
    blocks often do not divide among the threads (64 channels are 11 blocks of 6: one
    thread computes 6 while the other waits after 5); cutting the plane into up to
    `threads` - 1 more tiles then evens them out. Work is counted in vectors of output.
    Hundreds of (image block, group) items per thread are even already; they keep
    the fewest tiles, and the search stays cheap at load.
    """
    fewest = -(-l_pix // max(1, PIXEL_TILE_ELEMS // group))
    candidates = threads if image_blocks * groups <= 64 * threads else 1
    best = None
    for n_tiles in range(fewest, fewest + candidates):
        tile_pix = equal_tiles(l_pix, -(-l_pix // n_tiles))
        tiles = -(-l_pix // tile_pix)
        runs = min(channel_blocks, max(1, -(-ITEMS_PER_THREAD * threads // (image_blocks * tiles * groups))))
        if candidates == 1:
            return tile_pix, runs
        vectors = [-(-min(tile_pix, l_pix - t * tile_pix) * group // LANES) for t in range(tiles)]
        items = [vectors[t] * (channel_blocks * (r + 1) // runs - channel_blocks * r // runs)
                 for _ in range(image_blocks) for t in range(tiles) for _ in range(groups) for r in range(runs)]
        busiest = max(sum(items[len(items) * i // threads:len(items) * (i + 1) // threads]) for i in range(threads))
        if best is None or busiest < best[0]:
            best = (busiest, tile_pix, runs)
    return best[1], best[2]


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _dense_conv_pixels(packed, block_elems, src, blocks, n, g, ho, wo, wq, tile_pix, runs, vectors, n_vectors,
                       bias, act, lo, hi, res, res_lay, has_res, out, out_lay):
    # Work item = (image block, pixel tile, group, run of channel blocks), tiles outermost as
    # in the sparse kernel. Channels past the group's last (the zero padding of its last
    # block) are computed and not stored. A tile is computed in the vectors of `tile_vectors`,
    # four at a time; the accumulators' elements outside them (garbage columns) are never
    # written, and the store drops or re-zeroes them.
    groups = src.shape[0]
    per_group = blocks.shape[0] // groups
    og = bias.shape[0] // groups
    l_pix = (ho - 1) * wq + wo
    n_tiles = (l_pix + tile_pix - 1) // tile_pix
    per_tile = groups * runs
    per_block = n_tiles * per_tile
    for item in prange((n // g) * per_block):
        blk = item // per_block
        rest = item - blk * per_block
        tile = rest // per_tile
        rest -= tile * per_tile
        grp = rest // runs
        run = rest - grp * runs
        q0 = tile * tile_pix
        q1 = min(q0 + tile_pix, l_pix)
        length = (q1 - q0) * g
        vec = vectors[tile]
        n_vec = n_vectors[tile]
        # A tail of up to 3 vectors runs as one-vector passes: 6 FMAs per column and vector
        # instead of a whole chunk's 24 (an 8x8 plane at batch 1 is 64 + 14 elements).
        body = n_vec - n_vec % 4
        start = blk * block_elems + q0 * g
        s = src[grp]
        a0 = np.empty(length, np.float32)
        a1 = np.empty(length, np.float32)
        a2 = np.empty(length, np.float32)
        a3 = np.empty(length, np.float32)
        a4 = np.empty(length, np.float32)
        a5 = np.empty(length, np.float32)
        for b in range(per_group * run // runs, per_group * (run + 1) // runs):
            w = blocks[grp * per_group + b]
            for v in range(0, body, 4):
                _block_chunk(packed, s, w, g, start, vec[v:v + 4], a0, a1, a2, a3, a4, a5)
            for v in range(body, n_vec):
                _block_vector(packed, s, w, g, start + vec[v, 0], vec[v, 1], vec[v, 0], a0, a1, a2, a3, a4, a5)
            o = grp * og + BLOCK_CHANNELS * b
            for i in range(min(BLOCK_CHANNELS, og - BLOCK_CHANNELS * b)):
                acc = a0 if i == 0 else a1 if i == 1 else a2 if i == 2 else a3 if i == 3 else a4 if i == 4 else a5
                store_tile(acc, o + i, q0, q1, blk, g, ho, wq, wo, bias[o + i], act, lo, hi, res, res_lay, has_res,
                           out, out_lay)


@njit(cache=True, inline="always", error_model="numpy")
def _block_chunk(packed, s, w, g, start, vec, a0, a1, a2, a3, a4, a5):
    """a_i[vector j] = channel i of block w times the runs s[k] from `start`, for the 4 vectors j of `vec`.

    vec[j] = (element offset from `start`, count). 6 channels x 4 vectors of
    accumulators stay in registers through the whole sum over columns: each
    column costs 4 vector loads and 6 broadcasts for 24 FMAs.
    """
    r00, r01, r02, r03 = vzero(), vzero(), vzero(), vzero()
    r10, r11, r12, r13 = vzero(), vzero(), vzero(), vzero()
    r20, r21, r22, r23 = vzero(), vzero(), vzero(), vzero()
    r30, r31, r32, r33 = vzero(), vzero(), vzero(), vzero()
    r40, r41, r42, r43 = vzero(), vzero(), vzero(), vzero()
    r50, r51, r52, r53 = vzero(), vzero(), vzero(), vzero()
    d0, d1, d2, d3 = vec[0, 0], vec[1, 0], vec[2, 0], vec[3, 0]
    m0, m1, m2, m3 = vmask(vec[0, 1]), vmask(vec[1, 1]), vmask(vec[2, 1]), vmask(vec[3, 1])
    for k in range(s.shape[0]):
        p = s[k] * g + start
        x0 = vload(packed, p + d0, m0)
        x1 = vload(packed, p + d1, m1)
        x2 = vload(packed, p + d2, m2)
        x3 = vload(packed, p + d3, m3)
        wk = w[k]
        r00, r01, r02, r03 = _fma4(wk[0], x0, x1, x2, x3, r00, r01, r02, r03)
        r10, r11, r12, r13 = _fma4(wk[1], x0, x1, x2, x3, r10, r11, r12, r13)
        r20, r21, r22, r23 = _fma4(wk[2], x0, x1, x2, x3, r20, r21, r22, r23)
        r30, r31, r32, r33 = _fma4(wk[3], x0, x1, x2, x3, r30, r31, r32, r33)
        r40, r41, r42, r43 = _fma4(wk[4], x0, x1, x2, x3, r40, r41, r42, r43)
        r50, r51, r52, r53 = _fma4(wk[5], x0, x1, x2, x3, r50, r51, r52, r53)
    _store4(a0, d0, d1, d2, d3, m0, m1, m2, m3, r00, r01, r02, r03)
    _store4(a1, d0, d1, d2, d3, m0, m1, m2, m3, r10, r11, r12, r13)
    _store4(a2, d0, d1, d2, d3, m0, m1, m2, m3, r20, r21, r22, r23)
    _store4(a3, d0, d1, d2, d3, m0, m1, m2, m3, r30, r31, r32, r33)
    _store4(a4, d0, d1, d2, d3, m0, m1, m2, m3, r40, r41, r42, r43)
    _store4(a5, d0, d1, d2, d3, m0, m1, m2, m3, r50, r51, r52, r53)


@njit(cache=True, inline="always", error_model="numpy")
def _block_vector(packed, s, w, g, start, count, c, a0, a1, a2, a3, a4, a5):
    """As `_block_chunk` for one vector (count clipped to LANES): 6 accumulators, 1 load and 6 broadcasts a column."""
    r0, r1, r2, r3, r4, r5 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
    mask = vmask(count)
    for k in range(s.shape[0]):
        x = vload(packed, s[k] * g + start, mask)
        wk = w[k]
        r0 = vfma(vsplat(wk[0]), x, r0)
        r1 = vfma(vsplat(wk[1]), x, r1)
        r2 = vfma(vsplat(wk[2]), x, r2)
        r3 = vfma(vsplat(wk[3]), x, r3)
        r4 = vfma(vsplat(wk[4]), x, r4)
        r5 = vfma(vsplat(wk[5]), x, r5)
    vstore(a0, c, mask, r0)
    vstore(a1, c, mask, r1)
    vstore(a2, c, mask, r2)
    vstore(a3, c, mask, r3)
    vstore(a4, c, mask, r4)
    vstore(a5, c, mask, r5)


@njit(cache=True, inline="always")
def _fma4(w, x0, x1, x2, x3, r0, r1, r2, r3):
    """One channel's row of the block: r_j += w * x_j."""
    v = vsplat(w)
    return vfma(v, x0, r0), vfma(v, x1, r1), vfma(v, x2, r2), vfma(v, x3, r3)


@njit(cache=True, inline="always")
def _store4(acc, d0, d1, d2, d3, m0, m1, m2, m3, r0, r1, r2, r3):
    vstore(acc, d0, m0, r0)
    vstore(acc, d1, m1, r1)
    vstore(acc, d2, m2, r2)
    vstore(acc, d3, m3, r3)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _dense_conv_channels(packed, block_elems, src, slabs, n, g, ho, wo, wq,
                         bias, act, lo, hi, res, res_lay, has_res, out, out_lay):
    # Work item = (image block, weight slab, quad of output elements); an element is
    # (pixel, image) of the block, image innermost. A last quad short of four repeats
    # its final element and stores only the real ones.
    groups, k_all = src.shape
    n_slabs, _, width = slabs.shape
    per_group = n_slabs // groups
    og = bias.shape[0] // groups
    n_elems = ho * wo * g
    quads = (n_elems + 3) // 4
    k4 = k_all - k_all % 4
    per_block = n_slabs * quads
    for item in prange((n // g) * per_block):
        blk = item // per_block
        rest = item - blk * per_block
        slab = rest // quads
        quad = rest - slab * quads
        grp = slab // per_group
        o0 = grp * og + (slab - grp * per_group) * width
        count = min(width, (grp + 1) * og - o0)
        w = slabs[slab]
        s = src[grp]
        base = blk * block_elems
        last = n_elems - 1
        e0 = base + _element(min(4 * quad, last), g, wo, wq)
        e1 = base + _element(min(4 * quad + 1, last), g, wo, wq)
        e2 = base + _element(min(4 * quad + 2, last), g, wo, wq)
        e3 = base + _element(min(4 * quad + 3, last), g, wo, wq)
        a0 = np.zeros(width, np.float32)
        a1 = np.zeros(width, np.float32)
        a2 = np.zeros(width, np.float32)
        a3 = np.zeros(width, np.float32)
        for k in range(0, k4, 4):
            r0, r1, r2, r3 = s[k] * g, s[k + 1] * g, s[k + 2] * g, s[k + 3] * g
            x00, x01, x02, x03 = packed[r0 + e0], packed[r1 + e0], packed[r2 + e0], packed[r3 + e0]
            x10, x11, x12, x13 = packed[r0 + e1], packed[r1 + e1], packed[r2 + e1], packed[r3 + e1]
            x20, x21, x22, x23 = packed[r0 + e2], packed[r1 + e2], packed[r2 + e2], packed[r3 + e2]
            x30, x31, x32, x33 = packed[r0 + e3], packed[r1 + e3], packed[r2 + e3], packed[r3 + e3]
            w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
            for j in range(_U(width)):
                v0 = w0[j]
                v1 = w1[j]
                v2 = w2[j]
                v3 = w3[j]
                a0[j] += x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3
                a1[j] += x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3
                a2[j] += x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3
                a3[j] += x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3
        for k in range(k4, k_all):
            r0 = s[k] * g
            x0, x1, x2, x3 = packed[r0 + e0], packed[r0 + e1], packed[r0 + e2], packed[r0 + e3]
            wk = w[k]
            for j in range(_U(width)):
                v = wk[j]
                a0[j] += x0 * v
                a1[j] += x1 * v
                a2[j] += x2 * v
                a3[j] += x3 * v
        for i in range(min(4, n_elems - 4 * quad)):
            acc = a0 if i == 0 else a1 if i == 1 else a2 if i == 2 else a3
            _store_element(acc, count, o0, blk * g, 4 * quad + i, g, wo, bias, act, lo, hi, res, res_lay,
                           has_res, out, out_lay)


@njit(cache=True, inline="always")
def _element(e, g, wo, wq):
    """Packed position (from the block start) of output element e = (oh*wo + ow)*g + image."""
    pix = e // g
    oh = pix // wo
    return (oh * wq + pix - oh * wo) * g + e - pix * g


@njit(cache=True, inline="always", error_model="numpy")
def _store_element(acc, count, o0, first_image, e, g, wo, bias, act, lo, hi, res, res_lay, has_res, out, out_lay):
    """out[image, o0 + j, oh, ow] = act(acc[j] + bias + residual) for j < count; e as in `_element`."""
    pix = e // g
    oh = pix // wo
    ow = pix - oh * wo
    img = first_image + e - pix * g
    gd = out_lay[5]
    dst = row_offset(out_lay, img // gd, o0, oh) + ow * gd + img % gd
    d_step = (out_lay[1] + 2 * out_lay[3]) * (out_lay[2] + 2 * out_lay[4]) * gd
    gr = res_lay[5]
    src = row_offset(res_lay, img // gr, o0, oh) + ow * gr + img % gr
    r_step = (res_lay[1] + 2 * res_lay[3]) * (res_lay[2] + 2 * res_lay[4]) * gr
    for j in range(count):
        v = acc[j] + bias[o0 + j]
        if has_res:
            v += res[src + j * r_step]
        out[dst + j * d_step] = apply_act(v, act, lo, hi)


def _check_input_hw(op, x) -> tuple[int, int]:
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"{op}: input must be a float32 NCHW array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    return x.shape[2], x.shape[3]


def dense_linear(x, weight, bias=None, act="none", clip_range=None, residual=None, out=None) -> np.ndarray:
    """act(x @ weight.T + bias + residual); x (N, I), weight dense float32 (O, I)."""
    op = "dense_linear"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"{op}: input must be a float32 (N, I) array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 2:
        raise ValueError(f"{op}: weight must be a float32 (O, I) array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: input {x.shape} does not match weight {weight.shape}")
    n, o = x.shape[0], weight.shape[0]
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, o)
    res, has_res = resolve_residual(op, residual, (n, o))
    out = resolve_out(op, out, (n, o))
    np.dot(x, weight.T, out=out)
    _epilogue_2d(out, bias, act_code, lo, hi, res, has_res)
    return out


@dataclass(frozen=True)
class DenseLinearPlan:
    """A dense linear weight (O, K) and, made on first use, its copy for the channel-major kernel."""

    weight: np.ndarray

    @cached_property
    def weight_slabs(self) -> np.ndarray:
        return weight_slabs(self.weight)


def plan_dense_linear(weight) -> DenseLinearPlan:
    """Plan a dense linear layer of `weight`, a contiguous float32 (O, K) array."""
    if (not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 2
            or not weight.flags.c_contiguous):
        raise ValueError(f"dense_linear: weight must be a contiguous float32 2-D array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    return DenseLinearPlan(weight)


def bind_dense_linear(plan: DenseLinearPlan, x, bias, act: int, lo, hi, residual, out) -> Callable[[], None]:
    """A no-argument callable: out = act(weight @ x + bias[:, None] + residual), feature-major.

    x (K, M), out and residual (O, M), all contiguous float32; the runtime keeps
    flat values as (features, batch) (see `layout`). `act, lo, hi` come from
    `epilogue.resolve_activation`. Checked here, once. Up to SMALL_BATCH columns
    run the channel-major conv kernel (a 1x1 conv on a 1x1 plane, the batch as
    image group); more run BLAS.
    """
    op = "dense_linear"
    weight = plan.weight
    for what, a in (("input", x), ("out", out)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError(f"{op}: {what} must be a contiguous float32 2-D array, got "
                             f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    o, k = weight.shape
    m = x.shape[1]
    if x.shape[0] != k or out.shape != (o, m):
        raise ValueError(f"{op}: weight {weight.shape}, input {x.shape} and out {out.shape} do not fit")
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    res, has_res = resolve_residual(op, residual, out.shape)
    lo, hi = np.float32(lo), np.float32(hi)
    if 0 < m <= SMALL_BATCH:
        lay = Layout(o, 1, 1, group=m).params()
        columns = np.arange(k, dtype=np.int64).reshape(1, k)  # column k starts at row k of x
        return partial(_dense_conv_channels, x.reshape(-1), k * m, columns, plan.weight_slabs, m, m, 1, 1, 1,
                       bias, act, lo, hi, res.reshape(-1), lay, has_res, out.reshape(-1), lay)

    def run() -> None:
        split_dot(weight, x, out)
        _epilogue_rows(out, bias, act, lo, hi, res, has_res)

    return run


# Fewest rows of the product worth giving to one thread.
MIN_SPLIT_ROWS = 8
_pools: dict[int, ThreadPoolExecutor] = {}


def split_dot(a, b, out) -> None:
    """out = a @ b, its rows split across `threads.dense_split()` threads (the caller runs one part)."""
    parts = min(dense_split(), a.shape[0] // MIN_SPLIT_ROWS)
    if parts <= 1:
        np.dot(a, b, out=out)
        return
    if parts - 1 not in _pools:
        _pools[parts - 1] = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="harp-dense")
    bounds = [a.shape[0] * i // parts for i in range(parts + 1)]
    settings = np.geterr()  # the caller's np.errstate holds in its own thread only
    futures = [_pools[parts - 1].submit(_dot_under, settings, a[r0:r1], b, out[r0:r1])
               for r0, r1 in zip(bounds[1:-1], bounds[2:])]
    np.dot(a[: bounds[1]], b, out[: bounds[1]])
    for future in futures:
        future.result()


def _dot_under(settings: dict[str, str], a, b, out) -> None:
    """np.dot in a pool thread, under the caller's floating-point error settings (`harp run` had printed
    "invalid value encountered in dot" from these threads for inputs it then refused in one line)."""
    with np.errstate(**settings):
        np.dot(a, b, out=out)


@njit(cache=True, error_model="numpy")
def _epilogue_2d(y, bias, act, lo, hi, res, has_res):
    n, o = y.shape
    for i in range(n):
        for j in range(o):
            v = y[i, j] + bias[j]
            if has_res:
                v += res[i, j]
            y[i, j] = apply_act(v, act, lo, hi)


@njit(cache=True, error_model="numpy")
def _epilogue_rows(y, bias, act, lo, hi, res, has_res):
    o, m = y.shape
    for i in range(o):
        b = bias[i]
        for j in range(m):
            v = y[i, j] + b
            if has_res:
                v += res[i, j]
            y[i, j] = apply_act(v, act, lo, hi)
