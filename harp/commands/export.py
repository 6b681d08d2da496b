"""`harp export`: a checkpoint as ONNX, sparse ONNX and a CSR bundle, with parity checks and a manifest."""

import click

from ..values import json_text
from . import options as o
from .artifact_lines import echo_files, echo_parity

VALUES = {"fp32": "float32", "fp16": "float16"}


@click.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Artifact directory to create (must be new or empty).")
@click.option("--formats", default="onnx,onnx-sparse,csr", show_default=True,
              help="Comma-separated subset of onnx, onnx-sparse, csr.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--values", type=click.Choice(list(VALUES)), default="fp32", show_default=True,
              help="Precision of stored conv/linear weights (arithmetic stays fp32).")
@click.option("--n-parity", type=click.IntRange(min=0), default=None,
              help="Test images in the parity check. Default: 256, or all of a smaller test split.")
@click.option("--n-adversarial", type=click.IntRange(min=0), default=None,
              help="PGD examples (crafted on the torch model) in the parity check. Default: 64, or all of a "
                   "smaller test split.")
@o.data_root
@o.force
@o.as_json
def export_command(checkpoint, out, formats, values, as_json, **kw):
    """Export CHECKPOINT to --out and check every format against the torch model's logits."""
    from ..export.exporter import export_checkpoint

    manifest = export_checkpoint(checkpoint, out, formats=o.split_formats(formats),
                                 values_dtype=VALUES[values], **kw)
    if as_json:
        click.echo(json_text(manifest))
        return
    model = manifest["model"]
    click.echo(f"exported {model['architecture']} ({model['dataset']['name']}), "
               f"sparsity {model['sparsity']:.2%}, to {out}")
    if model.get("note"):
        click.echo(f"  note: {model['note']}")
    echo_files(manifest["files"], out)
    trim = manifest.get("channel_trimming")
    if trim:
        click.echo(f"channel trimming: {trim['channels_removed']} of {trim['channels_before']} channels removed "
                   f"({trim['zero_channels']} zero, {trim['unread_channels']} unread), "
                   f"{trim['params_removed']:,} parameters")
    inputs = manifest["parity"]["inputs"]
    click.echo(f"parity on {inputs['clean'] + inputs['adversarial']} inputs "
               f"({inputs['clean']} clean + {inputs['adversarial']} adversarial):")
    echo_parity(manifest["parity"]["results"])
