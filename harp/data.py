"""Datasets by name, as in-memory uint8 tensors with per-dataset defaults.

Every dataset is held as uint8 NCHW images plus int64 labels; batches are scaled to
float [0, 1] on the fly. Normalisation is not applied here: it is the model's first
layer (`harp.models.normalize.Normalize`), so attack budgets are in pixel space.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import HarpError

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and an attack need to know about a dataset."""

    name: str
    channels: int
    size: tuple[int, int]  # (H, W)
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: float  # default L-inf budget in pixel space
    train_steps: int  # PGD steps while training
    eval_steps: int  # PGD steps for `harp eval`
    eval_step_size: float
    augment: bool  # random crop + flip (natural images only)
    l2_eps: float = 0.5  # default L2 budget for `harp eval --attack pgd-l2`
    class_names: tuple[str, ...] | None = None  # imagefolder: label i is train/'s i-th class folder

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def to_json(self) -> dict:
        names = {} if self.class_names is None else {"class_names": list(self.class_names)}
        return {"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
                "mean": list(self.mean), "std": list(self.std), **names}


_SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 1, (8, 8), 10, (0.3,), (0.38,), 0.2, 10, 20, 0.02, False, 1.0),
    "mnist": DatasetSpec("mnist", 1, (28, 28), 10, (0.1307,), (0.3081,), 0.3, 7, 40, 0.01, False, 2.0),
    "fashion-mnist": DatasetSpec("fashion-mnist", 1, (28, 28), 10, (0.2860,), (0.3530,), 0.1, 7, 40, 0.01, False, 1.5),
    "cifar10": DatasetSpec("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           8 / 255, 10, 10, 2 / 255, True),
    "cifar100": DatasetSpec("cifar100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            8 / 255, 10, 10, 2 / 255, True),
    "svhn": DatasetSpec("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        8 / 255, 10, 10, 2 / 255, False),
}
DATASETS = tuple(_SPECS) + ("imagefolder:PATH",)
IMAGEFOLDER_SIZE = 32
IMAGEFOLDER_ORDER_SEED = 0


@dataclass
class ImageData:
    """A split as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> ImageData:
        return self if n is None or n >= len(self) else ImageData(self.images[:n], self.labels[:n])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, augment: bool = False,
                drop_single: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield float [0, 1] batches; with world_size > 1 each rank gets an equal, disjoint shard.

        drop_single: leave out a last batch of one example (training: BatchNorm cannot normalise
        a single value per channel, and a set of k * batch_size + 1 examples would fail there).
        """
        n = len(self)
        if shuffle:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if world_size > 1:  # equal shard sizes keep DDP's collective calls in step
            per_rank = n // world_size
            order = order[rank * per_rank:(rank + 1) * per_rank] if not shuffle else order[rank::world_size][:per_rank]
        aug_gen = torch.Generator().manual_seed(seed * 7_919 + epoch * 31 + rank)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if drop_single and len(idx) == 1:
                break
            x = self.images[idx].float().div_(255.0)
            if augment:
                x = _crop_flip(x, aug_gen)
            yield x, self.labels[idx]

    def num_batches(self, batch_size: int, world_size: int = 1, drop_single: bool = False) -> int:
        """How many batches `batches` yields with these arguments."""
        n = len(self) // world_size if world_size > 1 else len(self)
        return n // batch_size + (n % batch_size > (1 if drop_single else 0))


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: random crop from a 4-pixel zero-padded image, random flip."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
    rows = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen) + torch.arange(h)  # (N, H)
    cols = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen) + torch.arange(w)  # (N, W)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def dataset_spec(name: str) -> DatasetSpec:
    if name.startswith("imagefolder:"):
        return _imagefolder_spec(Path(name.split(":", 1)[1]))
    try:
        return _SPECS[name]
    except KeyError:
        raise HarpError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})") from None


def load_split(name: str, train: bool, *, root: str | Path = "data", download: bool | None = None) -> ImageData:
    """Load one split of a dataset by name into memory. download: None where the command
    offers no --download (its error then does not suggest one)."""
    spec = dataset_spec(name)
    if name == "digits":
        return _digits(train)
    if name.startswith("imagefolder:"):
        return _imagefolder(Path(name.split(":", 1)[1]), train, spec)
    return _torchvision(name, train, Path(root), download)


def _digits(train: bool) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=DIGITS_TEST_FRACTION,
                                              stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    x, y = (x_tr, y_tr) if train else (x_te, y_te)
    return ImageData(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


def _torchvision(name: str, train: bool, root: Path, download: bool) -> ImageData:
    import torchvision.datasets as tvd

    offers_download, download = download is not None, bool(download)
    try:
        if name in ("mnist", "fashion-mnist"):
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            ds = cls(str(root), train=train, download=download)
            images, labels = ds.data.unsqueeze(1), ds.targets
        elif name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            # CIFAR's batches are pickles: torchvision unpickles them only after each file's MD5 matched the
            # official one's, so a file crafted to run code on load is refused unread
            ds = cls(str(root), train=train, download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            labels = torch.tensor(ds.targets)
        else:  # svhn
            ds = tvd.SVHN(str(root), split="train" if train else "test", download=download)
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
    # MNIST's files carry no checksum: damaged ones fail inside torchvision's parser (an assertion, a
    # dtype check, a legacy .pt that torch's weights_only loader refuses)
    except (RuntimeError, OSError, ValueError, AssertionError, TypeError, IndexError, EOFError,
            pickle.UnpicklingError) as e:
        hint = "" if download else (" (pass --download to fetch it, or --data-root to point at it)" if offers_download
                                    else " (pass --data-root to point at it)")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"\s*You can use download=True to download it\.?", "", first)  # harp's hint says how
        raise HarpError(f"dataset {name!r} under {root} is missing or unreadable{hint}: {first}") from e
    if len(images) != len(labels):
        raise HarpError(f"dataset {name!r} under {root}: the {'train' if train else 'test'} split has "
                        f"{len(images)} images but {len(labels)} labels (files from different splits?)")
    labels = labels.to(torch.int64)
    classes = _SPECS[name].classes
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(torch.nonzero((labels < 0) | (labels >= classes))[0])
        raise HarpError(f"dataset {name!r} under {root}: the {'train' if train else 'test'} split has label "
                        f"{int(labels[bad])} at index {bad}, outside 0..{classes - 1} (damaged labels file?)")
    return ImageData(images.to(torch.uint8).contiguous(), labels)


def _imagefolder_dirs(path: Path) -> tuple[Path, Path]:
    train = path / "train"
    test = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not train.is_dir() or test is None:
        raise HarpError(f"imagefolder {path} needs subfolders train/ and val/ (or test/), one folder per class")
    return train, test


def _imagefolder_classes(folder: Path) -> list[str]:
    """The class folders, sorted; hidden ones (.ipynb_checkpoints, ...) are not classes."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _imagefolder_spec(path: Path) -> DatasetSpec:
    train, _ = _imagefolder_dirs(path)
    classes = _imagefolder_classes(train)
    if len(classes) < 2:
        raise HarpError(f"imagefolder {train} has {len(classes)} class folders, need at least 2")
    # the absolute path: a checkpoint's meta names the folder from wherever it is read
    return imagefolder_spec(path.absolute(), classes)


def imagefolder_spec(path: Path, classes: list[str]) -> DatasetSpec:
    """The spec of an imagefolder with these class folders (ImageNet statistics, 32x32 crops)."""
    return DatasetSpec(f"imagefolder:{path}", 3, (IMAGEFOLDER_SIZE, IMAGEFOLDER_SIZE), len(classes),
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 8 / 255, 10, 10, 2 / 255, True,
                       class_names=tuple(classes))


def _imagefolder(path: Path, train: bool, spec: DatasetSpec) -> ImageData:
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    train_dir, test_dir = _imagefolder_dirs(path)
    folder = train_dir if train else test_dir
    # Labels are the class's index among train/'s folders (spec.class_names), in both splits: a
    # test folder that lacks a class must not shift the labels of the classes after it.
    classes = list(spec.class_names or ())
    present = set(_imagefolder_classes(folder))
    unknown = sorted(present - set(classes))
    if unknown:
        raise HarpError(f"imagefolder {folder} has class folders that {train_dir} lacks: {', '.join(unknown)}")
    class_to_idx = {c: i for i, c in enumerate(classes) if c in present}

    class Folder(tvd.ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return classes, class_to_idx

    tf = T.Compose([T.Resize(spec.size[0]), T.CenterCrop(spec.size), T.PILToTensor()])
    try:
        # every training class needs images; the test split may leave one empty
        ds = Folder(str(folder), transform=tf, loader=_load_rgb, is_valid_file=_is_image_name,
                    allow_empty=not train)
    except FileNotFoundError as e:  # "Found no valid file for the classes ..."
        raise HarpError(f"imagefolder {folder}: {e}") from e
    if len(ds) == 0:
        raise HarpError(f"imagefolder {folder} holds no images")
    # A fixed shuffle: the folder lists the images class by class, and "the first N" (--subset,
    # --n, the parity images) must be a mix of classes, not the first class alone.
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(IMAGEFOLDER_ORDER_SEED)).tolist()
    images = torch.stack([_read_image(ds, i) for i in order])
    return ImageData(images, torch.tensor([ds.targets[i] for i in order], dtype=torch.int64))


def _is_image_name(path: str) -> bool:
    """Whether an ImageFolder file is read: any extension of a format PIL can open (torchvision's
    own list leaves out .gif, .tif and others, and silently), but no hidden file (.DS_Store, ._x.png)."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _openable_extensions()


@functools.cache
def _openable_extensions() -> frozenset[str]:
    """Extensions of the formats PIL can open (not .pdf, which it only writes); asked once per file."""
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _load_rgb(path: str) -> Any:
    """The image at `path` as RGB; 16- and 32-bit greyscale are scaled down to 8 bits, which PIL's
    convert("RGB") (torchvision's loader) clips: every value above 255 became white, and a
    float image's values in [0, 1] became black."""
    from PIL import Image

    with open(path, "rb") as f:
        im = Image.open(f)
        im.load()
    if im.mode.startswith("I") or im.mode == "F":  # "I;16*": 16 bits; "I": 32-bit integers; "F": 32-bit floats
        values = np.nan_to_num(np.asarray(im, dtype=np.float64))
        peak = values.max(initial=0)
        if im.mode == "F" and peak <= 1.0:
            top = 1.0  # floats in [0, 1]; larger ones are read as integers are
        else:
            top = 65535.0 if im.mode.startswith("I;16") or 255 < peak <= 65535 else max(peak, 255.0)
        im = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))
    return im.convert("RGB")


def _read_image(ds: Any, i: int) -> torch.Tensor:
    """Image i of an ImageFolder; HarpError naming the file if it is not a readable image."""
    from PIL import Image

    try:
        return ds[i][0]
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise HarpError(f"imagefolder image {ds.samples[i][0]} cannot be read: {e}") from e
