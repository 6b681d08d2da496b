"""Runtime API: loading, kernel choice and report, batch sizes, threads, and input validation."""

import gc
import threading
import time
from functools import partial

import numpy as np
import pytest

from harp.export.bundle import BundleError
from harp.export.reference import run_reference
from harp.kernels import runtime as runtime_module
from harp.kernels.runtime import RuntimeInputError, load_runtime
from harp.kernels.threads import get_num_threads, max_threads, set_num_threads


def pixels(n, seed=0):
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def assert_parity(actual, expected):
    tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(actual - expected).max()) <= tolerance
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))


@pytest.fixture(scope="module")
def resnet(registry_bundle):
    _, graph, path = registry_bundle("resnet18")
    return graph, path, load_runtime(path.parent, threads=2)  # an artifact dir holding model.harpz


def test_auto_choice_is_timed_and_reported(resnet):
    _, _, runtime = resnet
    report = runtime.plan_report(1)
    assert [r["name"] for r in report] == [s.name for s in runtime.plan.steps]
    winograd_steps = 0
    for row in report:
        if row["op"] in ("conv2d", "linear"):
            assert row["kernel"] in ("sparse", "dense", "winograd") and 0.0 <= row["density"] <= 1.0
            assert row["macs_per_image"] > 0
            if row["density"] < runtime_module.SPARSE_ONLY_BELOW:
                assert row["kernel"] == "sparse" and row["candidates_us"] == {}
            else:  # ~10% dense layers: every kernel timed on the layer's own shape, the fastest kept
                node = runtime.graph.node_by_name(row["nodes"][0])
                shape = runtime.graph.tensors[node.params["weight"]].shape
                winograd = tuple(shape[2:]) == (3, 3) and tuple(node.attrs.get("stride", ())) == (1, 1)
                kernels = {"sparse", "dense"} | ({"winograd"} if winograd else set())
                winograd_steps += winograd
                assert row["reason"] == "timed" and set(row["candidates_us"]) == kernels
                assert row["kernel"] == min(row["candidates_us"], key=row["candidates_us"].get)
                assert row["time_us"] == row["candidates_us"][row["kernel"]]
        else:
            assert row["kernel"] == "-" and row["density"] is None
    assert winograd_steps >= 10  # ResNet18's 3x3 stride-1 convs


def test_each_step_runs_the_kernel_it_reports(resnet, monkeypatch):
    # plan_report names the timed winner; the calls bound for the batch must be that kernel's. Each
    # step's last candidate wins here: on this machine the first (sparse) may win them all.
    _, path, _ = resnet
    runtime = load_runtime(path, threads=1)
    monkeypatch.setattr(runtime_module, "_timings_in_flow", lambda variants: [
        {k: float(k != list(v)[-1]) for k in v} if len(v) > 1 else {} for v in variants])
    bound: list[tuple[object, str]] = []  # (call, kernel), the calls kept alive: an id is not reused
    for ex in runtime.executors:
        def bind(ctx, kernel, _bind=ex.bind):
            calls = _bind(ctx, kernel)
            bound.extend((c, kernel) for c in calls)
            return calls
        ex.bind = bind
    state = runtime.prepare(3)
    kernel_of = {id(c): kernel for c, kernel in bound}
    assert {"dense", "winograd"} <= {s.kernel for s in state.steps}
    for step in state.steps:
        assert all(kernel_of[id(c)] == step.kernel for c in step.calls), step.executor.step.name  # flatten: none


def recorded_step(log, name, seconds):
    """A step's calls for `_timings_in_flow`: one call that logs `name` and takes `seconds`."""
    def call():
        log.append(name)
        time.sleep(seconds)
    return [call]


def test_candidates_are_timed_inside_whole_runs_of_the_model():
    # Three steps, the middle one with two kernels; each call records itself and takes a
    # known time, so the order of the calls and the best time of each candidate are checked.
    log = []
    step = partial(recorded_step, log)

    variants = [{"-": step("before", 0)}, {"sparse": step("sparse", 0.002), "dense": step("dense", 0.004)},
                {"-": step("after", 0)}]
    timings = runtime_module._timings_in_flow(variants)
    assert timings[0] == {} and timings[2] == {} and set(timings[1]) == {"sparse", "dense"}
    assert 2000 <= timings[1]["sparse"] < timings[1]["dense"]
    # every candidate runs between the steps before and after it, never repeated alone
    runs = [log[i:i + 3] for i in range(0, len(log), 3)]
    assert len(log) == 3 * len(runs)
    assert {tuple(r) for r in runs} == {("before", k, "after") for k in ("sparse", "dense")}
    assert [r[1] for r in runs][:4] == ["sparse", "dense", "sparse", "dense"]  # alternating
    assert len(runs) == 2 * (runtime_module.CHOICE_REPEATS + 1)


def test_a_stall_in_one_timing_round_does_not_pick_the_kernel():
    # The host stalls sparse's first timed run: one round would pick dense (4 ms) over sparse
    # (2 ms, 8 ms when stalled). Winograd, over CHOICE_DROP times slower than dense, stops
    # being timed after that round, and no model run is spent on its name any more.
    log = []
    step = partial(recorded_step, log)
    sparse_runs = []

    def sparse():
        sparse_runs.append(None)
        log.append("sparse")
        time.sleep(0.008 if len(sparse_runs) == 2 else 0.002)  # run 1 is the untimed round

    variants = [{"-": step("before", 0)},
                {"sparse": [sparse], "dense": step("dense", 0.004), "winograd": step("winograd", 0.030)},
                {"-": step("after", 0)}]
    timings = runtime_module._timings_in_flow(variants)[1]
    assert min(timings, key=timings.get) == "sparse" and 2000 <= timings["sparse"] < 4000
    middles = [log[i + 1] for i in range(0, len(log), 3)]
    assert len(log) == 3 * len(middles) and set(log[0::3]) == {"before"} and set(log[2::3]) == {"after"}
    rounds = runtime_module.CHOICE_REPEATS + 1
    assert middles.count("winograd") == 2  # the untimed round and the first timed one
    assert middles[6:] == ["sparse", "dense"] * (rounds - 2)


def test_a_step_runs_its_fastest_kernel_in_the_runs_of_names_it_lacks():
    # Step b has no Winograd: in the Winograd runs after the first timed round it runs dense,
    # its fastest so far, as the chosen model will, not its first kernel.
    log = []
    step = partial(recorded_step, log)

    variants = [{"sparse": step("a-sparse", 0.001), "winograd": step("a-winograd", 0.0015)},
                {"sparse": step("b-sparse", 0.002), "dense": step("b-dense", 0.001)}]
    runtime_module._timings_in_flow(variants)
    runs = [tuple(log[i:i + 2]) for i in range(0, len(log), 2)]  # sparse, winograd, dense each round
    assert runs[:3] == [("a-sparse", "b-sparse"), ("a-winograd", "b-sparse"), ("a-sparse", "b-dense")]
    assert runs[7] == ("a-winograd", "b-dense") and runs[8] == ("a-sparse", "b-dense")


def test_plan_fuses_and_reuses_buffers(resnet):
    _, _, runtime = resnet
    summary = runtime.summary()
    # ResNet18: 49 graph nodes; relus and residual adds fuse into the convs' epilogues.
    assert summary["graph_nodes"] == 49 and summary["steps"] == 24
    assert summary["slots"] < summary["values"] // 2 and summary["in_place_steps"] >= 1 and summary["views"] == 1
    fused = [r["nodes"] for r in runtime.plan_report() if len(r["nodes"]) == 3]
    assert len(fused) == 8 and all(n[1].endswith(".add") and n[2].endswith("relu_1") for n in fused)
    # Each 1x1 stride-2 shortcut reads the pack of the 3x3 stride-2 conv of its block.
    shared = runtime.prepare(runtime._last_batch).shared_packs
    assert summary["shared_packs"] == 3 and sorted(n for n, s in shared.items() if n != s.maker) == [
        f"net.layer{i}.0.shortcut.0" for i in (2, 3, 4)]


def test_batch_size_changes(resnet):
    graph, _, runtime = resnet
    x = pixels(5, seed=3)
    expected = run_reference(graph, x)
    for n in (1, 4, 2, 4, 5, 1):
        assert_parity(runtime.run(x[:n]), expected[:n])
    buffers = runtime.prepare(4).buffers
    assert buffers.slots[0].shape[0] == 4 * runtime.plan.slots[0].per_image
    assert len(runtime._prepared) <= runtime_module.KEPT_BATCH_SIZES
    # Every activation buffer starts on a cache line (image groups of 16 then read whole lines).
    for buf in (*buffers.slots, buffers.input, buffers.pack):
        assert buf.ctypes.data % 64 == 0 and buf.flags.c_contiguous and buf.flags.writeable


def test_results_are_fresh_arrays_and_the_input_is_untouched(resnet):
    _, _, runtime = resnet
    x = pixels(2)
    frozen = x.copy()
    x.flags.writeable = False
    first = runtime.run(x)
    kept = first.copy()
    runtime.run(pixels(2, seed=9))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(x, frozen)


def test_other_dtypes_and_array_likes_are_converted(resnet):
    graph, _, runtime = resnet
    x = pixels(2)
    expected = runtime.run(x)
    assert_parity(runtime.run(x.astype(np.float64)), expected)
    assert_parity(runtime.run(x.tolist()), expected)
    ints = (x > 0.5).astype(np.uint8)
    assert_parity(runtime.run(ints), runtime.run(ints.astype(np.float32)))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 32, 32), np.float32), r"input shape \(3, 32, 32\) is not \(N, C, H, W\) = \(N, 3, 32, 32\)"),
    (np.zeros((1, 1, 32, 32), np.float32), r"input shape \(1, 1, 32, 32\)"),
    (np.zeros((0, 3, 32, 32), np.float32), "batch is empty"),
    (np.full((1, 3, 32, 32), np.nan, np.float32), r"NaN or infinite values \(first at index \(0, 0, 0, 0\)\)"),
    (np.full((2, 3, 32, 32), 1e39), "after conversion to float32"),
    (np.zeros((1, 3, 32, 32), np.complex64), "dtype complex64 is not a real number type"),
    (np.zeros((1, 3, 32, 32), object), "dtype object"),
    ("not an image", "dtype <U12"),
    ([[1, 2], [3]], "not an array"),
])
def test_bad_input_raises_runtime_input_error(resnet, bad, message):
    _, _, runtime = resnet
    with pytest.raises(RuntimeInputError, match=message):
        runtime.run(bad)
    assert issubclass(RuntimeInputError, ValueError)


def test_inf_anywhere_is_rejected(resnet):
    _, _, runtime = resnet
    x = pixels(3)
    x[2, 1, 5, 7] = -np.inf
    with pytest.raises(RuntimeInputError, match=r"\(2, 1, 5, 7\)"):
        runtime.run(x)
    assert runtime.run(pixels(3)).shape == (3, 10)  # still usable afterwards


def test_threads_are_set_and_restored_from_other_threads(resnet):
    graph, path, _ = resnet
    runtime = load_runtime(path, threads=1, fallback="sparse")
    assert runtime.threads == 1 and runtime.summary()["threads"] == 1
    x = pixels(2)
    expected = run_reference(graph, x)
    results = []
    worker = threading.Thread(target=lambda: results.append(runtime.run(x)))
    worker.start()
    worker.join()
    assert_parity(results[0], expected)
    runtime.set_threads(2)
    assert runtime.threads == 2
    assert_parity(runtime.run(x), expected)


@pytest.mark.skipif(max_threads() < 2, reason="needs numba to allow 2 threads")
def test_kernels_run_on_the_runtimes_thread_count(resnet):
    # whatever the calling thread had set: --threads 1 must not use every core
    _, path, _ = resnet
    runtime = load_runtime(path, threads=1, fallback="sparse")
    seen: list[int] = []
    for ex in runtime.executors:
        def bind(ctx, kernel, _bind=ex.bind):
            return [lambda c=c: (seen.append(get_num_threads()), c()) for c in _bind(ctx, kernel)]
        ex.bind = bind
    for threads in (1, 2, 1):
        runtime.set_threads(threads)
        runtime.run(pixels(2))  # prepared for this batch size and thread count
        set_num_threads(3 - threads)  # then the caller's own setting, the other count
        seen.clear()
        runtime.run(pixels(2))
        assert seen and max(seen) == threads  # (a tiny step may run on one: `_maybe_serial`)
        assert get_num_threads() == threads  # numba's count is per thread: the caller's is the runtime's now


def test_one_runtime_called_from_several_threads_gives_each_its_own_logits(resnet):
    # its buffers hold one batch: four threads running at once had returned wrong logits in half the runs
    graph, path, _ = resnet
    runtime = load_runtime(path, threads=1, fallback="sparse")
    inputs = [pixels(4, seed) for seed in range(4)]
    expected = [run_reference(graph, x) for x in inputs]
    wrong = []

    def work(i):
        for _ in range(15):
            out = runtime.run(inputs[i])
            if float(np.abs(out - expected[i]).max()) > 1e-4 * max(1.0, float(np.abs(expected[i]).max())):
                wrong.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not wrong
    import copy
    import pickle

    for clone in (copy.copy, copy.deepcopy, pickle.dumps):  # a copy would share or lose the buffers
        with pytest.raises(TypeError, match="call load_runtime"):
            clone(runtime)


def test_default_threads_are_all_numba_may_use_and_batch_sizes_take_numpy_ints(resnet):
    from harp.kernels.threads import max_threads, set_num_threads

    _, path, _ = resnet
    set_num_threads(1)  # the calling thread's last setting had been the default
    try:
        assert load_runtime(path, fallback="sparse", warmup=False).threads == max_threads()
    finally:
        set_num_threads(max_threads())
    runtime = load_runtime(path, threads=1, fallback="sparse", warmup=False)
    assert runtime.prepare(np.int64(3)).n == 3 and runtime.plan_report(np.int32(3))[0]["batch"] == 3
    for bad in (3.0, True, "3", 0):
        with pytest.raises(RuntimeInputError, match=f"positive int, got {bad!r}"):
            runtime.prepare(bad)


def test_profile_times_every_step(resnet):
    _, _, runtime = resnet
    report = runtime.profile(batch=2, repeats=3)
    assert len(report) == len(runtime.plan.steps) and all(r["batch"] == 2 for r in report)
    assert all(r["time_us"] is not None and r["time_us"] >= 0 for r in report)


def test_dead_channels_are_not_computed(resnet, tmp_path):
    """A bundle exported untrimmed: the conv whose outputs layer2.0.conv2 no longer reads keeps 8 rows."""
    import dataclasses

    from harp.bench.runtime_report import model_macs
    from harp.export.bundle import write_bundle

    graph, _, _ = resnet
    tensors = dict(graph.tensors)
    weight = graph.node_by_name("net.layer2.0.conv2").params["weight"]
    tensors[weight] = tensors[weight].copy()
    tensors[weight][:, 8:] = 0.0  # channels 8.. of layer2.0.conv1 are now read by no one
    graph = dataclasses.replace(graph, tensors=tensors)
    write_bundle(graph, tmp_path / "model.harpz")
    trimmed, full = load_runtime(tmp_path, threads=2), load_runtime(tmp_path, threads=2, trim=False)

    assert trimmed.summary()["channels_trimmed"] == 120 and full.summary()["channels_trimmed"] == 0
    rows = {rt: {ex.step.name: ex.weight.n_rows for ex in rt.executors if ex.density is not None}
            for rt in (trimmed, full)}
    assert rows[trimmed]["net.layer2.0.conv1"] == 8 and rows[full]["net.layer2.0.conv1"] == 128
    assert {k: v for k, v in rows[trimmed].items() if k != "net.layer2.0.conv1"} == {
        k: v for k, v in rows[full].items() if k != "net.layer2.0.conv1"}
    x = pixels(3, seed=5)
    expected = run_reference(graph, x)
    assert_parity(trimmed.run(x), expected)
    np.testing.assert_allclose(trimmed.run(x), full.run(x), rtol=1e-5, atol=1e-5)
    # the report's yardstick stays the exported (model.onnx's) dense count; the nonzero count drops
    macs, full_macs = model_macs(trimmed), model_macs(full)
    assert macs["dense"] == full_macs["dense"] and macs["nonzero"] < full_macs["nonzero"]


def test_load_errors(tmp_path, resnet):
    _, path, _ = resnet
    with pytest.raises(BundleError, match="holds no model.harpz"):
        load_runtime(tmp_path)
    with pytest.raises(BundleError, match="cannot read"):
        load_runtime(tmp_path / "missing.harpz")
    with pytest.raises(ValueError, match="fallback must be one of"):
        load_runtime(path, fallback="fastest")
    with pytest.raises(ValueError, match="set_num_threads"):
        load_runtime(path, threads=0)
    runtime = load_runtime(path, warmup=False)
    assert runtime._prepared == {} and "warmup" not in runtime.load_seconds


def test_a_load_pauses_the_garbage_collector_and_restores_it(resnet, monkeypatch):
    _, path, _ = resnet
    seen = []
    warmup = runtime_module.Runtime.warmup
    monkeypatch.setattr(runtime_module.Runtime, "warmup", lambda self: (seen.append(gc.isenabled()), warmup(self)))
    assert gc.isenabled()
    load_runtime(path, threads=2)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(BundleError):
        load_runtime(path.parent / "missing.harpz")
    assert gc.isenabled()
    gc.disable()
    try:
        load_runtime(path, threads=2)
        assert not gc.isenabled()  # a caller's own setting is left as it was
    finally:
        gc.enable()


@pytest.mark.parametrize("what", ["workspace", "activations"])
def test_buffers_too_big_to_allocate_are_a_clear_error(resnet, monkeypatch, what):
    import dataclasses

    from harp.kernels.steps import ConvExecutor

    _, path, _ = resnet
    runtime = load_runtime(path, threads=1, fallback="winograd", warmup=False)
    slot = runtime.plan.slots[0]
    if what == "workspace":  # the Winograd scratch of one conv: 4 PiB
        monkeypatch.setattr(ConvExecutor, "scratch", lambda self, ctx, kernel: 2**50 if kernel == "winograd" else 0)
        message = "GiB of kernel workspace"
    else:
        runtime.plan.slots[0] = dataclasses.replace(slot, per_image=2**50)  # this runtime's own
        message = "GiB of activation buffers"
    with pytest.raises(RuntimeInputError, match=message):
        runtime.prepare(2)
    monkeypatch.undo()
    runtime.plan.slots[0] = slot
    # the refused size is not "the batch size used last": the reports still describe a prepared one
    assert runtime.summary()["batch"] == 1 and runtime.plan_report()[0]["batch"] == 1


def _edge_graph(kind: str):
    """Graphs whose steps read the graph input, which alone is plain NCHW (image group 1), or add
    two linear layers reading one value."""
    from harp.export.graph import Graph, Node

    rng = np.random.default_rng(11)
    if kind == "after_output":  # a step reads the logits after they are final (a bundle may have one)
        return Graph("x", (2, 4, 4), "y", [
            Node("flatten", "flat", ("x",), "f"), Node("linear", "fc", ("f",), "y", {}, {"weight": "w", "bias": "b"}),
            Node("relu", "r", ("y",), "unused")],
            {"w": rng.standard_normal((5, 32)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)})
    if kind == "two_heads":  # fc1(f) + fc2(f): fc2 takes fc1's output as its fused residual
        return Graph("x", (2, 4, 4), "y", [
            Node("relu", "r", ("x",), "r"), Node("flatten", "flat", ("r",), "f"),
            Node("linear", "fc1", ("f",), "h1", {}, {"weight": "w1"}),
            Node("linear", "fc2", ("f",), "h2", {}, {"weight": "w2"}), Node("add", "add", ("h1", "h2"), "y")],
            {"w1": rng.standard_normal((3, 32)).astype(np.float32),
             "w2": rng.standard_normal((3, 32)).astype(np.float32)})
    if kind == "flatten":  # an MLP: flatten the input, then a linear layer
        return Graph("x", (5, 8, 8), "y", [Node("flatten", "flat", ("x",), "f"),
                                           Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.w"})],
                     {"fc.w": rng.standard_normal((4, 320)).astype(np.float32)})
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    head = [Node("global_avgpool", "gap", ("s",), "g"), Node("flatten", "flat", ("g",), "f"),
            Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.w"})]
    if kind == "disjoint_shared_input":  # two stride-2 convs share one packed copy of n, reading other channels
        wa, wb = np.zeros((4, 4, 3, 3), np.float32), np.zeros((4, 4, 1, 1), np.float32)
        wa[:, 0], wb[:, 1:] = rng.standard_normal((4, 3, 3)), rng.standard_normal((4, 3, 1, 1))
        s2 = {**conv, "stride": [2, 2]}
        return Graph("x", (4, 8, 8), "y", [
            Node("normalize", "norm", ("x",), "n", {"mean": [0.5] * 4, "std": [0.25] * 4}),
            Node("conv2d", "a", ("n",), "a", s2, {"weight": "a.w"}),
            Node("conv2d", "b", ("n",), "b", {**s2, "padding": [0, 0]}, {"weight": "b.w"}),
            Node("add", "add", ("a", "b"), "s"), *head],
            {"a.w": wa, "b.w": wb, "fc.w": rng.standard_normal((3, 4)).astype(np.float32)})
    if kind == "read_after_act":  # n is read again after relu(n): the relu must not run in place over it
        return Graph("x", (2, 6, 6), "y", [
            Node("normalize", "norm", ("x",), "n", {"mean": [0.5] * 2, "std": [0.25] * 2}),
            Node("relu", "r", ("n",), "r"),
            Node("conv2d", "c", ("r",), "c", {**conv, "padding": [0, 0]}, {"weight": "c.w"}),
            Node("add", "add", ("c", "n"), "s"), *head],
            {"c.w": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
             "fc.w": rng.standard_normal((3, 2)).astype(np.float32)})
    if kind == "clips":  # fused clips whose both bounds bite: Hardtanh(-1, 1), then ReLU6
        return Graph("x", (2, 6, 6), "y", [
            Node("conv2d", "c1", ("x",), "c1", conv, {"weight": "c1.w"}),
            Node("clip", "t", ("c1",), "t", {"min": -1.0, "max": 1.0}),
            Node("conv2d", "c2", ("t",), "c2", conv, {"weight": "c2.w"}),
            Node("clip", "r6", ("c2",), "s", {"min": 0.0, "max": 6.0}), *head],
            {"c1.w": 4 * rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
             "c2.w": 4 * rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
             "fc.w": rng.standard_normal((3, 2)).astype(np.float32)})
    return Graph("x", (2, 8, 8), "y", [  # a residual block adding the input itself
        Node("conv2d", "conv", ("x",), "c", conv, {"weight": "conv.w"}), Node("add", "add", ("c", "x"), "a"),
        Node("relu", "relu", ("a",), "r"), Node("global_avgpool", "gap", ("r",), "g"),
        Node("flatten", "flat", ("g",), "f"), Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.w"})],
        {"conv.w": rng.standard_normal((2, 2, 3, 3)).astype(np.float32),
         "fc.w": rng.standard_normal((3, 2)).astype(np.float32)})


@pytest.mark.parametrize("kind", ["flatten", "residual", "two_heads", "after_output", "disjoint_shared_input",
                                  "read_after_act", "clips"])
@pytest.mark.parametrize("fallback", ["auto", "sparse", "dense", "winograd"])
def test_edge_graphs_at_every_batch_size(tmp_path, kind, fallback):
    # A flatten of the input had been planned as a view of it, read transposed at batch > 1; a conv
    # adding the input had been offered Winograd, whose epilogue refused the input's image group;
    # fc2 had written over its residual fc1(f) before adding it (2 * fc2(f)); a relu reading the
    # logits had run in place over them (relu(logits) returned). The last three keep what no model
    # test reaches: a shared packed copy that must hold every channel (at 99% sparsity two convs
    # read disjoint ones), a value read again after an activation of it, and both bounds of a clip.
    from harp.export.bundle import write_bundle

    graph = _edge_graph(kind)
    write_bundle(graph, tmp_path / "model.harpz")
    runtime = load_runtime(tmp_path / "model.harpz", threads=1, fallback=fallback)
    for n in (1, 2, 17, 1, 3):
        x = np.random.default_rng(n).random((n, *graph.input_shape), dtype=np.float32)
        assert_parity(runtime.run(x), run_reference(graph, x))
