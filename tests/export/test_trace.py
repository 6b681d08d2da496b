"""trace_model: which graph ops each torch construct becomes, BN folding, naming, errors.

Numerical equivalence is checked by running the traced graph through the ONNX
writer and onnxruntime against the torch model (the end-to-end model zoo lives in
test_onnx_writer.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harp.export.errors import ExportError
from harp.export.graph import Graph
from harp.export.onnx_writer import graph_to_onnx
from harp.export.trace import trace_model
from harp.models.normalize import Normalize


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) * 0.6 - 0.3)
    return model


def _run_graph(graph: Graph, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph_to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _assert_matches_torch(model: nn.Module, shape: tuple[int, int, int], graph: Graph | None = None) -> Graph:
    model.eval()
    graph = graph or trace_model(model, shape)
    x = torch.rand((3, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = _run_graph(graph, x.numpy())
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    return graph


def _ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes]


# -- BatchNorm folding ------------------------------------------------------


class _ConvBnNet(nn.Module):
    def __init__(self, conv_bias: bool) -> None:
        super().__init__()
        self.norm = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 8, 8)
        x = F.relu(self.bn(self.conv(self.norm(x))))
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("conv_bias", [False, True])
def test_batchnorm_after_conv_is_folded_and_keeps_zeros(conv_bias: bool) -> None:
    model = _randomise_batchnorm(_ConvBnNet(conv_bias)).eval()
    with torch.no_grad():
        model.conv.weight.mul_(torch.rand(model.conv.weight.shape) > 0.7)  # exact zeros
    graph = _assert_matches_torch(model, (3, 8, 8))

    assert _ops(graph) == ["normalize", "conv2d", "relu", "flatten", "linear"]
    conv = graph.node_by_name("conv")
    assert conv.params == {"weight": "conv.weight", "bias": "conv.bias"}
    bn = model.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    expected = model.conv.weight.detach().numpy() * scale[:, None, None, None]
    np.testing.assert_allclose(graph.tensors["conv.weight"], expected, rtol=1e-6)
    zeros = model.conv.weight.detach().numpy() == 0
    assert np.array_equal(graph.tensors["conv.weight"] == 0, zeros)
    assert graph.node_by_name("norm").attrs["std"] == pytest.approx([0.2, 0.25, 0.3])


class _SharedConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).flatten(1))


def test_batchnorm_is_not_folded_when_conv_output_has_another_user() -> None:
    graph = _assert_matches_torch(_randomise_batchnorm(_SharedConvOutput()), (3, 4, 4))
    assert _ops(graph) == ["conv2d", "affine", "add", "flatten", "linear"]
    assert graph.node_by_name("bn").params == {"scale": "bn.scale", "shift": "bn.shift"}


class _PreActBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(F.relu(self.bn(x))) + x)


def test_standalone_batchnorm_becomes_affine() -> None:
    graph = _assert_matches_torch(_randomise_batchnorm(_PreActBlock()), (4, 6, 6))
    assert _ops(graph) == ["affine", "relu", "conv2d", "add", "global_avgpool", "flatten", "linear"]
    assert "bias" not in graph.node_by_name("conv").params  # bias-less conv stays bias-less


def test_batchnorm1d_after_linear_is_folded() -> None:
    model = _randomise_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.BatchNorm1d(5),
                                               nn.ReLU(), nn.Linear(5, 3)))
    graph = _assert_matches_torch(model, (3, 2, 2))
    assert _ops(graph) == ["flatten", "linear", "relu", "linear"]
    assert graph.node_by_name("1").params == {"weight": "1.weight", "bias": "1.bias"}


# -- op mapping of modules, functions and methods ----------------------------


class _Wrap(nn.Module):
    """A conv feeding `body`, so `body` can be any construct under test."""

    def __init__(self, body: nn.Module, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


class _Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], out_features: int) -> None:
        super().__init__()
        self.fn = fn
        self.fc = nn.LazyLinear(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fn(x))


_FLAT = lambda x: torch.flatten(x, 1)  # noqa: E731

# (construct, per-sample input of the construct is (4, 8, 8), expected ops after the leading conv2d)
_VARIANTS = {
    "F.relu": (lambda x: _FLAT(F.relu(x)), ["relu", "flatten"]),
    "torch.relu": (lambda x: _FLAT(torch.relu(x)), ["relu", "flatten"]),
    "relu_": (lambda x: _FLAT(x.relu_()), ["relu", "flatten"]),
    "F.relu6": (lambda x: _FLAT(F.relu6(x)), ["clip", "flatten"]),
    "clamp": (lambda x: _FLAT(x.clamp(-0.1, 0.2)), ["clip", "flatten"]),
    "clamp_min0": (lambda x: _FLAT(torch.clamp(x, min=0)), ["relu", "flatten"]),
    "F.hardtanh": (lambda x: _FLAT(F.hardtanh(x, -0.5, 0.5)), ["clip", "flatten"]),
    "F.max_pool2d": (lambda x: _FLAT(F.max_pool2d(x, 3, 2, 1)), ["maxpool2d", "flatten"]),
    "max_pool2d_ceil": (lambda x: _FLAT(F.max_pool2d(x, 3, 3, ceil_mode=True)), ["maxpool2d", "flatten"]),
    "avg_pool2d_pad": (lambda x: _FLAT(F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)), ["avgpool2d", "flatten"]),
    "avg_pool2d_ceil": (lambda x: _FLAT(F.avg_pool2d(x, 3, 3, 1, ceil_mode=True)), ["avgpool2d", "flatten"]),
    "adaptive_avg_1": (lambda x: _FLAT(F.adaptive_avg_pool2d(x, 1)), ["global_avgpool", "flatten"]),
    "adaptive_avg_2": (lambda x: _FLAT(F.adaptive_avg_pool2d(x, (2, 4))), ["avgpool2d", "flatten"]),
    "adaptive_max_2": (lambda x: _FLAT(F.adaptive_max_pool2d(x, 2)), ["maxpool2d", "flatten"]),
    "mean_keepdim": (lambda x: _FLAT(x.mean((2, 3), keepdim=True)), ["global_avgpool", "flatten"]),
    "mean": (lambda x: x.mean((-1, -2)), ["global_avgpool", "flatten"]),
    "view": (lambda x: x.view(x.size(0), -1), ["flatten"]),
    "reshape": (lambda x: x.reshape(x.shape[0], -1), ["flatten"]),
    "view_minus_one": (lambda x: x.view(-1, 4 * 8 * 8), ["flatten"]),
    "add": (lambda x: _FLAT(torch.add(x, F.relu(x))), ["relu", "add", "flatten"]),
    "dropout": (lambda x: _FLAT(F.dropout(x, 0.5, training=False)), ["flatten"]),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_function_and_method_variants(variant: str) -> None:
    fn, expected_ops = _VARIANTS[variant]
    model = _Wrap(_Fn(fn, 3))
    model(torch.zeros(1, 3, 8, 8))  # materialise the LazyLinear
    graph = _assert_matches_torch(model, (3, 8, 8))
    assert _ops(graph) == ["conv2d", *expected_ops, "linear"]


@pytest.mark.parametrize(("layer", "expected"), [
    (nn.ReLU(inplace=True), "relu"),
    (nn.ReLU6(), "clip"),
    (nn.Hardtanh(-0.3, 0.4), "clip"),
    (nn.MaxPool2d(2), "maxpool2d"),
    (nn.AvgPool2d(3, stride=1, padding=1), "avgpool2d"),
    (nn.AdaptiveAvgPool2d((1, 1)), "global_avgpool"),
    (nn.Dropout(0.3), None),
    (nn.Dropout2d(0.3), None),
    (nn.Identity(), None),
])
def test_module_variants(layer: nn.Module, expected: str | None) -> None:
    model = _Wrap(nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3)))
    model(torch.zeros(1, 3, 8, 8))
    graph = _assert_matches_torch(model, (3, 8, 8))
    assert _ops(graph) == ["conv2d", *([expected] if expected else []), "flatten", "linear"]
    if expected == "clip":
        node = graph.nodes[1]
        assert (node.attrs["min"], node.attrs["max"]) == pytest.approx((layer.min_val, layer.max_val))


@pytest.mark.parametrize(("padding", "kernel", "dilation", "expected"), [
    ("same", 3, 1, [1, 1]), ("same", 5, 2, [4, 4]), ("valid", 3, 1, [0, 0]), ((2, 1), 3, 1, [2, 1]),
])
def test_conv_padding_forms(padding: object, kernel: int, dilation: int, expected: list[int]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation, groups=1),
                          nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 9, 9))
    graph = _assert_matches_torch(model, (3, 9, 9))
    assert graph.node_by_name("0").attrs["padding"] == expected


def test_grouped_strided_dilated_conv() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False), nn.BatchNorm2d(8),
                          nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 4, 9, 9))
    graph = _assert_matches_torch(_randomise_batchnorm(model), (4, 9, 9))
    assert graph.node_by_name("0").attrs == {"stride": [2, 2], "padding": [2, 2], "dilation": [2, 2], "groups": 2}


# -- names, dead code, aliasing -------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out += x
        return self.relu(out)  # the same module called twice


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(_Block(), _Block())
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        _ = self.unused(x)  # dead: never reaches the output
        return self.fc(x.mean((2, 3)))


def test_names_follow_module_paths_and_dead_code_is_dropped() -> None:
    graph = _assert_matches_torch(_Named(), (3, 6, 6))
    names = [n.name for n in graph.nodes]
    assert names == ["stem", "layer1.0.conv1", "layer1.0.relu", "layer1.0.add", "layer1.0.relu_1",
                     "layer1.1.conv1", "layer1.1.relu", "layer1.1.add", "layer1.1.relu_1", "mean",
                     "mean.flatten", "fc"]
    assert graph.input_name == "input" and graph.output_name == "logits"
    assert graph.nodes[-1].output == "logits" and graph.nodes[0].inputs == ("input",)
    assert len({n.output for n in graph.nodes}) == len(graph.nodes)
    assert "unused.weight" not in graph.tensors
    assert sorted(graph.tensors) == sorted(f"{n}.{r}" for n in ("stem", "layer1.0.conv1", "layer1.1.conv1", "fc")
                                           for r in ("weight", "bias"))


class _InPlaceAlias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        F.relu(y, inplace=True)  # result discarded: y itself is now rectified
        return self.fc(torch.flatten(y, 1))


def test_in_place_op_is_seen_by_later_readers() -> None:
    graph = _assert_matches_torch(_InPlaceAlias(), (3, 6, 6))
    assert _ops(graph) == ["conv2d", "relu", "flatten", "linear"]


def test_caller_model_is_not_modified() -> None:
    model = _randomise_batchnorm(_ConvBnNet(conv_bias=False)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, (3, 8, 8))
    assert model.training and model.bn.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- errors -----------------------------------------------------------------------


class _Sigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class _HardcodedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(2, -1))


class _ReadThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(x.size(0), -1)
        x.relu_()  # modifies `flat` too
        return self.fc(flat)


_ERRORS = {
    "module": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GELU(), nn.Flatten(),
                                     nn.LazyLinear(2)), r"unsupported layer '3' \(GELU\)"),
    "nested module": (lambda: nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh())),
                      r"unsupported layer '0.1' \(Tanh\)"),
    "function in block": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _Sigmoid()),
                          r"torch.sigmoid in layer '1' \(_Sigmoid\)"),
    "hard-coded batch": (_HardcodedBatch, r"view in the forward of _HardcodedBatch: .*hard-codes the batch size"),
    "adaptive uneven": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(27, 2)),
                        r"layer '0' \(AdaptiveAvgPool2d\): .*unequal windows"),
    "no running stats": (lambda: nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten(),
                                               nn.Linear(48, 2)),
                         r"layer '0' \(BatchNorm2d\) has no running statistics"),
    "reflect padding": (lambda: nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                                              nn.Linear(32, 2)), r"layer '0' \(Conv2d\): padding_mode='reflect'"),
    "asymmetric same": (lambda: nn.Sequential(nn.Conv2d(3, 2, 2, padding="same"), nn.Flatten(), nn.Linear(32, 2)),
                        r"layer '0' \(Conv2d\): padding='same' .* asymmetrically"),
    "write through view": (_ReadThroughView, r"in place .* reshaped view"),
    "linear on image": (lambda: nn.Sequential(nn.Linear(4, 2)), r"layer '0' \(Linear\): expects a flat input"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", sorted(_ERRORS))
def test_unsupported_constructs_raise_export_error_naming_the_layer(case: str) -> None:
    build, pattern = _ERRORS[case]
    model = build()
    with torch.no_grad():
        model.eval()(torch.zeros(2, 3, 4, 4))  # a model torch itself can run (materialises lazy layers)
    with pytest.raises(ExportError, match=pattern):
        trace_model(model, (3, 4, 4))


def test_lstm_is_rejected_and_export_error_is_a_value_error() -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    with pytest.raises(ValueError, match=r"unsupported layer 'rnn' \(LSTM\)") as info:
        trace_model(Recurrent(), (1, 1, 4))
    assert isinstance(info.value, ExportError)


def test_bad_input_shape_is_rejected() -> None:
    with pytest.raises(ExportError, match="input_shape"):
        trace_model(nn.Flatten(), (3, 4))  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="does not run on input shape"):
        trace_model(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), (3, 4, 4))
