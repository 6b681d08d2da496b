"""Accuracy of a model on a dataset, clean and under attack."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from .attacks import AttackConfig, fgsm, pgd
from .data import ImageData
from .training.distributed import DistContext

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def make_attack(name: str, cfg: AttackConfig) -> Attack:
    if name == "fgsm":
        return lambda m, x, y: fgsm(m, x, y, cfg.eps)
    return lambda m, x, y: pgd(m, x, y, cfg)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(1) == y).sum())


def accuracy(model: nn.Module, data: ImageData, device: torch.device, *, attack: Attack | None = None,
             batch_size: int = 256, desc: str = "eval", quiet: bool = True,
             dist_ctx: DistContext | None = None) -> float:
    """Fraction of examples classified correctly (after the attack, if one is given)."""
    ctx = dist_ctx or DistContext()
    model.eval()
    correct = total = 0
    batches = data.batches(batch_size, rank=ctx.rank, world_size=ctx.world_size)
    n_batches = data.num_batches(batch_size, ctx.world_size)
    # The ranks' shards are equal, which leaves the last n % world_size examples to no rank: the main
    # rank scores them too, so every example counts once.
    tail = len(data) % ctx.world_size if ctx.is_main else 0
    if tail:
        batches = itertools.chain(batches, ImageData(data.images[-tail:], data.labels[-tail:]).batches(batch_size))
        n_batches += 1
    for x, y in tqdm(batches, total=n_batches, desc=desc, disable=quiet or not ctx.is_main, leave=False):
        x, y = x.to(device), y.to(device)
        if attack is not None:
            with torch.enable_grad():
                x = attack(model, x, y)
        correct += _correct(model, x, y)
        total += len(y)
    correct, total = ctx.sum([correct, total])
    return correct / max(total, 1)


EVAL_ATTACKS = ("pgd", "pgd-l2", "fgsm", "all")


def evaluate_checkpoint(path: str, *, attack: str = "pgd", eps: float | None = None, steps: int | None = None,
                        restarts: int = 1, n: int | None = None, data_root: str = "data", download: bool = False,
                        device: str = "auto", quiet: bool = False) -> dict:
    """Test-set accuracy of a checkpoint, clean and under the chosen attack(s).

    `robust_accuracy` is the accuracy under `attack` (PGD L-inf by default, with the
    dataset's evaluation budget); with attack='all' it is PGD L-inf and FGSM and PGD-L2
    are reported beside it.
    """
    from .checkpoint import load_checkpoint
    from .data import load_split
    from .errors import HarpError
    from .sparsity import model_sparsity
    from .training.distributed import resolve_device
    from .training.train import eval_attack

    if attack not in EVAL_ATTACKS:
        raise HarpError(f"unknown attack {attack!r} (choose from {', '.join(EVAL_ATTACKS)})")
    if attack == "fgsm" and (steps is not None or restarts != 1):  # they had been ignored without a word
        raise HarpError("--attack fgsm takes one step of eps from the image itself: drop --steps and --restarts "
                        "(or use --attack all, whose PGD uses them)")
    dev = resolve_device(device)
    ckpt = load_checkpoint(path)
    spec = ckpt.spec
    model = ckpt.build_model().to(dev).eval()
    test = load_split(spec.name, False, root=data_root, download=download).subset(n)
    names = ["pgd", "fgsm", "pgd-l2"] if attack == "all" else [attack]
    results = {}
    for name in names:
        if name == "pgd-l2":
            cfg = eval_attack(spec, eps if attack == "pgd-l2" else None, steps, norm="l2", restarts=restarts)
        else:
            cfg = eval_attack(spec, eps, steps, restarts=restarts)
        torch.manual_seed(0)  # PGD's random starts: the same numbers every time a checkpoint is evaluated
        acc = accuracy(model, test, dev, attack=make_attack(name, cfg), quiet=quiet, desc=name)
        fgsm = name == "fgsm"  # one step of eps, from x itself
        results[name] = {"accuracy": acc, "eps": cfg.eps, "steps": 1 if fgsm else cfg.steps,
                         "step_size": cfg.eps if fgsm else cfg.step_size, "norm": cfg.norm,
                         "restarts": 1 if fgsm else cfg.restarts}
    natural = accuracy(model, test, dev, quiet=quiet, desc="clean")
    main = results["pgd" if attack == "all" else attack]
    return {"checkpoint": str(path), "architecture": ckpt.meta["architecture"], "dataset": spec.name,
            "n": len(test), "natural_accuracy": natural, "robust_accuracy": main["accuracy"],
            "attack": {"name": "pgd" if attack == "all" else attack, **main}, "attacks": results,
            "sparsity": model_sparsity(model)}
