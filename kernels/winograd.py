"""Winograd F(4x4, 3x3) and F(2x2, 3x3): a dense 3x3 stride-1 conv with 2.25-4x fewer multiply-adds.

Each m x m block ("tile") of output pixels is computed from the (m + 2) x
(m + 2) patch of input around it (Lavin & Gray, 2016):

    Y = A^T [ (G w G^T) (.) (B^T d B) ] A

for a 3x3 kernel w and an input patch d, with constant matrices per m. Over
all channels the elementwise product (.) becomes one matrix product per
position xi of the transformed patch ((m + 2)^2 of them):

    M[xi] (O x tiles) = U[xi] (O x C) @ V[xi] (C x tiles)

so the conv costs (m + 2)^2 * O * C multiply-adds per tile where the direct one
costs 9 * O * C * m^2: 4x fewer at m = 4 (36 for 144), 2.25x at m = 2 (16 for
36). m = 4 where the output height and width are multiples of 4 and a plane
has enough tiles to keep the products' runs long (`tile_edge`), else 2. The
products run as one grouped 1x1 conv ((m + 2)^2 groups) on the existing dense
kernel (`dense`), so V and M are activations in runtime layouts (`layout`): V
is ((m + 2)^2 * C, H/m, W/m) with the image group of the conv's output, M the
same with O channels. They are made and used a band of tile rows at a time
(`BAND_BYTES`), so that they stay in cache between the three calls of a band.
The transforms are a few additions and multiplications by small constants per
value, on explicit vectors (`simd`): at G = 1 a vector is 16 tiles of one row
(split into the m column phases, `vevens`/`vodds`, and zipped back on output);
at G > 1 it is one tile of 16 interleaved images. A 2x2 stride-2 max pooling
after the conv (VGG's) is taken in the output transform (`pool`): the max of
four output vectors, one store instead of four, and no pass over the conv's
full-size output (global-magnitude VGG16 at 99% exported untrimmed, batch 16:
6.59 → 5.97 ms in one process).

The kernel is fp32 throughout. Its rounding differs from the direct conv's:
at m = 4 the transforms scale values by up to 100 before the products and
combine them again after, so its error is 3-9e-6 of the output's largest
value, against 0.5-2e-6 for the direct dense kernel and 2-7e-7 at m = 2
(64-512 channels, batch 1 and 16). It covers 3x3 convs with stride 1,
dilation 1, padding 1, one group and an even output height and width (every
3x3 conv of VGG and of ResNet's stride-1 blocks), reading a packed input or an
activation with a border of at least 1. The two tile edges have their own
transform kernels: one kernel for both, branching on m inside its loops and
going through a scratch array, made the transforms 1.3-2.6x slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from numba import njit, prange

from .arrays import aligned_zeros
from .conv import FASTMATH, _NO_RES, _check_flat, _check_input, _check_output_layouts
from .dense import MIN_PIXEL_RUN, DenseConvPlan, _check_input_hw, bind_dense_conv2d, plan_dense_conv2d
from .epilogue import ACT_CLAMP, ACT_NONE, resolve_conv_epilogue
from .layout import Layout, row_offset
from .packing import pack_input
from .simd import (LANES, vadd, vclamp, vevens, vfma, vload, vmax, vmul, vodds, vsplat, vstore, vsub, vzip_hi,
                   vzip_lo)

# G of F(m x m, 3x3) per tile edge m: U = G w G^T maps a 3x3 kernel to the (m + 2) x (m + 2) transformed one.
_G = {
    2: np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
    4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                 [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
}
# V and M of one band of tile rows: small enough to stay in the caches between the three calls.
BAND_BYTES = 4 << 20


def tile_edge(out_hw, group: int = 1) -> int:
    """m of the F(m x m, 3x3) for an output plane of image group `group`: 4 where both sides are multiples
    of 4 and the products' runs, (H/4) (W/4) G values, are long enough for the pixel-major dense kernel;
    else 2. On 2 cores at batch 1 (G = 1), 64 channels on 32x32: m = 4 223 µs, m = 2 233, direct 349;
    128 on 16x16 (runs of 16 at m = 4): 301, 232, 341. At batch 16 (G = 16), m = 4 is 1.5-1.6x faster than
    m = 2 down to 8x8 planes (64 on 32x32: 2354, 4138 and 5583 µs direct); on 4x4 planes it is slower."""
    if out_hw[0] % 4 or out_hw[1] % 4 or (out_hw[0] // 4) * (out_hw[1] // 4) * group < MIN_PIXEL_RUN:
        return 2
    return 4


def supports_winograd(weight_shape, stride, padding, dilation, groups, out_hw) -> bool:
    """Whether a conv of this geometry can run as Winograd here."""
    return (tuple(weight_shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1 and out_hw[0] % 2 == 0 and out_hw[1] % 2 == 0)


@dataclass(frozen=True)
class WinogradPlan:
    """A 3x3 weight transformed once, and the grouped 1x1 convs that multiply it in, per band height."""

    weight_shape: tuple[int, int, int, int]
    out_hw: tuple[int, int]
    m: int  # output tile edge
    products: np.ndarray  # U as a ((m + 2)^2 * O, C, 1, 1) weight of (m + 2)^2 groups
    _gemms: dict[int, DenseConvPlan] = field(default_factory=dict, repr=False)

    @property
    def positions(self) -> int:
        return (self.m + 2) ** 2

    @property
    def tiles_hw(self) -> tuple[int, int]:
        return self.out_hw[0] // self.m, self.out_hw[1] // self.m

    def band_rows(self, n: int) -> int:
        """Tile rows per band for a batch of n: V and M of a band within BAND_BYTES, at least one row."""
        o, c = self.weight_shape[:2]
        row_bytes = 4 * self.positions * (c + o) * self.tiles_hw[1] * n
        # The products' runs (rows x tw x n values) must stay long enough for the pixel-major kernel.
        fewest = -(-MIN_PIXEL_RUN // (self.tiles_hw[1] * n))
        return max(1, min(self.tiles_hw[0], max(BAND_BYTES // row_bytes, fewest)))

    def scratch_size(self, n: int) -> int:
        """float32 elements of the scratch `bind_winograd` needs for a batch of n (V and M of one band)."""
        o, c = self.weight_shape[:2]
        return self.positions * (c + o) * self.band_rows(n) * self.tiles_hw[1] * n

    def gemm(self, rows: int) -> DenseConvPlan:
        """The products over a band of `rows` tile rows, planned once."""
        if rows not in self._gemms:
            self._gemms[rows] = plan_dense_conv2d(self.products, (rows, self.tiles_hw[1]), groups=self.positions)
        return self._gemms[rows]


def plan_winograd(weight: np.ndarray, in_hw, m: int | None = None) -> WinogradPlan:
    """Plan the Winograd conv of a float32 (O, C, 3, 3) weight on inputs of `in_hw` (stride 1, padding 1).

    m: the output tile edge, 2 or 4; default `tile_edge(in_hw)`.
    """
    if not isinstance(weight, np.ndarray) or weight.dtype != np.float32 or weight.ndim != 4:
        raise ValueError(f"winograd: weight must be a float32 (O, C, 3, 3) array, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {getattr(weight, 'shape', '')}")
    o, c, kh, kw = weight.shape
    out_hw = tuple(int(v) for v in in_hw)
    m = tile_edge(out_hw) if m is None else m
    if not supports_winograd(weight.shape, (1, 1), (1, 1), (1, 1), 1, out_hw) or m not in _G or out_hw[0] % m \
            or out_hw[1] % m:
        raise ValueError(f"winograd: needs a (O, C, 3, 3) weight and an even output size, got {weight.shape} "
                         f"on {out_hw} (tile edge {m})")
    # U[xi, o, c] for xi = (m + 2) * row + column of the transformed kernel, computed in float64.
    g = _G[m]
    u = np.einsum("ai,ocij,bj->aboc", g, weight.astype(np.float64), g).reshape((m + 2) ** 2 * o, c, 1, 1)
    return WinogradPlan(weight_shape=(o, c, kh, kw), out_hw=out_hw, m=m,
                        products=np.ascontiguousarray(u.astype(np.float32)))


def winograd_conv2d(x, weight, bias=None, act="none", clip_range=None, residual=None, out=None,
                    m: int | None = None) -> np.ndarray:
    """act(conv2d(x, weight, padding=1) + bias + residual) by Winograd; NCHW float32 in and out.

    weight: dense float32 (O, C, 3, 3); the output plane must have an even height and width.
    m: the output tile edge (2 or 4), default `tile_edge`.
    """
    op = "winograd_conv2d"
    plan = plan_winograd(weight, _check_input_hw(op, x), m)
    x = _check_input(op, x, weight.shape, 1)
    n, _, h, w = x.shape
    act_code, lo, hi, bias, out, out_layout, residual, res_layout = resolve_conv_epilogue(
        op, (n, weight.shape[0], h, w), act, clip_range, bias, residual, out)
    x_layout = Layout(weight.shape[1], h, w, 1, 1)
    packed = pack_input(x, (1, 1), (1, 1), 1)
    scratch = aligned_zeros(plan.scratch_size(n))
    for call in bind_winograd(plan, packed, x_layout, n, scratch, bias, act_code, lo, hi, residual, res_layout,
                              out.reshape(-1), out_layout):
        call()
    return out


def bind_winograd(plan: WinogradPlan, x, x_layout: Layout, n: int, scratch, bias, act: int, lo, hi, residual,
                  res_layout: Layout | None, out, out_layout: Layout, n_threads: int | None = None,
                  pool: bool = False) -> list[Callable[[], None]]:
    """The calls computing the conv into `out`: per band of tile rows, input transform, products, output transform.

    x: the conv's input, a flat buffer in `x_layout` with a border of at least 1
    and the output's image group. scratch: at least `plan.scratch_size(n)`
    float32 elements, overwritten. Epilogue arguments as for `dense.bind_dense_conv2d`.
    pool: `out` receives the 2x2 stride-2 max pooling of the conv's output
    (half its height and width; no residual), taken in the output transform.
    """
    op = "winograd"
    o, c = plan.weight_shape[:2]
    th, tw = plan.tiles_hw
    g = out_layout.group
    if (x_layout.channels, x_layout.height, x_layout.width) != (c, *plan.out_hw):
        raise ValueError(f"{op}: input layout {x_layout} does not match weight {plan.weight_shape} on "
                         f"{plan.out_hw}")
    if x_layout.pad_h < 1 or x_layout.pad_w < 1 or x_layout.group != g:
        raise ValueError(f"{op}: input layout {x_layout} needs a border of 1 and image group {g}")
    x_layout.check_batch(n)
    _check_flat(op, "input", x, x_layout.size(n))
    if pool and residual is not None:
        raise ValueError(f"{op}: a pooled output takes no residual")
    out_hw = (plan.out_hw[0] // 2, plan.out_hw[1] // 2) if pool else plan.out_hw
    res_params, has_res = _check_output_layouts(op, (o, *out_hw), n, out, out_layout, residual, res_layout)
    if has_res and res_layout.group != g:
        raise ValueError(f"{op}: residual layout {res_layout} needs image group {g}")
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    _check_flat(op, "scratch", scratch, plan.scratch_size(n))
    res = residual if has_res else _NO_RES
    positions = plan.positions
    no_bias = np.zeros(positions * o, np.float32)
    input_transform, output_transform = _TRANSFORMS[plan.m]
    calls: list[Callable[[], None]] = []
    band = plan.band_rows(n)
    for i0 in range(0, th, band):
        i1 = min(i0 + band, th)
        v_layout = Layout(positions * c, i1 - i0, tw, 0, 0, g)
        m_layout = Layout(positions * o, i1 - i0, tw, 0, 0, g)
        v = scratch[: v_layout.size(n)]
        m = scratch[v_layout.size(n): v_layout.size(n) + m_layout.size(n)]
        calls += [partial(input_transform, x, x_layout.params(), n, i0, i1, tw, v),
                  bind_dense_conv2d(plan.gemm(i1 - i0), v, n, g, no_bias, ACT_NONE, np.float32(0), np.float32(0),
                                    None, None, m, m_layout, n_threads=n_threads),
                  partial(output_transform, m, n, o, i0, i1, tw, bias, act, np.float32(lo), np.float32(hi), res,
                          res_params, has_res, out, out_layout.params(), pool)]
    return calls


@njit(cache=True, inline="always", error_model="numpy")
def _position_step(channels, i0, i1, tw, g):
    """Elements from one position xi of V (or M) to the next: `channels` planes of the band's tiles."""
    return channels * (i1 - i0) * tw * g


@njit(cache=True, inline="always", error_model="numpy")
def _band_item(item, channels, positions, i0, i1, tw, g):
    """Work item `item` of a transform, one (image block, channel) per item: (block, channel, where that
    channel's position 0 of tile row 0 would start in V or M, which hold tile rows i0..i1-1 only)."""
    blk = item // channels
    c = item - blk * channels
    plane = (i1 - i0) * tw * g
    return blk, c, (blk * positions * channels + c) * plane - i0 * tw * g


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _input_transform2(x, x_lay, n, i0, i1, tw, v):
    """F(2x2): V = B^T d B for every 4x4 input patch d of tile rows i0..i1-1 (tile (i, j): padded rows 2i..2i+3,
    columns 2j..2j+3); V holds those rows only."""
    c_in, g = x_lay[0], x_lay[5]
    step = _position_step(c_in, i0, i1, tw, g)  # from position xi to xi + 1 in V
    for item in prange((n // g) * c_in):
        blk, c, base = _band_item(item, c_in, 16, i0, i1, tw, g)
        for i in range(i0, i1):
            # Column -1 of the patch's four rows.
            r0 = row_offset(x_lay, blk, c, 2 * i - 1) - g
            r1 = row_offset(x_lay, blk, c, 2 * i) - g
            r2 = row_offset(x_lay, blk, c, 2 * i + 1) - g
            r3 = row_offset(x_lay, blk, c, 2 * i + 2) - g
            if g == 1:
                for j in range(0, tw, LANES):  # 16 tiles of a row: columns 2j..2j+3 split by parity
                    cnt = 2 * min(LANES, tw - j)
                    d00, d01, d02, d03 = _split_row(x, r0 + 2 * j, cnt)
                    d10, d11, d12, d13 = _split_row(x, r1 + 2 * j, cnt)
                    d20, d21, d22, d23 = _split_row(x, r2 + 2 * j, cnt)
                    d30, d31, d32, d33 = _split_row(x, r3 + 2 * j, cnt)
                    _store_transformed(v, base + i * tw + j, step, cnt // 2,
                                       d00, d01, d02, d03, d10, d11, d12, d13,
                                       d20, d21, d22, d23, d30, d31, d32, d33)
            else:
                for j in range(tw):
                    for k in range(0, g, LANES):  # one tile of 16 images
                        cnt = g - k
                        e = 2 * j * g + k
                        d00, d01, d02, d03 = _image_row(x, r0 + e, g, cnt)
                        d10, d11, d12, d13 = _image_row(x, r1 + e, g, cnt)
                        d20, d21, d22, d23 = _image_row(x, r2 + e, g, cnt)
                        d30, d31, d32, d33 = _image_row(x, r3 + e, g, cnt)
                        _store_transformed(v, base + (i * tw + j) * g + k, step, cnt,
                                           d00, d01, d02, d03, d10, d11, d12, d13,
                                           d20, d21, d22, d23, d30, d31, d32, d33)


@njit(cache=True, inline="always", error_model="numpy")
def _split_row(x, s, cnt):
    """Columns 2j, 2j+1, 2j+2, 2j+3 (j < cnt/2) of the row from x[s]: four vectors of tiles."""
    a0 = vload(x, s, cnt)
    a1 = vload(x, s + LANES, cnt - LANES)
    b0 = vload(x, s + 2, cnt)
    b1 = vload(x, s + 2 + LANES, cnt - LANES)
    return vevens(a0, a1), vodds(a0, a1), vevens(b0, b1), vodds(b0, b1)


@njit(cache=True, inline="always", error_model="numpy")
def _image_row(x, s, g, cnt):
    """Four consecutive pixels (of g interleaved images) from x[s], `cnt` images of each."""
    return vload(x, s, cnt), vload(x, s + g, cnt), vload(x, s + 2 * g, cnt), vload(x, s + 3 * g, cnt)


@njit(cache=True, inline="always", error_model="numpy")
def _store_transformed(v, dst, step, cnt, d00, d01, d02, d03, d10, d11, d12, d13,
                       d20, d21, d22, d23, d30, d31, d32, d33):
    """v[dst + xi * step] = (B^T d B)[xi]: rows of B^T are (1 0 -1 0), (0 1 1 0), (0 -1 1 0), (0 1 0 -1)."""
    t00, t01, t02, t03 = vsub(d00, d20), vsub(d01, d21), vsub(d02, d22), vsub(d03, d23)
    t10, t11, t12, t13 = vadd(d10, d20), vadd(d11, d21), vadd(d12, d22), vadd(d13, d23)
    t20, t21, t22, t23 = vsub(d20, d10), vsub(d21, d11), vsub(d22, d12), vsub(d23, d13)
    t30, t31, t32, t33 = vsub(d10, d30), vsub(d11, d31), vsub(d12, d32), vsub(d13, d33)
    _store_row(v, dst, step, cnt, t00, t01, t02, t03)
    _store_row(v, dst + 4 * step, step, cnt, t10, t11, t12, t13)
    _store_row(v, dst + 8 * step, step, cnt, t20, t21, t22, t23)
    _store_row(v, dst + 12 * step, step, cnt, t30, t31, t32, t33)


@njit(cache=True, inline="always", error_model="numpy")
def _store_row(v, dst, step, cnt, t0, t1, t2, t3):
    vstore(v, dst, cnt, vsub(t0, t2))
    vstore(v, dst + step, cnt, vadd(t1, t2))
    vstore(v, dst + 2 * step, cnt, vsub(t2, t1))
    vstore(v, dst + 3 * step, cnt, vsub(t1, t3))


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _output_transform2(m, n, o_out, i0, i1, tw, bias, act, lo, hi, res, res_lay, has_res, out, out_lay, pool):
    """F(2x2): out = act(A^T M A + bias + res) for tile rows i0..i1-1 (M holds those rows only); rows of A^T
    are (1 1 1 0) and (0 1 -1 -1). With `pool`, out = act(the max of each tile + bias): pixel (i, j)."""
    g = out_lay[5]
    step = _position_step(o_out, i0, i1, tw, g)
    for item in prange((n // g) * o_out):
        blk, o, src = _band_item(item, o_out, 16, i0, i1, tw, g)
        b = vsplat(bias[o])
        for i in range(i0, i1):
            if pool:  # pooled row i: one value per tile
                p = row_offset(out_lay, blk, o, i)
                if g == 1:
                    for j in range(0, tw, LANES):
                        cnt = min(LANES, tw - j)
                        y00, y01, y10, y11 = _inverse(m, src + i * tw + j, step, cnt, b)
                        _store_one(out, p + j, res, 0, False, cnt, _max4(y00, y01, y10, y11), act, lo, hi)
                else:
                    for j in range(tw):
                        for k in range(0, g, LANES):
                            y00, y01, y10, y11 = _inverse(m, src + (i * tw + j) * g + k, step, g - k, b)
                            _store_one(out, p + j * g + k, res, 0, False, g - k, _max4(y00, y01, y10, y11), act,
                                       lo, hi)
                continue
            y0 = row_offset(out_lay, blk, o, 2 * i)
            y1 = row_offset(out_lay, blk, o, 2 * i + 1)
            q0 = row_offset(res_lay, blk, o, 2 * i) if has_res else 0
            q1 = row_offset(res_lay, blk, o, 2 * i + 1) if has_res else 0
            if g == 1:
                for j in range(0, tw, LANES):
                    cnt = min(LANES, tw - j)
                    y00, y01, y10, y11 = _inverse(m, src + i * tw + j, step, cnt, b)
                    _store_pair(out, y0 + 2 * j, res, q0 + 2 * j, has_res, 2 * cnt, y00, y01, act, lo, hi)
                    _store_pair(out, y1 + 2 * j, res, q1 + 2 * j, has_res, 2 * cnt, y10, y11, act, lo, hi)
            else:
                for j in range(tw):
                    for k in range(0, g, LANES):
                        cnt = g - k
                        e = 2 * j * g + k
                        y00, y01, y10, y11 = _inverse(m, src + (i * tw + j) * g + k, step, cnt, b)
                        _store_one(out, y0 + e, res, q0 + e, has_res, cnt, y00, act, lo, hi)
                        _store_one(out, y0 + e + g, res, q0 + e + g, has_res, cnt, y01, act, lo, hi)
                        _store_one(out, y1 + e, res, q1 + e, has_res, cnt, y10, act, lo, hi)
                        _store_one(out, y1 + e + g, res, q1 + e + g, has_res, cnt, y11, act, lo, hi)


@njit(cache=True, inline="always", error_model="numpy")
def _inverse(m, s, step, cnt, b):
    """The 2x2 outputs A^T M A (+ bias b) of the 16 vectors m[s + xi * step]."""
    s0 = _combine(m, s, step, cnt)
    s1 = _combine(m, s + 4 * step, step, cnt)
    s2 = _combine(m, s + 8 * step, step, cnt)
    s3 = _combine(m, s + 12 * step, step, cnt)
    # Rows: (1 1 1 0) and (0 1 -1 -1) of the four column-combined rows.
    y0a = vadd(vadd(s0[0], s1[0]), s2[0])
    y0b = vadd(vadd(s0[1], s1[1]), s2[1])
    y1a = vsub(vsub(s1[0], s2[0]), s3[0])
    y1b = vsub(vsub(s1[1], s2[1]), s3[1])
    return vadd(y0a, b), vadd(y0b, b), vadd(y1a, b), vadd(y1b, b)


@njit(cache=True, inline="always", error_model="numpy")
def _combine(m, s, step, cnt):
    """One row of M times A: (m0 + m1 + m2, m1 - m2 - m3)."""
    m0 = vload(m, s, cnt)
    m1 = vload(m, s + step, cnt)
    m2 = vload(m, s + 2 * step, cnt)
    m3 = vload(m, s + 3 * step, cnt)
    return vadd(vadd(m0, m1), m2), vsub(vsub(m1, m2), m3)


@njit(cache=True, inline="always", error_model="numpy")
def _max4(a, b, c, d):
    """The lane-by-lane max of four vectors, NaN where any is NaN (as `pool`'s max pooling)."""
    return vmax(vmax(a, b), vmax(c, d))


@njit(cache=True, inline="always", error_model="numpy")
def _store_one(out, d, res, r, has_res, cnt, y, act, lo, hi):
    if has_res:
        y = vadd(y, vload(res, r, cnt))
    if act == ACT_CLAMP:
        y = vclamp(y, lo, hi)
    vstore(out, d, cnt, y)


@njit(cache=True, inline="always", error_model="numpy")
def _store_pair(out, d, res, r, has_res, cnt, even, odd, act, lo, hi):
    """Columns 2j (even) and 2j + 1 (odd) of 16 tiles, zipped into one row of `cnt` values from out[d]."""
    _store_one(out, d, res, r, has_res, cnt, vzip_lo(even, odd), act, lo, hi)
    _store_one(out, d + LANES, res, r + LANES, has_res, cnt - LANES, vzip_hi(even, odd), act, lo, hi)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _input_transform4(x, x_lay, n, i0, i1, tw, v):
    """F(4x4): V = B^T d B for every 6x6 input patch d of tile rows i0..i1-1 (tile (i, j): padded rows
    4i..4i+5, columns 4j..4j+5); V holds those rows only. B^T is applied along each row of the patch into
    `u`, then along each column of `u` into V."""
    c_in, g = x_lay[0], x_lay[5]
    step = _position_step(c_in, i0, i1, tw, g)  # from position xi to xi + 1 in V
    for item in prange((n // g) * c_in):
        blk, c, base = _band_item(item, c_in, 36, i0, i1, tw, g)
        u = np.empty(36 * LANES, np.float32)  # u[(6 r + q) * 16 + lane]: row r of the patch, transformed
        for i in range(i0, i1):
            if g == 1:
                for j in range(0, tw, LANES):  # 16 tiles of a row: columns 4j..4j+5 split by phase
                    cnt = min(LANES, tw - j)
                    for r in range(6):
                        s = row_offset(x_lay, blk, c, 4 * i - 1 + r) - 1 + 4 * j
                        d0, d1, d2, d3, d4, d5 = _split_row4(x, s, 4 * cnt)
                        _bt6_store(u, 6 * r * LANES, LANES, LANES, d0, d1, d2, d3, d4, d5)
                    _bt6_columns(u, v, base + i * tw + j, step, cnt)
            else:
                for j in range(tw):
                    for k in range(0, g, LANES):  # one tile of 16 images
                        cnt = g - k
                        for r in range(6):
                            s = row_offset(x_lay, blk, c, 4 * i - 1 + r) + (4 * j - 1) * g + k
                            _bt6_store(u, 6 * r * LANES, LANES, LANES, vload(x, s, cnt), vload(x, s + g, cnt),
                                       vload(x, s + 2 * g, cnt), vload(x, s + 3 * g, cnt),
                                       vload(x, s + 4 * g, cnt), vload(x, s + 5 * g, cnt))
                        _bt6_columns(u, v, base + (i * tw + j) * g + k, step, cnt)


@njit(cache=True, inline="always", error_model="numpy")
def _split_row4(x, s, cnt):
    """Columns 4j .. 4j+5 (j < cnt/4) of the row from x[s]: six vectors of tiles (phases 0-3, then 0-1 of the
    values four columns on)."""
    a0, a1 = vload(x, s, cnt), vload(x, s + LANES, cnt - LANES)
    a2, a3 = vload(x, s + 2 * LANES, cnt - 2 * LANES), vload(x, s + 3 * LANES, cnt - 3 * LANES)
    e0, e1, o0, o1 = vevens(a0, a1), vevens(a2, a3), vodds(a0, a1), vodds(a2, a3)
    # Only the first two phases of the shifted values are used: the last two values are not read.
    b0, b1 = vload(x, s + 4, cnt - 2), vload(x, s + 4 + LANES, cnt - 2 - LANES)
    b2, b3 = vload(x, s + 4 + 2 * LANES, cnt - 2 - 2 * LANES), vload(x, s + 4 + 3 * LANES, cnt - 2 - 3 * LANES)
    return (vevens(e0, e1), vevens(o0, o1), vodds(e0, e1), vodds(o0, o1),
            vevens(vevens(b0, b1), vevens(b2, b3)), vevens(vodds(b0, b1), vodds(b2, b3)))


@njit(cache=True, inline="always", error_model="numpy")
def _bt6_store(dst, d, stride, cnt, x0, x1, x2, x3, x4, x5):
    """dst[d + q * stride] = (B^T x)[q] for the six rows of F(4x4)'s B^T:
    (4 0 -5 0 1 0), (0 -4 -4 1 1 0), (0 4 -4 -1 1 0), (0 -2 -1 2 1 0), (0 2 -1 -2 1 0), (0 4 0 -5 0 1)."""
    four, five, two = vsplat(np.float32(4.0)), vsplat(np.float32(-5.0)), vsplat(np.float32(2.0))
    a = vsub(x4, vmul(four, x2))
    b = vsub(x3, vmul(four, x1))
    c = vsub(x4, x2)
    e = vmul(two, vsub(x3, x1))
    vstore(dst, d, cnt, vfma(four, x0, vfma(five, x2, x4)))
    vstore(dst, d + stride, cnt, vadd(a, b))
    vstore(dst, d + 2 * stride, cnt, vsub(a, b))
    vstore(dst, d + 3 * stride, cnt, vadd(c, e))
    vstore(dst, d + 4 * stride, cnt, vsub(c, e))
    vstore(dst, d + 5 * stride, cnt, vfma(four, x1, vfma(five, x3, x5)))


@njit(cache=True, inline="always", error_model="numpy")
def _bt6_columns(u, v, dst, step, cnt):
    """V[6 r + q] (at v[dst + (6 r + q) * step]) = (B^T applied down column q of u)[r]."""
    for q in range(6):
        _bt6_store(v, dst + q * step, 6 * step, cnt,
                   vload(u, q * LANES, LANES), vload(u, (6 + q) * LANES, LANES),
                   vload(u, (12 + q) * LANES, LANES), vload(u, (18 + q) * LANES, LANES),
                   vload(u, (24 + q) * LANES, LANES), vload(u, (30 + q) * LANES, LANES))


@njit(parallel=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _output_transform4(m, n, o_out, i0, i1, tw, bias, act, lo, hi, res, res_lay, has_res, out, out_lay, pool):
    """F(4x4): out = act(A^T M A + bias + res) for tile rows i0..i1-1 (M holds those rows only); A^T is
    applied along each row of M into `w`, then down each column of `w`. With `pool`, out = act(the max of
    each 2x2 quarter of a tile + bias): pixels 2i..2i+1 x 2j..2j+1."""
    g = out_lay[5]
    step = _position_step(o_out, i0, i1, tw, g)
    for item in prange((n // g) * o_out):
        blk, o, src = _band_item(item, o_out, 36, i0, i1, tw, g)
        b = vsplat(bias[o])
        w = np.empty(24 * LANES, np.float32)  # w[(4 r + q) * 16 + lane]: row r of M times A
        for i in range(i0, i1):
            if g == 1:
                for j in range(0, tw, LANES):
                    cnt = min(LANES, tw - j)
                    _at6_rows(m, src + i * tw + j, step, cnt, w)
                    y00, y10, y20, y30 = _at6_column(w, 0, b)
                    y01, y11, y21, y31 = _at6_column(w, 1, b)
                    y02, y12, y22, y32 = _at6_column(w, 2, b)
                    y03, y13, y23, y33 = _at6_column(w, 3, b)
                    if pool:  # rows 2i and 2i + 1: the two pooled columns of 16 tiles, zipped
                        for a, (z0, z1) in enumerate(((_max4(y00, y01, y10, y11), _max4(y02, y03, y12, y13)),
                                                      (_max4(y20, y21, y30, y31), _max4(y22, y23, y32, y33)))):
                            d = row_offset(out_lay, blk, o, 2 * i + a) + 2 * j
                            _store_pair(out, d, res, 0, False, 2 * cnt, z0, z1, act, lo, hi)
                        continue
                    for a, (z0, z1, z2, z3) in enumerate(((y00, y01, y02, y03), (y10, y11, y12, y13),
                                                          (y20, y21, y22, y23), (y30, y31, y32, y33))):
                        d = row_offset(out_lay, blk, o, 4 * i + a) + 4 * j
                        r = row_offset(res_lay, blk, o, 4 * i + a) + 4 * j if has_res else 0
                        _store_quad(out, d, res, r, has_res, 4 * cnt, z0, z1, z2, z3, act, lo, hi)
            else:
                for j in range(tw):
                    for k in range(0, g, LANES):
                        cnt = g - k
                        _at6_rows(m, src + (i * tw + j) * g + k, step, cnt, w)
                        if pool:
                            for q in range(2):  # output columns 2q and 2q + 1 make pooled column q
                                a0, a1, a2, a3 = _at6_column(w, 2 * q, b)
                                b0, b1, b2, b3 = _at6_column(w, 2 * q + 1, b)
                                e = (2 * j + q) * g + k
                                _store_one(out, row_offset(out_lay, blk, o, 2 * i) + e, res, 0, False, cnt,
                                           _max4(a0, a1, b0, b1), act, lo, hi)
                                _store_one(out, row_offset(out_lay, blk, o, 2 * i + 1) + e, res, 0, False, cnt,
                                           _max4(a2, a3, b2, b3), act, lo, hi)
                            continue
                        for q in range(4):
                            z0, z1, z2, z3 = _at6_column(w, q, b)
                            e = (4 * j + q) * g + k
                            for a, z in enumerate((z0, z1, z2, z3)):
                                d = row_offset(out_lay, blk, o, 4 * i + a) + e
                                r = row_offset(res_lay, blk, o, 4 * i + a) + e if has_res else 0
                                _store_one(out, d, res, r, has_res, cnt, z, act, lo, hi)


@njit(cache=True, inline="always", error_model="numpy")
def _at6(x0, x1, x2, x3, x4, x5):
    """A^T x for the four rows of F(4x4)'s A^T: (1 1 1 1 1 0), (0 1 -1 2 -2 0), (0 1 1 4 4 0), (0 1 -1 8 -8 1)."""
    p, q = vadd(x1, x2), vsub(x1, x2)
    r, s = vadd(x3, x4), vsub(x3, x4)
    return (vadd(vadd(x0, p), r), vfma(vsplat(np.float32(2.0)), s, q), vfma(vsplat(np.float32(4.0)), r, p),
            vadd(vfma(vsplat(np.float32(8.0)), s, q), x5))


@njit(cache=True, inline="always", error_model="numpy")
def _at6_rows(m, s, step, cnt, w):
    """w[(4 r + q) * 16] = (row r of M, at m[s + (6 r + xi) * step], times A)[q]."""
    for r in range(6):
        t = s + 6 * r * step
        w0, w1, w2, w3 = _at6(vload(m, t, cnt), vload(m, t + step, cnt), vload(m, t + 2 * step, cnt),
                              vload(m, t + 3 * step, cnt), vload(m, t + 4 * step, cnt), vload(m, t + 5 * step, cnt))
        vstore(w, 4 * r * LANES, LANES, w0)
        vstore(w, (4 * r + 1) * LANES, LANES, w1)
        vstore(w, (4 * r + 2) * LANES, LANES, w2)
        vstore(w, (4 * r + 3) * LANES, LANES, w3)


@njit(cache=True, inline="always", error_model="numpy")
def _at6_column(w, q, b):
    """Output column q of the tile (rows 0-3), plus bias b: A^T down column q of w."""
    y0, y1, y2, y3 = _at6(vload(w, q * LANES, LANES), vload(w, (4 + q) * LANES, LANES),
                          vload(w, (8 + q) * LANES, LANES), vload(w, (12 + q) * LANES, LANES),
                          vload(w, (16 + q) * LANES, LANES), vload(w, (20 + q) * LANES, LANES))
    return vadd(y0, b), vadd(y1, b), vadd(y2, b), vadd(y3, b)


@njit(cache=True, inline="always", error_model="numpy")
def _store_quad(out, d, res, r, has_res, cnt, z0, z1, z2, z3, act, lo, hi):
    """Columns 4j..4j+3 (z0..z3) of 16 tiles, zipped into one row of `cnt` values from out[d]."""
    p, q = vzip_lo(z0, z2), vzip_lo(z1, z3)
    _store_one(out, d, res, r, has_res, cnt, vzip_lo(p, q), act, lo, hi)
    _store_one(out, d + LANES, res, r + LANES, has_res, cnt - LANES, vzip_hi(p, q), act, lo, hi)
    p, q = vzip_hi(z0, z2), vzip_hi(z1, z3)
    _store_one(out, d + 2 * LANES, res, r + 2 * LANES, has_res, cnt - 2 * LANES, vzip_lo(p, q), act, lo, hi)
    _store_one(out, d + 3 * LANES, res, r + 3 * LANES, has_res, cnt - 3 * LANES, vzip_hi(p, q), act, lo, hi)


_TRANSFORMS = {2: (_input_transform2, _output_transform2), 4: (_input_transform4, _output_transform4)}
