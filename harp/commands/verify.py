"""`harp verify`: re-check an export directory against its manifest and stored torch logits."""

import click

from ..values import json_text
from . import options as o
from .artifact_lines import echo_files, echo_parity


@click.command("verify")
@click.argument("directory", type=click.Path())
@click.option("--executor", type=click.Choice(["auto", "runtime", "reference"]), default="auto", show_default=True,
              help="What runs the CSR bundle: the numba runtime if importable (auto), or force one.")
@click.option("--formats", default=None,
              help="Comma-separated formats to re-run (onnx, onnx-sparse, csr). Default: all the export holds.")
@o.as_json
def verify_command(directory, executor, formats, as_json):
    """Check DIRECTORY's file hashes and re-run every format on the stored parity inputs."""
    from ..export.verify import verify_artifact

    result = verify_artifact(directory, executor=executor,
                             formats=None if formats is None else o.split_formats(formats))
    if as_json:
        click.echo(json_text(result))
        return
    click.echo(f"{directory}: ok, {len(result['files'])} files match manifest.json")
    echo_files(result["files"], directory)
    click.echo("parity against the stored torch logits:")
    echo_parity(result["parity"])
