"""The execution plan: fusion, borders, in-place steps and buffer slots, on hand-built graphs."""

import numpy as np
import pytest

from harp.export.bundle import load_bundle, write_bundle
from harp.export.graph import Graph, Node
from harp.export.reference import run_reference
from harp.kernels.plan import plan_graph
from harp.kernels.runtime import Runtime
from harp.kernels.steps import Context

CONV = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}


def conv(name, x, out, stride=1, padding=1, kernel=3):
    attrs = {**CONV, "stride": [stride, stride], "padding": [padding, padding]}
    return Node("conv2d", name, (x,), out, attrs, {"weight": f"{name}.w", "bias": f"{name}.b"})


def residual_graph() -> Graph:
    """normalize -> conv a -> relu -> [conv c -> relu -> conv b -> add(a) -> relu] -> conv d -> add(block) -> conv s2
    -> head: a basic residual block, a conv whose add partner comes first, a stride-2 conv."""
    rng = np.random.default_rng(0)
    nodes = [
        Node("normalize", "norm", ("x",), "n", {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}),
        conv("a", "n", "a"), Node("relu", "a_relu", ("a",), "ar"),
        conv("c", "ar", "c"), Node("relu", "c_relu", ("c",), "cr"),
        conv("b", "cr", "b"), Node("add", "b_add", ("b", "ar"), "bs"), Node("relu", "b_relu", ("bs",), "br"),
        conv("d", "br", "d"), Node("add", "d_add", ("br", "d"), "ds"),
        conv("e", "ds", "e", stride=2, padding=0, kernel=1),
        Node("global_avgpool", "gap", ("e",), "g"), Node("flatten", "flat", ("g",), "f"),
        Node("linear", "fc", ("f",), "logits", {}, {"weight": "fc.w", "bias": "fc.b"}),
    ]
    tensors = {}
    for name, shape in (("a", (4, 3, 3, 3)), ("c", (4, 4, 3, 3)), ("b", (4, 4, 3, 3)), ("d", (4, 4, 3, 3)),
                        ("e", (6, 4, 1, 1))):
        tensors[f"{name}.w"] = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < 0.5)
        tensors[f"{name}.b"] = rng.standard_normal(shape[0]).astype(np.float32)
    tensors["fc.w"] = rng.standard_normal((5, 6)).astype(np.float32)
    tensors["fc.b"] = rng.standard_normal(5).astype(np.float32)
    return Graph("x", (3, 8, 8), "logits", nodes, tensors)


def test_fusion_absorbs_activations_and_residual_adds():
    plan = plan_graph(residual_graph())
    steps = {s.name: s for s in plan.steps}
    assert plan.graph_nodes == 14 and len(plan.steps) == 9
    assert [s.op for s in plan.steps] == ["affine", "conv2d", "conv2d", "conv2d", "conv2d", "conv2d",
                                          "global_avgpool", "flatten", "linear"]
    assert steps["a"].nodes == ("a", "a_relu") and steps["a"].clamp == (0.0, np.inf)
    assert steps["b"].nodes == ("b", "b_add", "b_relu") and steps["b"].residual == "ar" and steps["b"].output == "br"
    assert steps["d"].nodes == ("d", "d_add") and steps["d"].residual == "br" and steps["d"].clamp is None
    assert steps["e"].residual is None and steps["fc"].clamp is None


def test_borders_follow_the_conv_readers_and_flatten_is_a_view():
    plan = plan_graph(residual_graph())
    border = {name: v.border for name, v in plan.values.items()}
    assert border["n"] == border["ar"] == border["cr"] == border["br"] == (1, 1)  # read in place by 3x3 p1 convs
    assert border["ds"] == (0, 0)  # read only by a stride-2 conv without padding
    assert border["x"] == (0, 0) and plan.values["x"].slot == -1
    assert plan.values["f"].view_of == "g" and plan.values["f"].slot == plan.values["g"].slot


def test_in_place_steps_and_slot_reuse():
    plan = plan_graph(residual_graph())
    steps = {s.name: s for s in plan.steps}
    # b's residual "ar" dies at b and has b's layout: b writes over it (c, not b, reads it as input).
    assert steps["b"].in_place == "ar" and plan.values["br"].slot == plan.values["ar"].slot
    # d's residual "br" has border 1 but d's output "ds" border 0: no in-place.
    assert steps["d"].in_place is None
    assert len(plan.slots) < len(plan.values) - 1
    _assert_no_live_value_shares_a_slot(plan)


def _assert_no_live_value_shares_a_slot(plan):
    produced = {plan.input_name: -1}
    last = {}
    for i, step in enumerate(plan.steps):
        produced[step.output] = i
        for v in step.inputs + ((step.residual,) if step.residual else ()):
            last[v] = i
    last[plan.output_name] = len(plan.steps)
    in_place = {s.output: s.in_place for s in plan.steps if s.in_place}
    by_slot = {}
    for name, info in plan.values.items():
        by_slot.setdefault(info.slot, []).append(name)
    for slot, names in by_slot.items():
        for a in names:
            for b in names:
                if a == b or produced[a] >= produced[b]:
                    continue
                # a is produced first: it must be dead when b is written, unless b overwrites it in place or views it.
                handover = in_place.get(b) == a or plan.values[b].view_of == a
                assert last.get(a, produced[a]) <= produced[b] if handover else last.get(a, produced[a]) < produced[b], \
                    (slot, a, b)


def test_runtime_matches_reference_on_the_planned_graph(tmp_path):
    graph = residual_graph()
    write_bundle(graph, tmp_path / "m.harpz")
    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    expected = run_reference(graph, x)
    for fallback in ("sparse", "dense"):
        runtime = Runtime(load_bundle(tmp_path / "m.harpz"), threads=1, fallback=fallback)
        for n in (3, 16):  # at 16 the sparse stride-2 conv e reads its input in place
            np.testing.assert_allclose(runtime.run(x[:n]), expected[:n], rtol=1e-4,
                                       atol=1e-4 * max(1, np.abs(expected).max()))


def flat_graph(flatten_input_hw) -> Graph:
    """conv 1x1 -> flatten (a copy when the plane is large) -> linear -> relu -> linear."""
    h, w = flatten_input_hw
    rng = np.random.default_rng(2)
    nodes = [conv("c", "x", "c", padding=0, kernel=1), Node("flatten", "flat", ("c",), "f"),
             Node("linear", "fc1", ("f",), "h", {}, {"weight": "fc1.w"}), Node("relu", "r", ("h",), "hr"),
             Node("linear", "fc2", ("hr",), "logits", {}, {"weight": "fc2.w", "bias": "fc2.b"})]
    tensors = {"c.w": rng.standard_normal((2, 1, 1, 1)).astype(np.float32),
               "c.b": rng.standard_normal(2).astype(np.float32),
               "fc1.w": rng.standard_normal((7, 2 * h * w)).astype(np.float32),
               "fc2.w": rng.standard_normal((3, 7)).astype(np.float32), "fc2.b": np.zeros(3, np.float32)}
    return Graph("x", (1, h, w), "logits", nodes, tensors)


@pytest.mark.parametrize("hw, view", [((4, 4), True), ((48, 48), False)])
def test_flatten_of_a_large_plane_is_a_copy(tmp_path, hw, view):
    graph = flat_graph(hw)
    plan = plan_graph(graph)
    assert (plan.values["f"].view_of == "c") is view
    assert [s.nodes for s in plan.steps if s.op == "linear"][0] == ("fc1", "r")
    write_bundle(graph, tmp_path / "m.harpz")
    runtime = Runtime(load_bundle(tmp_path / "m.harpz"), threads=1)
    for n in (1, 4):
        x = np.random.default_rng(n).random((n, 1, *hw), dtype=np.float32)
        expected = run_reference(graph, x)
        np.testing.assert_allclose(runtime.run(x), expected, rtol=1e-4, atol=1e-4 * max(1, np.abs(expected).max()))


def test_standalone_add_and_affine_fuse_their_activation(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [Node("affine", "bn", ("x",), "a", {}, {"scale": "s", "shift": "t"}), Node("relu", "r1", ("a",), "ar"),
             Node("maxpool2d", "mp", ("ar",), "m", {"kernel": [1, 1], "stride": [1, 1], "padding": [0, 0],
                                                    "dilation": [1, 1], "ceil_mode": False}),
             Node("add", "add", ("m", "ar"), "s1"), Node("clip", "c", ("s1",), "sc", {"min": 0.0, "max": 1.0}),
             Node("global_avgpool", "gap", ("sc",), "g"), Node("flatten", "flat", ("g",), "logits")]
    tensors = {"s": rng.standard_normal(3).astype(np.float32), "t": rng.standard_normal(3).astype(np.float32)}
    graph = Graph("x", (3, 5, 5), "logits", nodes, tensors)
    plan = plan_graph(graph)
    assert [(s.op, s.nodes) for s in plan.steps] == [
        ("affine", ("bn", "r1")), ("maxpool2d", ("mp",)), ("add", ("add", "c")), ("global_avgpool", ("gap",)),
        ("flatten", ("flat",))]
    assert plan.steps[2].in_place in ("m", "ar")
    write_bundle(graph, tmp_path / "m.harpz")
    x = rng.random((2, 3, 5, 5), dtype=np.float32)
    np.testing.assert_allclose(Runtime(load_bundle(tmp_path / "m.harpz"), threads=1).run(x),
                               run_reference(graph, x), rtol=1e-5, atol=1e-5)


def pool(name, x, out, kernel=2, stride=2, padding=0):
    return Node("maxpool2d", name, (x,), out, {"kernel": [kernel, kernel], "stride": [stride, stride],
                                               "padding": [padding, padding], "dilation": [1, 1], "ceil_mode": False})


def pooled_graph(hw) -> Graph:
    """conv a 3x3 -> relu -> maxpool 2x2 (fused) -> conv b 1x1 -> maxpool 2x2 (not: no Winograd for 1x1)
    -> conv c 3x3 -> maxpool 3x3 s2 (not: another window) -> global avgpool -> flatten -> linear."""
    rng = np.random.default_rng(4)
    nodes = [conv("a", "x", "a"), Node("relu", "a_relu", ("a",), "ar"), pool("a_pool", "ar", "p1"),
             conv("b", "p1", "b", padding=0, kernel=1), pool("b_pool", "b", "p2"),
             conv("c", "p2", "c"), pool("c_pool", "c", "p3", kernel=3, padding=1),
             Node("global_avgpool", "gap", ("p3",), "g"), Node("flatten", "flat", ("g",), "f"),
             Node("linear", "fc", ("f",), "logits", {}, {"weight": "fc.w", "bias": "fc.b"})]
    tensors = {}
    for name, shape in (("a", (6, 3, 3, 3)), ("b", (5, 6, 1, 1)), ("c", (4, 5, 3, 3))):
        tensors[f"{name}.w"] = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < 0.6)
        tensors[f"{name}.b"] = rng.standard_normal(shape[0]).astype(np.float32)
    tensors["fc.w"] = rng.standard_normal((3, 4)).astype(np.float32)
    tensors["fc.b"] = rng.standard_normal(3).astype(np.float32)
    return Graph("x", (3, hw, hw), "logits", nodes, tensors)


# 64x64: the conv's own output has image group 1 at every batch, its pooled 32x32 output group N, so at
# batch 2 Winograd writes the conv to scratch and the pooling kernel reads it, as the other kernels do.
@pytest.mark.parametrize("hw", [16, 64])
def test_a_winograd_shaped_conv_takes_the_2x2_max_pooling_after_it(tmp_path, hw):
    graph = pooled_graph(hw)
    plan = plan_graph(graph)
    assert [(s.op, s.nodes) for s in plan.steps] == [
        ("conv2d", ("a", "a_relu", "a_pool")), ("conv2d", ("b",)), ("maxpool2d", ("b_pool",)), ("conv2d", ("c",)),
        ("maxpool2d", ("c_pool",)), ("global_avgpool", ("gap",)), ("flatten", ("flat",)), ("linear", ("fc",))]
    assert plan.steps[0].output == "p1" and plan.steps[0].attrs["unpooled_shape"] == (6, hw, hw)
    assert "ar" not in plan.values and plan.values["p1"].border == (0, 0)
    write_bundle(graph, tmp_path / "m.harpz")
    for fallback in ("sparse", "dense", "winograd", "auto"):
        runtime = Runtime(load_bundle(tmp_path / "m.harpz"), threads=2, fallback=fallback)
        for n in (1, 2):
            x = np.random.default_rng(n).random((n, 3, hw, hw), dtype=np.float32)
            expected = run_reference(graph, x)
            np.testing.assert_allclose(runtime.run(x), expected, rtol=1e-4,
                                       atol=1e-4 * max(1, np.abs(expected).max()))
            conv_a = runtime.executors[0]
            ctx = Context(plan, runtime.prepare(n).buffers)
            assert conv_a.pools_in_kernel(ctx, "winograd") is (hw == 16 or n == 1)
            assert not conv_a.pools_in_kernel(ctx, "sparse")
