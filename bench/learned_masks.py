"""Pruning masks of trained CIFAR-shaped VGG16-BN and ResNet18 models, for the runtime report.

    .venv/bin/python -m harp.bench.learned_masks --work DIR [--data-root ../shared/data]
        [--archs vgg16_bn resnet18] [--methods harp [global-magnitude]] [--per-class 300] [--epochs 4] [--steps 3]

HARP's VGG16 and ResNet18 results are for CIFAR-10 on a GPU; a machine with
neither can still learn real HARP masks for the same architectures and input
shape (3x32x32): this writes `--per-class` MNIST training digits per class and
50 test digits per class as an ImageFolder under DIR (harp's imagefolder loader
turns them into 32x32 RGB), then runs harp's own stages on it: PGD adversarial
training (DIR/ARCH/dense), then for each of `--methods` pruning that model to
99% and PGD fine-tuning (DIR/ARCH/finetuned-METHOD). `harp` (the default) learns
per-layer rates and scores under the PGD loss; `global-magnitude` keeps the
largest weights of the trained model, to compare its per-layer profile with the
random-init one the report prunes itself (at 99% it empties whole layers, and
the models end at chance accuracy). The schedule is short (PGD with `--steps`
steps, a few epochs) so that it fits a 2-core CPU. Stages already finished in
DIR are reused. It prints the fine-tuned checkpoints, to be timed with
`python -m harp.bench.runtime_report --checkpoint DIR/ARCH/finetuned-METHOD`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from harp.cli_errors import ScriptArgumentParser, script_main
from harp.errors import HarpError
from harp.io import atomic_write_bytes

ARCHS = ("vgg16_bn", "resnet18")
METHODS = ("harp", "global-magnitude")
TEST_PER_CLASS = 50
SPARSITY = 0.99
PRUNE_GAMMA0 = 0.5
PRUNE_BATCH = 64


def write_imagefolder(images: np.ndarray, labels: np.ndarray, root: Path, per_class: int) -> int:
    """The first `per_class` images of each label as root/<label>/<i>.png; returns how many were written."""
    from PIL import Image

    written = 0
    for label in np.unique(labels):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index]).save(folder / f"{i:05d}.png")
            written += 1
    return written


def mnist_imagefolder(data_root: str, out: Path, per_class: int) -> Path:
    """MNIST from torchvision's on-disk format as out/{train,test}/<digit>/*.png (kept if already there)."""
    import torchvision

    done = out / "complete"
    if done.is_file() and done.read_text() == str(per_class):
        return out
    for split, train, n in (("train", True, per_class), ("test", False, TEST_PER_CLASS)):
        try:
            ds = torchvision.datasets.MNIST(data_root, train=train, download=False)
        except RuntimeError as e:
            raise HarpError(f"MNIST not found under {data_root} (torchvision format, e.g. ../shared/data): {e}") from None
        write_imagefolder(ds.data.numpy(), ds.targets.numpy(), out / split, n)
    atomic_write_bytes(done, str(per_class).encode())
    return out


def learn_masks(arch: str, dataset: str, out: Path, epochs: int, steps: int, method: str = "harp") -> Path:
    """dense (PGD-AT) -> pruned to SPARSITY by `method` -> fine-tuned, each stage skipped when its checkpoint loads."""
    from harp.pipeline import stage_done
    from harp.pruning.finetune import finetune_checkpoint
    from harp.pruning.methods import PruneOptions, make_config, prune_checkpoint
    from harp.training.train import TrainOptions, train

    dense, pruned, tuned = out / "dense", out / f"pruned-{method}", out / f"finetuned-{method}"
    if not stage_done(dense):
        # Adam at harp's MNIST settings: SGD at the natural-image defaults (lr 0.1, made for 100
        # epochs) left VGG16 at 32% accuracy after 2 of 4 epochs.
        train(TrainOptions(dataset=dataset, arch=arch, adv="pgd", steps=steps, epochs=epochs, optimizer="adam",
                           lr=1e-3, device="cpu"), dense, force=dense.exists())
    stage = PruneOptions(adv="pgd", steps=steps, epochs=epochs, device="cpu")
    if not stage_done(pruned):
        # A few epochs of 3000 images are ~90 steps of 128, where harp's MNIST default takes
        # ~1400: with its gamma0 (0.1) VGG16 ended 4 epochs at 1.7% density, short of 1%.
        # Batches of 64 and gamma rising 5x as fast give the rates the steps to get there.
        settings = {"gamma0": PRUNE_GAMMA0} if method == "harp" else {}
        prune_checkpoint(dense, pruned, make_config(method, sparsity=SPARSITY, **settings),
                         replace(stage, batch_size=PRUNE_BATCH), force=pruned.exists())
    if not stage_done(tuned):
        finetune_checkpoint(pruned, tuned, replace(stage, epochs=max(1, epochs // 2)), force=tuned.exists())
    return tuned


def main(argv: list[str] | None = None) -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Where the dataset and checkpoints go (reused).")
    parser.add_argument("--data-root", default="../shared/data", help="Folder holding torchvision's MNIST.")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--methods", nargs="+", default=["harp"], choices=list(METHODS),
                        help="Pruning methods applied to each trained model.")
    parser.add_argument("--per-class", type=int, default=300, help="MNIST training images per digit.")
    parser.add_argument("--epochs", type=int, default=4, help="Epochs of training and of pruning (fine-tuning: half).")
    parser.add_argument("--steps", type=int, default=3, help="PGD steps in every stage.")
    args = parser.parse_args(argv)
    for flag, value in (("--per-class", args.per_class), ("--epochs", args.epochs), ("--steps", args.steps)):
        if value < 1:
            raise HarpError(f"{flag} must be >= 1, got {value}")
    folder = mnist_imagefolder(args.data_root, args.work / "mnist32", args.per_class)
    for arch in args.archs:
        for method in args.methods:
            tuned = learn_masks(arch, f"imagefolder:{folder}", args.work / arch, args.epochs, args.steps, method)
            print(f"{arch} {method}: {tuned}", flush=True)


if __name__ == "__main__":
    sys.exit(script_main(main, "learned_masks"))
