"""Masks, the straight-through estimator and the rate mapping of the scored layers."""

import pytest
import torch
from torch import nn

from harp.pruning.layers import bake, fraction_to_rate, make_masked, make_scored, rate_to_fraction
from harp.pruning.masks import global_magnitude_masks, keep_count, topk_mask
from harp.pruning.rates import initial_densities, project_to_budget


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize("numel,density", [(288, 0.01), (1000, 0.5), (7, 0.001), (50, 1.0)])
def test_topk_mask_keeps_exactly_the_count(numel, density):
    layer = make_scored(nn.Sequential(nn.Linear(numel, 1)), "weight", {"0": density}, a_min=0.0,
                        learn_rate=True)["0"]
    with torch.no_grad():
        layer.scores.copy_(torch.randn(1, numel))
    k = keep_count(numel, float(layer.fraction().detach()))
    mask = layer.mask()
    assert int(mask.sum()) == k and k >= 1 and k == keep_count(numel, density)
    scores = layer.scores.detach()
    kept_min = scores.abs()[mask.bool()].min()
    assert (scores.abs()[~mask.bool()] <= kept_min).all()  # the largest |scores| are the kept ones
    assert torch.equal(topk_mask(scores, k), mask.bool())


def test_mask_follows_every_score_update():
    layer = make_scored(nn.Sequential(nn.Linear(100, 1)), "weight", {"0": 0.1}, a_min=0.0, learn_rate=True)["0"]
    before = layer.mask().bool()
    assert torch.equal(layer.mask().bool(), before)  # cached while nothing changed
    with torch.no_grad():
        layer.scores.copy_(torch.where(before, 0.0, 1.0 + torch.rand(1, 100)))  # in place, as an optimizer step
    after = layer.mask().bool()
    assert not (after & before).any() and int(after.sum()) == int(before.sum())


def test_eval_mode_weight_follows_score_and_rate_updates():
    net = nn.Sequential(nn.Linear(100, 1))
    layer = make_scored(net, "weight", {"0": 0.1}, a_min=0.0, learn_rate=True)["0"]
    net.eval()  # attacks run here: the masked weight is cached between calls
    x = torch.rand(3, 100)
    assert torch.equal(net(x), net(x)) and torch.equal(layer.effective_weight(), layer.weight * layer.mask())
    with torch.no_grad():  # in place, as optimizer steps on the scores and on the rate
        layer.scores.copy_(torch.where(layer.mask().bool(), 0.0, 1.0 + torch.rand(1, 100)))
        layer.rate.copy_(torch.tensor(fraction_to_rate(0.3, 0.0)))
    assert torch.equal(layer.effective_weight(), layer.weight * layer.mask())
    kept = keep_count(100, float(layer.fraction().detach()))
    assert kept >= 30 and int((layer.effective_weight() != 0).sum()) == kept  # the new rate, not the cached 10
    net.train()  # training differentiates through the mask again
    net(x).sum().backward()
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0


def test_ste_gradient_reaches_scores_and_rate():
    model = _net().train()
    layers = make_scored(model, "weight", {"0": 0.3, "4": 0.3}, a_min=0.01, learn_rate=True)
    with torch.no_grad():
        for layer in layers.values():
            layer.scores.mul_(torch.where(torch.rand_like(layer.scores) < 0.5, -1.0, 1.0))  # both signs
            layer.rate.fill_(0.3)
    masked = {}  # each layer's masked weight, to read the loss's gradient with respect to it
    for name, layer in layers.items():
        def keep(effective=layer.effective_weight, name=name):
            masked[name] = effective()
            masked[name].retain_grad()
            return masked[name]
        layer.effective_weight = keep
    model(torch.rand(4, 1, 6, 6)).pow(2).sum().backward()
    for name, layer in layers.items():
        # straight-through: d loss / d mask = d loss / d (w * mask) * w, passed to |S| (so times sign S)
        # and, summed, to the kept fraction a = a_min + (1 - a_min) * sigmoid(r)
        d_mask = masked[name].grad * layer.weight
        torch.testing.assert_close(layer.scores.grad, d_mask * layer.scores.sign())
        sig = torch.sigmoid(layer.rate.detach())
        torch.testing.assert_close(layer.rate.grad, d_mask.sum() * (1 - 0.01) * sig * (1 - sig))
        assert layer.rate.grad != 0 and layer.weight.grad is None  # the pretrained weight is frozen


def test_fraction_stays_in_amin_one_and_inverts():
    a_min = 0.001
    r = torch.linspace(-50, 50, 101)
    a = rate_to_fraction(r, a_min)
    assert a.min() >= a_min and a.max() <= 1.0
    for frac in (0.002, 0.01, 0.3, 0.9):
        assert abs(float(rate_to_fraction(torch.tensor(fraction_to_rate(frac, a_min)), a_min)) - frac) < 1e-4


def test_budget_projection_hits_the_target_and_keeps_order():
    numel = {"a": 288, "b": 18432, "c": 73728, "d": 32768}
    fractions = {"a": 0.5, "b": 0.02, "c": 0.004, "d": 0.01}
    budget = keep_count(sum(numel.values()), 0.01)
    counts = project_to_budget(fractions, numel, budget, a_min=0.001)
    assert sum(counts.values()) == budget  # one common shift moves one layer's count at a time: exact
    dens = {n: counts[n] / numel[n] for n in numel}
    assert dens["a"] > dens["b"] > dens["d"] > dens["c"]


def test_erk_densities_average_to_target():
    model = _net()
    dens = initial_densities(model, 0.1, "erk")
    total = sum(m.weight.numel() for m in (model[0], model[4]))
    kept = dens["0"] * model[0].weight.numel() + dens["4"] * model[4].weight.numel()
    assert abs(kept / total - 0.1) < 1e-6 and dens["0"] > dens["4"]


def test_channel_masks_zero_whole_channels_after_batchnorm():
    model = _net().eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].bias.data.uniform_(0.5, 1)  # without gating, pruned channels would output the BN shift
    masks = {"0": torch.zeros(8, 1, 3, 3, dtype=torch.bool), "4": torch.ones(10, 288, dtype=torch.bool)}
    masks["0"][:3] = True
    layers = make_masked(model, masks, "channel")
    x = torch.rand(2, 1, 6, 6)
    feats = model[:3](x)
    assert feats[:, 3:].abs().max() == 0 and feats[:, :3].abs().max() > 0
    plain, baked = bake(model, layers)
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    assert plain[1].weight[3:].abs().max() == 0 and plain[1].bias[3:].abs().max() == 0
    assert torch.equal(baked["0"], masks["0"])


def test_global_magnitude_keeps_every_layer_alive():
    model = _net()
    masks = global_magnitude_masks(model, 0.999)
    assert all(m.any() for m in masks.values())


def _channel_bake(model: nn.Module, kept: dict[str, int]) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """Channel-prune `model` keeping the first kept[name] output channels of the named layers (all of the
    others), bake it, and check the plain model computes what the masked one does. Returns the plain
    model, the baked masks and a reference input."""
    from harp.models import prunable_layers

    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):  # nonzero shifts: a pruned channel would leak them
                m.running_mean.uniform_(-1, 1)
                if m.affine:
                    m.bias.uniform_(0.5, 1)
    masks = {}
    for name, m in prunable_layers(model):
        mask = torch.zeros_like(m.weight, dtype=torch.bool)
        mask[:kept.get(name, m.weight.shape[0])] = True
        masks[name] = mask
    layers = make_masked(model.eval(), masks, "channel")
    x = torch.rand(4, *model.input_shape)
    plain, baked = bake(model, layers)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), model(x), atol=1e-6)
    return plain, baked, x


def test_bake_zeroes_the_weights_that_read_a_pruned_channel():
    # Conv (BN, ReLU, pool) -> conv -> functional relu and flatten -> Linear: the inputs a pruned channel
    # feeds are 0, so the weights reading them are zeroed (model and masks) and count as zero.
    class Net(nn.Module):
        input_shape = (1, 6, 6)

        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
            self.b = nn.Conv2d(8, 6, 3, padding=1, bias=True)  # no BatchNorm: its bias is gated
            self.fc = nn.Linear(6 * 3 * 3, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.b(self.a(x))), 1))

    net = Net()
    with torch.no_grad():
        net.fc.weight[9, :4 * 9] = 0  # this row reads pruned channels only: it keeps them (a live constant)
    plain, baked, _ = _channel_bake(net, {"a.0": 3, "b": 4})
    assert plain.b.weight[:, 3:].abs().max() == 0 and plain.b.weight[:4, :3].abs().min() > 0
    assert not baked["b"][:, 3:].any() and baked["b"][:4, :3].all()
    assert plain.fc.weight[:9, 4 * 9:].abs().max() == 0 and plain.fc.weight[:9, :4 * 9].abs().min() > 0
    assert torch.equal(plain.fc.weight[9, 4 * 9:], net.fc.weight[9, 4 * 9:]) and baked["fc"][9].all()
    from harp.sparsity import model_sparsity
    kept = 3 * 9 + 4 * 3 * 9 + 9 * 4 * 9 + 2 * 9
    assert model_sparsity(plain) == pytest.approx(1 - kept / (8 * 9 + 6 * 8 * 9 + 10 * 54))


def test_bake_keeps_the_weights_that_read_a_channel_which_is_not_zero():
    # A pruned channel reaches these layers through an add, a BatchNorm of another layer (its shift), a
    # clip above 0, or as a depthwise conv's only input (whose BatchNorm emits a constant): all stay.
    class Net(nn.Module):
        input_shape = (2, 5, 5)

        def __init__(self):
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 4, 1)  # reads c1 + the residual
            self.c3 = nn.Conv2d(4, 4, 1, bias=False)  # its output passes ReLU, then a BatchNorm not its own
            self.bn3 = nn.BatchNorm2d(4)
            self.c4 = nn.Conv2d(4, 4, 1)
            self.c5, self.bn5 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.clip = nn.Hardtanh(0.5, 2.0)  # 0 -> 0.5
            self.c6 = nn.Conv2d(4, 4, 1)
            self.c7, self.bn7 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
            self.dw, self.bndw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.bn1(self.c1(x)))
            h = torch.relu(self.c2(h + torch.ones_like(h)))
            h = self.c4(self.bn3(torch.relu(self.c3(h))))
            h = self.c6(self.clip(self.bn5(self.c5(h))))
            h = torch.relu(self.bndw(self.dw(torch.relu(self.bn7(self.c7(h))))))
            return self.fc(h.mean((2, 3)))

    kept = {"c1": 2, "c3": 2, "c5": 2, "c7": 2}
    model = Net()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    plain, baked, _ = _channel_bake(model, kept)
    for name in ("c2", "c4", "c6", "dw"):
        keep = torch.ones(before[name].shape[0], dtype=torch.bool)
        keep[kept.get(name, len(keep)):] = False
        expected = before[name] * keep.view(-1, *[1] * (before[name].dim() - 1))
        assert torch.equal(plain.get_submodule(name).weight, expected), name
        assert baked[name].all(), name


class _ConvBnConv(nn.Module):
    """Convs c1 (with BatchNorm bn1), c2, c3 and a head fc, for the in-place write tests: each test's
    forward wires them."""

    input_shape = (2, 5, 5)

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)


def test_bake_keeps_the_weights_behind_an_in_place_write_or_a_producer_applied_twice():
    # fx shows h before h.add_(1) wrote into it, and c1's call without its BatchNorm is not gated:
    # the channels c2 and c3 read are not zero, so their weights stay.
    class Net(_ConvBnConv):
        def forward(self, x):
            h = self.bn1(self.c1(x))
            h.add_(1)
            y = self.c2(torch.relu(h)) + self.c3(torch.relu(self.c1(x * 2)))
            return self.fc(y.mean((2, 3)))

    model = Net()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("c2", "c3")}
    plain, baked, _ = _channel_bake(model, {"c1": 2})
    for name in ("c2", "c3"):
        assert torch.equal(plain.get_submodule(name).weight, before[name]) and baked[name].all(), name


@pytest.mark.parametrize("write", [
    None,  # no write: c2's weights on c1's pruned channels are zeroed
    lambda h: h.add_(1),
    # these four had been taken for reads: c2's weights zeroed, logits off by 0.161
    lambda h: h.data.add_(1),
    lambda h: torch.add(h, 1, out=h),
    lambda h: h.mT.add_(1),
    lambda h: h.moveaxis(1, 3).add_(1),
], ids=["none", "add_", "data", "out=", "mT", "moveaxis"])
def test_bake_sees_every_kind_of_in_place_write(write):
    class Net(_ConvBnConv):  # c3 unused
        def forward(self, x):
            h = self.bn1(self.c1(x))
            if write is not None:
                write(h)
            return self.fc(self.c2(torch.relu(h)).mean((2, 3)))

    model = Net()
    before = model.c2.weight.detach().clone()
    plain, baked, _ = _channel_bake(model, {"c1": 2})  # checks the baked model's logits too
    zeroed = ~baked["c2"][:, 2:].any()
    assert bool(zeroed) == (write is None)
    assert torch.equal(plain.c2.weight[:, :2], before[:, :2])


def test_channel_pruning_of_a_non_affine_batchnorm_and_a_linear_on_tokens():
    # bake had crashed on BatchNorm(affine=False) (no weight to zero), and a Linear on (N, L, C)
    # had its gate applied to axis 1
    class Net(nn.Module):
        input_shape = (2, 4, 4)

        def __init__(self):
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False)
            self.tok = nn.Linear(6, 5)
            self.fc = nn.Linear(5 * 16, 3)

        def forward(self, x):
            h = torch.relu(self.bn1(self.c1(x)))  # (N, 6, 4, 4)
            h = self.tok(h.flatten(2).transpose(1, 2))  # (N, 16, 5): tokens, channels last
            return self.fc(torch.relu(h).flatten(1))

    plain, baked, _ = _channel_bake(Net(), {"c1": 3, "tok": 2})
    assert not baked["tok"][2:].any() and baked["tok"][:2].any()
