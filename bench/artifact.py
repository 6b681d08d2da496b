"""An export directory as harp-bench reads it: the manifest, checked files, and what the model is.

`open_artifact(path)` is the one way a benchmark gets at an artifact: it reads
manifest.json and checks every file it lists against the recorded size and
SHA-256 (`harp.export.verify`), so a truncated or corrupted file is one clear
error before any backend loads it. NumPy only: it runs on a device without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harp.errors import HarpError

# Backend name -> the file it loads. torch runs the bundle's graph rebuilt as torch ops (`torch_graph`).
BACKEND_FILES: dict[str, str] = {
    "torch": "model.harpz",
    "onnxruntime": "model.onnx",
    "onnxruntime-sparse": "model.sparse.onnx",
    "harp": "model.harpz",
}


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
        if isinstance(ds, dict):
            return ds.get("name")
        return ds if isinstance(ds, str) else None

    @property
    def sparsity(self) -> float:
        return float(self.model.get("sparsity", 0.0))

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
        return metrics if isinstance(metrics, dict) else {}

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per prunable layer of the source model: name, shape, params, nonzero, density."""
        return list(self.model.get("layers", []))

    def file(self, name: str) -> Path:
        return self.root / name

    def size_bytes(self, backend: str) -> int:
        return self.file(BACKEND_FILES[backend]).stat().st_size

    def has_backend_file(self, backend: str) -> bool:
        return BACKEND_FILES[backend] in self.manifest["files"]


def open_artifact(path: str | os.PathLike[str]) -> Artifact:
    """The checked artifact at `path`; HarpError (or VerifyError) naming the file for anything wrong."""
    from harp.export.verify import _check_files, _read_manifest

    root = Path(path)
    if not root.is_dir():
        raise HarpError(f"{root} is not an artifact directory (expected the folder `harp export` wrote)")
    manifest = _read_manifest(root)
    _check_files(root, manifest)
    model = manifest["model"]
    shape, classes = model.get("input_shape"), model.get("classes")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise HarpError(f"{root / 'manifest.json'}: model.input_shape {shape!r} is not [C, H, W]")
    if not isinstance(classes, int) or classes < 1:
        raise HarpError(f"{root / 'manifest.json'}: model.classes {classes!r} is not a positive int")
    return Artifact(root.resolve(), manifest)


def check_backends(artifact: Artifact, backends: list[str]) -> None:
    """HarpError for an unknown backend or one whose file this artifact does not hold."""
    for name in backends:
        if name not in BACKEND_FILES:
            raise HarpError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_FILES)})")
        if not artifact.has_backend_file(name):
            raise HarpError(f"backend {name} needs {BACKEND_FILES[name]}, which {artifact.root} does not hold")


# Backend name -> the Python modules it imports (a device may lack some).
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime",),
    "onnxruntime-sparse": ("onnxruntime",),
    "harp": ("numba",),
}


def missing_package(backend: str) -> str | None:
    """The first Python package `backend` imports that is not installed here (found without importing it)."""
    from harp.lazy_group import is_installed

    return next((m for m in BACKEND_MODULES.get(backend, ()) if not is_installed(m)), None)


def check_backend_packages(backends: list[str]) -> None:
    """HarpError naming the missing package of the first backend that cannot be imported here."""
    for name in backends:
        module = missing_package(name)
        if module is not None:
            raise HarpError(f"backend {name} needs the Python package {module!r}, which is not installed "
                            f"(pip install {module}, or leave {name} out of --backends)")


def runnable_backends(artifact: Artifact) -> tuple[list[str], dict[str, str]]:
    """The backends (in BACKEND_FILES order) this artifact and machine can run, and why each other one
    cannot: a device has no torch, and `harp export --formats csr` writes no ONNX."""
    runnable, skipped = [], {}
    for name, file in BACKEND_FILES.items():
        module = missing_package(name)
        if not artifact.has_backend_file(name):
            skipped[name] = f"the artifact has no {file}"
        elif module is not None:
            skipped[name] = f"Python package {module!r} not installed"
        else:
            runnable.append(name)
    return runnable, skipped
