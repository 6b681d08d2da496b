"""Build a model by name for a dataset: Normalize first, then the architecture."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ..data import DatasetSpec
from ..errors import HarpError
from .mobilenet import MobileNetV2
from .normalize import Normalize
from .resnet import ResNet
from .small_cnn import SmallCNN
from .vgg import VGG
from .wrn import WideResNet

_BUILDERS: dict[str, Callable[[DatasetSpec], nn.Module]] = {
    "small_cnn": lambda s: SmallCNN(s.channels, s.size, s.classes),
    "vgg16_bn": lambda s: VGG(s.channels, s.size, s.classes),
    "resnet18": lambda s: ResNet(s.channels, s.classes),
    "wrn-28-4": lambda s: WideResNet(s.channels, s.classes, 28, 4),
    "mobilenet_v2": lambda s: MobileNetV2(s.channels, s.size, s.classes),
}
ARCHITECTURES = tuple(_BUILDERS) + ("torchvision:NAME",)


def default_arch(spec: DatasetSpec) -> str:
    return "small_cnn" if spec.channels == 1 and max(spec.size) <= 28 else "resnet18"


def build_model(arch: str, spec: DatasetSpec) -> nn.Sequential:
    """The model the pipeline trains: raw [0, 1] pixels in, logits out."""
    if arch.startswith("torchvision:"):
        body = _torchvision(arch.split(":", 1)[1], spec)
    elif arch in _BUILDERS:
        body = _BUILDERS[arch](spec)
    else:
        raise HarpError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    return nn.Sequential(OrderedDict(normalize=Normalize(spec.mean, spec.std), net=body))


def check_model_runs(model: nn.Module, arch: str, spec: DatasetSpec) -> None:
    """HarpError unless `model` maps a batch of `spec`'s images to one logit per class: a torchvision
    network made for 224-pixel images can pool 8x8 digits down to nothing."""
    shape = "x".join(map(str, spec.input_shape))
    # Both modes: some networks answer differently in training (extra heads, a tuple of outputs).
    # A copy runs in training mode, so the model's BatchNorm statistics stay as they are.
    was_training = model.training
    for training in (False, True):
        probe = copy.deepcopy(model).train() if training else model.eval()
        try:
            with torch.no_grad():
                logits = probe(torch.zeros(2, *spec.input_shape))
        except (RuntimeError, AssertionError, ValueError, IndexError) as e:  # ViT asserts its image size
            first = (str(e).strip().splitlines() or [""])[0]
            raise HarpError(f"--arch {arch} cannot run on the {shape} images of {spec.name}: {first}") from e
        finally:
            model.train(was_training)
        mode = " in training" if training else ""
        if not isinstance(logits, torch.Tensor):
            raise HarpError(f"--arch {arch} returns a {type(logits).__name__}{mode}, not a tensor of logits")
        if tuple(logits.shape) != (2, spec.classes):
            raise HarpError(f"--arch {arch} maps the {shape} images of {spec.name} to outputs of shape "
                            f"{tuple(logits.shape)[1:]}{mode}, not {spec.classes} logits")


AUX_HEAD_MODELS = ("googlenet", "inception_v3")


def _torchvision(name: str, spec: DatasetSpec) -> nn.Module:
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise HarpError(f"unknown torchvision model {name!r}")
    # Auxiliary heads make training return a tuple of logits: harp trains the main head only (and
    # names the initialisation, which these models otherwise warn will change)
    aux = {"aux_logits": False, "init_weights": True} if name in AUX_HEAD_MODELS else {}
    model = tvm.get_model(name, weights=None, num_classes=spec.classes, **aux)
    if spec.channels != 3:  # rebuild the stem for grey images
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Conv2d):
                    setattr(parent, child_name, nn.Conv2d(
                        spec.channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        child.dilation, child.groups, child.bias is not None))
                    return model
    return model


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear (shortcuts and classifier included), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
