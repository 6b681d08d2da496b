"""`harp run`: predictions of an exported model on a .npy batch, with the torch-free runtime."""

from __future__ import annotations

import json
import os

import click
import numpy as np

from ..errors import HarpError


def load_input(path: str | os.PathLike[str]) -> np.ndarray:
    """A float32 (N, C, H, W) array from a .npy file (no pickles); HarpError if unreadable or not float32."""
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise HarpError(f"input {path}: no such file") from e
    except (OSError, ValueError, EOFError) as e:  # not .npy, truncated, or a pickled object array
        raise HarpError(f"input {path}: not a readable .npy array ({e})") from e
    if not isinstance(x, np.ndarray):  # an .npz archive
        x.close()
        raise HarpError(f"input {path}: expected one .npy array, got an .npz archive")
    if x.dtype != np.float32:
        raise HarpError(f"input {path}: dtype {x.dtype} is not float32 (save it with x.astype(np.float32))")
    return x


def run_model(artifact: str | os.PathLike[str], x: np.ndarray, *, batch: int | None = None,
              threads: int | None = None) -> np.ndarray:
    """Logits (N, classes) of the bundle in `artifact` (artifact dir or .harpz file) on x, `batch` at a time.

    Raises HarpError for input the runtime rejects (shape, NaN/inf); BundleError for a bad bundle;
    WaitPolicyError for a bad $HARP_WAIT_POLICY.
    """
    from harp.kernels.runtime import RuntimeInputError, load_runtime  # numba loads only for this command
    from harp.kernels.threads import max_threads

    if batch is not None and batch < 1:
        raise HarpError(f"--batch must be >= 1, got {batch}")
    if threads is not None and not 1 <= threads <= max_threads():
        raise HarpError(f"--threads must be in 1..{max_threads()}, got {threads}")
    runtime = load_runtime(artifact, threads=threads)
    size = batch or max(1, len(x))
    try:
        if x.ndim == 0 or len(x) == 0:
            return runtime.run(x)  # the runtime names what is wrong with it
        return np.concatenate([runtime.run(x[i:i + size]) for i in range(0, len(x), size)])
    except RuntimeInputError as e:
        raise HarpError(str(e)) from e


@click.command("run")
@click.argument("artifact", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="A .npy float32 array (N, C, H, W) of raw [0, 1] pixels.")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Images per runtime call. Default: all.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Kernel threads. Default: all the runtime may use.")
@click.option("--json", "as_json", is_flag=True, help='Print {"predictions": [...], "logits": [[...], ...]}.')
def run_command(artifact, input_path, batch, threads, as_json):
    """Run an exported model (artifact dir or model.harpz) on a batch with the numba runtime."""
    logits = run_model(artifact, load_input(input_path), batch=batch, threads=threads)
    predictions = logits.argmax(axis=1).tolist()
    if as_json:
        click.echo(json.dumps({"predictions": predictions, "logits": logits.tolist()}))
        return
    for p in predictions:
        click.echo(p)
