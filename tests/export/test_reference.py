"""The NumPy reference executor against torch, on a small network using every op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harp.export.bundle import load_bundle, write_bundle
from harp.export.csr import dense_to_csr
from harp.export.graph import OPS, Graph, GraphError, Node
from harp.export.reference import HANDLERS, run_reference

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        x = F.relu(self.bn1(self.conv1(x)))  # (N, 8, 16, 16)
        p = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)  # (N, 8, 9, 9)
        y = F.relu6(self.conv2(p)) + p
        y = F.avg_pool2d(y, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)  # (N, 8, 5, 5)
        y = self.conv3(y)  # (N, 16, 3, 3)
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)  # (N, 16)
        return self.fc(y)


def pruned_net(seed: int = 0, density: float = 0.05) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet().eval()
    with torch.no_grad():
        for module in (net.conv1, net.conv2, net.conv3, net.fc):
            mask = torch.rand_like(module.weight) < density
            mask.view(mask.shape[0], -1)[:, 0] = True
            module.weight.mul_(mask)
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.5, 0.5)
    return net


def to_graph(net: SmallNet, csr: bool) -> Graph:
    """The same network written by hand as a harp Graph (the tracer's job, done manually)."""
    def weight(t: torch.Tensor) -> object:
        w = t.detach().numpy().astype(np.float32)
        return dense_to_csr(w) if csr else w

    bn = net.bn1
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    tensors = {
        "conv1.weight": weight(net.conv1.weight), "conv1.bias": net.conv1.bias.detach().numpy(),
        "bn1.scale": scale.numpy(), "bn1.shift": (bn.bias - bn.running_mean * scale).detach().numpy(),
        "conv2.weight": weight(net.conv2.weight),
        "conv3.weight": weight(net.conv3.weight), "conv3.bias": net.conv3.bias.detach().numpy(),
        "fc.weight": weight(net.fc.weight), "fc.bias": net.fc.bias.detach().numpy(),
    }

    def conv(name: str, x: str, out: str, stride: int, padding: int, dilation: int, groups: int) -> Node:
        params = {"weight": f"{name}.weight"}
        if f"{name}.bias" in tensors:
            params["bias"] = f"{name}.bias"
        return Node("conv2d", name, (x,), out, {"stride": [stride] * 2, "padding": [padding] * 2,
                                                "dilation": [dilation] * 2, "groups": groups}, params)

    nodes = [
        Node("normalize", "normalize", ("x",), "n", {"mean": MEAN, "std": STD}),
        conv("conv1", "n", "c1", 1, 1, 1, 1),
        Node("affine", "bn1", ("c1",), "b1", {}, {"scale": "bn1.scale", "shift": "bn1.shift"}),
        Node("relu", "relu1", ("b1",), "r1"),
        Node("maxpool2d", "pool1", ("r1",), "p1", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1],
                                                   "dilation": [1, 1], "ceil_mode": True}),
        conv("conv2", "p1", "c2", 1, 2, 2, 4),
        Node("clip", "relu6", ("c2",), "q2", {"min": 0.0, "max": 6.0}),
        Node("add", "residual", ("q2", "p1"), "s2"),
        Node("avgpool2d", "pool2", ("s2",), "p2", {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1],
                                                   "ceil_mode": True, "count_include_pad": False}),
        conv("conv3", "p2", "c3", 2, 1, 1, 1),
        Node("global_avgpool", "gap", ("c3",), "g"),
        Node("flatten", "flatten", ("g",), "f"),
        Node("linear", "fc", ("f",), "logits", {}, {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    return Graph("x", (3, 16, 16), "logits", nodes, tensors)


def images(n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 3, 16, 16)).astype(np.float32)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("csr", [True, False])
def test_reference_matches_torch(csr: bool) -> None:
    net = pruned_net()
    x = images()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = run_reference(to_graph(net, csr), x)
    assert got.shape == (3, 10) and got.dtype == np.float32
    assert relative_error(got, want) < 1e-4


def test_reference_on_loaded_bundle_is_identical(tmp_path: Path) -> None:
    graph = to_graph(pruned_net(2), csr=False)
    write_bundle(graph, tmp_path / "m.hcsr")
    x = images(2, seed=3)
    np.testing.assert_array_equal(run_reference(load_bundle(tmp_path / "m.hcsr").graph, x), run_reference(graph, x))


def test_every_op_has_a_handler() -> None:
    assert set(HANDLERS) == set(OPS)


def test_input_is_checked() -> None:
    graph = to_graph(pruned_net(), csr=True)
    with pytest.raises(ValueError, match=r"input shape \(3, 16, 16\)"):
        run_reference(graph, images()[0])
    with pytest.raises(ValueError, match="float32"):
        run_reference(graph, images().astype(np.float64))
    graph.tensors["fc.bias"] = np.zeros(4, np.float32)
    with pytest.raises(GraphError, match="node 'fc'"):
        run_reference(graph, images())


@pytest.mark.parametrize("kernel", [2**24 + 1, 2**40 + 1])
def test_a_pool_padded_past_its_input_is_refused(tmp_path, kernel) -> None:
    # A valid-looking 1 kB bundle (kernel 2**24 + 1, padding 2**23 on 8x8) had kept `harp run` busy for
    # hours; kernel 2**40 + 1 had crashed numba with a SystemError traceback.
    from harp.export.bundle import BundleError

    rng = np.random.default_rng(0)
    pool = {"kernel": [kernel, kernel], "stride": [1, 1], "padding": [kernel // 2] * 2, "dilation": [1, 1],
            "ceil_mode": False}
    graph = Graph("x", (2, 8, 8), "y", [Node("maxpool2d", "pool", ("x",), "p", pool),
                                         Node("flatten", "flat", ("p",), "f"),
                                         Node("linear", "fc", ("f",), "y", {}, {"weight": "w"})],
                  {"w": rng.standard_normal((3, 128)).astype(np.float32)})
    with pytest.raises((GraphError, BundleError), match=r"padding \(\d+, \d+\) is larger than the 8x8 input"):
        write_bundle(graph, tmp_path / "m.harpz")
