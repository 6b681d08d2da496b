"""`harp info`: what a checkpoint or an exported artifact holds: architecture, sparsity, per-layer densities.

An artifact is read from its checked manifest without torch, so `harp info` works on a
device; a checkpoint needs torch (its model is rebuilt to count the nonzeros).
"""

import os
from pathlib import Path
from typing import Any

import click

from ..errors import HarpError
from ..lazy_group import is_installed
from ..values import json_text
from .artifact_lines import human_size


def checkpoint_info(path: str) -> dict[str, Any]:
    from ..checkpoint import load_checkpoint
    from ..sparsity import layer_densities, model_sparsity

    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    layers = layer_densities(model)
    names = ckpt.spec.class_names
    return {"path": str(path), "architecture": ckpt.meta["architecture"], "dataset": ckpt.meta["dataset"]["name"],
            "class_names": None if names is None else list(names),
            "sparsity": model_sparsity(model), "pruning": ckpt.meta.get("pruning"),
            "metrics": {k: v for k, v in ckpt.meta.get("metrics", {}).items() if not isinstance(v, dict)},
            "layers": [{"name": lay["name"], "shape": lay["shape"], "density": lay["density"]} for lay in layers]}


def artifact_info(path: str) -> dict[str, Any]:
    """The same facts from an export directory's manifest (files checked against their hashes), plus its files."""
    from ..export.artifact import open_artifact

    art = open_artifact(path)
    return {"path": str(path), "architecture": art.architecture, "dataset": art.dataset,
            "class_names": art.class_names, "sparsity": art.sparsity, "pruning": art.model.get("pruning"),
            "metrics": {k: v for k, v in art.metrics.items() if not isinstance(v, dict)},
            "layers": [{"name": lay["name"], "shape": lay["shape"], "density": lay["density"]} for lay in art.layers],
            "files": {name: entry["bytes"] for name, entry in art.manifest["files"].items()},
            "export": art.manifest["export"]}


def read_info(path: str) -> dict[str, Any]:
    """`checkpoint_info` or `artifact_info`, by what the directory holds."""
    root = Path(path)
    # lexists: a manifest.json that is a folder or a symlink loop is named by the reader, not taken for no file
    if os.path.lexists(root / "manifest.json"):
        return artifact_info(path)
    if root.is_dir() and not os.path.lexists(root / "meta.json"):
        raise HarpError(f"{root} is neither a harp checkpoint (no meta.json) nor an export (no manifest.json)")
    if not is_installed("torch"):
        raise HarpError(f"{root}: reading a checkpoint needs torch, which is not installed here "
                        "(an exported artifact does not)")
    return checkpoint_info(path)  # load_checkpoint says what is wrong with anything else


@click.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info_command(path, as_json):
    """Architecture, dataset, sparsity and per-layer densities of a checkpoint or an exported artifact."""
    info = read_info(path)
    if as_json:
        click.echo(json_text(info))
        return
    click.echo(f"{info['architecture']} on {info['dataset']}: sparsity {info['sparsity']:.4%}")
    if info["class_names"]:
        click.echo("  classes (prediction 0, 1, ...): " + ", ".join(info["class_names"]))
    for k, v in info["metrics"].items():
        click.echo(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    if "files" in info:
        click.echo("  files: " + ", ".join(f"{name} {human_size(n)}" for name, n in info["files"].items()))
        export = info["export"]
        onnx = any(str(f).startswith("onnx") for f in export.get("formats") or ())
        opset = f", opset {export.get('opset')}" if onnx else ""  # a CSR bundle alone used none
        click.echo(f"  export: values {export.get('values_dtype')}{opset}, "
                   f"dead channels {'trimmed' if export.get('channel_trimming') else 'kept'}")
    click.echo(f"  {'layer':<32} {'shape':<20} density")
    for layer in info["layers"]:
        click.echo(f"  {layer['name']:<32} {str(layer['shape']):<20} {layer['density']:.4%}")
