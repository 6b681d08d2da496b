"""graph_to_onnx / save_onnx: traced models run in onnxruntime like in torch, dense, sparse and fp16.

Every model has its BatchNorm statistics randomised (so folding matters) and its
conv/linear weights pruned to exact zeros before tracing, as harp does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from harp.export.errors import ExportError
from harp.export.graph import Graph
from harp.export.onnx_writer import graph_to_onnx, save_onnx, sparse_weights
from harp.export.trace import trace_model
from harp.models.normalize import Normalize

CIFAR_MEAN, CIFAR_STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


# -- models ---------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(self.norm(x)))), 2)  # (N, 16, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 32, 4, 4)
        x = torch.flatten(x, 1)  # (N, 512)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class VGGBN(nn.Module):
    def __init__(self, widths: tuple[int, int] = (32, 64), classes: int = 10) -> None:
        super().__init__()
        a, b = widths
        layers: list[nn.Module] = [Normalize(CIFAR_MEAN, CIFAR_STD)]
        for cin, cout, pool in ((3, a, False), (a, a, True), (a, b, False), (b, b, True)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(b * 4, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Dropout(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16)
        x = self.pool(self.features(x))  # (N, b, 2, 2)
        return self.classifier(x.view(x.size(0), -1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.linear = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16)
        out = F.relu(self.bn1(self.conv1(self.norm(x))))
        out = self.layer2(self.layer1(out))  # (N, 32, 8, 8)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # (N, 32)
        return self.linear(out)


class WideBlock(nn.Module):
    """Pre-activation block: BN -> ReLU -> conv, shortcut taken from the activated input when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.same_shape = cin == cout and stride == 1
        self.shortcut = None if self.same_shape else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return torch.add(x if self.shortcut is None else self.shortcut(act), out)


class WideResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(WideBlock(16, 32, 1), WideBlock(32, 32, 1))
        self.block2 = nn.Sequential(WideBlock(32, 64, 2))
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16)
        out = self.block2(self.block1(self.conv1(self.norm(x))))  # (N, 64, 8, 8)
        out = self.relu(self.bn(out)).mean((2, 3))  # (N, 64)
        return self.fc(out)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class TinyMobileNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16)
        x = self.head(self.blocks(self.stem(self.norm(x))))  # (N, 64, 8, 8)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)  # (N, 64)
        return self.classifier(x)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "small_cnn": (SmallCNN, (3, 16, 16)),
    "vgg_bn": (VGGBN, (3, 16, 16)),
    "cifar_resnet": (CifarResNet, (3, 16, 16)),
    "wide_resnet": (WideResNet, (3, 16, 16)),
    "mobilenet_block": (TinyMobileNet, (3, 16, 16)),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
}


def prepared(name: str, sparsity: float = 0.9, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build a zoo model with random BN statistics and conv/linear weights pruned to exact zeros."""
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) * 0.6 - 0.3)
            if isinstance(mod, nn.Conv2d | nn.Linear):  # survivors rescaled so activations keep their scale
                keep = torch.rand(mod.weight.shape, generator=gen) >= sparsity
                mod.weight.mul_(keep / (1.0 - sparsity) ** 0.5)
    return model, shape


def images(shape: tuple[int, int, int], n: int = 6, seed: int = 1) -> torch.Tensor:
    """Smooth random images in [0, 1] (upsampled 4x4 noise): more varied logits than white noise."""
    coarse = torch.rand((n, shape[0], 4, 4), generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)  # (n, C, H, W)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_close_logits(got: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    assert got.shape == expected.shape
    bound = rel * np.maximum(1.0, np.abs(expected))
    worst = float(np.max(np.abs(got - expected) - bound))
    assert worst <= 0, f"max excess over tolerance {worst:.3g}"


def weight_names(graph: Graph) -> list[str]:
    return [n.params["weight"] for n in graph.nodes if n.op in ("conv2d", "linear")]


# -- end to end ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_model_zoo_dense_and_sparse_match_torch(name: str) -> None:
    model, shape = prepared(name)
    graph = trace_model(model, shape)
    x = images(shape)
    with torch.no_grad():
        expected = model(x).numpy()
    for sparse in (False, True):
        onnx_model = graph_to_onnx(graph, sparse=sparse)
        onnx.checker.check_model(onnx_model, full_check=True)
        got = run(onnx_model, x.numpy())
        assert_close_logits(got, expected)
        assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert "affine" not in [n.op for n in graph.nodes] or name == "wide_resnet"  # every post-conv BN folded


@pytest.mark.parametrize("storage", ["constant", "initializer"])
def test_sparse_weights_are_canonical_coo(storage: str) -> None:
    model, shape = prepared("cifar_resnet")
    graph = trace_model(model, shape)
    onnx_model = graph_to_onnx(graph, sparse=True, sparse_storage=storage)
    found = sparse_weights(onnx_model)
    assert sorted(found) == sorted(weight_names(graph))
    assert not {t.name for t in onnx_model.graph.initializer} & set(found)  # no dense copy of any weight
    for name, sp in found.items():
        dense = graph.tensors[name]
        indices = numpy_helper.to_array(sp.indices)
        values = numpy_helper.to_array(sp.values)
        assert sp.indices.data_type == TensorProto.INT64 and indices.ndim == 1
        assert list(sp.dims) == list(dense.shape)
        assert np.all(np.diff(indices) > 0) and indices.min(initial=0) >= 0 and indices.max(initial=0) < dense.size
        assert len(values) == len(indices) == np.count_nonzero(dense)
        rebuilt = np.zeros(dense.size, np.float32)
        rebuilt[indices] = values
        assert np.array_equal(rebuilt.reshape(dense.shape), dense)


def test_sparse_initializer_storage_loads_and_runs() -> None:
    model, shape = prepared("small_cnn")
    graph = trace_model(model, shape)
    onnx_model = graph_to_onnx(graph, sparse=True, sparse_storage="initializer")
    assert sorted(sp.values.name for sp in onnx_model.graph.sparse_initializer) == sorted(weight_names(graph))
    onnx.checker.check_model(onnx_model)  # strict shape inference rejects sparse initializers as op inputs
    x = images(shape)
    with torch.no_grad():
        assert_close_logits(run(onnx_model, x.numpy()), model(x).numpy())


def test_sparse_file_is_much_smaller_at_99_percent(tmp_path: Path) -> None:
    model, shape = prepared("vgg_bn", sparsity=0.99)
    graph = trace_model(model, shape)
    dense = save_onnx(graph_to_onnx(graph), tmp_path / "dense.onnx")
    sparse = save_onnx(graph_to_onnx(graph, sparse=True), tmp_path / "sparse.onnx")
    assert dense.stat().st_size > 200_000
    assert sparse.stat().st_size < dense.stat().st_size / 10


@pytest.mark.parametrize("sparse", [False, True])
def test_float16_weights_are_cast_back_and_run_within_fp16_tolerance(sparse: bool) -> None:
    model, shape = prepared("cifar_resnet")
    graph = trace_model(model, shape)
    onnx_model = graph_to_onnx(graph, sparse=sparse, values_dtype="float16")
    onnx.checker.check_model(onnx_model, full_check=True)
    names = weight_names(graph)
    casts = [n for n in onnx_model.graph.node if n.op_type == "Cast"]
    assert sorted(n.output[0] for n in casts) == sorted(names)
    stored = ([sp.values for sp in sparse_weights(onnx_model).values()] if sparse else
              [t for t in onnx_model.graph.initializer if t.data_type == TensorProto.FLOAT16])
    assert len(stored) == len(names) and all(t.data_type == TensorProto.FLOAT16 for t in stored)

    x = images(shape).numpy()
    got = run(onnx_model, x)
    # exactly "round the weights to fp16, compute in fp32"
    rounded = {k: (v.astype(np.float16).astype(np.float32) if k in names else v) for k, v in graph.tensors.items()}
    assert_close_logits(got, run(graph_to_onnx(dataclasses.replace(graph, tensors=rounded)), x), rel=1e-5)
    with torch.no_grad():
        assert_close_logits(got, model(torch.from_numpy(x)).numpy(), rel=1e-2)


# -- format ----------------------------------------------------------------------


def test_signature_has_symbolic_batch_and_runs_any_batch_size() -> None:
    model, shape = prepared("small_cnn")
    onnx_model = graph_to_onnx(trace_model(model, shape))
    (inp,), (out,) = onnx_model.graph.input, onnx_model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp), inp.type.tensor_type.elem_type) == ("input", ["N", 3, 16, 16], TensorProto.FLOAT)
    assert (out.name, dims(out)) == ("logits", ["N", 10])
    assert "conv1" in {n.name for n in onnx_model.graph.node}
    for n in (1, 5):
        x = images(shape, n=n)
        with torch.no_grad():
            assert_close_logits(run(onnx_model, x.numpy()), model(x).numpy())


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_ir_version_is_the_minimum_for_the_opset_and_loads(opset: int) -> None:
    model, shape = prepared("mobilenet_block")
    onnx_model = graph_to_onnx(trace_model(model, shape), sparse=True, opset=opset)
    assert onnx_model.opset_import[0].version == opset
    assert onnx_model.ir_version == max(6, helper.find_min_ir_version_for(list(onnx_model.opset_import)))
    assert onnx_model.ir_version < onnx.IR_VERSION or onnx.IR_VERSION <= 8  # not onnx's (possibly too new) default
    onnx.checker.check_model(onnx_model, full_check=True)
    x = images(shape)
    with torch.no_grad():
        assert_close_logits(run(onnx_model, x.numpy()), model(x).numpy())


def test_save_onnx_replaces_atomically(tmp_path: Path) -> None:
    model, shape = prepared("small_cnn")
    first = graph_to_onnx(trace_model(model, shape))
    second = graph_to_onnx(trace_model(model, shape), sparse=True)
    path = tmp_path / "model.onnx"
    assert save_onnx(first, path) == path
    assert onnx.load(str(path)).SerializeToString() == first.SerializeToString()
    save_onnx(second, str(path))
    assert onnx.load(str(path)).SerializeToString() == second.SerializeToString()
    assert os.listdir(tmp_path) == ["model.onnx"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_invalid_arguments_raise_export_error() -> None:
    model, shape = prepared("small_cnn")
    graph = trace_model(model, shape)
    for kwargs, pattern in (({"opset": 10}, "opset 10"), ({"opset": 999}, "opset 999"),
                            ({"values_dtype": "int8"}, "values_dtype 'int8'"),
                            ({"sparse_storage": "coo"}, "sparse_storage 'coo'")):
        with pytest.raises(ExportError, match=pattern):
            graph_to_onnx(graph, **kwargs)
    broken = dataclasses.replace(graph, tensors={k: v for k, v in graph.tensors.items() if k != "fc2.bias"})
    with pytest.raises(ExportError, match="fc2.bias"):
        graph_to_onnx(broken)
