"""Sparse conv with a layer's sparsity pattern compiled into straight-line machine code.

`conv`'s loop loads one input vector per multiply-add: an unstructured mask has
no pattern a generic loop could share a loaded vector with, so a 64-channel
32x32 layer at 9-13% density and batch 16 runs at the speed its input streams
from L2. Knowing the pattern, 16 output channels can share every load: at one
output vector (one pixel of 16 images), the code loads each input vector that
any of the 16 rows reads once and multiply-adds it into the accumulators, in
registers, of the rows with a nonzero there (~2.3 rows a load at 13%). The code
holds the pattern, not the weights: it broadcasts them from an array. Alone, on
2 cores, 64->64 3x3 on 32x32 at batch 16: 1.24 ms at 13% density and 1.34 ms at
9%, against 1.95 and 1.68 ms for `conv.sparse_conv2d` in the same process; 128
channels on 16x16 at 7%: 1.19 against 1.27 ms, and 4.9%-dense 1x1 convs twice as
slow (`MIN_DENSITY`).

The code is LLVM IR written here and compiled by llvmlite, numba's own LLVM, to
an object file cached on disk under the hash of the IR and the CPU (see
`cache_dir`); a numba driver calls it through a ctypes function pointer, one
work item (image block, tile of output pixels, block of 16 output channels) at a
time. Its last pass adds bias and residual, clamps, and stores to the output
buffer where a tile is one run of each channel's plane (the runtime's stride-1
chains); elsewhere it stores raw sums and `conv.store_tile` places them (HARP
ResNet18 at batch 16, alternating in one process: 12.5-13.0 ms against 13.2-13.5). Compiling takes ~0.3 s per
1000 nonzeros, once; a cached object loads in milliseconds. The loads are the
ones `conv.accumulate_row` makes (the same offsets, from the same checked
plan), so the code reads nothing the generic kernel would not.

Only inputs in image groups of 16k qualify: a pixel is then k whole vectors and
every run starts on one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
from numba import njit, prange

from harp.io import atomic_write_bytes

from .arrays import as_kernel_array
from .conv import (SparseConvPlan, TILE_ELEMS, _check_flat, _check_output_layouts, equal_tiles, store_tile,
                   work_item, zero_garbage)
from .epilogue import ACT_NONE
from .layout import Layout, row_offset
from .simd import LANES

ROWS = 16  # output channels per block: 16 accumulators, the loaded vector and the broadcast fit 32 registers
# Input channels per pass over a tile: their 3x3 windows (16 x 9 x 64 bytes at batch 16)
# stay in L1, where all 64 channels' did not (64->64 3x3 at 13%, batch 16, 2 threads:
# 1.24-1.33 ms in passes of 16, 1.86-1.90 in one pass, 1.95-2.32 for `conv`).
CHUNK = 16
# Where the runtime offers this kernel: sharing a load needs rows that meet (16 rows at
# density d share ~16d / (1 - (1-d)^16) multiply-adds a load: 1.2 at 2%, 1.9 at 9%), and
# compiling costs ~0.3 s per 1000 nonzeros, once per layer and CPU.
MIN_DENSITY = 0.08
MAX_NONZEROS = 8192
CACHE_MAGIC = b"HARPUNR1"  # then the SHA-256 of the object, then the object
_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_float)
_V = f"<{LANES} x float>"


@functools.cache
def host_has_512bit_vectors() -> bool:
    """Whether this CPU has AVX-512F, which the kernel needs to pay off.

    A block keeps 16 rows of 16-lane accumulators in registers; with 256-bit vectors
    each splits in two and they spill. Compiled for znver2 (AVX2), numba's kernels
    too, and run on a Zen 4 at batch 16 on 2 threads, it took 1.0x, 1.2x, 1.18x and
    1.33x the sparse kernel's time on 64->64 3x3 convs at 9% and 13% density, a
    64->128 stride-2 one at 7% and a 3->64 one at 27% (0.79x, 0.62x, 1.0x and 0.5x
    with AVX-512), and compiled 1.5-2x longer. The runtime's "auto" choice skips it
    on other CPUs; fallback="unrolled" still runs it anywhere.
    """
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


def worth_unrolling(density: float, nnz: int) -> bool:
    """Whether a conv of this density and nonzero count may gain enough to pay for its compile."""
    return density >= MIN_DENSITY and nnz <= MAX_NONZEROS


def supports_unrolled(plan: SparseConvPlan, group: int) -> bool:
    """Whether the unrolled kernel can run `plan` on inputs in image groups of `group`."""
    return group % LANES == 0 and not plan.strided_rows


def cache_dir() -> Path:
    """Where compiled layers are kept: $HARP_CACHE_DIR, else $XDG_CACHE_HOME/harp/unrolled or ~/.cache/harp/unrolled.

    Objects there are executed as they are, like numba's own cache: the
    directory must be as trusted as the installed code. A file whose hash does
    not match (truncated, or not written by harp), or that does not define the
    layer's function, is compiled again.
    """
    if os.environ.get("HARP_CACHE_DIR"):
        return Path(os.environ["HARP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "harp" / "unrolled"


@dataclass(frozen=True)
class UnrolledConv:
    """One conv's compiled code, for one plan and image group.

    `order[k]` is the nonzero whose weight the code's k-th multiply-add takes.
    `function` must stay referenced while the code may run.
    """

    plan: SparseConvPlan
    group: int
    order: np.ndarray
    function: Callable
    seconds: float  # to compile, or to load from the cache


def unrolled_ir(plan: SparseConvPlan, indptr: np.ndarray, group: int, symbol: str) -> tuple[str, np.ndarray]:
    """LLVM IR of `symbol` for `plan` in image group `group`, and its weight order.

    symbol(x, acc, w, block, u0, u1, stride, out, ostride, res, rstride, bias, lo, hi)
    computes rows j = 0..15 of block `block` (output channels block*16 + j) at
    output vectors u in [u0, u1), vector u being x[16u:][:16] of the packed image
    block at x: s_j(u) = sum over row j's nonzeros p of w[k] x[16u + offsets[p]*group:][:16],
    k the position of p in the returned order, and stores
    out[j*ostride + 16(u - u0):][:16] = clamp(s_j(u) + bias[j] + res[j*rstride + 16(u - u0):][:16], lo, hi).
    One pass over [u0, u1) per `CHUNK` input channels the block reads, each but
    the last keeping its partial sums in acc[j*stride + 16(u - u0):][:16].
    """
    o = plan.weight_shape[0]
    blocks = range(-(-o // ROWS))
    lines = [f"declare {_V} @llvm.fmuladd.v{LANES}f32({_V}, {_V}, {_V})",
             f"define void @{symbol}(float* noalias %x, float* %acc, float* noalias %w0, i64 %block, i64 %u0, "
             f"i64 %u1, i64 %stride, float* %out, i64 %ostride, float* %res, i64 %rstride, float* noalias %bias0, "
             f"float %lo, float %hi) nounwind {{",
             "entry:",
             # Reloaded (volatile) every pass: else LLVM hoists all weight broadcasts out of the
             # loop and spills them to the stack, 64 bytes each.
             "  %slot = alloca float*",
             "  store float* %w0, float** %slot",
             "  %bslot = alloca float*",
             "  store float* %bias0, float** %bslot",
             *_splat("%lov", "%lo"), *_splat("%hiv", "%hi"),
             "  %any = icmp slt i64 %u0, %u1",
             "  br i1 %any, label %dispatch, label %done",
             "dispatch:",
             f"  switch i64 %block, label %done [{' '.join(f'i64 {b}, label %b{b}' for b in blocks)}]"]
    order: list[int] = []
    for b in blocks:
        rows = range(b * ROWS, min(o, (b + 1) * ROWS))
        nz = sorted((int(plan.offsets[p]) // plan.channel_pixels // CHUNK, int(plan.offsets[p]), j, p)
                    for j, r in enumerate(rows) for p in range(indptr[r], indptr[r + 1]))
        chunks = sorted({t[0] for t in nz}) or [0]
        labels = [f"{b}.{chunk}" for chunk in chunks]
        lines += [f"b{b}:", f"  br label %l{labels[0]}"]
        for i, (chunk, here) in enumerate(zip(chunks, labels)):
            lines += _pass_ir(here, f"b{b}" if i == 0 else f"l{labels[i - 1]}",
                              f"%l{labels[i + 1]}" if i + 1 < len(labels) else "%done",
                              len(rows), [t[1:] for t in nz if t[0] == chunk], i == 0, i + 1 == len(labels),
                              group, order)
    lines += ["done:", "  ret void", "}"]
    return "\n".join(lines) + "\n", np.asarray(order, np.int64)


def _splat(name: str, scalar: str) -> list[str]:
    """IR: `name` = the float `scalar` in every lane."""
    return [f"  {name}.one = insertelement {_V} undef, float {scalar}, i32 0",
            f"  {name} = shufflevector {_V} {name}.one, {_V} undef, <{LANES} x i32> zeroinitializer"]


def _vector_at(name: str, base: str, index: str) -> list[str]:
    """IR: `name` = a pointer to the vector at float `index` of `base`."""
    return [f"  {name}.f = getelementptr float, float* {base}, i64 {index}",
            f"  {name} = bitcast float* {name}.f to {_V}*"]


def _row_vector_at(name: str, base: str, stride: str, row: int, here: str) -> list[str]:
    """IR: `name` = a pointer to row `row`'s vector at the loop's u in a buffer of rows `stride` floats apart."""
    return [f"  {name}.r = mul i64 {stride}, {row}",
            f"  {name}.i = add i64 {name}.r, %ai.{here}",
            *_vector_at(name, base, f"{name}.i")]


def _pass_ir(here: str, entered_from: str, after: str, rows: int, nonzeros: list[tuple[int, int, int]],
             first: bool, last: bool, group: int, order: list[int]) -> list[str]:
    """IR of one pass over u in [u0, u1), labelled l{here}: the multiply-adds of `nonzeros`
    ((offset, row, nonzero) sorted by offset) on the rows' sums, which start at zero in the
    first pass and from acc otherwise; the last pass ends in the epilogue, the others store
    the sums they changed to acc. Appends the nonzeros to `order`."""
    lines = [f"l{here}:",
             f"  %u.{here} = phi i64 [%u0, %{entered_from}], [%next.{here}, %l{here}]",
             f"  %xi.{here} = shl i64 %u.{here}, {LANES.bit_length() - 1}",
             f"  %du.{here} = sub i64 %u.{here}, %u0",
             f"  %ai.{here} = shl i64 %du.{here}, {LANES.bit_length() - 1}",
             f"  %w.{here} = load volatile float*, float** %slot"]
    touched = range(rows) if first or last else sorted({j for _, j, _ in nonzeros})
    acc = {}
    for j in touched:
        if first:
            acc[j] = "zeroinitializer"
        else:
            lines += _row_vector_at(f"%acc.{here}.{j}", "%acc", "%stride", j, here)
            lines.append(f"  %ol.{here}.{j} = load {_V}, {_V}* %acc.{here}.{j}, align 4")
            acc[j] = f"%ol.{here}.{j}"
    loaded = None
    for offset, j, p in nonzeros:
        t = f"{here}.{len(order)}"
        if offset != loaded:
            loaded, vector = offset, f"%v{t}"
            lines += [f"  %i{t} = add i64 %xi.{here}, {offset * group}", *_vector_at(f"%pv{t}", "%x", f"%i{t}"),
                      f"  {vector} = load {_V}, {_V}* %pv{t}, align 4"]
        lines += [f"  %wp{t} = getelementptr float, float* %w.{here}, i64 {len(order)}",
                  f"  %ws{t} = load float, float* %wp{t}, align 4", *_splat(f"%wv{t}", f"%ws{t}"),
                  f"  %a{t} = call {_V} @llvm.fmuladd.v{LANES}f32({_V} %wv{t}, {_V} {vector}, {_V} {acc[j]})"]
        acc[j] = f"%a{t}"
        order.append(p)
    if last:
        lines += [f"  %bp.{here} = load volatile float*, float** %bslot", *_epilogue(here, rows, acc)]
    else:
        for j in touched:
            if first:  # no pointer made for the load
                lines += _row_vector_at(f"%acc.{here}.{j}", "%acc", "%stride", j, here)
            lines.append(f"  store {_V} {acc[j]}, {_V}* %acc.{here}.{j}, align 4")
    return lines + [f"  %next.{here} = add i64 %u.{here}, 1",
                    f"  %more.{here} = icmp slt i64 %next.{here}, %u1",
                    f"  br i1 %more.{here}, label %l{here}, label {after}"]


def _epilogue(here: str, rows: int, acc: dict[int, str]) -> list[str]:
    """IR storing out[j*ostride + 16(u - u0):][:16] = clamp(acc_j + bias[j] + res[j*rstride + 16(u - u0):][:16])."""
    lines = []
    for j in range(rows):
        t = f"{here}.e{j}"
        lines += [f"  %bq{t} = getelementptr float, float* %bp.{here}, i64 {j}",
                  f"  %bs{t} = load float, float* %bq{t}, align 4", *_splat(f"%bv{t}", f"%bs{t}"),
                  f"  %s{t} = fadd {_V} {acc[j]}, %bv{t}",
                  *_row_vector_at(f"%rq{t}", "%res", "%rstride", j, here),
                  f"  %rv{t} = load {_V}, {_V}* %rq{t}, align 4",
                  f"  %sr{t} = fadd {_V} %s{t}, %rv{t}",
                  # As `epilogue.apply_act`: below lo -> lo, then above hi -> hi; NaN passes.
                  f"  %cl{t} = fcmp olt {_V} %sr{t}, %lov",
                  f"  %sl{t} = select <{LANES} x i1> %cl{t}, {_V} %lov, {_V} %sr{t}",
                  f"  %ch{t} = fcmp ogt {_V} %sl{t}, %hiv",
                  f"  %sh{t} = select <{LANES} x i1> %ch{t}, {_V} %hiv, {_V} %sl{t}",
                  *_row_vector_at(f"%oq{t}", "%out", "%ostride", j, here),
                  f"  store {_V} %sh{t}, {_V}* %oq{t}, align 4"]
    return lines


class _Compiler:
    """One LLVM target machine and execution engine for the process: every loaded object stays in it."""

    def __init__(self):
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        self.cpu = llvm.get_host_cpu_name()
        self.features = llvm.get_host_cpu_features().flatten()
        target = llvm.Target.from_default_triple()
        self.machine = target.create_target_machine(cpu=self.cpu, features=self.features, opt=3)
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.machine)
        self.loaded: dict[str, int] = {}  # symbol -> address
        self.lock = threading.Lock()  # runtimes loading in two threads share the engine

    def key(self, ir: str) -> str:
        identity = f"{llvm.get_default_triple()} {self.cpu} {self.features} {llvm.llvm_version_info}\n"
        return hashlib.sha256((identity + ir).encode()).hexdigest()

    def address(self, ir: str, name: str) -> int:
        """The address of function `name` of `ir`, compiled or loaded from the cache (under a unique name)."""
        symbol = f"{name}_{self.key(ir)[:32]}"
        with self.lock:
            if symbol not in self.loaded:
                path = cache_dir() / f"{symbol}.o"
                cached = _read_cached(path)
                address = self._load(cached, symbol) if cached is not None else 0
                if not address:  # not cached, damaged, or (renamed) another layer's code
                    module = llvm.parse_assembly(ir.replace(f"@{name}(", f"@{symbol}(", 1))
                    module.verify()
                    obj = self.machine.emit_object(module)
                    _write_cached(path, obj)
                    address = self._load(obj, symbol)
                self.loaded[symbol] = address
            return self.loaded[symbol]

    def _load(self, obj: bytes, symbol: str) -> int:
        """Add an object to the engine; the address of `symbol` in it, 0 if it has none."""
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()
        return self.engine.get_function_address(symbol)


_COMPILER: _Compiler | None = None
_COMPILER_LOCK = threading.Lock()


def _compiler() -> _Compiler:
    global _COMPILER
    with _COMPILER_LOCK:
        if _COMPILER is None:
            _COMPILER = _Compiler()
        return _COMPILER


def _read_cached(path: Path) -> bytes | None:
    """The object in `path` if it is there and its hash matches, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(CACHE_MAGIC) + 32
    if data[:len(CACHE_MAGIC)] != CACHE_MAGIC or hashlib.sha256(data[head:]).digest() != data[len(CACHE_MAGIC):head]:
        return None
    return data[head:]


def _write_cached(path: Path, obj: bytes) -> None:
    """Keep `obj` at `path` (atomically); an unwritable cache only costs the next process a compile."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, CACHE_MAGIC + hashlib.sha256(obj).digest() + obj)
    except OSError:
        pass


def compile_unrolled(plan: SparseConvPlan, indptr: np.ndarray, group: int) -> UnrolledConv:
    """The compiled code of `plan` for image group `group` (a multiple of 16), from the cache when there."""
    if not supports_unrolled(plan, group):
        raise ValueError(f"unrolled_conv2d: needs a packed (or stride-1 in place) input in image groups of a "
                         f"multiple of {LANES}, got group {group}, strided in-place read {plan.strided_rows}")
    start = time.perf_counter()
    ir, order = unrolled_ir(plan, indptr, group, "harp_unrolled")
    address = _compiler().address(ir, "harp_unrolled")
    return UnrolledConv(plan=plan, group=group, order=order, function=_SIGNATURE(address),
                        seconds=time.perf_counter() - start)


def bind_unrolled_conv2d(code: UnrolledConv, values, packed, n: int, bias, act: int, lo, hi, residual,
                         res_layout: Layout | None, out, out_layout: Layout) -> Callable[[], None]:
    """`conv.bind_sparse_conv2d` with the compiled code of `code` (its plan, its image group)."""
    op = "unrolled_conv2d"
    plan, group = code.plan, code.group
    o, cg, _, _ = plan.weight_shape
    ho, wo = plan.out_hw
    wq = plan.packed_hw[1]
    if n % group:
        raise ValueError(f"{op}: image group {group} does not divide batch {n}")
    block_elems = cg * plan.groups * plan.channel_pixels * group
    _check_flat(op, "packed input", packed, block_elems * (n // group))
    if values.dtype != np.float32 or values.shape != plan.offsets.shape:
        raise ValueError(f"{op}: values must be float32 with one entry per nonzero ({plan.offsets.shape[0]}), "
                         f"got {values.dtype} {values.shape}")
    res_params, has_res = _check_output_layouts(op, (o, ho, wo), n, out, out_layout, residual, res_layout)
    if bias.dtype != np.float32 or bias.shape != (o,):
        raise ValueError(f"{op}: bias must be float32 ({o},), got {bias.dtype} {bias.shape}")
    tile_pix = equal_tiles((ho - 1) * wq + wo, max(1, TILE_ELEMS // group))
    weights = np.ascontiguousarray(values[code.order])
    zeros = np.zeros(tile_pix * group + ROWS, np.float32)  # the residual and bias where there are none
    res = residual if has_res else zeros
    if act == ACT_NONE:  # the code always clamps
        lo, hi = -np.inf, np.inf
    # The code applies the epilogue and stores to `out` itself where a tile is one run of each
    # output channel's plane (as in conv.store_tile's fast path); elsewhere it stores raw sums
    # and store_tile places them.
    fused = all(lay.group == group and lay.padded_hw[1] == wq for lay in (out_layout, res_layout) if lay is not None)
    return partial(_unrolled_conv, code.function, packed, block_elems, weights, n, group, ho, wo, wq, tile_pix,
                   -(-o // ROWS), as_kernel_array(bias), act, np.float32(lo), np.float32(hi), res, res_params,
                   has_res, out, out_layout.params(), fused, zeros)


@njit(parallel=True, cache=True, error_model="numpy")
def _unrolled_conv(fn, packed, block_elems, weights, n, g, ho, wo, wq, tile_pix, n_blocks, bias, act, lo, hi,
                   res, res_lay, has_res, out, out_lay, fused, zeros):
    # Work item = (image block, tile, block of 16 output channels), in that order, as in conv._sparse_conv.
    l_pix = (ho - 1) * wq + wo
    n_tiles = (l_pix + tile_pix - 1) // tile_pix
    per_image_block = n_tiles * n_blocks
    o = bias.shape[0]
    out_plane = row_offset(out_lay, 0, 1, 0) - row_offset(out_lay, 0, 0, 0)
    res_plane = row_offset(res_lay, 0, 1, 0) - row_offset(res_lay, 0, 0, 0) if has_res else 0
    for item in prange((n // g) * per_image_block):
        img_block, block, q0, q1 = work_item(item, per_image_block, n_blocks, tile_pix, l_pix)
        length = (q1 - q0) * g
        first = block * ROWS
        rows = min(ROWS, o - first)
        acc = np.empty(ROWS * length, np.float32)
        x = packed[img_block * block_elems:].ctypes.data
        u0, u1 = q0 * g // LANES, q1 * g // LANES
        if fused:
            dst = row_offset(out_lay, img_block, first, 0) + q0 * g
            r = row_offset(res_lay, img_block, first, 0) + q0 * g if has_res else 0
            fn(x, acc.ctypes.data, weights.ctypes.data, block, u0, u1, length, out[dst:].ctypes.data, out_plane,
               res[r:].ctypes.data, res_plane, bias[first:].ctypes.data, lo, hi)
            for j in range(rows):
                zero_garbage(out, dst + j * out_plane, q0, q1, wq, wo, g)
        else:
            fn(x, acc.ctypes.data, weights.ctypes.data, block, u0, u1, length, acc.ctypes.data, length,
               zeros.ctypes.data, 0, zeros.ctypes.data, np.float32(-np.inf), np.float32(np.inf))
            for j in range(rows):
                store_tile(acc[j * length:(j + 1) * length], first + j, q0, q1, img_block, g, ho, wq, wo,
                           bias[first + j], act, lo, hi, res, res_lay, has_res, out, out_lay)
