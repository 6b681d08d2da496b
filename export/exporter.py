"""Export a (pruned) torch classifier as an artifact directory: ONNX, sparse ONNX, CSR bundle, parity, manifest.

    export_checkpoint(ckpt_dir, out_dir)      checkpoint dir -> artifact dir (what `harp export` runs)
    export_model(model, shape, out_dir, ...)  any traceable classifier -> artifact dir

Steps: trace (BatchNorm folded) -> trim dead channels (`channels.trim_channels`) ->
write every requested format into a temporary sibling of out_dir -> run each
written file on the parity inputs and compare with the torch model's logits
(`verify.compare_logits`) -> write manifest.json last -> rename the temporary
directory to out_dir. A failure at any step removes the temporary directory, so
out_dir either does not change or holds a complete, verified export. With
force=True an existing export is moved aside first and deleted after the rename.

File names and the parity policy are shared with `verify.py`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harp.errors import HarpError
from harp.io import DIR_MODE, NAME_MAX, fsync_dir, temp_prefix
from harp.outdir import check_can_create, check_out_spares, harp_wrote, writing

from .bundle import write_bundle
from .channels import TrimSummary, trim_channels
from .errors import ExportError
from .graph import Graph
from .onnx_writer import DEFAULT_OPSET, graph_to_onnx, save_onnx
from .trace import trace_model
from .verify import (
    FORMAT_FILES,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    PARITY_FILE,
    RTOL,
    ParityResult,
    check_onnx,
    compare_logits,
    run_format,
    sha256_file,
)

DEFAULT_FORMATS = ("onnx", "onnx-sparse", "csr")
DEFAULT_PARITY, DEFAULT_ADVERSARIAL = 256, 64  # test images and PGD examples in the parity check
RANDOM_PARITY_INPUTS = 16  # used when export_model gets no parity inputs
ADVERSARIAL_STEPS = 10  # PGD steps for the adversarial parity inputs (the dataset's eps)
TORCH_BATCH = 64


def export_model(model: nn.Module, input_shape: Sequence[int], out_dir: str | os.PathLike[str], *,
                 formats: Sequence[str] = DEFAULT_FORMATS, opset: int = DEFAULT_OPSET, values_dtype: str = "float32",
                 meta: dict[str, Any], parity_x: np.ndarray | None = None, parity_adv: np.ndarray | None = None,
                 force: bool = False, trim: bool = True, source: dict[str, Any] | None = None,
                 parity_note: dict[str, str] | None = None) -> dict[str, Any]:
    """Write `model` (raw [0, 1] pixels of per-sample `input_shape` in, logits out) to `out_dir`; return the manifest.

    `meta` (JSON) describes the model; it becomes the manifest's "model" block and the bundle's meta.
    parity_x / parity_adv are clean / adversarial inputs (N, C, H, W); with neither, 16 seeded uniform
    [0, 1] inputs are used; `parity_note` says where they came from. `source` identifies what was
    exported (export_checkpoint: the checkpoint path and the SHA-256 of its meta.json). trim=False
    skips dead-channel trimming. Raises ExportError (nothing written) for bad arguments, an unsupported layer,
    an occupied out_dir without force, or a format whose logits miss the parity criterion.
    """
    formats = _check_formats(formats)
    _check_values_dtype(values_dtype)
    _check_opset(opset, formats)
    shape = _check_shape(input_shape)
    if not isinstance(meta, dict):
        raise ExportError(f"meta must be a dict, got {type(meta).__name__}")
    for name, obj in (("meta", meta), ("source", source), ("parity_note", parity_note)):
        try:
            json.dumps(obj, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ExportError(f"{name} is not plain JSON: {e}") from e
    out = Path(out_dir)
    _check_out_dir(out, force)
    x_clean, x_adv, random_note = _parity_inputs(parity_x, parity_adv, shape)

    graph = trace_model(model, shape)
    trimmed, summary = trim_channels(graph) if trim else (graph, None)
    logits_clean, logits_adv = _torch_logits(model, x_clean), _torch_logits(model, x_adv)
    model_block = _model_block(model, meta, shape, graph)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out.name)}tmp-", dir=out.parent))
    try:
        files = _write_formats(trimmed, tmp, formats, opset, values_dtype, _bundle_meta(model_block))
        with open(tmp / PARITY_FILE, "wb") as f:
            np.savez(f, x_clean=x_clean, x_adv=x_adv, logits_clean=logits_clean, logits_adv=logits_adv)
        files[PARITY_FILE] = _file_entry(tmp / PARITY_FILE, "parity")
        results = _parity(tmp, formats, values_dtype, np.concatenate([x_clean, x_adv]),
                          np.concatenate([logits_clean, logits_adv]))
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created_by": _versions(),
            "source": source if source is not None else {"checkpoint": None, "meta_sha256": None},
            "model": model_block,
            "export": {"formats": list(formats), "opset": opset, "values_dtype": values_dtype,
                       "onnx_sparse_storage": "sparse_initializer", "channel_trimming": trim},
            "channel_trimming": None if summary is None else _trim_json(summary),
            "files": files,
            "parity": {
                "inputs": {"clean": int(x_clean.shape[0]), "adversarial": int(x_adv.shape[0]),
                           **(parity_note or {}), **random_note},
                "criterion": {"rtol": RTOL[values_dtype], "tolerance": "rtol * max(1, max |torch logit|)",
                              "argmax": "identical on every input except near-ties "
                                        "(torch top-2 margin <= 2 * tolerance)"},
                "results": {fmt: r.to_json() for fmt, r in results.items()},
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes 0700; the export is meant to be shared
        with writing(out):  # no other harp process writing `out`, and it is still what it was at the start
            _check_out_dir(out, force)
            _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_checkpoint(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      formats: Sequence[str] = DEFAULT_FORMATS, opset: int = DEFAULT_OPSET,
                      values_dtype: str = "float32", n_parity: int | None = None,
                      n_adversarial: int | None = None, data_root: str | os.PathLike[str] = "data",
                      force: bool = False) -> dict[str, Any]:
    """Export a checkpoint directory (see harp.checkpoint) to `out_dir`; return the manifest.

    Parity inputs: the first `n_parity` test images, and PGD examples (dataset eps, 10 steps, seeded)
    crafted on the torch model from the first `n_adversarial` of them. None means 256 and 64, or the
    whole test split where it is smaller (a small imagefolder); a number is required in full.
    Raises HarpError for a bad checkpoint or missing dataset, ExportError as `export_model` does;
    nothing is written on error.
    """
    from harp.attacks import AttackConfig, pgd
    from harp.checkpoint import META, load_checkpoint
    from harp.data import load_split

    formats = _check_formats(formats)
    _check_values_dtype(values_dtype)
    _check_opset(opset, formats)
    for name, n in (("n_parity", n_parity), ("n_adversarial", n_adversarial)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ExportError(f"{name} must be a non-negative integer, got {n!r}")
    if n_parity == 0 and n_adversarial == 0:
        raise ExportError("n_parity and n_adversarial are both 0: there would be no parity check")
    _check_out_dir(Path(out_dir), force, source=ckpt_dir)  # before loading data or crafting attacks
    ckpt = load_checkpoint(ckpt_dir)
    model = ckpt.build_model().eval()
    spec = ckpt.spec

    test = load_split(spec.name, False, root=data_root)
    n_parity = min(DEFAULT_PARITY, len(test)) if n_parity is None else n_parity
    n_adversarial = min(DEFAULT_ADVERSARIAL, len(test)) if n_adversarial is None else n_adversarial
    count = max(n_parity, n_adversarial)
    if len(test) < count:
        raise ExportError(f"test split of {spec.name} has {len(test)} images, fewer than the {count} requested "
                          "(--n-parity, --n-adversarial)")
    x, y = next(test.subset(count).batches(count))  # float [0, 1], first `count` test images
    attack = AttackConfig(eps=spec.eps, step_size=2.5 * spec.eps / ADVERSARIAL_STEPS, steps=ADVERSARIAL_STEPS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # PGD's random start
        x_adv = pgd(model, x[:n_adversarial], y[:n_adversarial], attack) if n_adversarial else x[:0]

    pruning = ckpt.meta.get("pruning")
    meta = {
        "architecture": ckpt.meta["architecture"],
        "dataset": spec.to_json(),
        "pruning": pruning,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std),
                          "applied": "inside the model: feed raw pixels scaled to [0, 1]"},
        "metrics": {k: v for k, v in ckpt.meta.get("metrics", {}).items() if isinstance(v, int | float | str)},
    }
    source = {"checkpoint": str(Path(ckpt_dir).resolve()), "meta_sha256": sha256_file(Path(ckpt_dir) / META)}
    note = {"clean_source": f"first {n_parity} images of the {spec.name} test split",
            "adversarial_source": f"PGD-linf eps={spec.eps:.6g}, step {attack.step_size:.6g}, {attack.steps} "
                                  f"steps, seed 0, on the first {n_adversarial} of them"}
    if pruning is None:
        meta["note"] = "dense checkpoint (meta.json has no pruning block): exported unpruned, sparsity 0"
    return export_model(model, spec.input_shape, out_dir, formats=formats, opset=opset, values_dtype=values_dtype,
                        meta=meta, parity_x=x[:n_parity].numpy(), parity_adv=x_adv.numpy(), force=force,
                        source=source, parity_note=note)


# ---------------------------------------------------------------------------
# argument checks (all before anything is written)


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str) or not isinstance(formats, Sequence) or not formats:
        raise ExportError(f"formats must be a non-empty list of {', '.join(FORMAT_FILES)}; got {formats!r}")
    unknown = [f for f in formats if f not in FORMAT_FILES]
    if unknown:
        raise ExportError(f"unknown format {unknown[0]!r} (choose from {', '.join(FORMAT_FILES)})")
    return tuple(dict.fromkeys(formats))


def _check_values_dtype(values_dtype: str) -> None:
    if values_dtype not in RTOL:
        raise ExportError(f"values_dtype {values_dtype!r} is not one of {list(RTOL)}")


def _check_opset(opset: int, formats: Sequence[str] = ()) -> None:
    """ExportError for an opset onnx cannot write or, where ONNX formats are written (their parity
    check runs them), onnxruntime cannot run: onnx may know opsets onnxruntime does not yet."""
    import onnx

    from .onnx_writer import MIN_OPSET

    newest = _newest_runnable_opset() if any(f != "csr" for f in formats) else onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r} is not supported (expected {MIN_OPSET}..{newest}, the opsets onnx "
                          "writes and onnxruntime runs)")


@functools.cache  # export_checkpoint and the export_model it calls both check the opset
def _newest_runnable_opset() -> int:
    """The newest opset onnx writes and onnxruntime runs: a few milliseconds per opset tried, newest first."""
    import onnx

    from .onnx_writer import MIN_OPSET

    newest = onnx.defs.onnx_opset_version()
    return next((v for v in range(newest, MIN_OPSET - 1, -1) if _onnxruntime_runs(v)), MIN_OPSET)


def _onnxruntime_runs(opset: int) -> bool:
    """Whether onnxruntime loads a one-Relu model of this opset (a few milliseconds)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])  # as onnx_writer sets it
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own Fail / InvalidGraph types
        return False
    return True


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ExportError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _check_out_dir(out: Path, force: bool, source: str | os.PathLike[str] | None = None) -> None:
    """ExportError unless `out` can become the export: new, empty, or (with force) an export that is
    neither the input checkpoint `source` nor holds it, nor the current folder (it is replaced by a rename)."""
    if source is not None:
        try:
            check_out_spares(out, source)
        except HarpError as e:
            raise ExportError(str(e)) from None
    if len(out.name.encode()) > NAME_MAX:
        raise ExportError(f"cannot create {out}: the folder name is longer than {NAME_MAX} bytes")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ExportError(f"--out {out} is the current folder or holds it, which the export would replace; "
                          "name a new folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"output {out} exists and is not a directory")
        if any(out.iterdir()):
            if not force:
                raise ExportError(f"output directory {out} is not empty; pass --force to replace it")
            if not harp_wrote(out, MANIFEST):
                raise ExportError(f"--force: {out} holds no {MANIFEST} written by harp, so it is not a harp "
                                  "export; refusing to delete it")
    try:
        check_can_create(out.absolute().parent)  # missing parents are created with the export
    except HarpError as e:
        raise ExportError(str(e)) from None


def _parity_inputs(parity_x: np.ndarray | None, parity_adv: np.ndarray | None,
                   shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    if parity_x is None and parity_adv is None:
        rng = np.random.default_rng(0)
        x = rng.random((RANDOM_PARITY_INPUTS, *shape), dtype=np.float32)
        return x, np.zeros((0, *shape), np.float32), {"clean_source": f"{RANDOM_PARITY_INPUTS} uniform [0, 1] "
                                                                      "random inputs, numpy seed 0"}
    arrays = []
    for name, a in (("parity_x", parity_x), ("parity_adv", parity_adv)):
        a = np.zeros((0, *shape), np.float32) if a is None else np.asarray(a)
        if a.ndim != 4 or tuple(a.shape[1:]) != shape:
            raise ExportError(f"{name} has shape {a.shape}, expected (N, {', '.join(map(str, shape))})")
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise ExportError(f"{name} must hold finite floats, got dtype {a.dtype}")
        arrays.append(np.ascontiguousarray(a, dtype=np.float32))
    if arrays[0].shape[0] + arrays[1].shape[0] == 0:
        raise ExportError("parity_x and parity_adv are both empty: there would be no parity check")
    return arrays[0], arrays[1], {}


# ---------------------------------------------------------------------------
# the work


def _torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    from harp.attacks import eval_mode

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    outs = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, x.shape[0], TORCH_BATCH):
            outs.append(model(torch.from_numpy(x[i:i + TORCH_BATCH]).to(device)).float().cpu().numpy())
    if not outs:
        with eval_mode(model), torch.no_grad():
            classes = model(torch.zeros((1, *x.shape[1:]), device=device)).shape[1]
        return np.zeros((0, classes), np.float32)
    return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)


def _model_block(model: nn.Module, meta: dict[str, Any], shape: tuple[int, int, int], graph: Graph) -> dict[str, Any]:
    from harp.sparsity import layer_densities

    layers = layer_densities(model)
    total = sum(layer["params"] for layer in layers)
    nonzero = sum(layer["nonzero"] for layer in layers)
    block = dict(meta)
    block.update({
        "input_shape": list(shape),
        "classes": int(graph.num_classes),
        "prunable_params": total,
        "nonzero_params": nonzero,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "layers": [{"name": lay["name"], "shape": lay["shape"], "params": lay["params"],
                    "nonzero": lay["nonzero"], "density": lay["density"]} for lay in layers],
    })
    return block


def _bundle_meta(model_block: dict[str, Any]) -> dict[str, Any]:
    """What the bundle carries about its model: the manifest's model block without the per-layer table."""
    meta = {k: v for k, v in model_block.items() if k != "layers"}
    pruning = meta.get("pruning")
    if isinstance(pruning, dict) and "layers" in pruning:
        meta["pruning"] = {k: v for k, v in pruning.items() if k != "layers"}
    return meta


def _write_formats(graph: Graph, tmp: Path, formats: tuple[str, ...], opset: int, values_dtype: str,
                   bundle_meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = {}
    for fmt in formats:
        path = tmp / FORMAT_FILES[fmt]
        if fmt == "csr":
            write_bundle(graph, path, values_dtype=values_dtype, meta=bundle_meta)
        else:
            sparse = fmt == "onnx-sparse"
            model = graph_to_onnx(graph, sparse=sparse, opset=opset, values_dtype=values_dtype,
                                  sparse_storage="initializer")
            save_onnx(model, path)
            check_onnx(path, fmt)
        files[FORMAT_FILES[fmt]] = _file_entry(path, fmt)
    return files


def _file_entry(path: Path, fmt: str) -> dict[str, Any]:
    return {"format": fmt, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _parity(tmp: Path, formats: tuple[str, ...], values_dtype: str, x: np.ndarray,
            expected: np.ndarray) -> dict[str, ParityResult]:
    results = {}
    for fmt in formats:
        executor, logits = run_format(fmt, tmp / FORMAT_FILES[fmt], x)
        result = compare_logits(fmt, executor, logits, expected, values_dtype)
        if not result.passed:
            raise ExportError(f"parity failed for {result.describe()}; nothing was written")
        results[fmt] = result
    return results


def _trim_json(summary: TrimSummary) -> dict[str, Any]:
    """The summary with only the layers that lost rows."""
    out = summary.to_json()
    out["layers"] = [layer for layer in out["layers"] if layer["rows_before"] != layer["rows_after"]]
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out`; an existing export is moved aside, then deleted."""
    old: Path | None = None
    if out.is_dir() and any(out.iterdir()):  # a harp export that --force replaces (`_check_out_dir`, under the lock)
        old = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out.name)}old-", dir=out.parent))
        os.replace(out, old)  # onto the empty placeholder directory
    elif out.is_dir():
        out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise ExportError(f"cannot move the finished export into {out}: {e}") from e
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import harp

    return {"harp": harp.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}

