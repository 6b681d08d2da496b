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
