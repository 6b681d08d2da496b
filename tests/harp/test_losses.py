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


@pytest.fixture
def fixed_adversary(monkeypatch):
    """A model, a batch and a fixed 'adversarial' batch the losses receive from their attack, so their value
    can be compared with each paper's formula written out here."""
    import harp.training.losses as losses

    torch.manual_seed(0)
    model = build_model("small_cnn", dataset_spec("digits")).eval()
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(2.0)  # confident, input-dependent outputs: an initialised model's are near uniform
    x = torch.rand(12, 1, 8, 8)
    y = torch.randint(0, 10, (12,))
    x_adv = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    monkeypatch.setattr(losses, "pgd", lambda *a, **k: x_adv)
    monkeypatch.setattr(losses, "perturb", lambda *a, **k: x_adv)
    with torch.no_grad():
        p, q = model(x).softmax(1), model(x_adv).softmax(1)
    return model, x, y, p, q


def _loss(model, x, y, kind, beta=None):
    cfg = LossConfig(kind, AttackConfig(eps=0.2, step_size=0.1, steps=2), beta=beta)
    with torch.no_grad():
        return adversarial_loss(model, lambda *xs: [model(v) for v in xs], x, y, cfg).item()


def test_pgd_at_is_cross_entropy_on_the_adversarial_batch(fixed_adversary):
    model, x, y, p, q = fixed_adversary
    assert _loss(model, x, y, "pgd") == pytest.approx(-q[range(12), y].log().mean().item(), rel=1e-5)


@pytest.mark.parametrize("beta", [None, 0.0, 2.5])
def test_trades_is_clean_cross_entropy_plus_beta_kl(fixed_adversary, beta):
    # TRADES: CE(f(x), y) + beta * KL(p(x) || p(x')), mean over the batch; beta defaults to 6
    model, x, y, p, q = fixed_adversary
    kl = (p * (p.log() - q.log())).sum(1).mean().item()
    expected = -p[range(12), y].log().mean().item() + (6.0 if beta is None else beta) * kl
    assert kl > 1e-3  # the check below sees the KL term
    assert _loss(model, x, y, "trades", beta) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [None, 0.0, 2.5])
def test_mart_is_boosted_ce_plus_misclassification_weighted_kl(fixed_adversary, beta):
    # MART: BCE(p(x'), y) + beta * mean(KL(p(x) || p(x')) * (1 - p_y(x))), with
    # BCE = -log q_y - log(1 - max_{k != y} q_k); beta defaults to 5
    model, x, y, p, q = fixed_adversary
    others = q.clone()
    others[range(12), y] = -1.0
    bce = (-q[range(12), y].log() - (1.0001 - others.max(1).values).log()).mean().item()
    kl = ((p * (p.log() - q.log())).sum(1) * (1 - p[range(12), y])).mean().item()
    assert kl > 1e-3
    expected = bce + (5.0 if beta is None else beta) * kl
    assert _loss(model, x, y, "mart", beta) == pytest.approx(expected, rel=1e-5)
