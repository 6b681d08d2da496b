"""`harp export`: a checkpoint as ONNX, sparse ONNX and a CSR bundle, with parity checks and a manifest."""

import json
from pathlib import Path

import click

from . import options as o

VALUES = {"fp32": "float32", "fp16": "float16"}


@click.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Artifact directory to create (must be new or empty).")
@click.option("--formats", default="onnx,onnx-sparse,csr", show_default=True,
              help="Comma-separated subset of onnx, onnx-sparse, csr.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--values", type=click.Choice(list(VALUES)), default="fp32", show_default=True,
              help="Precision of stored conv/linear weights (arithmetic stays fp32).")
@click.option("--n-parity", type=int, default=256, show_default=True, help="Test images in the parity check.")
@click.option("--n-adversarial", type=int, default=64, show_default=True,
              help="PGD examples (crafted on the torch model) in the parity check.")
@o.data_root
@o.force
@o.as_json
def export_command(checkpoint, out, formats, values, as_json, **kw):
    """Export CHECKPOINT to --out and check every format against the torch model's logits."""
    from ..export.exporter import export_checkpoint

    manifest = export_checkpoint(checkpoint, out, formats=[f.strip() for f in formats.split(",") if f.strip()],
                                 values_dtype=VALUES[values], **kw)
    if as_json:
        click.echo(json.dumps(manifest))
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


def human_size(n: float) -> str:
    """1000-based size: 512 B, 62.4 kB, 59.9 MB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


def echo_files(files: dict, out) -> None:
    """The file table: name, size, first 12 hex digits of the SHA-256 (manifest.json last, unhashed)."""
    rows = [(name, entry["bytes"], entry["sha256"][:12]) for name, entry in files.items()]
    manifest = Path(out) / "manifest.json"
    if manifest.is_file():
        rows.append(("manifest.json", manifest.stat().st_size, ""))
    click.echo(f"  {'file':<20} {'size':>10}  sha256")
    for name, size, digest in rows:
        click.echo(f"  {name:<20} {human_size(size):>10}  {digest}")


def echo_parity(results: dict) -> None:
    """One line per format: max |diff|, tolerance, argmax agreement, executor, verdict."""
    for fmt, r in results.items():
        click.echo(f"  {fmt:<12} max |diff| {r['max_abs_diff']:.2e}  tolerance {r['tolerance']:.1e}  "
                   f"argmax {r['argmax_agree']}/{r['n_inputs']}  [{r['executor']}]  "
                   f"{'ok' if r['passed'] else 'FAILED'}")
