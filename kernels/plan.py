"""The execution plan of a graph: fused steps, value borders and buffer slots. No kernel runs here.

`plan_graph(graph)` turns a validated `Graph` into a `Plan` once, at load time:

1. Fusion. A conv2d or linear node absorbs what follows it when that costs no
   extra pass and changes no result: a residual `add` whose other input is
   already computed (it becomes the epilogue's residual), then a relu/clip (the
   epilogue's clamp), provided each absorbed value has no other reader; then a
   2x2 stride-2 max pooling, where the conv is one the Winograd kernel covers
   (it pools in its output transform; the other kernels write the conv's output
   to scratch and pool from there, as the separate step did). A
   normalize or affine node absorbs a following relu/clip the same way, and so
   does an add. A standalone relu/clip is an `act` step; flatten is a `flatten`
   step, a view of its input where the layout allows (see below).
2. Borders. Every 4-D value is stored in a runtime `layout` whose zero border is
   the largest padding of the convs that read it, so those convs read it in
   place and its producer writes their packed input (`layout`): stride-1 convs
   with any kernel, strided ones with the sparse kernel where a pixel is whole
   vectors (`steps.ConvExecutor.reads_strided_in_place`); the others pack it.
3. Buffers. Values get buffer slots by liveness: a slot is reused once its last
   reader has run; a step writes in place over an input that dies at that step
   when the layouts agree (act/affine, add, and a conv's, not a linear's, residual); a bordered
   slot is only shared by values of the same geometry, so its border, zeroed
   once, stays zero.

The image group of each layout depends on the batch size and is settled when the
runtime prepares a batch size (`Plan.layout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from harp.export.graph import Graph, Node

from . import packing
from .layout import Layout
from .winograd import supports_winograd

CONV_LIKE = ("conv2d", "linear")
ACTIVATIONS = ("relu", "clip")


@dataclass(frozen=True)
class Step:
    """One unit of execution: a main graph node plus the nodes fused into it.

    op: conv2d, linear, affine (normalize and affine nodes), act (standalone
    relu/clip), add, maxpool2d, avgpool2d, global_avgpool or flatten.
    `clamp` is the fused activation as (lo, hi), None for none. A conv2d with a
    fused max pooling has attrs["unpooled_shape"], its own output's (C, H, W).
    """

    name: str
    op: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str
    residual: str | None = None
    clamp: tuple[float, float] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    in_place: str | None = None  # the input whose buffer the output overwrites


@dataclass(frozen=True)
class ValueInfo:
    """A value's per-sample shape, its border, and the buffer slot that holds it."""

    name: str
    shape: tuple[int, ...]
    border: tuple[int, int]
    slot: int
    view_of: str | None = None  # a flatten view shares its input's buffer


@dataclass(frozen=True)
class Slot:
    """A buffer shared by values whose lifetimes do not overlap.

    `per_image` float32 elements per image of the batch; `geometry` is the
    (C, H, W, bh, bw) of its values when they have a border (such a slot only
    holds that geometry), None for a plain slot.
    """

    per_image: int
    geometry: tuple[int, ...] | None


@dataclass
class Plan:
    graph_nodes: int
    steps: list[Step]
    values: dict[str, ValueInfo]
    slots: list[Slot]
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]

    def layout(self, value: str, n: int) -> Layout:
        """The layout of `value` for a batch of n (the graph input is always plain NCHW)."""
        info = self.values[value]
        if len(info.shape) == 1:
            return Layout(info.shape[0], 1, 1, 0, 0, packing.image_group(n, 1))
        c, h, w = info.shape
        group = 1 if value == self.input_name else packing.image_group(n, h * w)
        return Layout(c, h, w, info.border[0], info.border[1], group)


def plan_graph(graph: Graph) -> Plan:
    """Fuse, lay out and allocate `graph` (validated here); see the module docstring."""
    shapes = graph.validate()
    steps = _fuse(graph, shapes)
    borders = _borders(steps, shapes, graph.input_name)
    views = {s.output: s.inputs[0] for s in steps if s.op == "flatten" and s.inputs[0] != graph.input_name
             and _flatten_is_view(shapes[s.inputs[0]], borders[s.inputs[0]])}  # the input is NCHW: (N, F)
    steps = _mark_in_place(steps, shapes, borders, views, graph)
    values, slots = _allocate(steps, shapes, borders, views, graph)
    return Plan(graph_nodes=len(graph.nodes), steps=steps, values=values, slots=slots,
                input_name=graph.input_name, output_name=graph.output_name,
                input_shape=tuple(graph.input_shape))


def _flatten_is_view(shape: tuple[int, ...], border: tuple[int, int]) -> bool:
    """Flat values are feature-major (F, N): a (C, H, W) value with no border is that
    already when its image group is N, which holds for every batch when its planes
    are small (`packing.image_group`)."""
    if len(shape) == 1:
        return True
    return border == (0, 0) and shape[1] * shape[2] < packing.MIN_PLANE_PIXELS


# ---------------------------------------------------------------- fusion


def _clamp_of(node: Node) -> tuple[float, float]:
    if node.op == "relu":
        return 0.0, math.inf
    return float(node.attrs["min"]), float(node.attrs["max"])


def _fuse(graph: Graph, shapes: dict[str, tuple[int, ...]]) -> list[Step]:
    producer = {node.output: i for i, node in enumerate(graph.nodes)}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        for value in node.inputs:
            readers.setdefault(value, []).append(i)

    def sole_reader(value: str) -> Node | None:
        """The one node reading `value`, unless the value is the graph output or read elsewhere."""
        users = readers.get(value, [])
        if value == graph.output_name or len(users) != 1:
            return None
        return graph.nodes[users[0]]

    claimed: set[int] = set()
    steps: list[Step] = []
    for i, node in enumerate(graph.nodes):
        if i in claimed:
            continue
        fused = [node.name]
        output, residual, clamp = node.output, None, None
        if node.op in CONV_LIKE:
            nxt = sole_reader(output)
            if nxt is not None and nxt.op == "add":
                other = nxt.inputs[1] if nxt.inputs[0] == output else nxt.inputs[0]
                ready = other == graph.input_name or producer.get(other, len(graph.nodes)) < i
                if ready and other != output:
                    claimed.add(graph.nodes.index(nxt))
                    fused.append(nxt.name)
                    output, residual = nxt.output, other
        if node.op in CONV_LIKE + ("normalize", "affine", "add"):
            nxt = sole_reader(output)
            if nxt is not None and nxt.op in ACTIVATIONS:
                claimed.add(graph.nodes.index(nxt))
                fused.append(nxt.name)
                output, clamp = nxt.output, _clamp_of(nxt)
        attrs = dict(node.attrs)
        if node.op == "conv2d" and residual is None and _winograd_shaped(node, graph, shapes[output]):
            nxt = sole_reader(output)
            if nxt is not None and nxt.op == "maxpool2d" and _halving(nxt):
                claimed.add(graph.nodes.index(nxt))
                fused.append(nxt.name)
                output, attrs["unpooled_shape"] = nxt.output, tuple(shapes[output])
        op = node.op
        if op == "normalize":
            op = "affine"
        elif op in ACTIVATIONS:
            op, clamp = "act", _clamp_of(node)
        steps.append(Step(name=node.name, op=op, nodes=tuple(fused), inputs=node.inputs, output=output,
                          residual=residual, clamp=clamp, attrs=attrs, params=dict(node.params)))
    return steps


def _winograd_shaped(node: Node, graph: Graph, out_shape) -> bool:
    a = node.attrs
    return supports_winograd(graph.tensors[node.params["weight"]].shape, a["stride"], a["padding"], a["dilation"],
                             a["groups"], out_shape[1:])


def _halving(node: Node) -> bool:
    """A 2x2 max pooling at stride 2 without padding or dilation (on an even plane: ceil_mode changes nothing)."""
    a = node.attrs
    return all(tuple(a[key]) == value for key, value in
               (("kernel", (2, 2)), ("stride", (2, 2)), ("padding", (0, 0)), ("dilation", (1, 1))))


# ---------------------------------------------------------------- borders


def _borders(steps: list[Step], shapes: dict[str, tuple[int, ...]], input_name: str) -> dict[str, tuple[int, int]]:
    """Per value, the largest padding among the convs reading it (the graph input has none)."""
    borders = {value: (0, 0) for value in shapes}
    for step in steps:
        if step.op != "conv2d":
            continue
        value = step.inputs[0]
        if value == input_name:
            continue
        ph, pw = (int(p) for p in step.attrs["padding"])
        bh, bw = borders[value]
        borders[value] = (max(bh, ph), max(bw, pw))
    return borders


# ---------------------------------------------------------------- buffers


def _geometry(value: str, shapes, borders) -> tuple[int, ...] | None:
    border = borders[value]
    return None if border == (0, 0) else (*shapes[value], *border)


def _per_image(value: str, shapes, borders) -> int:
    shape = shapes[value]
    if len(shape) == 1:
        return shape[0]
    c, h, w = shape
    bh, bw = borders[value]
    return c * (h + 2 * bh) * (w + 2 * bw)


def _same_layout(a: str, b: str, shapes, borders) -> bool:
    """Equal layouts for every batch size: same shape and border (then the same image group)."""
    return shapes[a] == shapes[b] and borders[a] == borders[b]


def _last_reads(steps: list[Step], views: dict[str, str]) -> dict[str, int]:
    """Index of the last step reading each value; a view's reads count for the value it views."""
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for value in step.inputs + ((step.residual,) if step.residual else ()):
            while value is not None:
                last[value] = i
                value = views.get(value)
    return last


def _mark_in_place(steps, shapes, borders, views, graph) -> list[Step]:
    last = _last_reads(steps, views)
    viewed = set(views.values())
    marked = []
    for i, step in enumerate(steps):
        candidates: tuple[str, ...] = ()
        if step.op in ("act", "affine", "add"):
            candidates = step.inputs
        elif step.op == "conv2d" and step.residual is not None:  # the conv kernels add it tile by tile;
            candidates = (step.residual,)  # the linear ones write their output before adding it
        chosen = None
        for value in candidates:
            # the graph's input and output belong to the caller: a step after the output (a bundle
            # may have one) had overwritten the logits with relu(logits)
            if (value not in (graph.input_name, graph.output_name) and value not in views and value not in viewed
                    and last.get(value) == i and step.inputs.count(value) + (step.residual == value) == 1
                    and _same_layout(value, step.output, shapes, borders)):
                chosen = value
                break
        marked.append(replace(step, in_place=chosen))
    return marked


def _allocate(steps, shapes, borders, views, graph) -> tuple[dict[str, ValueInfo], list[Slot]]:
    last = _last_reads(steps, views)
    slots: list[Slot] = []
    free: list[int] = []
    slot_of: dict[str, int] = {}

    def take(value: str) -> int:
        geometry = _geometry(value, shapes, borders)
        need = _per_image(value, shapes, borders)
        matching = [s for s in free if slots[s].geometry == geometry]
        if geometry is None:  # the smallest plain slot that fits, else the largest, grown
            fitting = [s for s in matching if slots[s].per_image >= need]
            pick = min(fitting, key=lambda s: slots[s].per_image) if fitting else (
                max(matching, key=lambda s: slots[s].per_image) if matching else None)
        else:
            pick = matching[0] if matching else None
        if pick is None:
            slots.append(Slot(need, geometry))
            return len(slots) - 1
        free.remove(pick)
        if slots[pick].per_image < need:
            slots[pick] = Slot(need, geometry)
        return pick

    slot_of[graph.input_name] = -1  # the runtime's own input buffer, never shared
    for i, step in enumerate(steps):
        if step.output in views:
            slot_of[step.output] = slot_of[views[step.output]]
        elif step.in_place is not None:
            slot_of[step.output] = slot_of[step.in_place]
        else:
            slot_of[step.output] = take(step.output)
        # Free every slot none of whose values is read after this step.
        for slot in sorted(set(slot_of.values()) - set(free) - {-1}):
            holders = [v for v, s in slot_of.items() if s == slot]
            if all(v != graph.output_name and last.get(v, -1) <= i for v in holders):
                free.append(slot)
    values = {name: ValueInfo(name, shapes[name], borders[name], slot_of[name], views.get(name))
              for name in slot_of}
    return values, slots
