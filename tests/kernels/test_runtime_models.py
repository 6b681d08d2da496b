"""The runtime on every registry architecture against the NumPy reference and torch, sparse and dense kernels."""

import numpy as np
import pytest
import torch

from harp.export.reference import run_reference
from harp.kernels.runtime import load_runtime
from harp.models import ARCHITECTURES

ARCHS = [a for a in ARCHITECTURES if ":" not in a]  # the registry's own families (not torchvision:NAME)


def assert_parity(actual, expected):
    """The export parity criterion: max |diff| <= 1e-4 * max(1, max |logit|) and identical argmax."""
    tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(actual - expected).max()) <= tolerance
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))


def test_every_registry_family_is_covered():
    assert set(ARCHS) == {"small_cnn", "vgg16_bn", "resnet18", "wrn-28-4", "mobilenet_v2"}


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_matches_reference_and_torch(registry_bundle, arch):
    model, graph, path = registry_bundle(arch)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    reference = run_reference(graph, x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(expected).max() > 1.0 and np.ptp(expected, axis=1).min() > 0.1  # informative logits
    for fallback in ("sparse", "dense", "winograd"):
        runtime = load_runtime(path, threads=2, fallback=fallback)
        logits = runtime.run(x)
        assert logits.shape == (3, 10) and logits.dtype == np.float32
        assert_parity(logits, reference)
        assert_parity(logits, expected)
        kernels = {r["kernel"] for r in runtime.plan_report() if r["op"] in ("conv2d", "linear")}
        # Every family has 3x3 stride-1 convs; the rest (and linear layers) run the dense kernel.
        assert kernels == ({"winograd", "dense"} if fallback == "winograd" else {fallback})


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_strided_convs_read_their_input_in_place_at_batch_16(registry_bundle, arch):
    """16 images per group: the sparse kernel reads a stride-2 conv's bordered input as it is, no pack."""
    from harp.kernels.packing import _pack

    _, graph, path = registry_bundle(arch)
    x = np.random.default_rng(4).random((16, 3, 32, 32), dtype=np.float32)
    reference = run_reference(graph, x)
    packing = {}
    for fallback in ("sparse", "dense"):
        runtime = load_runtime(path, threads=2, fallback=fallback)
        assert_parity(runtime.run(x), reference)
        steps = runtime.prepare(16).steps
        packing[fallback] = {s.executor.step.name for s in steps
                             if any(getattr(call, "func", None) is _pack for call in s.calls)}
        strided = {ex.step.name for ex in runtime.executors
                   if ex.step.op == "conv2d" and ex.geometry[0] != (1, 1) and ex.step.inputs[0] != graph.input_name}
    # Every conv reads its input in place (the first one the normalized input); the dense kernel
    # packs each strided conv's input.
    assert len(strided) >= 3 and packing["sparse"] == set() and strided <= packing["dense"]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_unrolled_layers_at_batch_16(registry_bundle, arch):
    """fallback="unrolled": compiled layers where offered (16 images per group), the sparse kernel elsewhere."""
    from harp.kernels.unrolled import worth_unrolling

    _, graph, path = registry_bundle(arch)
    x = np.random.default_rng(5).random((16, 3, 32, 32), dtype=np.float32)
    runtime = load_runtime(path, threads=2, fallback="unrolled")
    assert_parity(runtime.run(x), run_reference(graph, x))
    rows = {r["name"]: r for r in runtime.plan_report(16)}
    offered = {ex.step.name for ex in runtime.executors
               if ex.step.op == "conv2d" and worth_unrolling(ex.density, ex.weight.nnz)}
    assert len(offered) >= 5
    assert {name for name, r in rows.items() if r["kernel"] == "unrolled"} == offered
    assert {r["kernel"] for name, r in rows.items() if r["op"] == "conv2d" and name not in offered} == {"sparse"}
    # At batch 1 (image group 1) no layer can run it.
    assert {r["kernel"] for r in runtime.plan_report(1) if r["op"] == "conv2d"} == {"sparse"}


@pytest.mark.parametrize("wide", [True, False])
def test_auto_times_the_unrolled_kernel_only_on_cpus_with_512bit_vectors(registry_bundle, monkeypatch, wide):
    from harp.kernels import runtime as runtime_module

    _, _, path = registry_bundle("resnet18")
    monkeypatch.setattr(runtime_module, "host_has_512bit_vectors", lambda: wide)
    runtime = load_runtime(path, threads=2)
    timed = [r for r in runtime.plan_report(16) if r["reason"] == "timed" and r["op"] == "conv2d"]
    assert len(timed) >= 5
    assert any("unrolled" in r["candidates_us"] for r in timed) == wide
    assert all("sparse" in r["candidates_us"] for r in timed)
