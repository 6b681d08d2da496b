"""Check an export directory on its own: hashes, loadable formats, and parity with the stored torch logits.

An export directory (written by `harp.export.exporter`) holds

    model.onnx          dense ONNX
    model.sparse.onnx   ONNX with every conv/linear weight a sparse_initializer
    model.harpz         the CSR bundle (docs/bundle-format.md)
    parity.npz          inputs and the torch model's logits on them
    manifest.json       what the directory holds, with every file's size and SHA-256

`verify_artifact` needs nothing but the directory: no torch, no checkpoint. This
module also owns the parity policy the exporter applies, so both judge a format
the same way:

    tolerance = rtol * max(1, max |torch logit|),  rtol = 1e-4 (fp32 values), 1e-2 (fp16 values)
    pass      = max |format logit - torch logit| <= tolerance
                and the argmax agrees on every input except near-ties, inputs whose torch
                top-2 margin is <= 2 * tolerance (a difference within tolerance could flip them).

fp16 stores each weight with a relative rounding error of up to 2^-11 (about 5e-4).
Measured over every registry architecture and a trained digits model, fp16 moves
the logits by 1.2e-4 to 4e-4 of the largest logit (bench/results/export.md); 1e-2
leaves a 25x margin for deeper or larger-logit models while still catching a wrong
weight, so fp16 gets 1e-2 and fp32 1e-4 (measured fp32 differences: below 1e-6).

The CSR bundle runs on the numba runtime (`harp.kernels.runtime`, its sparse
kernels) when it can be imported, and on the NumPy reference executor otherwise;
the executor used is recorded with each result.
"""

from __future__ import annotations

import importlib
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harp.errors import HarpError
from harp.io import read_json, sha256_file
from harp.values import is_int

from .bundle import BundleError, load_bundle
from .errors import ExportError
from .reference import run_reference

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "harp-export"
MANIFEST_VERSION = 1
PARITY_FILE = "parity.npz"
FORMAT_FILES: dict[str, str] = {"onnx": "model.onnx", "onnx-sparse": "model.sparse.onnx", "csr": "model.harpz"}
PARITY_ARRAYS = ("x_clean", "x_adv", "logits_clean", "logits_adv")
RTOL: dict[str, float] = {"float32": 1e-4, "float16": 1e-2}
EXECUTORS = ("auto", "runtime", "reference")
BATCH = 64  # inputs per executor call: bounds the reference executor's float64 temporaries


class VerifyError(ExportError):
    """An export directory does not match its manifest, or a format no longer reproduces the torch logits."""


@dataclass(frozen=True)
class ParityResult:
    """How one format's logits compare with the torch model's on the parity inputs."""

    format: str
    executor: str
    n_inputs: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    argmax_agree: int  # inputs whose argmax matches torch's
    near_ties: int  # inputs whose torch top-2 margin is within 2 * tolerance
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.format}: max |diff| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
                f"argmax {self.argmax_agree}/{self.n_inputs} [{self.executor}] {verdict}")


def parity_tolerance(values_dtype: str, max_abs_logit: float) -> float:
    """The largest logit difference a format may show: rtol(values_dtype) * max(1, max |logit|)."""
    if values_dtype not in RTOL:
        raise ExportError(f"values_dtype {values_dtype!r} is not one of {list(RTOL)}")
    return RTOL[values_dtype] * max(1.0, float(max_abs_logit))


def compare_logits(fmt: str, executor: str, got: np.ndarray, expected: np.ndarray, values_dtype: str) -> ParityResult:
    """Judge `got` (N, classes) against the torch logits `expected` with the policy above."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise VerifyError(f"{fmt}: produced logits of shape {got.shape}, expected {expected.shape}")
    n = int(expected.shape[0])
    max_logit = float(np.abs(expected).max()) if expected.size else 0.0
    tol = parity_tolerance(values_dtype, max_logit)
    diff = float(np.abs(got - expected).max()) if expected.size else 0.0
    if not np.isfinite(got).all():
        diff = float("inf")
    agree = got.argmax(axis=1) == expected.argmax(axis=1) if n else np.zeros(0, dtype=bool)
    if expected.shape[1] > 1 and n:
        top2 = np.sort(expected, axis=1)[:, -2:]
        tie = (top2[:, 1] - top2[:, 0]) <= 2 * tol
    else:
        tie = np.zeros(n, dtype=bool)
    passed = diff <= tol and bool(np.all(agree | tie))
    return ParityResult(fmt, executor, n, diff, max_logit, tol, int(agree.sum()), int(tie.sum()), passed)


# ---------------------------------------------------------------------------
# running each format


def csr_executor(path: str | os.PathLike[str], executor: str = "auto") -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """(name, run) for a bundle: the numba runtime when importable (or asked for), else the reference.

    Raises BundleError if the bundle is invalid, ExportError if `executor="runtime"` is not available.
    """
    if executor not in EXECUTORS:
        raise ExportError(f"executor {executor!r} is not one of {list(EXECUTORS)}")
    load_runtime = _runtime_loader() if executor != "reference" else None
    if load_runtime is None and executor == "runtime":
        raise ExportError("the numba runtime harp.kernels.runtime (load_runtime) is not available")
    if load_runtime is not None:
        # sparse kernels only: "auto" picks sparse or dense per layer by timing, which would make the
        # check exercise different kernels (and differ in the last bits) from run to run
        runtime = load_runtime(path, fallback="sparse")
        return "harp.kernels.runtime (sparse kernels)", lambda x: np.asarray(runtime.run(x))
    bundle = load_bundle(path)
    return "reference", lambda x: run_reference(bundle.graph, x)


def _runtime_loader() -> Callable[..., Any] | None:
    try:
        runtime = importlib.import_module("harp.kernels.runtime")
    except ModuleNotFoundError as e:
        if e.name in ("harp.kernels.runtime", "numba"):
            return None
        raise
    return getattr(runtime, "load_runtime", None)


def onnx_executor(path: str | os.PathLike[str]) -> Callable[[np.ndarray], np.ndarray]:
    """Run an ONNX file in onnxruntime (CPU); raises ExportError naming the file if it does not load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    options.log_severity_level = 3  # errors only: no warnings about unused initializers
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unloadable models
        raise ExportError(f"onnxruntime cannot load {path}: {e}") from e
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return session.run(None, {name: x})[0]
        except Exception as e:  # onnxruntime's Fail, InvalidArgument ... derive from Exception only
            raise RuntimeError(str(e)) from e

    return run


def check_onnx(path: str | os.PathLike[str], fmt: str) -> Any:
    """onnx.checker on a written file: the full check (with shape inference) for dense ONNX, the basic
    check for sparse ONNX, whose sparse initializers onnx's strict type inference cannot feed to Conv/Gemm.
    Returns the loaded ModelProto."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # DecodeError and others of protobuf's
        raise ExportError(f"{fmt}: {path} is not an ONNX model: {e}") from e
    external = _external_tensor(model.graph, [f.node for f in model.functions])
    if external is not None:  # harp writes self-contained files, and only model.onnx's hash is pinned
        raise ExportError(f"{fmt}: {path} keeps tensor {external!r} in another file; harp exports never do")
    try:
        onnx.checker.check_model(model, full_check=fmt == "onnx")
    except Exception as e:  # onnx raises ValidationError, InferenceError ...
        raise ExportError(f"{fmt}: {path} fails the ONNX checker: {e}") from e
    if fmt == "onnx-sparse":
        from .onnx_writer import sparse_weights

        if not sparse_weights(model):  # every export has a linear layer, stored sparse in this format
            raise ExportError(f"{fmt}: {path} stores no sparse tensor, though this format keeps every conv and "
                              "linear weight sparse")
    return model


def _external_tensor(graph: Any, function_nodes: Sequence[Any] = ()) -> str | None:
    """The name of a tensor of `graph` (its initializers, node attributes, subgraphs) or of the
    function bodies' nodes whose data lives outside the file, else None."""
    from onnx import TensorProto

    tensors = [*graph.initializer]
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    subgraphs = []
    for node in [*graph.node, *(n for nodes in function_nodes for n in nodes)]:
        for a in node.attribute:
            tensors += [a.t, *a.tensors, a.sparse_tensor.values, a.sparse_tensor.indices]
            tensors += [t for sparse in a.sparse_tensors for t in (sparse.values, sparse.indices)]
            if a.HasField("g"):
                subgraphs.append(a.g)
            subgraphs += a.graphs
    for t in tensors:
        if t.data_location == TensorProto.EXTERNAL:
            return t.name
    return next((name for g in subgraphs if (name := _external_tensor(g)) is not None), None)


def stored_values_dtype(fmt: str, path: str | os.PathLike[str], onnx_model: Any = None) -> str:
    """The dtype ("float32" or "float16") a written file stores its conv/linear weight values in."""
    if fmt == "csr":
        header = load_bundle(path).header
        dtypes = {t["arrays"]["values"]["dtype"] for t in header["tensors"] if t["layout"] == "csr"}
        if len(dtypes) != 1:
            raise VerifyError(f"{path}: CSR weights are stored in {sorted(dtypes)}, expected one dtype")
        return dtypes.pop()
    from onnx import TensorProto

    model = onnx_model if onnx_model is not None else check_onnx(path, fmt)
    tensors = [*model.graph.initializer, *(sp.values for sp in model.graph.sparse_initializer)]
    return "float16" if any(t.data_type == TensorProto.FLOAT16 for t in tensors) else "float32"


def run_format(fmt: str, path: str | os.PathLike[str], x: np.ndarray, *,
               executor: str = "auto") -> tuple[str, np.ndarray]:
    """(executor name, logits) of one format on inputs x (N, C, H, W) float32, in batches."""
    if fmt == "csr":
        name, run = csr_executor(path, executor)
    elif fmt in FORMAT_FILES:
        name, run = "onnxruntime", onnx_executor(path)
    else:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMAT_FILES)})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        parts = [np.asarray(run(x[i:i + BATCH]), dtype=np.float32) for i in range(0, x.shape[0], BATCH)]
    except (ValueError, RuntimeError, MemoryError) as e:
        raise ExportError(f"{fmt}: {name} failed on inputs of shape {x.shape}: {e}") from e
    return name, np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------------------
# files


def load_parity(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The parity arrays, checked for names, dtypes and matching shapes (no pickle is ever loaded).

    Read member by member (`_read_npy_member`) rather than with np.load, whose errors
    on a crafted archive were tracebacks and whose arrays are sized by their headers.
    """
    expected = sorted(f"{k}.npy" for k in PARITY_ARRAYS)
    try:
        with zipfile.ZipFile(path) as archive:
            if sorted(archive.namelist()) != expected:
                raise VerifyError(f"holds {sorted(archive.namelist())}, expected the arrays {list(PARITY_ARRAYS)}")
            arrays = {k: _read_npy_member(archive, f"{k}.npy") for k in PARITY_ARRAYS}
    except VerifyError as e:
        raise VerifyError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            tokenize.TokenError) as e:  # numpy's header parser raises TokenError on an unclosed bracket
        raise VerifyError(f"{path} is not a readable parity file: {e}") from e
    for k, a in arrays.items():
        if not np.isfinite(a).all():
            raise VerifyError(f"{path}: array {k!r} holds NaN or infinite values")
    for kind in ("clean", "adv"):
        x, y = arrays[f"x_{kind}"], arrays[f"logits_{kind}"]
        if x.ndim != 4 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise VerifyError(f"{path}: x_{kind} {x.shape} and logits_{kind} {y.shape} do not pair up")
    # the clean and adversarial sets are run as one batch: the same image shape and class count
    clean, adv = arrays["x_clean"].shape[1:], arrays["x_adv"].shape[1:]
    classes = {arrays["logits_clean"].shape[1], arrays["logits_adv"].shape[1]}
    if clean != adv or 0 in clean or len(classes) != 1 or 0 in classes:
        raise VerifyError(f"{path}: x_clean {arrays['x_clean'].shape} / logits_clean "
                          f"{arrays['logits_clean'].shape} and x_adv {arrays['x_adv'].shape} / logits_adv "
                          f"{arrays['logits_adv'].shape} are not images and logits of one model")
    return arrays


def _read_npy_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """One little-endian float32 .npy member, stored uncompressed as np.savez writes it.

    Its header must account for exactly the bytes that follow it, so nothing is allocated
    beyond the member's size, and a stored member cannot expand as a compressed one can.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise VerifyError(f"{name} is compressed; harp writes parity arrays uncompressed")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise VerifyError(f"{name}: .npy version {version} is not supported")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if dtype != np.dtype("<f4"):
            raise VerifyError(f"{name} must be float32, got {dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - f.tell():
            raise VerifyError(f"{name}: shape {shape} does not match its {info.file_size} bytes")
        data = bytearray(f.read(nbytes))
    if len(data) != nbytes:
        raise VerifyError(f"{name} is truncated")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")


def read_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = read_json(root / MANIFEST)
    except FileNotFoundError:
        raise VerifyError(f"{root} is not a harp export (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise VerifyError(f"{root / MANIFEST} is not readable JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise VerifyError(f"{root / MANIFEST} is not a harp export manifest (format != {MANIFEST_FORMAT!r})")
    if not is_int(manifest.get("version")) or manifest["version"] != MANIFEST_VERSION:  # true == 1 in Python
        raise VerifyError(f"{root / MANIFEST}: version {manifest.get('version')!r} is not supported "
                          f"(expected {MANIFEST_VERSION})")
    for key in ("files", "export", "parity", "model"):
        if not isinstance(manifest.get(key), dict):
            raise VerifyError(f"{root / MANIFEST}: field {key!r} is missing or not an object")
    shape, classes = manifest["model"].get("input_shape"), manifest["model"].get("classes")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_size(s) for s in shape)):
        raise VerifyError(f"{root / MANIFEST}: model.input_shape {shape!r} is not [C, H, W]")
    if not _size(classes):
        raise VerifyError(f"{root / MANIFEST}: model.classes {classes!r} is not a positive int below 2**31")
    return manifest


def _size(value: Any) -> bool:
    """A positive int that fits int32 (a shape or class count), not a bool."""
    return is_int(value) and 1 <= value < 2**31


def check_files(root: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = manifest["files"]
    allowed = set(FORMAT_FILES.values()) | {PARITY_FILE}
    for name, entry in files.items():
        if name not in allowed:
            raise VerifyError(f"{root / MANIFEST} lists unexpected file {name!r}")
        check_file(root, name, entry)
    return files


def check_file(root: Path, name: str, entry: Any) -> None:
    """VerifyError unless root/name has the size and SHA-256 its manifest entry records."""
    expected = check_entry(root, name, entry)
    if sha256_file(root / name) != expected:
        raise VerifyError(f"{root / name}: SHA-256 does not match the manifest (corrupted or tampered)")


def check_entry(root: Path, name: str, entry: Any) -> str:
    """The SHA-256 root/name must have, after checking its manifest entry's form and the file's size
    (without reading it: a reader that reads the file anyway hashes those bytes, see load_bundle)."""
    if not isinstance(entry, dict) or not is_int(entry.get("bytes")) or not isinstance(entry.get("sha256"), str):
        raise VerifyError(f"{root / MANIFEST}: entry for {name} lacks bytes/sha256")
    path = root / name
    if not path.is_file():
        raise VerifyError(f"{path} is listed in the manifest but missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise VerifyError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    return entry["sha256"]


# ---------------------------------------------------------------------------
# the entry point


def verify_artifact(directory: str | os.PathLike[str], *, executor: str = "auto",
                    formats: list[str] | None = None) -> dict[str, Any]:
    """Validate an export directory and re-run its formats against the stored torch logits.

    formats: the formats to re-run, of those the export holds (default: all of them); every
    file's hash is checked either way. A device without onnx and onnxruntime can check
    ["csr"] alone. Returns {"dir", "ok", "files", "parity"}; raises VerifyError (an
    ExportError) naming the file or format on any mismatch, or a format it cannot run here,
    BundleError for an invalid bundle.
    """
    root = Path(directory)
    if not root.is_dir():
        raise VerifyError(f"{root} does not exist or is not a directory")
    manifest = read_manifest(root)
    files = check_files(root, manifest)
    from .artifact import Artifact  # here: artifact imports this module

    try:
        Artifact(root, manifest).check()  # what harp info and harp-bench read: "ok" must not pass what they refuse
    except HarpError as e:
        raise VerifyError(str(e)) from e
    export = manifest["export"]
    exported, values_dtype = export.get("formats"), export.get("values_dtype")
    if not isinstance(exported, list) or not exported or \
            any(not isinstance(f, str) or f not in FORMAT_FILES for f in exported):  # a list here is unhashable
        raise VerifyError(f"{root / MANIFEST}: export.formats {exported!r} is not a list of "
                          f"{', '.join(FORMAT_FILES)}")
    if not isinstance(values_dtype, str) or values_dtype not in RTOL:
        raise VerifyError(f"{root / MANIFEST}: export.values_dtype {values_dtype!r} is not one of {list(RTOL)}")
    for name in [FORMAT_FILES[f] for f in exported] + [PARITY_FILE]:
        if name not in files:
            raise VerifyError(f"{root / MANIFEST} does not list {name}")
    if formats is None:
        formats = exported
    else:
        missing = [f for f in formats if f not in exported]
        if missing or not formats:
            raise VerifyError(f"{root} holds the formats {', '.join(exported)}; "
                              + (f"it has no {', '.join(missing)}" if missing else "no format was asked for"))
        formats = [f for f in exported if f in formats]
    if executor != "auto" and "csr" not in formats:  # it had been ignored without a word
        raise VerifyError(f"executor {executor!r} runs the CSR bundle, and the formats re-run here are "
                          f"{', '.join(formats)}: add csr or drop the executor")

    arrays = load_parity(root / PARITY_FILE)
    x = np.concatenate([arrays["x_clean"], arrays["x_adv"]])
    expected = np.concatenate([arrays["logits_clean"], arrays["logits_adv"]])
    shape = manifest["model"].get("input_shape")
    if list(x.shape[1:]) != shape:
        raise VerifyError(f"{root / PARITY_FILE}: inputs of shape {list(x.shape[1:])}, the model takes {shape}")
    if expected.shape[1] != manifest["model"]["classes"]:
        raise VerifyError(f"{root / PARITY_FILE}: logits of {expected.shape[1]} classes, the manifest says "
                          f"{manifest['model']['classes']}")

    results: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        path = root / FORMAT_FILES[fmt]
        try:
            model = check_onnx(path, fmt) if fmt != "csr" else None
            stored = stored_values_dtype(fmt, path, model)
            if stored != values_dtype:  # the tolerance follows values_dtype: the files must agree
                raise VerifyError(f"{path.name} stores {stored} weight values, but the manifest says {values_dtype}")
            used, logits = run_format(fmt, path, x, executor=executor)
        except BundleError as e:
            raise VerifyError(f"csr: {e}") from e
        except ModuleNotFoundError as e:
            package = (e.name or "").split(".")[0]
            if package not in ("onnx", "onnxruntime"):
                raise
            raise VerifyError(f"{fmt}: needs {package}, which is not installed here (the file hashes all match; "
                              f"--formats csr re-runs the CSR bundle alone)") from e
        result = compare_logits(fmt, used, logits, expected, values_dtype)
        if not result.passed:
            raise VerifyError(f"parity failed for {result.describe()}")
        results[fmt] = result.to_json()
    return {"dir": str(root), "ok": True, "files": files, "parity": results}
