"""Dead-channel trimming: a Graph -> Graph pass that deletes channels which never matter.

Channel pruning leaves whole output channels at exactly zero (weight rows and
bias zero after BatchNorm folding), and extreme weight pruning leaves channels
no later layer reads. Both still cost rows, biases and activation memory in
every artifact. `trim_channels` removes them and keeps the function exactly the
same: every removed term was `w * 0` or `0 * x`.

How it works
1. Zero analysis (`zero_channels`), forward over the nodes. A channel is
   provably zero when it is zero for every input:
       conv2d / linear   every tap of the row meets a zero weight or a zero input
                         channel, and the bias is 0 (so for a depthwise conv a zero
                         input gives the bias alone: zero only if that bias is 0)
       relu, pools       zero in -> zero out
       clip              zero in and min <= 0 <= max
       affine, normalize zero (or scale 0) in and shift 0 / mean 0
       flatten           channel c becomes the block of H*W features c*H*W...
       add               zero in both inputs
2. Channel spaces. Ops that keep channel c in place (relu, clip, pools, affine,
   normalize, add, flatten, depthwise conv) put their input and output in one
   space, so a channel is removed from a space all at once: from the rows of
   every conv/linear producing into it, from every affine/normalize/depthwise
   conv inside it, and from the input slices of every conv/linear reading it
   ("exits"). The graph input's and output's spaces are pinned (their shapes are
   the model's interface); so are both sides of a grouped, non-depthwise conv.
3. A channel of a space is removable when at every exit it is provably zero or
   the exit's weights never read it (an all-zero input slice among the rows
   still kept). Removing rows can leave earlier channels unread, so this is
   iterated to a fixed point on masks; the graph is rebuilt once. Every space
   keeps at least one channel.

So a channel that feeds an `add` whose partner channel is live and read stays:
the sum is read at an exit and is not zero there.

Weights keep their storage: a dense float32 array comes out dense, a CSR weight
(a loaded bundle's; the runtime trims what it loads) comes out CSR, never
densified, and a tensor of a node that loses nothing comes out as it went in.
NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .csr import CSRTensor, csr_from_entries
from .errors import ExportError
from .graph import Graph, GraphError, Node

# ops whose output channel c is a function of input channel c alone (and, for add, of both inputs' c)
_CHANNELWISE = ("normalize", "affine", "relu", "clip", "maxpool2d", "avgpool2d", "global_avgpool", "flatten", "add")
_MAX_ROUNDS = 10_000  # the fixed point is reached long before; a guard against a logic error

Weight = np.ndarray | CSRTensor  # a CSR weight is trimmed as CSR


@dataclass(frozen=True)
class TrimSummary:
    """What `trim_channels` removed. Channels count distinct channels of channel spaces (a residual
    channel shared by several convs counts once); `layers` lists each conv/linear's output rows."""

    channels_before: int
    channels_after: int
    zero_channels: int  # removed because provably zero wherever they are read
    unread_channels: int  # removed because no kept weight reads them (not all zero)
    params_before: int  # elements of every weight, bias and affine tensor
    params_after: int
    nonzero_before: int
    nonzero_after: int
    rounds: int  # passes of the fixed-point iteration
    layers: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # {name, op, rows_before, rows_after}

    @property
    def channels_removed(self) -> int:
        return self.channels_before - self.channels_after

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_json(self) -> dict[str, Any]:
        return {
            "channels_before": self.channels_before, "channels_after": self.channels_after,
            "channels_removed": self.channels_removed, "zero_channels": self.zero_channels,
            "unread_channels": self.unread_channels, "params_before": self.params_before,
            "params_after": self.params_after, "params_removed": self.params_removed,
            "nonzero_before": self.nonzero_before, "nonzero_after": self.nonzero_after,
            "rounds": self.rounds, "layers": [dict(layer) for layer in self.layers],
        }


def zero_channels(graph: Graph) -> dict[str, np.ndarray]:
    """For every value, a bool mask over axis 0 of its per-sample shape (channels of a (C, H, W)
    value, features of a flat one): True where the value is zero for every possible input.

    Raises ExportError if the graph is invalid.
    """
    shapes = _validate(graph)
    return _zero_masks(graph, shapes, _params(graph))


def trim_channels(graph: Graph) -> tuple[Graph, TrimSummary]:
    """A graph computing the same function with dead channels removed, and what was removed.

    The input graph is not modified. Raises ExportError if the graph is invalid.
    """
    shapes = _validate(graph)
    params = _params(graph)
    zero = _zero_masks(graph, shapes, params)
    spaces = _Spaces.build(graph, shapes)
    keep, rounds = _fixed_point(spaces, zero, params)
    trimmed = _rebuild(graph, shapes, spaces, keep, params)
    try:
        trimmed.validate()
    except GraphError as e:  # a bug in this pass, never the user's input
        raise ExportError(f"channel trimming produced an invalid graph: {e}") from e
    return trimmed, _summary(graph, trimmed, spaces, zero, keep, rounds)


# ---------------------------------------------------------------------------
# zero analysis


ZeroRule = Callable[[Node, list[np.ndarray], dict[str, np.ndarray], dict[str, tuple[int, ...]]], np.ndarray]


def _zero_masks(graph: Graph, shapes: dict[str, tuple[int, ...]],
                params: dict[str, Weight]) -> dict[str, np.ndarray]:
    zero = {graph.input_name: np.zeros(shapes[graph.input_name][0], dtype=bool)}
    for node in graph.nodes:
        node_params = {role: params[name] for role, name in node.params.items()}
        zero[node.output] = _ZERO_RULES[node.op](node, [zero[v] for v in node.inputs], node_params, shapes)
    return zero


def _bias_zero(p: dict[str, np.ndarray], rows: int) -> np.ndarray:
    return np.ones(rows, dtype=bool) if "bias" not in p else p["bias"] == 0


def _zero_conv2d(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    w = p["weight"]
    out, per_group = w.shape[0], w.shape[1]
    groups = int(node.attrs["groups"])
    reads = _reads(w, per_group)  # (O, I/groups): row o touches input j of its group
    group_of_row = np.arange(out) // (out // groups)
    live_in = ~z[0].reshape(groups, per_group)[group_of_row]  # (O, I/groups)
    return ~(reads & live_in).any(axis=1) & _bias_zero(p, out)


def _zero_linear(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    w = p["weight"]
    return ~(_reads(w, w.shape[1]) & ~z[0]).any(axis=1) & _bias_zero(p, w.shape[0])


def _zero_same(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    return z[0].copy()


def _zero_clip(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    passes_zero = node.attrs["min"] <= 0 <= node.attrs["max"]
    return z[0].copy() if passes_zero else np.zeros_like(z[0])


def _zero_affine(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    return (z[0] | (p["scale"] == 0)) & (p["shift"] == 0)


def _zero_normalize(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    return z[0] & (np.asarray(node.attrs["mean"], dtype=np.float64) == 0)


def _zero_flatten(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    shape = shapes[node.inputs[0]]
    return np.repeat(z[0], math.prod(shape[1:]))  # channel c -> features [c*H*W, (c+1)*H*W)


def _zero_add(node: Node, z: list[np.ndarray], p: dict[str, np.ndarray], shapes: dict) -> np.ndarray:
    return z[0] & z[1]


_ZERO_RULES: dict[str, ZeroRule] = {
    "normalize": _zero_normalize,
    "affine": _zero_affine,
    "conv2d": _zero_conv2d,
    "linear": _zero_linear,
    "relu": _zero_same,
    "clip": _zero_clip,
    "maxpool2d": _zero_same,  # every window holds an input element, so -inf padding never wins alone
    "avgpool2d": _zero_same,
    "global_avgpool": _zero_same,
    "flatten": _zero_flatten,
    "add": _zero_add,
}


# ---------------------------------------------------------------------------
# channel spaces


@dataclass(frozen=True)
class _Exit:
    """A conv2d (groups=1) or linear node reading `value` from another space."""

    node: Node
    value: str


@dataclass
class _Spaces:
    """Union-find over values; each class is one channel space."""

    parent: dict[str, str]
    units: dict[str, int]  # channels of the value's space
    block: dict[str, int]  # axis-0 entries per channel: 1 for (C, H, W), H*W after flatten
    pinned: set[str]  # spaces (any member; compare roots) whose channels must all stay
    exits: list[_Exit]
    depthwise: set[str]  # names of conv2d nodes with groups == in == out channels

    @classmethod
    def build(cls, graph: Graph, shapes: dict[str, tuple[int, ...]]) -> _Spaces:
        spaces = cls({}, {}, {}, set(), [], set())
        pins = [graph.input_name, graph.output_name]
        spaces._add(graph.input_name, shapes[graph.input_name][0], 1)
        shared = _shared_tensors(graph)
        for node in graph.nodes:
            x, y = node.inputs[0], node.output
            if node.op == "conv2d":
                groups, out, cin = int(node.attrs["groups"]), shapes[y][0], shapes[x][0]
                spaces._add(y, out, 1)
                if groups == 1:
                    spaces.exits.append(_Exit(node, x))
                elif groups == cin == out:
                    spaces.depthwise.add(node.name)
                    spaces._link(x, y)  # output channel c reads input channel c alone
                else:
                    pins += [x, y]  # removing channels would unbalance the groups
            elif node.op == "linear":
                spaces._add(y, shapes[y][0], 1)
                spaces.exits.append(_Exit(node, x))
            elif node.op == "flatten":
                shape = shapes[x]
                block = math.prod(shape[1:]) * spaces.block[x]
                spaces._add(y, math.prod(shape) // block, block)
                spaces._link(x, y, reblock=True)
            elif node.op in _CHANNELWISE:
                spaces._add(y, spaces.units[x], spaces.block[x])
                for v in node.inputs:
                    spaces._link(v, y)
            else:
                raise ExportError(f"node {node.name!r} ({node.op}): channel trimming has no rule for this op")
            if any(t in shared for t in node.params.values()):
                pins += [*node.inputs, y]  # a tensor used twice cannot be cut two ways
        spaces.pinned |= set(pins)
        return spaces

    def find(self, v: str) -> str:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:  # path compression
            self.parent[v], v = root, self.parent[v]
        return root

    def free_roots(self) -> dict[str, int]:
        """Root -> channel count of every space whose channels may be removed."""
        pinned = {self.find(v) for v in self.pinned}
        return {r: self.units[r] for r in {self.find(v) for v in self.parent} if r not in pinned}

    def all_roots(self) -> dict[str, int]:
        return {r: self.units[r] for r in {self.find(v) for v in self.parent}}

    def _add(self, v: str, units: int, block: int) -> None:
        self.parent[v] = v
        self.units[v] = units
        self.block[v] = block

    def _link(self, a: str, b: str, *, reblock: bool = False) -> None:
        """Put a and b in one space; `reblock`: b is a flattened a (same channels, H*W entries each)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if self.units[a] != self.units[b] or (self.block[a] != self.block[b] and not reblock):
            self.pinned.add(a)  # e.g. a flattened value added to a linear output: no common channels


def _shared_tensors(graph: Graph) -> set[str]:
    seen: set[str] = set()
    shared: set[str] = set()
    for node in graph.nodes:
        for name in node.params.values():
            (shared if name in seen else seen).add(name)
    return shared


# ---------------------------------------------------------------------------
# the fixed point


def _unit_zero(zero: np.ndarray, block: int) -> np.ndarray:
    return zero.reshape(-1, block).all(axis=1)


def _fixed_point(spaces: _Spaces, zero: dict[str, np.ndarray],
                 params: dict[str, Weight]) -> tuple[dict[str, np.ndarray], int]:
    """Keep mask of every free space root, iterated until no exit loses a reader."""
    keep = {root: np.ones(units, dtype=bool) for root, units in spaces.free_roots().items()}
    checks = []  # (space read, space written, (rows, units) reads-through-a-nonzero-weight, units zero there)
    for e in spaces.exits:
        source = spaces.find(e.value)
        if source not in keep:
            continue
        w = params[e.node.params["weight"]]
        reads = _reads(w, spaces.units[e.value])
        checks.append((source, spaces.find(e.node.output), reads, _unit_zero(zero[e.value], spaces.block[e.value])))
    for rounds in range(1, _MAX_ROUNDS + 1):
        removable = {root: np.ones_like(mask) for root, mask in keep.items()}
        for source, target, reads, is_zero in checks:
            read = reads[keep[target]].any(axis=0) if target in keep else reads.any(axis=0)
            removable[source] &= is_zero | ~read
        changed = False
        for root, mask in removable.items():
            new = keep[root] & ~mask
            if not new.any():
                new[int(np.argmax(keep[root]))] = True  # a space keeps one channel: shapes stay >= 1
            if not np.array_equal(new, keep[root]):
                keep[root], changed = new, True
        if not changed:
            return keep, rounds
    raise ExportError(f"channel trimming did not converge in {_MAX_ROUNDS} rounds")


# ---------------------------------------------------------------------------
# rebuilding the graph


def _rebuild(graph: Graph, shapes: dict[str, tuple[int, ...]], spaces: _Spaces, keep: dict[str, np.ndarray],
             params: dict[str, Weight]) -> Graph:
    def mask(value: str) -> np.ndarray:  # over axis 0 of the value
        root = spaces.find(value)
        if root not in keep:
            return np.ones(shapes[value][0], dtype=bool)
        return np.repeat(keep[root], spaces.block[value])

    tensors: dict[str, Weight] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        p = {role: params[name] for role, name in node.params.items()}
        attrs = node.attrs
        new: dict[str, Weight] = dict(p)
        if node.op in ("conv2d", "linear"):
            rows, cols = mask(node.output), mask(node.inputs[0])
            w = p["weight"]
            if node.name in spaces.depthwise:
                new["weight"] = _select(w, rows, None)
                attrs = {**attrs, "groups": int(rows.sum())}
            elif node.op == "conv2d" and int(attrs["groups"]) > 1:
                pass  # both sides pinned
            else:
                new["weight"] = _select(w, rows, cols)
            if "bias" in p and not rows.all():
                new["bias"] = p["bias"][rows]
        elif node.op == "affine":
            channels = mask(node.output)
            new = {"scale": p["scale"][channels], "shift": p["shift"][channels]}
        elif node.op == "normalize":
            channels = mask(node.output)
            attrs = {**attrs, "mean": [m for m, k in zip(attrs["mean"], channels) if k],
                     "std": [s for s, k in zip(attrs["std"], channels) if k]}
        for role, array in new.items():
            tensors[node.params[role]] = (array if isinstance(array, CSRTensor)
                                          else np.ascontiguousarray(array, dtype=np.float32))
        nodes.append(node if attrs is node.attrs else replace(node, attrs=attrs))
    return Graph(graph.input_name, tuple(graph.input_shape), graph.output_name, nodes, tensors)  # type: ignore[arg-type]


def _summary(before: Graph, after: Graph, spaces: _Spaces, zero: dict[str, np.ndarray],
             keep: dict[str, np.ndarray], rounds: int) -> TrimSummary:
    provably_zero = {root: np.ones(units, dtype=bool) for root, units in spaces.free_roots().items()}
    for e in spaces.exits:
        root = spaces.find(e.value)
        if root in provably_zero:
            provably_zero[root] &= _unit_zero(zero[e.value], spaces.block[e.value])
    zero_removed = sum(int((~keep[r] & provably_zero[r]).sum()) for r in keep)
    unread_removed = sum(int((~keep[r] & ~provably_zero[r]).sum()) for r in keep)
    layers = []
    for old, new in zip(before.nodes, after.nodes):
        if old.op in ("conv2d", "linear"):
            layers.append({"name": old.name, "op": old.op,
                           "rows_before": int(before.tensors[old.params["weight"]].shape[0]),
                           "rows_after": int(after.tensors[new.params["weight"]].shape[0])})
    channels_before = sum(spaces.all_roots().values())
    return TrimSummary(
        channels_before=channels_before,
        channels_after=channels_before - zero_removed - unread_removed,
        zero_channels=zero_removed, unread_channels=unread_removed,
        params_before=_count(before, nonzero=False), params_after=_count(after, nonzero=False),
        nonzero_before=_count(before, nonzero=True), nonzero_after=_count(after, nonzero=True),
        rounds=rounds, layers=tuple(layers))


# ---------------------------------------------------------------------------
# helpers


def _validate(graph: Graph) -> dict[str, tuple[int, ...]]:
    try:
        return graph.validate()
    except GraphError as e:
        raise ExportError(f"channel trimming needs a valid graph: {e}") from e


def _params(graph: Graph) -> dict[str, Weight]:
    return {name: t if isinstance(t, CSRTensor) else np.asarray(t, dtype=np.float32)
            for name, t in graph.tensors.items()}


def _reads(w: Weight, units: int) -> np.ndarray:
    """(rows, units) bools: row r has a nonzero weight in unit u, the columns cut into `units` equal blocks."""
    if not isinstance(w, CSRTensor):
        return (w.reshape(w.shape[0], units, -1) != 0).any(axis=2)
    reads = np.zeros((w.n_rows, units), dtype=bool)
    stored = w.values != 0  # a reader tolerates stored zeros (an fp16 value rounded to 0)
    reads[w.row_indices()[stored], w.indices[stored].astype(np.int64) // (w.n_cols // units)] = True
    return reads


def _select(w: Weight, rows: np.ndarray, cols: np.ndarray | None) -> Weight:
    """w[rows][:, cols] over axes 0 and 1 (cols None: all); `w` itself when both keep everything."""
    if rows.all() and (cols is None or cols.all()):
        return w
    if not isinstance(w, CSRTensor):
        return w[rows] if cols is None else w[rows][:, cols]
    block = w.n_cols // w.shape[1]  # columns per input channel (its kh*kw taps)
    kept_cols = np.ones(w.n_cols, dtype=bool) if cols is None else np.repeat(cols, block)
    row_of, col_of = w.row_indices(), w.indices.astype(np.int64)
    keep = rows[row_of] & kept_cols[col_of]
    shape = (int(rows.sum()), int(kept_cols.sum()) // block, *w.shape[2:])
    # Kept rows and columns renumbered in order: the entries stay sorted by row, then column.
    return csr_from_entries(shape, (np.cumsum(rows) - 1)[row_of[keep]], (np.cumsum(kept_cols) - 1)[col_of[keep]],
                            w.values[keep])


def _count(graph: Graph, *, nonzero: bool) -> int:
    total = 0
    for t in graph.tensors.values():
        if isinstance(t, CSRTensor):
            total += int(np.count_nonzero(t.values)) if nonzero else math.prod(t.shape)
        else:
            total += int(np.count_nonzero(t)) if nonzero else int(np.asarray(t).size)
    return total
