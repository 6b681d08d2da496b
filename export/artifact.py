"""An export directory as a reader sees it: the manifest, checked files, and what the model is.

`open_artifact(path)` reads manifest.json and checks every file it lists against
the recorded size and SHA-256 (`verify`), so a truncated or corrupted file is one
clear error before anything loads it. `harp info` and every harp-bench command
read artifacts through it. NumPy only: it runs on a device without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.errors import HarpError
from harp.values import is_int, is_number

from .bundle import BundleError, read_header
from .verify import MANIFEST, VerifyError, check_files, read_manifest

BUNDLE = "model.harpz"


@dataclass(frozen=True)
class Artifact:
    """A checked export directory and the facts about its model that reports use."""

    root: Path
    manifest: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def name(self) -> str:
        """A short label: the directory's name, or its parent's for a pipeline's `OUT/artifact`."""
        return self.root.parent.name if self.root.name == "artifact" and self.root.parent.name else self.root.name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.model["input_shape"])  # type: ignore[return-value]

    @property
    def classes(self) -> int:
        return int(self.model["classes"])

    @property
    def architecture(self) -> str:
        return str(self.model.get("architecture", "?"))

    @property
    def dataset(self) -> str | None:
        """The dataset name the model was trained on, None when the manifest does not say."""
        ds = self.model.get("dataset")
        name = ds.get("name") if isinstance(ds, dict) else ds
        if name is not None and not isinstance(name, str):
            field = "model.dataset.name" if isinstance(ds, dict) else "model.dataset"
            raise HarpError(f"{self.root / MANIFEST}: {field} {name!r} is not a string")
        return name

    @property
    def class_names(self) -> list[str] | None:
        """The class each prediction index names (imagefolder datasets record them), None when not recorded."""
        ds = self.model.get("dataset")
        names = ds.get("class_names") if isinstance(ds, dict) else None
        if names is not None and not (isinstance(names, list) and len(names) == self.classes
                                      and all(isinstance(n, str) for n in names)):
            raise HarpError(f"{self.root / MANIFEST}: model.dataset.class_names is not {self.classes} names")
        return names

    @property
    def sparsity(self) -> float:
        value = self.model.get("sparsity", 0.0)
        if not (is_number(value) and 0 <= value <= 1):
            raise HarpError(f"{self.root / MANIFEST}: model.sparsity {value!r} is not a fraction")
        return float(value)

    @property
    def method(self) -> str:
        pruning = self.model.get("pruning")
        return str(pruning.get("method", "?")) if isinstance(pruning, dict) else "none"

    @property
    def target_sparsity(self) -> float | None:
        """The sparsity the model was pruned to (`harp prune --sparsity`), None when the manifest does not say."""
        pruning = self.model.get("pruning")
        if not isinstance(pruning, dict):
            return None
        value = pruning.get("target_sparsity", pruning.get("sparsity"))  # checkpoints / bench-built models
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def metrics(self) -> dict[str, Any]:
        """The checkpoint's recorded accuracy (natural_accuracy, robust_accuracy, test_examples), {} if none."""
        metrics = self.model.get("metrics")
        if not isinstance(metrics, dict):
            return {}
        for key in ("natural_accuracy", "robust_accuracy"):
            if key in metrics and not (is_number(metrics[key]) and 0 <= metrics[key] <= 1):
                raise HarpError(f"{self.root / MANIFEST}: model.metrics.{key} {metrics[key]!r} is not a fraction")
        if "test_examples" in metrics and not _count(metrics["test_examples"]):
            raise HarpError(f"{self.root / MANIFEST}: model.metrics.test_examples {metrics['test_examples']!r} "
                            "is not a count")
        return metrics

    @property
    def params(self) -> tuple[int, int]:
        """(prunable weights, nonzero ones) of the source model, (0, 0) when the manifest does not say."""
        total, nonzero = self.model.get("prunable_params", 0), self.model.get("nonzero_params", 0)
        if not (_count(total) and _count(nonzero) and nonzero <= total):
            raise HarpError(f"{self.root / MANIFEST}: model.prunable_params {total!r} and nonzero_params "
                            f"{nonzero!r} are not two counts, the second no larger")
        return total, nonzero

    @property
    def channel_trimming(self) -> tuple[int, int] | None:
        """(channels removed, channels before) by the export's trimming, None when it trimmed none."""
        trim = self.manifest.get("channel_trimming")
        if not trim:
            return None
        removed = trim.get("channels_removed") if isinstance(trim, dict) else None
        before = trim.get("channels_before") if isinstance(trim, dict) else None
        if not (_count(removed) and _count(before) and removed <= before):
            raise HarpError(f"{self.root / MANIFEST}: channel_trimming does not count channels_removed "
                            "of channels_before")
        return removed, before

    @property
    def source_checkpoint(self) -> str | None:
        """The path of the checkpoint the export read, None when the manifest does not say."""
        source = self.manifest.get("source")
        path = source.get("checkpoint") if isinstance(source, dict) else None
        if path is not None and not isinstance(path, str):
            raise HarpError(f"{self.root / MANIFEST}: source.checkpoint {path!r} is not a path")
        return path

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per prunable layer of the source model: name, shape, params, nonzero, density.

        HarpError for an entry that lacks them: the manifest's hash pins the other files, not itself."""
        layers = self.model.get("layers", [])
        if not isinstance(layers, list):
            raise HarpError(f"{self.root / MANIFEST}: model.layers is not a list")
        for i, layer in enumerate(layers):
            if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)
                    and isinstance(layer.get("shape"), list) and all(_count(d) for d in layer["shape"])
                    and _count(layer.get("params")) and _count(layer.get("nonzero"))
                    and is_number(layer.get("density")) and 0 <= layer["density"] <= 1):
                raise HarpError(f"{self.root / MANIFEST}: model.layers[{i}] is not a layer "
                                "(name, shape, params, nonzero, density)")
        return list(layers)

    def check(self) -> None:
        """HarpError if a fact reports read is malformed: `harp verify` must not pass what they refuse."""
        (self.class_names, self.sparsity, self.layers, self.dataset,  # noqa: B018 (each property checks its value)
         self.metrics, self.params, self.channel_trimming, self.source_checkpoint)

    def file(self, name: str) -> Path:
        return self.root / name

    def has_file(self, name: str) -> bool:
        """Whether the export wrote `name` (model.onnx, model.sparse.onnx, model.harpz, parity.npz)."""
        return name in self.manifest["files"]


def open_artifact(path: str | os.PathLike[str]) -> Artifact:
    """The checked artifact at `path`; HarpError (or VerifyError) naming the file for anything wrong."""
    root = Path(path)
    if not root.is_dir():
        raise HarpError(f"{root} is not an artifact directory (expected the folder `harp export` wrote)")
    manifest = read_manifest(root)  # checks the model's input shape and class count too
    check_files(root, manifest)
    if BUNDLE in manifest["files"]:
        _check_bundle_agrees(root, manifest["model"])
    return Artifact(root.resolve(), manifest)


def _check_bundle_agrees(root: Path, model: dict[str, Any]) -> None:
    """VerifyError unless the bundle's header records the manifest's input shape and class count.

    The manifest's own hash is recorded nowhere, so an edited one would pass `check_files`; readers
    feed inputs of its shape, which the model then refuses mid-benchmark."""
    try:
        header = read_header(root / BUNDLE)
    except BundleError as e:
        raise VerifyError(str(e)) from e
    graph_input = header["graph"].get("input") if isinstance(header["graph"], dict) else None
    shape = graph_input.get("shape") if isinstance(graph_input, dict) else None
    classes = header["meta"].get("classes") if isinstance(header["meta"], dict) else None
    for what, stored in (("input_shape", shape), ("classes", classes)):
        recorded = model[what]
        if stored is not None and stored != recorded:
            raise VerifyError(f"{root / MANIFEST}: model.{what} {recorded!r} differs from {BUNDLE}'s "
                              f"{stored!r} (the manifest was edited)")


def _count(value: Any) -> bool:
    return is_int(value) and value >= 0
