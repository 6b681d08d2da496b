"""Kernel tests run with sleeping (not spinning) idle threads: robust on a busy machine.

`registry_bundle(arch)` builds, once per session, a registry architecture for
CIFAR-10 shapes with random weights, randomised BatchNorm statistics, ~90% of
every conv/linear weight zeroed at random and the classifier scaled so logits
are O(10); it returns (torch model, traced graph, bundle path).
"""

from pathlib import Path

import pytest

from harp.kernels.threads import init_threads

def pytest_configure(config):
    init_threads()


@pytest.fixture(scope="session")
def registry_bundle(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def build(arch: str):
        if arch not in cache:
            cache[arch] = _build(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return build


def _build(arch: str, out: Path):
    import torch

    from harp.data import dataset_spec
    from harp.export.bundle import write_bundle
    from harp.export.trace import trace_model
    from harp.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, dataset_spec("cifar10")).eval()
    gen = torch.Generator().manual_seed(1)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.2)
        for mod in layers:
            mod.weight.mul_((torch.rand(mod.weight.shape, generator=gen) < 0.1).float())
        layers[-1].weight.mul_(300.0)  # logits of order 10, so the relative criterion has teeth
    graph = trace_model(model, (3, 32, 32))
    write_bundle(graph, out / "model.harpz", meta={"architecture": arch})
    return model, graph, out / "model.harpz"
