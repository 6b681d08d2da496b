"""Executors of plan steps: each turns one `plan.Step` into bound kernel calls for a batch size.

An executor is built once per step at load time (weights converted to kernel
arrays, CSR decoded) and asked, for each batch size the runtime prepares, for
the workspace it needs and for the no-argument callables that compute the step
with a given kernel (one of its `kernels`: "sparse" or "dense" for conv2d and
linear, "winograd" for the 3x3 stride-1 convs it covers, and "unrolled"
(`unrolled`) for convs in image groups of 16k, offered per batch size by
`kernels_in`; "-" for the rest). Every check happens while binding; the
callables only run kernels.
One class per op, registered in `EXECUTORS`; adding an op means one class and
one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from harp.export.csr import CSRTensor

from .conv import SparseConvPlan, bind_sparse_conv2d, plan_sparse_conv2d
from .csr import kernel_csr
from .dense import (DenseConvPlan, DenseLinearPlan, bind_dense_conv2d, bind_dense_linear, plan_dense_conv2d,
                    plan_dense_linear)
from .elementwise import bind_add_act, bind_affine_act
from .epilogue import resolve_activation
from .layout import Layout
from .packing import bind_pack, image_group, packed_size, used_phases
from .plan import Plan, Step
from .pool import bind_avgpool2d, bind_global_avgpool, bind_maxpool2d
from .simd import LANES
from .spmm import bind_spmm
from .unrolled import UnrolledConv, bind_unrolled_conv2d, compile_unrolled, worth_unrolling
from .winograd import WinogradPlan, bind_winograd, plan_winograd, supports_winograd, tile_edge

Call = Callable[[], None]


@dataclass
class Buffers:
    """The arrays of one prepared batch size: value slots, the input, and the shared pack workspace."""

    n: int
    slots: list[np.ndarray]
    input: np.ndarray
    pack: np.ndarray  # packed inputs of convs that cannot read their input in place
    scratch: np.ndarray  # the Winograd kernel's transformed input and products, one step at a time


@dataclass
class SharedPack:
    """One conv's packed input, read by later convs of the same input instead of packing it again."""

    maker: str  # the step that packs
    border: tuple[int, int]  # the padding it packs with (the maker's own)
    phases: np.ndarray  # the stride phases the maker and the convs reading its pack read


class Context:
    """What executors bind against: the plan, the batch size and its buffers."""

    def __init__(self, plan: Plan, buffers: Buffers):
        self.plan = plan
        self.buffers = buffers
        self.n = buffers.n
        self.shared_packs: dict[str, SharedPack] = {}  # step name -> the shared pack it makes or reads

    def share_packs(self, executors: list[Executor]) -> None:
        """Let a conv read the pack of an earlier conv instead of packing the same input again.

        Conv B reads conv A's pack when A is the last conv before B that packs
        (the workspace still holds A's pack), both read the same value with the
        same stride and image group, and A's padding is at least B's: ResNet's
        1x1 stride-2 shortcut then reads phase (1, 1) of the pack of the 3x3
        stride-2 conv beside it. A packs every channel and the phases both read.
        A conv whose sparse kernel reads its input in place at its stride
        (`ConvExecutor.reads_strided_in_place`) takes no part: it packs only
        with the other kernels, for itself, which ends any sharing before it.
        """
        maker: ConvExecutor | None = None
        for ex in executors:
            if not isinstance(ex, ConvExecutor) or not ex.packs(self):
                continue
            if ex.reads_strided_in_place(self):
                maker = None
                continue
            if maker is not None and maker.pack_serves(ex, self):
                name = maker.step.name
                shared = self.shared_packs.setdefault(name, SharedPack(name, maker.padding, maker.phases()))
                shared.phases |= ex.phases(shift=tuple(a - b for a, b in zip(maker.padding, ex.padding)))
                self.shared_packs[ex.step.name] = shared
            else:
                maker = ex

    def layout(self, value: str) -> Layout:
        return self.plan.layout(value, self.n)

    def buffer(self, value: str) -> np.ndarray:
        """The flat buffer holding `value` (a prefix of its slot)."""
        layout = self.layout(value)
        slot = self.plan.values[value].slot
        whole = self.buffers.input if slot < 0 else self.buffers.slots[slot]
        return whole[: layout.size(self.n)]

    def value(self, value: str) -> tuple[np.ndarray, Layout]:
        return self.buffer(value), self.layout(value)

    def matrix(self, value: str) -> np.ndarray:
        """A flat value as the feature-major (F, N) matrix it is stored as."""
        features = self.plan.values[value].shape[0]
        return self.buffer(value).reshape(features, self.n)


def _activation(step: Step) -> tuple[int, np.float32, np.float32]:
    if step.clamp is None:
        return resolve_activation(step.name, "none")
    return resolve_activation(step.name, "clip", step.clamp)


class Executor:
    """Base: an op with a single kernel and no workspace."""

    kernels: tuple[str, ...] = ("-",)

    def __init__(self, step: Step, tensors: dict[str, Any], plan: Plan):
        self.step = step
        self.plan = plan

    @property
    def density(self) -> float | None:
        return None

    @property
    def macs_per_image(self) -> int | None:
        """Multiply-adds per image the sparse kernel performs (nonzeros x output pixels)."""
        return None

    @property
    def dense_macs_per_image(self) -> int | None:
        """Multiply-adds per image with the weight dense (what onnxruntime computes)."""
        return None

    def kernels_in(self, ctx: Context) -> tuple[str, ...]:
        """The kernels that can run this step at the context's batch size."""
        return self.kernels

    def workspace(self, ctx: Context, kernel: str) -> int:
        """float32 elements of the pack workspace `kernel` needs for the context's batch size."""
        return 0

    def scratch(self, ctx: Context, kernel: str) -> int:
        """float32 elements of the scratch buffer `kernel` needs for the context's batch size."""
        return 0

    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        raise NotImplementedError


class ConvExecutor(Executor):
    """conv2d: the sparse kernel, the dense one, Winograd (`winograd`) where the geometry allows it,
    and the sparse one compiled for the layer's pattern (`unrolled`) where the image group allows it.

    A fused max pooling (attrs["unpooled_shape"], see `plan`) is taken in Winograd's
    output transform where the conv's output and the pooled one have the same
    image group; otherwise the kernel writes the conv's output to the scratch
    buffer, after its own scratch, and the pooling kernel reads it from there.
    """

    def __init__(self, step: Step, tensors: dict[str, Any], plan: Plan):
        super().__init__(step, tensors, plan)
        weight = tensors[step.params["weight"]]
        if not isinstance(weight, CSRTensor):
            raise TypeError(f"conv2d {step.name}: weight must be a CSRTensor from the bundle loader")
        self.weight = weight
        self.indptr, self.indices, self.values = kernel_csr(weight)
        self.bias = _bias(tensors, step, weight.shape[0])
        a = step.attrs
        self.geometry = (tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), int(a["groups"]))
        self.in_hw = tuple(plan.values[step.inputs[0]].shape[1:])
        self._sparse: dict[tuple[tuple[int, int], bool], SparseConvPlan] = {}  # (border, in place) -> plan
        self._dense: dict[tuple[int, int], DenseConvPlan] = {}
        self._dense_weight: np.ndarray | None = None
        self._winograd: dict[int, WinogradPlan] = {}  # tile edge -> plan
        self._unrolled: dict[tuple[tuple[int, int], int], UnrolledConv] = {}  # (border, group) -> code
        self.unpooled = step.attrs.get("unpooled_shape")
        self.out_hw = tuple((self.unpooled or plan.values[step.output].shape)[1:])  # the conv's, before any pooling
        self.kernels = ("sparse", "dense") + (("winograd",) if supports_winograd(
            weight.shape, *self.geometry, self.out_hw) else ()) + ("unrolled",)

    def kernels_in(self, ctx: Context) -> tuple[str, ...]:
        group = self.conv_layout(ctx).group
        left_out = set()
        if group % LANES or not worth_unrolling(self.density, self.weight.nnz):
            left_out.add("unrolled")
        if self.step.residual and ctx.layout(self.step.residual).group != group:
            left_out.add("winograd")  # its epilogue adds a residual of its own image group only (the graph
            # input's is 1: a conv on a small plane adding the input at batch > 1)
        return tuple(k for k in self.kernels if k not in left_out)

    @property
    def density(self) -> float:
        return self.weight.density

    @property
    def macs_per_image(self) -> int:
        return self.weight.nnz * self.out_hw[0] * self.out_hw[1]

    @property
    def dense_macs_per_image(self) -> int:
        return self.weight.n_rows * self.weight.n_cols * self.out_hw[0] * self.out_hw[1]

    @property
    def padding(self) -> tuple[int, int]:
        return self.geometry[1]

    def _fits(self, layout: Layout, group: int) -> bool:
        """Whether a buffer in `layout` can be read as this conv's input: the same image group, border >= padding."""
        return layout.group == group and layout.pad_h >= self.padding[0] and layout.pad_w >= self.padding[1]

    def _reads_in_place(self, layout: Layout, group: int) -> bool:
        return self.geometry[0] == (1, 1) and self._fits(layout, group)

    def packs(self, ctx: Context) -> bool:
        """Whether this conv needs a packed copy of its input at the context's batch size (with some kernel)."""
        return not self._reads_in_place(ctx.layout(self.step.inputs[0]), self.conv_layout(ctx).group)

    def reads_strided_in_place(self, ctx: Context) -> bool:
        """Whether the sparse kernel reads the input buffer as it is at this conv's stride > 1.

        It can when a pixel of the buffer is whole vectors (the same image group,
        a multiple of 16, in the input and the output) and the buffer's border covers the padding
        (`plan` gives inputs of strided convs one). That saves the pack: ResNet18's
        three stride-2 packs at batch 16 wrote 4.5, 2.5 and 1.6 MiB, and took
        0.1-0.6 ms each in the model.
        """
        group = self.conv_layout(ctx).group
        return ("sparse" in self.kernels and self.geometry[0] != (1, 1) and group % LANES == 0
                and self._fits(ctx.layout(self.step.inputs[0]), group))

    def phases(self, shift=(0, 0)) -> np.ndarray:
        """The stride phases of a pack made with `shift` more padding than this conv's that it reads."""
        return used_phases(self.weight.shape[2:], self.geometry[0], self.geometry[2], shift)

    def pack_serves(self, other: ConvExecutor, ctx: Context) -> bool:
        """Whether this conv's pack of its input can also be `other`'s (see `Context.share_packs`)."""
        return (other.step.inputs[0] == self.step.inputs[0] and other.geometry[0] == self.geometry[0]
                and other.conv_layout(ctx).group == self.conv_layout(ctx).group
                and all(mine >= theirs for mine, theirs in zip(self.padding, other.padding)))

    def sparse_plan(self, border, in_place: bool = False) -> SparseConvPlan:
        key = (border, in_place)
        if key not in self._sparse:
            self._sparse[key] = plan_sparse_conv2d(self.indptr, self.indices, self.weight.shape, self.in_hw,
                                                   *self.geometry, border=border, in_place=in_place)
        return self._sparse[key]

    def unrolled_code(self, border, group: int) -> UnrolledConv:
        """The layer compiled for a packed input of `border` in image groups of `group` (made on first use)."""
        if (border, group) not in self._unrolled:
            self._unrolled[border, group] = compile_unrolled(self.sparse_plan(border), self.indptr, group)
        return self._unrolled[border, group]

    def dense_plan(self, border) -> DenseConvPlan:
        if border not in self._dense:
            self._dense[border] = plan_dense_conv2d(self.dense_weight(), self.in_hw, *self.geometry, border=border)
        return self._dense[border]

    def winograd_plan(self, ctx: Context) -> WinogradPlan:
        """The Winograd plan of the tile edge that suits the context's image group."""
        m = tile_edge(self.in_hw, self.conv_layout(ctx).group)
        if m not in self._winograd:
            self._winograd[m] = plan_winograd(self.dense_weight(), self.in_hw, m)
        return self._winograd[m]

    def dense_weight(self) -> np.ndarray:
        """The weight as a dense (O, C/groups, kh, kw) array, made on first use."""
        if self._dense_weight is None:
            self._dense_weight = self.weight.to_dense()
        return self._dense_weight

    def conv_layout(self, ctx: Context) -> Layout:
        """The layout of the conv's own output: its step's output, or the scratch one a fused pooling reads."""
        if self.unpooled is None:
            return ctx.layout(self.step.output)
        c, h, w = self.unpooled
        return Layout(c, h, w, 0, 0, image_group(ctx.n, h * w))

    def pools_in_kernel(self, ctx: Context, kernel: str) -> bool:
        """Whether `kernel` takes the fused max pooling itself (Winograd's output transform)."""
        return (self.unpooled is not None and kernel == "winograd"
                and self.conv_layout(ctx).group == ctx.layout(self.step.output).group)

    def _own_scratch(self, ctx: Context, kernel: str) -> int:
        return self.winograd_plan(ctx).scratch_size(ctx.n) if kernel == "winograd" else 0

    def scratch(self, ctx: Context, kernel: str) -> int:
        if self.unpooled is None or self.pools_in_kernel(ctx, kernel):
            return self._own_scratch(ctx, kernel)
        return self._own_scratch(ctx, kernel) + self.conv_layout(ctx).size(ctx.n)

    def workspace(self, ctx: Context, kernel: str) -> int:
        if not self.packs(ctx) or (kernel == "sparse" and self.reads_strided_in_place(ctx)):
            return 0
        return packed_size(ctx.n, ctx.layout(self.step.inputs[0]).channels, self.in_hw, self.geometry[0],
                           self.padding)

    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        step = self.step
        x, x_layout = ctx.value(step.inputs[0])
        out, out_layout = ctx.value(step.output)
        res, res_layout = ctx.value(step.residual) if step.residual else (None, None)
        pooled, pooled_layout, pool = None, None, self.pools_in_kernel(ctx, kernel)
        if self.unpooled is not None and not pool:  # the conv's output goes to scratch, the pooling reads it
            pooled, pooled_layout = out, out_layout
            out_layout = self.conv_layout(ctx)
            start = self._own_scratch(ctx, kernel)
            out = ctx.buffers.scratch[start: start + out_layout.size(ctx.n)]
        group = self.conv_layout(ctx).group
        stride, padding = self.geometry[0], self.geometry[1]
        calls: list[Call] = []
        shared = ctx.shared_packs.get(step.name)
        strided_in_place = kernel == "sparse" and self.reads_strided_in_place(ctx)
        if self._reads_in_place(x_layout, group) or strided_in_place:
            packed, border = x, (x_layout.pad_h, x_layout.pad_w)
        elif shared is not None and shared.maker != step.name:  # an earlier conv packed it for us
            packed, border = ctx.buffers.pack, shared.border
        else:
            packed, border = ctx.buffers.pack, padding
            # The dense kernel reads every channel; the sparse one only those its nonzeros name,
            # unless other convs read the pack too.
            if shared is not None:
                phases, channels = shared.phases, None
            else:
                phases = self.phases()
                channels = self.sparse_plan(border).used_channels() if kernel in ("sparse", "unrolled") else None
            calls.append(bind_pack(x, x_layout, ctx.n, stride, padding, group, packed, phases, channels))
        act, lo, hi = _activation(step)
        if kernel == "winograd":  # stride 1: the packed input is the input with a border of `border`
            x_layout = Layout(x_layout.channels, x_layout.height, x_layout.width, *border, group)
            calls += bind_winograd(self.winograd_plan(ctx), packed, x_layout, ctx.n, ctx.buffers.scratch, self.bias,
                                   act, lo, hi, res, res_layout, out, out_layout, pool=pool)
        elif kernel == "unrolled":
            calls.append(bind_unrolled_conv2d(self.unrolled_code(border, group), self.values, packed, ctx.n, self.bias,
                                              act, lo, hi, res, res_layout, out, out_layout))
        elif kernel == "sparse":
            calls.append(bind_sparse_conv2d(self.sparse_plan(border, strided_in_place), self.indptr, self.values,
                                            packed, ctx.n, group, self.bias, act, lo, hi, res, res_layout, out,
                                            out_layout))
        else:
            calls.append(bind_dense_conv2d(self.dense_plan(border), packed, ctx.n, group, self.bias, act, lo, hi,
                                           res, res_layout, out, out_layout))
        if pooled is not None:
            calls.append(bind_maxpool2d(out, out_layout, ctx.n, (2, 2), (2, 2), (0, 0), (1, 1), False, pooled,
                                        pooled_layout))
        return calls


class LinearExecutor(Executor):
    kernels = ("sparse", "dense")

    def __init__(self, step: Step, tensors: dict[str, Any], plan: Plan):
        super().__init__(step, tensors, plan)
        weight = tensors[step.params["weight"]]
        if not isinstance(weight, CSRTensor):
            raise TypeError(f"linear {step.name}: weight must be a CSRTensor from the bundle loader")
        self.weight = weight
        self.indptr, self.indices, self.values = kernel_csr(weight)
        self.bias = _bias(tensors, step, weight.shape[0])
        self._dense: DenseLinearPlan | None = None

    @property
    def density(self) -> float:
        return self.weight.density

    @property
    def macs_per_image(self) -> int:
        return self.weight.nnz

    @property
    def dense_macs_per_image(self) -> int:
        return self.weight.n_rows * self.weight.n_cols

    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        step = self.step
        x, out = ctx.matrix(step.inputs[0]), ctx.matrix(step.output)
        res = ctx.matrix(step.residual) if step.residual else None
        act, lo, hi = _activation(step)
        if kernel == "sparse":
            return [bind_spmm(self.indptr, self.indices, self.values, x, self.bias, act, lo, hi, res, out)]
        if self._dense is None:
            self._dense = plan_dense_linear(self.weight.to_dense())
        return [bind_dense_linear(self._dense, x, self.bias, act, lo, hi, res, out)]


class AffineExecutor(Executor):
    """normalize ((x - mean) / std, as x * (1/std) + (-mean/std)) and affine, with an optional clamp."""

    def __init__(self, step: Step, tensors: dict[str, Any], plan: Plan):
        super().__init__(step, tensors, plan)
        if "scale" in step.params:
            self.scale = np.array(tensors[step.params["scale"]], np.float32)
            self.shift = np.array(tensors[step.params["shift"]], np.float32)
        else:
            mean = np.asarray(step.attrs["mean"], np.float64)
            std = np.asarray(step.attrs["std"], np.float64)
            self.scale = (1.0 / std).astype(np.float32)
            self.shift = (-mean / std).astype(np.float32)

    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        x, x_layout = ctx.value(self.step.inputs[0])
        out, out_layout = ctx.value(self.step.output)
        act, lo, hi = _activation(self.step)
        return [bind_affine_act(x, x_layout, ctx.n, self.scale, self.shift, act, lo, hi, out, out_layout)]


class ActExecutor(Executor):
    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        x, x_layout = ctx.value(self.step.inputs[0])
        out, out_layout = ctx.value(self.step.output)
        act, lo, hi = _activation(self.step)
        return [bind_affine_act(x, x_layout, ctx.n, None, None, act, lo, hi, out, out_layout)]


class AddExecutor(Executor):
    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        a, a_layout = ctx.value(self.step.inputs[0])
        b, b_layout = ctx.value(self.step.inputs[1])
        out, out_layout = ctx.value(self.step.output)
        act, lo, hi = _activation(self.step)
        return [bind_add_act(a, a_layout, b, b_layout, ctx.n, act, lo, hi, out, out_layout)]


class MaxPoolExecutor(Executor):
    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        a = self.step.attrs
        x, x_layout = ctx.value(self.step.inputs[0])
        out, out_layout = ctx.value(self.step.output)
        return [bind_maxpool2d(x, x_layout, ctx.n, a["kernel"], a["stride"], a["padding"], a["dilation"],
                               a["ceil_mode"], out, out_layout)]


class AvgPoolExecutor(Executor):
    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        a = self.step.attrs
        x, x_layout = ctx.value(self.step.inputs[0])
        out, out_layout = ctx.value(self.step.output)
        return [bind_avgpool2d(x, x_layout, ctx.n, a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                               a["count_include_pad"], out, out_layout)]


class GlobalAvgPoolExecutor(Executor):
    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        x, x_layout = ctx.value(self.step.inputs[0])
        out, out_layout = ctx.value(self.step.output)
        return [bind_global_avgpool(x, x_layout, ctx.n, out, out_layout)]


class FlattenExecutor(Executor):
    """A view when the plan made it one; otherwise a copy into the feature-major (F, N) layout."""

    def bind(self, ctx: Context, kernel: str) -> list[Call]:
        if self.plan.values[self.step.output].view_of is not None:
            return []
        x, x_layout = ctx.value(self.step.inputs[0])
        shape = self.plan.values[self.step.inputs[0]].shape
        out = ctx.buffer(self.step.output)
        if len(shape) == 1:  # flattening a flat value: a plain copy
            return [bind_affine_act(x, x_layout, ctx.n, None, None, *resolve_activation("flatten", "none"), out,
                                    x_layout)]
        # (C, H, W) with no border and image group N is exactly (C*H*W, N), feature-major.
        out_layout = Layout(*shape, 0, 0, ctx.n)
        return [bind_affine_act(x, x_layout, ctx.n, None, None, *resolve_activation("flatten", "none"), out,
                                out_layout)]


def _bias(tensors: dict[str, Any], step: Step, n_out: int) -> np.ndarray:
    if "bias" not in step.params:
        return np.zeros(n_out, np.float32)
    return np.array(tensors[step.params["bias"]], dtype=np.float32, order="C")


EXECUTORS: dict[str, type[Executor]] = {
    "conv2d": ConvExecutor,
    "linear": LinearExecutor,
    "affine": AffineExecutor,
    "act": ActExecutor,
    "add": AddExecutor,
    "maxpool2d": MaxPoolExecutor,
    "avgpool2d": AvgPoolExecutor,
    "global_avgpool": GlobalAvgPoolExecutor,
    "flatten": FlattenExecutor,
}
