"""trim_channels / zero_channels: dead channels leave every registry model, the function stays the same."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from harp.data import dataset_spec
from harp.export.channels import trim_channels, zero_channels
from harp.export.csr import CSRTensor, check_csr, dense_to_csr
from harp.export.errors import ExportError
from harp.export.graph import Graph, Node
from harp.export.reference import run_reference
from harp.export.trace import trace_model
from harp.models import build_model

SMALL = dataclasses.replace(dataset_spec("cifar10"), size=(8, 8))


def _inputs(shape: tuple[int, ...], n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _rows(graph: Graph) -> dict[str, int]:
    return {n.name: int(graph.tensors[n.params["weight"]].shape[0]) for n in graph.nodes
            if n.op in ("conv2d", "linear")}


def _assert_same_function(before: Graph, after: Graph) -> None:
    x = _inputs(before.input_shape)
    expected = run_reference(before, x)
    np.testing.assert_allclose(run_reference(after, x), expected, rtol=1e-6,
                               atol=1e-6 * max(1.0, float(np.abs(expected).max())))


# -- every registry architecture, channel-pruned -----------------------------------


@pytest.mark.parametrize("arch", ["small_cnn", "vgg16_bn", "resnet18", "wrn-28-4", "mobilenet_v2"])
def test_channel_pruned_registry_models_shrink_and_compute_the_same(arch, channel_pruner, bn_randomiser):
    torch.manual_seed(0)
    model = bn_randomiser(build_model(arch, SMALL)).eval()
    zeroed = channel_pruner(model, 0.5)
    graph = trace_model(model, SMALL.input_shape)
    trimmed, summary = trim_channels(graph)

    trimmed.validate()
    _assert_same_function(graph, trimmed)
    with torch.no_grad():  # and still the torch model
        logits = model(torch.from_numpy(_inputs(SMALL.input_shape))).numpy()
    np.testing.assert_allclose(run_reference(trimmed, _inputs(SMALL.input_shape)), logits, rtol=1e-4, atol=1e-5)

    before, after = _rows(graph), _rows(trimmed)
    shrunk = [name for name in before if after[name] < before[name]]
    assert shrunk, "no conv/linear lost a row"
    assert summary.zero_channels > 0 and summary.channels_removed == summary.zero_channels + summary.unread_channels
    assert summary.params_after < summary.params_before
    assert summary.channels_after == summary.channels_before - summary.channels_removed
    # a layer whose zeroed channels feed only plain consumers loses exactly those rows (VGG: all of them)
    if arch == "vgg16_bn":
        for name, rows in zeroed.items():
            assert after[name] <= before[name] - len(rows), name
    assert after[graph.nodes[-1].name] == before[graph.nodes[-1].name]  # the logits keep every class


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_weight_pruned_models_lose_unread_channels_and_compute_the_same(arch):
    from harp.pruning.masks import apply_masks, global_magnitude_masks

    torch.manual_seed(0)
    model = build_model(arch, SMALL).eval()
    apply_masks(model, global_magnitude_masks(model, 0.99))
    graph = trace_model(model, SMALL.input_shape)
    trimmed, summary = trim_channels(graph)
    _assert_same_function(graph, trimmed)
    assert summary.channels_removed > 0
    assert summary.nonzero_after <= summary.nonzero_before


def _as_csr(graph: Graph) -> Graph:
    """The graph with every conv/linear weight in CSR, as a loaded bundle holds them."""
    weights = {n.params["weight"] for n in graph.nodes if n.op in ("conv2d", "linear")}
    tensors = {k: dense_to_csr(v) if k in weights else v for k, v in graph.tensors.items()}
    return Graph(graph.input_name, graph.input_shape, graph.output_name, graph.nodes, tensors)


@pytest.mark.parametrize("arch,pruning", [("resnet18", "weights"), ("mobilenet_v2", "weights"),
                                          ("vgg16_bn", "channels"), ("mobilenet_v2", "channels")])
def test_csr_weights_are_trimmed_as_csr_like_their_dense_twins(arch, pruning, channel_pruner):
    """The runtime trims a loaded bundle: CSR weights stay CSR, removing exactly what the dense pass removes."""
    from harp.pruning.masks import apply_masks, global_magnitude_masks

    torch.manual_seed(0)
    model = build_model(arch, SMALL).eval()
    if pruning == "weights":
        apply_masks(model, global_magnitude_masks(model, 0.99))
    else:
        channel_pruner(model, 0.5)
    graph = trace_model(model, SMALL.input_shape)
    dense, dense_summary = trim_channels(graph)
    sparse_graph = _as_csr(graph)
    sparse, summary = trim_channels(sparse_graph)

    assert summary == dense_summary and summary.channels_removed > 0
    for name, t in sparse.tensors.items():
        before = sparse_graph.tensors[name]
        if isinstance(before, CSRTensor):
            assert isinstance(t, CSRTensor), name
            check_csr(t, name)
            np.testing.assert_array_equal(t.to_dense(), dense.tensors[name], err_msg=name)
            assert (t is before) == (t.shape == before.shape), name  # a layer losing nothing keeps its tensor
        else:
            np.testing.assert_array_equal(t, dense.tensors[name], err_msg=name)
    _assert_same_function(graph, sparse)
    assert trim_channels(sparse)[1].channels_removed == 0  # trimming is idempotent


def test_input_graph_is_not_modified(channel_pruner):
    torch.manual_seed(0)
    model = build_model("small_cnn", SMALL).eval()
    channel_pruner(model, 0.5)
    graph = trace_model(model, SMALL.input_shape)
    shapes = {k: np.asarray(v).shape for k, v in graph.tensors.items()}
    trim_channels(graph)
    assert {k: np.asarray(v).shape for k, v in graph.tensors.items()} == shapes


# -- hand-built graphs: each rule of the analysis ---------------------------------


class _Builder:
    """A tiny graph over (C, 4, 4) inputs; weights are given explicitly."""

    def __init__(self, channels: int = 2) -> None:
        self.nodes: list[Node] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.shape = (channels, 4, 4)

    def add(self, op: str, inputs: list[str], attrs: dict | None = None, **params: np.ndarray) -> str:
        name = f"n{len(self.nodes)}"
        roles = {}
        for role, array in params.items():
            self.tensors[f"{name}.{role}"] = np.asarray(array, dtype=np.float32)
            roles[role] = f"{name}.{role}"
        self.nodes.append(Node(op, name, tuple(inputs), name, dict(attrs or {}), roles))
        return name

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None = None, groups: int = 1) -> str:
        attrs = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": groups}
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return self.add("conv2d", [x], attrs, **params)

    def head(self, x: str, classes: int = 3) -> Graph:
        """flatten -> linear(classes) as the output; returns the graph."""
        flat = self.add("flatten", [x])
        features = int(np.prod(self.value_shape(flat)))
        rng = np.random.default_rng(7)
        out = self.add("linear", [flat], weight=rng.standard_normal((classes, features)), bias=np.zeros(classes))
        graph = Graph("input", self.shape, out, self.nodes, self.tensors)
        graph.validate()
        return graph

    def value_shape(self, value: str) -> tuple[int, ...]:
        return Graph("input", self.shape, value, self.nodes, self.tensors).validate()[value]


def _weights(out: int, cin: int, seed: int, k: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((out, cin, k, k)).astype(np.float32)


def test_add_keeps_a_channel_whose_partner_is_live():
    b = _Builder()
    wa, wb = _weights(4, 2, 1), _weights(4, 2, 2)
    wa[1] = 0  # channel 1: zero in branch a only -> the sum is live
    wa[2] = wb[2] = 0  # channel 2: zero in both branches -> removable
    a, c = b.conv("input", wa), b.conv("input", wb)
    s = b.add("add", [a, c])
    graph = b.head(b.add("relu", [s]))
    assert zero_channels(graph)[s].tolist() == [False, False, True, False]

    trimmed, summary = trim_channels(graph)
    _assert_same_function(graph, trimmed)
    assert _rows(trimmed)[a] == 3 and _rows(trimmed)[c] == 3  # only channel 2 left both producers
    kept = trimmed.tensors[f"{a}.weight"]
    np.testing.assert_array_equal(kept[1], 0)  # channel 1 stayed in branch a, still all zero
    assert summary.zero_channels == 1 and summary.unread_channels == 0
    assert trimmed.validate()[trimmed.output_name] == (3,)


def test_depthwise_zero_input_is_dead_only_with_zero_bias():
    b = _Builder()
    w1 = _weights(3, 2, 3, k=1)
    w1[0] = w1[1] = 0  # channels 0 and 1 are zero after the 1x1 conv
    x = b.conv("input", w1, bias=np.zeros(3))
    dw = b.conv(x, _weights(3, 1, 4), bias=np.array([0.0, 0.5, 0.0]), groups=3)  # channel 1: bias-only output
    graph = b.head(b.add("clip", [dw], {"min": 0.0, "max": 6.0}))
    assert zero_channels(graph)[dw].tolist() == [True, False, False]

    trimmed, _ = trim_channels(graph)
    _assert_same_function(graph, trimmed)
    node = next(n for n in trimmed.nodes if n.name == dw)
    assert node.attrs["groups"] == 2 and trimmed.tensors[f"{dw}.weight"].shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(trimmed.tensors[f"{dw}.bias"], [0.5, 0.0])


@pytest.mark.parametrize("op,attrs,params,dead", [
    ("relu", {}, {}, True),
    ("clip", {"min": 0.0, "max": 6.0}, {}, True),
    ("clip", {"min": 0.5, "max": 6.0}, {}, False),  # clip(0) = 0.5: the channel is live
    ("affine", {}, {"scale": [1.0, 2.0], "shift": [0.0, 0.0]}, True),
    ("affine", {}, {"scale": [1.0, 2.0], "shift": [0.3, 0.0]}, False),  # a shift makes zero nonzero
    ("maxpool2d", {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False},
     {}, True),
    ("avgpool2d", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "ceil_mode": False,
                   "count_include_pad": False}, {}, True),
    ("global_avgpool", {}, {}, True),
])
def test_elementwise_rules_decide_whether_a_zero_channel_stays_zero(op, attrs, params, dead):
    b = _Builder()
    w = _weights(2, 2, 5)
    w[0] = 0
    x = b.conv("input", w, bias=np.array([0.0, 0.1]))
    y = b.add(op, [x], attrs, **{k: np.array(v) for k, v in params.items()})
    graph = b.head(y)
    assert bool(zero_channels(graph)[y][0]) is dead
    trimmed, summary = trim_channels(graph)
    _assert_same_function(graph, trimmed)
    assert _rows(trimmed)[x] == (1 if dead else 2)
    if dead:  # the linear lost the channel's whole H*W block of columns
        linear = trimmed.nodes[-1]
        cols_before = graph.tensors[graph.nodes[-1].params["weight"]].shape[1]
        assert trimmed.tensors[linear.params["weight"]].shape[1] == cols_before // 2


def test_unread_channels_go_even_when_nonzero():
    b = _Builder()
    x = b.conv("input", _weights(3, 2, 6), bias=np.array([0.1, 0.2, 0.3]))  # nothing is zero
    w2 = _weights(2, 3, 7)
    w2[:, 1] = 0  # but no kept row of the next conv reads channel 1
    y = b.conv(b.add("relu", [x]), w2)
    graph = b.head(y)
    trimmed, summary = trim_channels(graph)
    _assert_same_function(graph, trimmed)
    assert _rows(trimmed)[x] == 2 and trimmed.tensors[f"{y}.weight"].shape == (2, 2, 3, 3)
    assert summary.unread_channels == 1 and summary.zero_channels == 0


def test_input_and_output_channels_are_never_removed():
    b = _Builder(channels=3)
    w = _weights(2, 3, 8)
    w[:, 0] = 0  # the first conv ignores input channel 0: the input keeps it anyway
    graph = b.head(b.conv("input", w), classes=4)
    last = graph.nodes[-1]
    graph.tensors[last.params["weight"]][2] = 0  # logit 2 is the constant 0: it stays
    trimmed, _ = trim_channels(graph)
    assert trimmed.input_shape == (3, 4, 4)
    assert trimmed.validate()[trimmed.output_name] == (4,)
    _assert_same_function(graph, trimmed)


def test_a_space_keeps_one_channel_when_all_are_dead():
    b = _Builder()
    x = b.conv("input", np.zeros((3, 2, 3, 3), np.float32))
    graph = b.head(b.add("relu", [x]))
    trimmed, _ = trim_channels(graph)
    assert _rows(trimmed)[x] == 1
    _assert_same_function(graph, trimmed)


def test_invalid_graph_is_an_export_error():
    b = _Builder()
    graph = b.head(b.conv("input", _weights(2, 2, 9)))
    broken = Graph(graph.input_name, graph.input_shape, "nowhere", graph.nodes, graph.tensors)
    with pytest.raises(ExportError, match="valid graph"):
        trim_channels(broken)
