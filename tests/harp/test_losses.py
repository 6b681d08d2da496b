import pytest
import torch

from harp.attacks import AttackConfig
from harp.data import dataset_spec, load_split
from harp.models import build_model
from harp.training.losses import LOSSES, LossConfig, adversarial_loss


@pytest.mark.parametrize("kind", ["pgd", "trades", "mart"])
def test_adversarial_losses_are_finite_and_decrease(kind):
    torch.manual_seed(0)
    model = build_model("small_cnn", dataset_spec("digits"))
    x, y = next(load_split("digits", True).batches(96))
    cfg = LossConfig(kind, AttackConfig(eps=0.2, step_size=0.1, steps=2))
    forward = lambda *xs: [model(v) for v in xs]  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        loss = adversarial_loss(model, forward, x, y, cfg)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.5  # the model learned from this loss


def test_loss_registry_names():
    assert set(LOSSES) == {"none", "pgd", "trades", "mart"}
