"""The harp-bench backends of an export directory: which file each loads and which package it needs.

Artifacts themselves are read through `harp.export.artifact.open_artifact`.
"""

from __future__ import annotations

from collections.abc import Callable

from harp.errors import HarpError
from harp.export.artifact import Artifact
from harp.lazy_group import is_installed

# Backend name -> the file it loads. torch runs the bundle's graph rebuilt as torch ops (`torch_graph`).
BACKEND_FILES: dict[str, str] = {
    "torch": "model.harpz",
    "onnxruntime": "model.onnx",
    "onnxruntime-sparse": "model.sparse.onnx",
    "harp": "model.harpz",
}


def check_backends(artifact: Artifact, backends: list[str]) -> None:
    """HarpError for an unknown backend or one whose file this artifact does not hold."""
    for name in backends:
        if name not in BACKEND_FILES:
            raise HarpError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_FILES)})")
        if not artifact.has_file(BACKEND_FILES[name]):
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
        if not artifact.has_file(file):
            skipped[name] = f"the artifact has no {file}"
        elif module is not None:
            skipped[name] = f"Python package {module!r} not installed"
        else:
            runnable.append(name)
    return runnable, skipped


def default_backends(artifact: Artifact, doing: str, note: Callable[[str], None], *,
                     required: tuple[str, str] | None = None) -> tuple[str, ...]:
    """The backends to use when --backends is not given: those `runnable_backends` finds, with a note
    naming the others ("demo: not timing torch (...)"). HarpError if none can run, or if the
    backend of `required` (name, why it is needed) cannot."""
    runnable, skipped = runnable_backends(artifact)
    if not runnable:
        raise HarpError(f"{artifact.name}: no backend can run here: "
                        + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
    if required is not None and required[0] not in runnable:
        raise HarpError(f"{artifact.name}: backend {required[0]} cannot run here ({skipped[required[0]]}): "
                        f"{required[1]}")
    if skipped:
        note(f"{artifact.name}: not {doing} " + "; ".join(f"{b} ({why})" for b, why in skipped.items()))
    return tuple(runnable)
