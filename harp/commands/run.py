"""`harp run`: predictions of an exported model on a .npy batch, with the torch-free runtime."""

from __future__ import annotations

import os
import tokenize

import click
import numpy as np

from ..cli_errors import freeze_at_exit
from ..errors import HarpError
from ..io import open_regular
from ..values import json_text

DEFAULT_BATCH = 16  # images per runtime call unless --batch says otherwise (see run_model)
NPY_MAGIC = b"\x93NUMPY"
PIXEL_SLACK = 1e-6  # rounding beyond [0, 1] that is not worth a warning


def load_input(path: str | os.PathLike[str]) -> np.ndarray:
    """A float32 (N, C, H, W) array from a .npy file (no pickles); HarpError if unreadable or not float32.

    The file is memory-mapped: a large input is read one batch at a time, not held in memory.
    """
    try:
        with open_regular(path) as f:  # a fifo would block the read forever
            magic = f.read(len(NPY_MAGIC))
    except ValueError:  # open_regular's "not a regular file": a directory, a fifo, a device
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        raise HarpError(f"input {path}: is {kind}, not a .npy file") from None
    except FileNotFoundError as e:
        raise HarpError(f"input {path}: no such file") from e
    except OSError as e:
        raise HarpError(f"input {path}: cannot read it ({e.strerror})") from e
    if magic.startswith(b"PK"):  # a zip, as .npz archives are: not parsed at all
        raise HarpError(f"input {path}: expected one .npy array, got a zip (.npz) archive")
    if magic != NPY_MAGIC:  # numpy would try it as a pickle and say so
        raise HarpError(f"input {path}: not a .npy file")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    # truncated, a bad header (an unclosed bracket is numpy's TokenError), a pickled array
    except (OSError, ValueError, EOFError, OverflowError, tokenize.TokenError) as e:
        raise HarpError(f"input {path}: not a readable .npy array ({e})") from e
    if x.dtype.newbyteorder("=") != np.float32:  # float32 saved on a big-endian machine is float32 too
        raise HarpError(f"input {path}: dtype {x.dtype} is not float32 (save it with x.astype(np.float32))")
    extra = os.path.getsize(path) - (getattr(x, "offset", 0) + x.nbytes)
    if isinstance(x, np.memmap) and extra > 0:  # numpy ignores it: the header describes another array
        raise HarpError(f"input {path}: {extra} bytes follow the {'x'.join(map(str, x.shape))} array its header "
                        "describes (a wrong header?)")
    return x


def run_model(artifact: str | os.PathLike[str], x: np.ndarray, *, batch: int = DEFAULT_BATCH,
              threads: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Logits (N, classes) of the bundle in `artifact` (artifact dir or .harpz file) on x, `batch` at a
    time, and the (min, max) of x, taken from each batch while it is in memory (see `pixel_range_warning`).

    Batches of 16 bound the runtime's buffers (23 MiB for ResNet18 on CIFAR, 14 GiB for
    all 10000 test images at once), and larger ones ran no faster per image here (HARP
    ResNet18: 1.12 ms an image at 16, 1.25-1.51 ms at 32-256; each new size also costs a
    kernel choice, 7-17 s on its first load). Raises HarpError for input the runtime
    rejects (shape, NaN/inf; indices count from x's first image); BundleError for a bad
    bundle; WaitPolicyError for a bad $HARP_WAIT_POLICY.
    """
    from harp.kernels.runtime import RuntimeInputError, load_runtime, non_finite_error  # numba loads here only
    from harp.kernels.threads import max_threads

    if batch < 1:
        raise HarpError(f"--batch must be >= 1, got {batch}")
    if threads is not None and not 1 <= threads <= max_threads():
        raise HarpError(f"--threads must be in 1..{max_threads()}, got {threads}")
    runtime = load_runtime(artifact, threads=threads)
    if x.ndim != 4 or len(x) == 0 or tuple(x.shape[1:]) != runtime.input_shape:
        parts = [(0, x)]  # one call: the runtime names what is wrong with the whole input
    else:
        parts = [(start, x[start:start + batch]) for start in range(0, len(x), batch)]
    logits, lo, hi = [], np.inf, -np.inf
    for start, part in parts:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite logits are refused by the caller
                logits.append(runtime.run(part))
        except RuntimeInputError as e:
            if e.first_bad is not None:  # its index counts from this batch's first image
                e = non_finite_error((e.first_bad[0] + start, *e.first_bad[1:]))
            raise HarpError(str(e)) from e
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))  # finite: the runtime checked
    return np.concatenate(logits), (lo, hi)


def pixel_range_warning(lo: float, hi: float) -> str | None:
    """A warning if input spanning [lo, hi] strays outside the [0, 1] pixels the model expects (say
    0-255 pixels), else None: the exported model normalises its input itself, so such input runs
    but its predictions mean little."""
    if lo >= -PIXEL_SLACK and hi <= 1 + PIXEL_SLACK:
        return None
    hint = " (divide 8-bit pixels by 255)" if hi > 2 else ""
    return (f"input values span [{lo:.4g}, {hi:.4g}], but the model expects raw pixels in [0, 1]{hint}; "
            f"its predictions on them mean little")


@click.command("run")
@click.argument("artifact", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="A .npy float32 array (N, C, H, W) of raw [0, 1] pixels.")
@click.option("--batch", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="Images per runtime call.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Kernel threads. Default: all the runtime may use.")
@click.option("--json", "as_json", is_flag=True, help='Print {"predictions": [...], "logits": [[...], ...]}.')
def run_command(artifact, input_path, batch, threads, as_json):
    """Run an exported model (artifact dir or model.harpz) on a batch with the numba runtime."""
    logits, (lo, hi) = run_model(artifact, load_input(input_path), batch=batch, threads=threads)
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):  # finite input far outside [0, 1] can overflow; argmax of NaN would say class 0
        raise HarpError(f"the logits of image {bad[0]} are not finite (input values span [{lo:.4g}, {hi:.4g}], "
                        "far outside the [0, 1] pixels the model expects)")
    warning = pixel_range_warning(lo, hi)
    if warning:
        click.echo(f"harp: warning: {warning}", err=True)
    predictions = logits.argmax(axis=1).tolist()
    if as_json:
        click.echo(json_text({"predictions": predictions, "logits": logits.tolist()}))
    else:
        for p in predictions:
            click.echo(p)
    freeze_at_exit()  # no torch here: the interpreter's exit need not collect numba's objects
