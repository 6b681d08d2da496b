"""Prunable layers for training: learned-mask (scores + rate) and fixed-mask variants.

`ScoredConv2d` / `ScoredLinear` keep the pretrained weight frozen and learn
importance scores S (and, for HARP, a rate parameter r). Their forward uses
w * mask with mask = top-k(|S|), k = keep_count(a * N); a straight-through estimator
sends the mask's gradient to S and its sum to the kept fraction a (hence to r).

`MaskedConv2d` / `MaskedLinear` train the weight under a fixed mask (fine-tuning).

With granularity "channel", scores are per output channel and the mask zeroes whole
output channels. The layer's output gate is applied after its BatchNorm (when one
directly follows), so a pruned channel is exactly zero and the exporter can remove it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Set as AbstractSet

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HarpError
from ..models import prunable_layers
from .masks import keep_count, topk_mask

GRANULARITIES = ("weight", "channel")


class TopKMask(torch.autograd.Function):
    """Forward: the given exact top-k mask of the scores. Backward: straight-through.

    The scores get the mask's gradient unchanged; the kept fraction gets its sum,
    i.e. the first-order change of the loss if every candidate weight were kept.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, fraction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.sum(), None


def rate_to_fraction(rate: torch.Tensor, a_min: float) -> torch.Tensor:
    """HARP's mapping of the trainable rate r into [a_min, 1]."""
    return a_min + (1.0 - a_min) * torch.sigmoid(rate)


def fraction_to_rate(fraction: float, a_min: float) -> float:
    """Inverse of rate_to_fraction, clipped away from the sigmoid's flat ends."""
    p = (fraction - a_min) / max(1.0 - a_min, 1e-12)
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


class _Scored:
    """Mixin: frozen weight, learned scores and rate."""

    granularity: str
    a_min: float
    learn_rate: bool

    def _init_pruning(self, granularity: str, density: float, a_min: float, learn_rate: bool) -> None:
        w = self.weight
        w.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.granularity = granularity
        self.a_min = a_min
        self.learn_rate = learn_rate
        # HYDRA's scaled initialisation: proportional to |w|, at the scale of Kaiming init
        fan_in = w[0].numel()
        if granularity == "weight":
            init = math.sqrt(6.0 / fan_in) * w.detach() / w.detach().abs().max().clamp_min(1e-12)
        else:  # one score per output channel: its L1 norm, scaled the same way
            norms = w.detach().flatten(1).abs().sum(1)
            init = math.sqrt(6.0 / fan_in) * norms / norms.max().clamp_min(1e-12)
        self.scores = nn.Parameter(init.clone())
        self.rate = nn.Parameter(torch.tensor(fraction_to_rate(density, a_min)), requires_grad=learn_rate)

    def fraction(self) -> torch.Tensor:
        return rate_to_fraction(self.rate, self.a_min)

    def pin_count(self, count: int) -> None:
        """Set the rate so that the mask keeps exactly `count` scores (or the fewest a_min allows).

        The search runs through fraction() itself: a rate found in float64 and stored in the
        float32 parameter can land just below the count's boundary and lose a weight.
        """
        n = self.scores.numel()
        lo, hi = -60.0, 60.0
        with torch.no_grad():
            for _ in range(100):
                mid = (lo + hi) / 2
                self.rate.fill_(mid)
                if keep_count(n, float(self.fraction())) >= count:
                    hi = mid
                else:
                    lo = mid
            self.rate.fill_(hi)

    def kept_fraction(self) -> torch.Tensor:
        """The fraction the mask really keeps (integer count) with the gradient of fraction().

        Densities built from it match what the masks achieve, so the compression term keeps
        pushing while rounding up still leaves the model above its target (a 64-channel
        layer rounds by up to 1/64).
        """
        frac = self.fraction()
        exact = keep_count(self.scores.numel(), float(frac.detach())) / self.scores.numel()
        return frac + (exact - frac).detach()

    def mask(self) -> torch.Tensor:
        """Mask over the scores (weight-shaped, or per output channel)."""
        frac = self.fraction()
        k = keep_count(self.scores.numel(), float(frac.detach()))
        # A PGD step runs the model many times with unchanged scores and rate: sort once.
        # The optimizer's in-place update bumps the scores' version and invalidates the cache.
        key = (self.scores._version, k, self.scores.device)
        if getattr(self, "_mask_key", None) != key:
            self._mask_cache = topk_mask(self.scores, k).to(self.scores.dtype)
            self._mask_key = key
        return TopKMask.apply(self.scores.abs(), frac, self._mask_cache)

    def weight_mask(self) -> torch.Tensor:
        m = self.mask()
        return m if self.granularity == "weight" else m.view(-1, *[1] * (self.weight.dim() - 1)).expand_as(self.weight)

    def effective_weight(self) -> torch.Tensor:
        if self.training:
            return self.weight * self.weight_mask()
        # Eval mode (an attack crafting the batch's examples, or scoring): nothing differentiates
        # through the mask and nothing changes between calls, so compute the masked weight once
        # per optimiser step instead of once per PGD iteration.
        key = (self.scores._version, self.rate._version, self.weight._version, self.scores.device)
        if getattr(self, "_eval_key", None) != key:
            with torch.no_grad():
                self._eval_weight = self.weight * self.weight_mask()
            self._eval_key = key
        return self._eval_weight

    def channel_gate(self) -> torch.Tensor | None:
        """The mask over output channels, applied after the BatchNorm; in training it carries the
        scores' gradient: the BatchNorm cancels any scale of the layer's weights, so the gradient
        through the masked weight alone is ~0 and the scores would never move."""
        if self.granularity != "channel":
            return None
        return self.mask() if self.training else self.mask().detach()


class _Masked:
    """Mixin: trainable weight under a fixed mask buffer."""

    def _init_mask(self, mask: torch.Tensor, granularity: str) -> None:
        self.register_buffer("mask", mask.to(self.weight.dtype))
        self.granularity = granularity

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def channel_gate(self) -> torch.Tensor | None:
        if self.granularity != "channel":
            return None
        return (self.mask.flatten(1).sum(1) > 0).to(self.weight.dtype)


class _GatedOutput:
    """Applies the channel gate to the layer's own output unless a BatchNorm does it."""

    gate_after_bn: bool = False

    def _gate(self, y: torch.Tensor) -> torch.Tensor:
        gate = None if self.gate_after_bn else self.channel_gate()
        if gate is None:
            return y
        if isinstance(self, nn.Linear):  # its channels are the last axis, whatever comes before (N, ..., C)
            return y * gate
        return y * gate.view(1, -1, *[1] * (y.dim() - 2))


class ScoredConv2d(_Scored, _GatedOutput, nn.Conv2d):
    def forward(self, x):
        return self._gate(self._conv_forward(x, self.effective_weight(), self.bias))


class ScoredLinear(_Scored, _GatedOutput, nn.Linear):
    def forward(self, x):
        return self._gate(F.linear(x, self.effective_weight(), self.bias))


class MaskedConv2d(_Masked, _GatedOutput, nn.Conv2d):
    def forward(self, x):
        return self._gate(self._conv_forward(x, self.effective_weight(), self.bias))


class MaskedLinear(_Masked, _GatedOutput, nn.Linear):
    def forward(self, x):
        return self._gate(F.linear(x, self.effective_weight(), self.bias))


def _clone_as(layer: nn.Module, cls: type) -> nn.Module:
    """A new instance of cls (a subclass of layer's type) sharing layer's parameters."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    fresh = set(new.__dict__) - {"training"}  # nn.Module's own registries stay new
    new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in fresh})
    for name, p in layer._parameters.items():
        new.register_parameter(name, p)
    for name, b in layer._buffers.items():
        new.register_buffer(name, b)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _subclass_for(layer: nn.Module, conv_cls: type, linear_cls: type) -> type:
    return conv_cls if isinstance(layer, nn.Conv2d) else linear_cls


def make_scored(model: nn.Module, granularity: str, densities: dict[str, float], a_min: float,
                learn_rate: bool, frozen_output: AbstractSet[str] = frozenset()) -> dict[str, _Scored]:
    """Swap every prunable layer for a scored twin; returns them by name.

    Layers in `frozen_output` (the classifier under channel pruning) keep every
    output: their rate is pinned at density 1.
    """
    layers = {}
    for name, layer in prunable_layers(model):
        new = _clone_as(layer, _subclass_for(layer, ScoredConv2d, ScoredLinear))
        dens = 1.0 if name in frozen_output else densities[name]
        learned = learn_rate and name not in frozen_output
        new._init_pruning(granularity, dens, 0.0 if name in frozen_output else a_min, learned)
        if not learned:  # a fixed rate keeps exactly its count (the learned ones start clipped, see fraction_to_rate)
            new.pin_count(keep_count(new.scores.numel(), dens))
        _replace(model, name, new)
        layers[name] = new
    if granularity == "channel":
        attach_channel_gates(model, layers)
    return layers


def make_masked(model: nn.Module, masks: dict[str, torch.Tensor], granularity: str) -> dict[str, _Masked]:
    """Swap every prunable layer for a fixed-mask twin (fine-tuning)."""
    layers = {}
    for name, layer in prunable_layers(model):
        mask = masks.get(name)
        if mask is None or mask.shape != layer.weight.shape:  # masks.safetensors is read from a checkpoint
            found = "none" if mask is None else tuple(mask.shape)
            raise HarpError(f"the masks do not fit the model: layer {name!r} has weights of shape "
                            f"{tuple(layer.weight.shape)}, its mask {found}")
        new = _clone_as(layer, _subclass_for(layer, MaskedConv2d, MaskedLinear))
        new._init_mask(mask.to(layer.weight.device), granularity)
        _replace(model, name, new)
        layers[name] = new
    if granularity == "channel":
        attach_channel_gates(model, layers)
    return layers


def trace_layers(model: nn.Module):
    """fx graph of `model` with every Conv2d/Linear (scored and masked twins too) kept as one node."""
    import torch.fx as fx

    class LayerTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.Conv2d | nn.Linear) or super().is_leaf_module(m, qualname)

    return fx.GraphModule(model, LayerTracer().trace(model))


def following_batchnorms(model: nn.Module) -> dict[str, str]:
    """Prunable layer name -> the BatchNorm that directly and solely consumes its output."""
    try:
        gm = trace_layers(model)
    except Exception:  # noqa: BLE001 - untraceable models gate at the layer itself
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d | nn.Linear):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and \
                isinstance(modules.get(users[0].target), nn.BatchNorm2d | nn.BatchNorm1d) and \
                modules[users[0].target].affine:  # without weight and bias, bake cannot zero it there
            pairs[node.target] = users[0].target
    return pairs


def attach_channel_gates(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Gate pruned channels after the following BatchNorm, so they are exactly zero."""
    for layer_name, bn_name in following_batchnorms(model).items():
        layer = layers.get(layer_name)
        if layer is None:
            continue
        layer.gate_after_bn = True
        model.get_submodule(bn_name).register_forward_hook(_gate_hook(layer))


def _gate_hook(layer: nn.Module) -> Callable:
    def hook(_module, _inputs, output):
        gate = layer.channel_gate()
        return output * gate.view(1, -1, *[1] * (output.dim() - 2))
    return hook


def bake(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A plain model (original layer types) with masks baked in, plus the masks.

    For channel pruning the BatchNorm after a pruned channel gets weight = bias = 0
    there (and a layer without BN loses that bias entry), so the channel's output is
    exactly zero in the plain model too; and the weights that read such a channel
    through ops keeping zero at zero (see `inert_inputs`) are zeroed, in the model
    and the masks: they multiply a 0, so the model computes the same function and
    its zero-weight count is the effective one.
    """
    import copy

    plain = copy.deepcopy(model)
    masks, pairs = {}, following_batchnorms(model) if any(
        getattr(m, "granularity", "weight") == "channel" for m in layers.values()) else {}
    dead_channels = {}
    for name, layer in layers.items():
        with torch.no_grad():
            wmask = (layer.weight_mask() if isinstance(layer, _Scored) else layer.mask).detach().bool()
            base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
            new = _clone_as(layer, base)
            new.weight = nn.Parameter(layer.weight.detach() * wmask)
            if layer.bias is not None:
                new.bias = nn.Parameter(layer.bias.detach().clone())
            gate = layer.channel_gate()
            if gate is not None:
                dead = gate == 0
                dead_channels[name] = dead.detach().cpu()
                if name in pairs:
                    bn = plain.get_submodule(pairs[name])
                    bn.weight.data[dead] = 0
                    bn.bias.data[dead] = 0
                elif new.bias is not None:
                    new.bias.data[dead] = 0
        for attr in ("scores", "rate", "mask"):
            new._parameters.pop(attr, None)
            new._buffers.pop(attr, None)
        _replace(plain, name, new)
        masks[name] = wmask.cpu()
    for name, inert in inert_inputs(model, dead_channels, pairs).items():
        _zero_inputs(plain.get_submodule(name), masks, name, inert)
    for m in plain.modules():
        m._forward_hooks.clear()
    return plain, masks


# Ops whose output channel c is zero wherever their input channel c is (a BatchNorm only as the
# producer's own, gated one: any other adds its shift to a zero).
_ZERO_KEEPING = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                 nn.Identity)


def inert_inputs(model: nn.Module, dead: dict[str, torch.Tensor], pairs: dict[str, str]) -> dict[str, torch.Tensor]:
    """Layer name -> bool mask over its weight's axis 1: inputs that are exactly zero for every model
    input because they carry a pruned channel of `dead` (layer name -> bool per output channel).

    Only a plain path counts: the consumer (a Linear, or a Conv2d with groups=1) reads the producer's
    output through ReLU / ReLU6 / Hardtanh around 0, pooling, Dropout, Identity, the producer's own
    BatchNorm (gated, in `pairs`) and at most one flatten from dimension 1 before a Linear. An add,
    a concatenation, any other BatchNorm or an unknown op stops it: its channel may not be zero.
    A depthwise/grouped conv is never a consumer here (its row would be all inert, but its
    BatchNorm still emits a constant).
    """
    if not any(d.any() for d in dead.values()):
        return {}
    try:
        gm = trace_layers(model)
    except Exception:  # noqa: BLE001 - untraceable: keep every weight
        return {}
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    out = {}
    for node in gm.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, nn.Conv2d | nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups != 1) \
                or calls[node.target] > 1:  # a layer applied twice may read a live channel the other time
            continue
        producer, flattened = _plain_producer(node, modules, pairs)
        if producer is None or producer not in dead or calls[producer] > 1:
            continue  # a producer applied twice: its call without the BatchNorm is not gated
        channels = dead[producer]
        source = modules[producer]
        if isinstance(layer, nn.Conv2d):
            ok = isinstance(source, nn.Conv2d) and not flattened and layer.in_channels == channels.numel()
            block = 1
        elif flattened:
            ok = isinstance(source, nn.Conv2d) and layer.in_features % channels.numel() == 0
            block = layer.in_features // channels.numel()
        else:
            ok = isinstance(source, nn.Linear) and layer.in_features == channels.numel()
            block = 1
        if ok and channels.any():
            out[node.target] = channels.repeat_interleave(block)
    return out


def _plain_producer(node, modules: dict[str, nn.Module], pairs: dict[str, str]) -> tuple[str | None, bool]:
    """The layer whose output reaches `node`'s input along a zero-keeping path, and whether it was flattened."""
    import torch.fx as fx

    src, flattened = (node.args[0] if node.args else None), False
    while isinstance(src, fx.Node) and len(src.args) >= 1:
        prev = src.args[0]
        if _mutated(src, modules):  # e.g. h.add_(1) after h was read into the path: h is not what fx shows
            return None, False
        if src.op == "call_module":
            mod = modules.get(src.target)
            if isinstance(mod, nn.Conv2d | nn.Linear):
                return src.target, flattened
            if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                if not (isinstance(prev, fx.Node) and prev.op == "call_module" and pairs.get(prev.target) == src.target):
                    return None, False
            elif isinstance(mod, nn.Hardtanh):  # ReLU6 too
                if not mod.min_val <= 0 <= mod.max_val:
                    return None, False
            elif isinstance(mod, nn.Flatten):
                if flattened or mod.start_dim != 1 or mod.end_dim != -1:
                    return None, False
                flattened = True
            elif not isinstance(mod, _ZERO_KEEPING):
                return None, False
        elif src.op == "call_function" and src.target in (F.relu, torch.relu, torch.relu_):
            pass
        elif src.op == "call_function" and src.target is torch.flatten and not flattened and \
                _flatten_dims(src) == (1, -1):
            flattened = True
        else:
            return None, False
        src = prev
    return None, False


# Ops whose result may share the tensor's memory: a write into it is a write into the tensor.
# getattr: h.data, h.T, h.mT (an attribute that is not a tensor has no writes to find).
_VIEWS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
          "expand", "narrow", "select", "unbind", "split", "chunk", "view_as", "reshape_as", "as_strided",
          "movedim", "moveaxis", "swapaxes", "swapdims", "unfold", "diagonal", "view_as_real", "view_as_complex",
          "__getitem__", "getitem", "getattr", "detach", "contiguous"}


def _mutated(node, modules: dict[str, nn.Module], depth: int = 0) -> bool:
    """Whether some op writes into `node`'s tensor, or a view of it, in place (fx records such an op as
    a user whose result is unused, so the graph shows the value before the write)."""
    for user in node.users:
        target = user.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if user.op == "call_module":
            mod = modules.get(target)
            if getattr(mod, "inplace", False) and not (isinstance(mod, nn.ReLU) or (
                    isinstance(mod, nn.Hardtanh) and mod.min_val <= 0 <= mod.max_val)):
                return True
            if isinstance(mod, nn.Flatten | nn.Unflatten | nn.Identity | nn.Dropout | nn.ReLU | nn.Hardtanh) \
                    and depth < 8 and _mutated(user, modules, depth + 1):
                return True
        elif user.op in ("call_method", "call_function"):
            if user.kwargs.get("inplace") or user.kwargs.get("out") is not None \
                    or name in ("setitem", "__setitem__") or (
                    name.endswith("_") and not name.startswith("_") and name != "relu_") or (
                    user.op == "call_function" and getattr(target, "__module__", None) in ("_operator", "operator")
                    and name.startswith("i") and name not in ("is_", "is_not", "index", "indexOf", "inv", "invert")):
                return True
            if (name in _VIEWS or name == "relu_" or target in (F.relu, torch.relu)) and depth < 8 \
                    and _mutated(user, modules, depth + 1):
                return True
    return False


def _flatten_dims(node) -> tuple:
    args = list(node.args[1:]) + [None] * 2
    return (args[0] if args[0] is not None else node.kwargs.get("start_dim", 0),
            args[1] if args[1] is not None else node.kwargs.get("end_dim", -1))


def _zero_inputs(layer: nn.Module, masks: dict[str, torch.Tensor], name: str, inert: torch.Tensor) -> None:
    """Zero `layer`'s weights (and mask entries) at the inert inputs; a row left with no nonzero weight
    keeps its own (it still emits its bias or BatchNorm shift, and counts as a live channel)."""
    with torch.no_grad():
        w = layer.weight
        inert = inert.to(w.device).view(1, -1, *[1] * (w.dim() - 2)).expand_as(w)
        live_before = (w != 0).flatten(1).any(1)
        emptied = live_before & ~((w != 0) & ~inert).flatten(1).any(1)
        cut = inert & ~emptied.view(-1, *[1] * (w.dim() - 1))
        w[cut] = 0
        masks[name] = masks[name] & ~cut.cpu()
