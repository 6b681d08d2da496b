"""Checkpoint directories: safetensors weights + JSON metadata, validated on load.

Layout of a checkpoint DIR:
    model.safetensors   the model's state dict (pruned weights are exact zeros)
    masks.safetensors   pruning masks, one per pruned layer (pruned checkpoints only)
    meta.json           architecture, dataset, training config, metrics, versions,
                        pruning info, and the SHA-256 of every file above

meta.json is written last, so a directory without it is not a checkpoint. Loading
checks the format tag, every listed file's hash and the state dict's keys and shapes
against the architecture; nothing is unpickled.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .data import DatasetSpec, dataset_spec, imagefolder_spec
from .errors import HarpError
from .io import atomic_save_tensors, atomic_write_json, read_json, sha256_file
from .models import build_model
from .values import is_int, is_number

FORMAT = "harp-checkpoint"
VERSION = 1
META = "meta.json"
MODEL = "model.safetensors"
MASKS = "masks.safetensors"


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]

    @property
    def spec(self) -> DatasetSpec:
        return spec_from_json(self.meta["dataset"])

    def build_model(self) -> nn.Module:
        """The architecture with these weights loaded (masks already baked into the weights)."""
        model = build_model(self.meta["architecture"], self.spec)
        expected = model.state_dict()
        for name, t in self.state.items():  # load_state_dict would cast an int8 or bool weight silently
            if name in expected and t.dtype != expected[name].dtype:
                raise HarpError(f"{self.path}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                                f"architecture {self.meta['architecture']!r} has "
                                f"{str(expected[name].dtype).removeprefix('torch.')}")
        try:
            model.load_state_dict(self.state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise HarpError(f"{self.path}: weights do not fit architecture {self.meta['architecture']!r}: {first}") from e
        return model


def spec_from_json(obj: dict[str, Any]) -> DatasetSpec:
    """The dataset spec stored in a checkpoint, checked against the registry's (and an imagefolder
    against its folder, where that still exists)."""
    saved = obj.get("class_names")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(c, str) for c in saved)):
        raise HarpError(f"checkpoint dataset {obj['name']!r}: class_names {saved!r} is not a list of names")
    name = obj["name"]
    folder = Path(name.split(":", 1)[1]) if isinstance(name, str) and name.startswith("imagefolder:") else None
    if folder is not None and saved is not None and not folder.exists():
        # moved or deleted: the model is still described by its record (harp info); a command that
        # reads the images names the missing folder then
        spec = imagefolder_spec(folder, saved)
    else:
        spec = dataset_spec(name)
    if list(spec.input_shape) != obj["input_shape"] or spec.classes != obj["classes"]:
        raise HarpError(f"checkpoint dataset {obj['name']!r} has shape {obj['input_shape']} and "
                        f"{obj['classes']} classes, the dataset now has {list(spec.input_shape)} and {spec.classes}")
    # Same count, other folders (renamed or replaced classes): every label would mean another class.
    if saved is not None and spec.class_names is not None and list(spec.class_names) != saved:
        raise HarpError(f"checkpoint dataset {obj['name']!r} was trained on classes {', '.join(map(str, saved))}; "
                        f"the folder now has {', '.join(spec.class_names)}")
    return spec


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    import harp

    return {"harp": harp.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any],
                    masks: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights (and masks) then meta.json with their hashes; each file atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_tensors(path / MODEL, state)
    files = {MODEL: sha256_file(path / MODEL)}
    if masks:
        atomic_save_tensors(path / MASKS, {k: v.to(torch.uint8) for k, v in masks.items()})
        files[MASKS] = sha256_file(path / MASKS)
    elif (path / MASKS).exists():
        (path / MASKS).unlink()
    full = {"format": FORMAT, "version": VERSION, **meta, "versions": library_versions(), "files": files}
    atomic_write_json(path / META, full)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise HarpError(f"checkpoint {path} does not exist or is not a directory")
    meta = _read_meta(path)
    files = meta["files"]
    for name, digest in files.items():
        f = path / name
        if name not in (MODEL, MASKS) or not f.is_file():
            raise HarpError(f"checkpoint {path}: file {name!r} listed in {META} is missing")
        if sha256_file(f) != digest:
            raise HarpError(f"checkpoint {path}: {name} does not match its SHA-256 in {META} (corrupted or tampered)")
    state = _load_tensors(path / MODEL)
    check_values(path, state)
    masks = {k: v.bool() for k, v in _load_tensors(path / MASKS).items()} if MASKS in files else {}
    return Checkpoint(path, meta, state, masks)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = read_json(path / META)
    except FileNotFoundError:
        raise HarpError(f"{path} is not a harp checkpoint (no {META})") from None
    except OSError as e:
        raise HarpError(f"checkpoint {path}: cannot read {META} ({e.strerror})") from e
    except ValueError as e:
        raise HarpError(f"checkpoint {path}: {META} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HarpError(f"{path} is not a harp checkpoint ({META} lacks format={FORMAT!r})")
    if not is_int(meta.get("version")) or meta["version"] != VERSION:  # true == 1 in Python
        raise HarpError(f"checkpoint {path}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    for key, kind in (("architecture", str), ("dataset", dict), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise HarpError(f"checkpoint {path}: {META} field {key!r} is missing or not a {kind.__name__}")
    if MODEL not in meta["files"]:
        raise HarpError(f"checkpoint {path}: {META} does not list {MODEL}")
    for key, nullable in (("metrics", False), ("pruning", False), ("training", True), ("source", True)):
        if key in meta and not (isinstance(meta[key], dict) or nullable and meta[key] is None):  # sections read later
            raise HarpError(f"checkpoint {path}: {META} field {key!r} is not an object")
    for key, value in meta.get("metrics", {}).items():  # printed by harp info, tabled by harp pipeline
        if key.endswith("accuracy") and not (is_number(value) and 0 <= value <= 1):
            raise HarpError(f"checkpoint {path}: {META} metric {key!r} is {value!r}, not a fraction")
    ds = meta["dataset"]
    if not isinstance(ds.get("name"), str) or not isinstance(ds.get("input_shape"), list) \
            or not isinstance(ds.get("classes"), int):
        raise HarpError(f"checkpoint {path}: {META} field 'dataset' lacks name/input_shape/classes")
    return meta


def check_values(path: Path, state: dict[str, torch.Tensor]) -> None:
    """HarpError for weights no training run writes: NaN/inf, floats other than float32 (a float64 1e300
    is inf in the model), a negative BatchNorm variance or an input std that is not positive (later
    stages would fail far from the cause: a NaN loss, a NaN sqrt in BatchNorm folding)."""
    for name, t in state.items():
        if t.is_floating_point() and t.dtype != torch.float32:
            raise HarpError(f"checkpoint {path}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, "
                            "not the float32 harp writes")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise HarpError(f"checkpoint {path}: tensor {name!r} holds NaN or infinite values")
        if name.endswith("running_var") and (t < 0).any():
            raise HarpError(f"checkpoint {path}: BatchNorm variance {name!r} is negative")
        if name == "normalize.std" and (t <= 0).any():  # a division by zero: every logit inf or NaN
            raise HarpError(f"checkpoint {path}: input normalization std {t.flatten().tolist()} is not positive")


def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise HarpError(f"checkpoint file {f} is unreadable: {e}") from e
