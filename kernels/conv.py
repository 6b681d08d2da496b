"""Direct sparse 2-D convolution over a CSR weight, with the fused epilogue.

No im2col: the input is packed once (see `packing`), after which every nonzero
weight v at (o, c, i, j) adds v times one contiguous run of the packed input to
output channel o's accumulator. The output domain of an image block (Ho rows of
wq pixels of G images, minus the trailing garbage columns) is cut into tiles
small enough to stay in L1; work items are (image block, tile, run of output
channels), in that order, and the channel runs are balanced by nonzero count, so
a static `prange` split gives each thread the same work and the input rows of a
tile stay in its cache.

`plan_sparse_conv2d` decodes the CSR columns into packed-input offsets once per
(weight, input size); `sparse_conv2d` validates, packs and runs the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
from numba import njit, prange

from .arrays import as_kernel_array
from .csr import INDEX_DTYPES, balanced_blocks
from .epilogue import apply_act, resolve_activation, resolve_bias, resolve_out, resolve_residual
from .packing import image_group, pack_input, packed_hw, packed_size, tap_offsets
from .reference import conv2d_output_hw

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
    Channel runs for the work split are cached per thread count.
    """

    weight_shape: tuple[int, int, int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    packed_hw: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offsets: np.ndarray
    row_cost: np.ndarray
    _blocks: dict = field(default_factory=dict, compare=False, repr=False)

    def blocks(self, n_threads: int) -> np.ndarray:
        """Boundaries of `n_threads` runs of output channels with about equal work."""
        if n_threads not in self._blocks:
            self._blocks[n_threads] = balanced_blocks(self.row_cost, n_threads)
        return self._blocks[n_threads]


def plan_sparse_conv2d(indptr, indices, weight_shape, in_hw, stride=(1, 1), padding=(0, 0),
                       dilation=(1, 1), groups=1) -> SparseConvPlan:
    """Decode a CSR conv weight's columns into packed-input offsets for inputs of `in_hw`."""
    o, cg, kh, kw = (int(d) for d in weight_shape)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    in_hw = _pair(in_hw)
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
    hq, wq = packed_hw(in_hw, stride, padding)
    chan_pix = stride[0] * stride[1] * hq * wq
    taps = tap_offsets((kh, kw), stride, padding, dilation, in_hw)
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
        stride=stride, padding=padding, dilation=dilation, groups=int(groups),
        offsets=np.ascontiguousarray(offsets, np.int64), row_cost=(counts + 1).astype(np.float64),
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
            plan.stride, plan.padding, plan.dilation, plan.groups) != geometry:
        raise ValueError(f"{op}: plan is for input {plan.in_hw}, weight {plan.weight_shape}, stride "
                         f"{plan.stride}, padding {plan.padding}, dilation {plan.dilation}, groups "
                         f"{plan.groups}; got input {x.shape[2:]}, weight {tuple(weight_shape)}, "
                         f"stride/padding/dilation/groups {geometry}")
    if values.dtype != np.float32 or values.shape != plan.offsets.shape:
        raise ValueError(f"{op}: values must be float32 with one entry per nonzero "
                         f"({plan.offsets.shape[0]}), got {values.dtype} {values.shape}")
    n = x.shape[0]
    o = plan.weight_shape[0]
    ho, wo = plan.out_hw
    act_code, lo, hi = resolve_activation(op, act, clip_range)
    bias = resolve_bias(op, bias, o)
    res, has_res = resolve_residual(op, residual, (n, o, ho, wo))
    out = resolve_out(op, out, (n, o, ho, wo))
    wq = plan.packed_hw[1]
    group = image_group(n, (ho - 1) * wq + wo)
    packed = pack_input(x, plan.stride, plan.padding, group, workspace,
                        allow_view=not np.may_share_memory(out, x))
    block_elems = x.shape[1] * plan.stride[0] * plan.stride[1] * plan.packed_hw[0] * wq * group
    tile_pix = max(1, TILE_ELEMS // group)
    _sparse_conv(packed, plan.offsets, as_kernel_array(indptr), as_kernel_array(values), n, group, block_elems, ho, wo, wq, tile_pix,
                 plan.blocks(numba.get_num_threads()), bias, act_code, lo, hi, res, has_res, out)
    return out


def sparse_conv2d_workspace(plan: SparseConvPlan, n: int) -> int:
    """float32 elements of the workspace `sparse_conv2d` needs for batch `n`."""
    return packed_size(n, plan.weight_shape[1] * plan.groups, plan.in_hw, plan.stride, plan.padding)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _sparse_conv(packed, offsets, indptr, values, n, g, block_elems, ho, wo, wq, tile_pix, blocks,
                 bias, act, lo, hi, res, has_res, out):
    # Work item = (image block, tile of output pixels, run of output channels), in that
    # order, so each thread gets consecutive tiles and their input rows stay cached.
    n_ch = indptr.shape[0] - 1
    out_flat = out.reshape(out.size)
    res_flat = res.reshape(res.size)
    l_pix = (ho - 1) * wq + wo
    n_tiles = (l_pix + tile_pix - 1) // tile_pix
    n_blocks = blocks.shape[0] - 1
    per_image_block = n_tiles * n_blocks
    for item in prange((n // g) * per_image_block):
        img_block = item // per_image_block
        rest = item - img_block * per_image_block
        tile = rest // n_blocks
        block = rest - tile * n_blocks
        q0 = tile * tile_pix
        q1 = min(q0 + tile_pix, l_pix)
        acc = np.empty((q1 - q0) * g, np.float32)
        start = img_block * block_elems + q0 * g
        for o in range(blocks[block], blocks[block + 1]):
            accumulate_row(acc, packed, offsets, values, indptr[o], indptr[o + 1], start, g)
            store_row(acc, o, q0, q1, img_block * g, g, n_ch, ho, wq, wo, bias[o], act, lo, hi,
                      res_flat, has_res, out_flat)


@njit(cache=True, inline="always", error_model="numpy", fastmath=FASTMATH)
def accumulate_row(acc, packed, offsets, values, p0, p1, start, g):
    """acc[k] = sum over nonzeros p in [p0, p1) of values[p] * packed[offsets[p]*g + start + k].

    Indices are uint64 so numba adds no wraparound test and LLVM vectorises the
    k loop; four nonzeros per pass cut the loads and stores of `acc` by four.
    """
    length = _U(acc.shape[0])
    for k in range(length):
        acc[k] = 0.0
    p = p0
    while p + 4 <= p1:
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        s0 = _U(offsets[p] * g + start)
        s1 = _U(offsets[p + 1] * g + start)
        s2 = _U(offsets[p + 2] * g + start)
        s3 = _U(offsets[p + 3] * g + start)
        for k in range(length):
            acc[k] += v0 * packed[s0 + k] + v1 * packed[s1 + k] + v2 * packed[s2 + k] + v3 * packed[s3 + k]
        p += 4
    while p < p1:
        v0 = values[p]
        s0 = _U(offsets[p] * g + start)
        for k in range(length):
            acc[k] += v0 * packed[s0 + k]
        p += 1


@njit(cache=True, inline="always", error_model="numpy")
def store_row(acc, o, q0, q1, img0, g, n_ch, ho, wq, wo, b, act, lo, hi, res, has_res, out):
    """Write output channel o's packed pixels q0..q1 of images img0..img0+g into flat NCHW `out`.

    Pixel q is (oh, ow) = divmod(q, wq); columns ow >= wo are garbage and dropped.
    acc holds (q1 - q0) pixels of g images each, image innermost. `out` and `res`
    are flattened (N, n_ch, ho, wo) arrays; `res` is read only when `has_res`.
    """
    ug = _U(g)
    oh = q0 // wq
    row_start = oh * wq
    while row_start < q1:
        c0 = max(q0 - row_start, 0)
        c1 = min(q1 - row_start, wo)
        width = _U(max(c1 - c0, 0))
        for k in range(g):
            src = _U((row_start + c0 - q0) * g + k)
            dst = _U((((img0 + k) * n_ch + o) * ho + oh) * wo + c0)
            if g == 1:
                if has_res:
                    for j in range(width):
                        out[dst + j] = apply_act(acc[src + j] + b + res[dst + j], act, lo, hi)
                else:
                    for j in range(width):
                        out[dst + j] = apply_act(acc[src + j] + b, act, lo, hi)
            elif has_res:
                for j in range(width):
                    out[dst + j] = apply_act(acc[src + j * ug] + b + res[dst + j], act, lo, hi)
            else:
                for j in range(width):
                    out[dst + j] = apply_act(acc[src + j * ug] + b, act, lo, hi)
        oh += 1
        row_start += wq


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
