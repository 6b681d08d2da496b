"""A 16-lane float32 vector for numba kernels, as a handful of LLVM intrinsics.

numba's auto-vectoriser keeps accumulators in memory: a loop body that adds to
an array is loaded and stored on every pass, and a block of scalar
accumulators stays scalar. A register-blocked GEMM micro-kernel needs the
opposite, a grid of vector accumulators that live in registers for a whole
reduction, so it is written with this explicit vector type instead
(`dense._dense_conv_pixels`). One `F32x16` is one AVX-512 register (two AVX2
or four NEON registers elsewhere: still correct, only slower).

Loads and stores are masked to the first `count` lanes (count <= 0: none, >=
16: all), so a run that ends mid-vector, or at the end of a buffer, neither
reads nor writes past its last element. They also take a mask made once by
`vmask(count)`: LLVM does not hoist the mask of a count out of a loop, and
rebuilding four of them cost the dense kernel's inner loop 8 compares a
column. `vfma` is LLVM's fmuladd: one fused instruction where the target has
FMA; `vmul` and `vadd` round each on its own. `vtranspose` moves a block of up to
16 x 16 values between layouts in registers (`pool` turns rows of 16 images,
one image each, into one row of 16 interleaved images with it); `vevens` and
`vodds` split 32 values into their even and odd ones (`packing`'s stride-2
phases).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16

_VECTOR = ir.VectorType(ir.FloatType(), LANES)
_MASK = ir.VectorType(ir.IntType(1), LANES)
_MASK_BITS = ir.IntType(LANES)
_I64 = ir.IntType(64)


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name=f"f32x{LANES}")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


class Mask16(types.Type):
    def __init__(self):
        super().__init__(name=f"mask{LANES}")


mask16 = Mask16()


@register_model(Mask16)
class _Mask16Model(models.PrimitiveModel):
    # A 16-bit integer, not <16 x i1>: LLVM sinks a vector compare into the loop that uses it.
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _MASK_BITS)


@intrinsic
def vzero(typingctx):
    """A vector of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VECTOR, [0.0] * LANES)
    return f32x16(), codegen


@intrinsic
def vsplat(typingctx, x):
    """float32 x in every lane."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], _VECTOR)
    return f32x16(types.float32), codegen


def _splat(builder, value, vector_type):
    """`value` in every lane of a `vector_type`."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


def _lanewise(name: str, doc: str, emit):
    """An intrinsic of two vectors returning one, its LLVM code emit(builder, a, b)."""
    def typer(typingctx, a, b):
        if not (a == b == f32x16):
            return None

        def codegen(context, builder, sig, args):
            return emit(builder, *args)
        return f32x16(a, b), codegen
    typer.__name__, typer.__qualname__, typer.__doc__ = name, name, doc
    return intrinsic(typer)


def _lanes_of_two(start: int) -> ir.Constant:
    """Shuffle indices start, start + 2, ... into the 32 lanes of two vectors."""
    return ir.Constant(ir.VectorType(ir.IntType(32), LANES), list(range(start, 2 * LANES, 2)))


vmul = _lanewise("vmul", "a * b, lane by lane.", lambda builder, a, b: builder.fmul(a, b))
vadd = _lanewise("vadd", "a + b, lane by lane.", lambda builder, a, b: builder.fadd(a, b))
vsub = _lanewise("vsub", "a - b, lane by lane.", lambda builder, a, b: builder.fsub(a, b))
vmax = _lanewise("vmax", "max(a, b), lane by lane; NaN where either is NaN (torch's max pooling).",
                 lambda builder, a, b: builder.select(
                     builder.or_(builder.fcmp_ordered(">", a, b), builder.fcmp_unordered("uno", a, a)), a, b))
vevens = _lanewise("vevens", "Lanes 0, 2, ..., 30 of the 32 lanes of a then b (one vpermt2ps with AVX-512).",
                   lambda builder, a, b: builder.shuffle_vector(a, b, _lanes_of_two(0)))
vodds = _lanewise("vodds", "Lanes 1, 3, ..., 31 of the 32 lanes of a then b.",
                  lambda builder, a, b: builder.shuffle_vector(a, b, _lanes_of_two(1)))
vzip_lo = _lanewise("vzip_lo", "a[0], b[0], a[1], b[1], ..., a[7], b[7]: `vevens` and `vodds` undone, first half.",
                    lambda builder, a, b: builder.shuffle_vector(a, b, _zipped_lanes(0)))
vzip_hi = _lanewise("vzip_hi", "a[8], b[8], ..., a[15], b[15]: the second half.",
                    lambda builder, a, b: builder.shuffle_vector(a, b, _zipped_lanes(LANES // 2)))


def _zipped_lanes(start: int) -> ir.Constant:
    """Shuffle indices start, LANES + start, start + 1, LANES + start + 1, ... (16 of them)."""
    lanes = [start + i // 2 + (LANES if i % 2 else 0) for i in range(LANES)]
    return ir.Constant(ir.VectorType(ir.IntType(32), LANES), lanes)


@intrinsic
def vclamp(typingctx, v, lo, hi):
    """v clamped to [lo, hi] lane by lane, as `epilogue.apply_act` clamps one value."""
    if not (v == f32x16 and lo == hi == types.float32):
        return None

    def codegen(context, builder, sig, args):
        v, lo, hi = args
        for bound, op in ((lo, "<"), (hi, ">")):
            splat = _splat(builder, bound, _VECTOR)
            v = builder.select(builder.fcmp_ordered(op, v, splat), splat, v)
        return v
    return f32x16(v, lo, hi), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, lane by lane."""
    if not (a == b == c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3),
                                            f"llvm.fmuladd.v{LANES}f32")
        return builder.call(fn, args)
    return f32x16(a, b, c), codegen


def _check_array(arr, idx, count) -> bool:
    """arr is 1-D float32, idx an integer and count an integer or a `vmask`."""
    return (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1
            and isinstance(idx, types.Integer) and (isinstance(count, types.Integer) or count == mask16))


def _i64(builder, value):
    return builder.sext(value, _I64) if value.type.width < 64 else value


def _lane_pointer(context, builder, arrty, arr, idx):
    """Pointer to arr[idx] as a pointer to a vector."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [_i64(builder, idx)]), _VECTOR.as_pointer())


def _lanes(builder, count_type, count):
    """The mask a load or store takes: `count` itself if it is a `vmask`, else the lanes below it."""
    return builder.bitcast(count, _MASK) if count_type == mask16 else _first_lanes(builder, count)


def _first_lanes(builder, count):
    """The mask of lanes < count."""
    lanes = ir.Constant(ir.VectorType(_I64, LANES), list(range(LANES)))
    return builder.icmp_signed("<", lanes, _splat(builder, _i64(builder, count), ir.VectorType(_I64, LANES)))


def _masked_load(builder, ptr, mask):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VECTOR, [_VECTOR.as_pointer(), ir.IntType(32), _MASK, _VECTOR]),
        f"llvm.masked.load.v{LANES}f32.p0")
    return builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 4), mask, ir.Constant(_VECTOR, [0.0] * LANES)])


def _masked_store(builder, vector, ptr, mask):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_VECTOR, _VECTOR.as_pointer(), ir.IntType(32), _MASK]),
        f"llvm.masked.store.v{LANES}f32.p0")
    builder.call(fn, [vector, ptr, ir.Constant(ir.IntType(32), 4), mask])


@intrinsic
def vmask(typingctx, count):
    """The mask of the first `count` lanes (clipped to 0..16), for vload and vstore."""
    if not isinstance(count, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        lanes = _i64(builder, args[0])
        lanes = builder.select(builder.icmp_signed("<", lanes, _int(0)), _int(0), lanes)
        lanes = builder.select(builder.icmp_signed(">", lanes, _int(LANES)), _int(LANES), lanes)
        bits = builder.sub(builder.shl(_int(1), lanes), _int(1))
        return builder.trunc(bits, _MASK_BITS)
    return mask16(count), codegen


@intrinsic
def vload(typingctx, arr, idx, count):
    """arr[idx : idx + count] in the first lanes (count clipped to 0..16, or a vmask), zeros in the rest."""
    if not _check_array(arr, idx, count):
        return None

    def codegen(context, builder, sig, args):
        arr, idx, count = args
        return _masked_load(builder, _lane_pointer(context, builder, sig.args[0], arr, idx),
                            _lanes(builder, sig.args[2], count))
    return f32x16(arr, idx, count), codegen


@intrinsic
def vstore(typingctx, arr, idx, count, v):
    """arr[idx : idx + count] = the first count lanes of v (count clipped to 0..16, or a vmask)."""
    if not _check_array(arr, idx, count) or v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        arr, idx, count, v = args
        _masked_store(builder, v, _lane_pointer(context, builder, sig.args[0], arr, idx),
                      _lanes(builder, sig.args[2], count))
        return context.get_dummy_value()
    return types.none(arr, idx, count, v), codegen


def _int(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _transpose_lanes(builder, rows):
    """The 16 vectors `rows` transposed: each stage swaps the off-diagonal blocks of size b."""
    rows = list(rows)
    for b in (8, 4, 2, 1):
        low = [lane if lane & b == 0 else LANES + lane - b for lane in range(LANES)]
        high = [lane + b if lane & b == 0 else LANES + lane for lane in range(LANES)]
        for i in range(LANES):
            if i & b:
                continue
            a, c = rows[i], rows[i + b]
            rows[i] = builder.shuffle_vector(a, c, ir.Constant(ir.VectorType(ir.IntType(32), LANES), low))
            rows[i + b] = builder.shuffle_vector(a, c, ir.Constant(ir.VectorType(ir.IntType(32), LANES), high))
    return rows


@intrinsic
def vtranspose(typingctx, src, s0, s_step, rows, cols, dst, d0, d_step):
    """dst[d0 + j*d_step + i] = src[s0 + i*s_step + j] for i < rows and j < cols (both clipped to 16).

    Reads only those rows x cols values and writes only their transposes:
    16 masked loads, 64 lane shuffles and 16 masked stores.
    """
    if not (_check_array(src, s0, rows) and _check_array(dst, d0, cols)
            and isinstance(s_step, types.Integer) and isinstance(d_step, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        src, s0, s_step, rows, cols, dst, d0, d_step = args
        s0, s_step, rows, cols, d0, d_step = (_i64(builder, v) for v in (s0, s_step, rows, cols, d0, d_step))
        none = ir.Constant(_MASK, [0] * LANES)
        col_mask, row_mask = _first_lanes(builder, cols), _first_lanes(builder, rows)
        vectors = []
        for i in range(LANES):  # row i, or nothing past the last row
            ptr = _lane_pointer(context, builder, sig.args[0], src, builder.add(s0, builder.mul(s_step, _int(i))))
            mask = builder.select(builder.icmp_signed(">", rows, _int(i)), col_mask, none)
            vectors.append(_masked_load(builder, ptr, mask))
        for j, vector in enumerate(_transpose_lanes(builder, vectors)):
            ptr = _lane_pointer(context, builder, sig.args[5], dst, builder.add(d0, builder.mul(d_step, _int(j))))
            mask = builder.select(builder.icmp_signed(">", cols, _int(j)), row_mask, none)
            _masked_store(builder, vector, ptr, mask)
        return context.get_dummy_value()
    return types.none(src, s0, s_step, rows, cols, dst, d0, d_step), codegen
