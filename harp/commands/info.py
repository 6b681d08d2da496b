"""`harp info`: what a checkpoint holds: architecture, sparsity, per-layer densities."""

import json

import click

from ..checkpoint import load_checkpoint
from ..sparsity import layer_densities, model_sparsity


def checkpoint_info(path: str) -> dict:
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    layers = layer_densities(model)
    return {"path": str(path), "architecture": ckpt.meta["architecture"], "dataset": ckpt.meta["dataset"]["name"],
            "sparsity": model_sparsity(model), "pruning": ckpt.meta.get("pruning"),
            "metrics": {k: v for k, v in ckpt.meta.get("metrics", {}).items() if not isinstance(v, dict)},
            "layers": [{"name": lay["name"], "shape": lay["shape"], "density": lay["density"]} for lay in layers]}


@click.command("info")
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info_command(checkpoint, as_json):
    """Architecture, dataset, sparsity and per-layer densities of a checkpoint."""
    info = checkpoint_info(checkpoint)
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{info['architecture']} on {info['dataset']}: sparsity {info['sparsity']:.4%}")
    for k, v in info["metrics"].items():
        click.echo(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    click.echo(f"  {'layer':<32} {'shape':<20} density")
    for layer in info["layers"]:
        click.echo(f"  {layer['name']:<32} {str(layer['shape']):<20} {layer['density']:.4%}")
