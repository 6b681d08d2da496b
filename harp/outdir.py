"""Output directories: refuse to clobber, clear only what harp wrote, create late."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import HarpError

_OURS = ("meta.json", "state", "model.safetensors", "manifest.json", "pipeline.json")


def check_out_dir(out: Path, *, force: bool, resume: bool, source: str | Path | None = None) -> None:
    """Validate --out before any work; nothing is created here.

    source: the checkpoint the command reads, which --out may neither be nor hold (--force would delete it).
    """
    if source is not None:
        check_out_spares(out, source)
    if resume:
        if not (out / "state" / "state.json").is_file():
            raise HarpError(f"--resume: {out} holds no interrupted run (no state/state.json)")
        return
    if out.exists():
        if not out.is_dir():
            raise HarpError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not never_finished_an_epoch(out):
            if not force:
                raise HarpError(f"output directory {out} already exists; pass --force to overwrite it or --resume")
            if not any((out / name).exists() for name in _OURS):
                raise HarpError(f"--force: {out} does not look like a harp output; refusing to delete it")
    check_can_create(out.absolute().parent)


def check_can_create(folder: Path) -> None:
    """HarpError unless `folder` is, or can be made, a writable folder: missing parents are created
    with it (runs/ in a fresh clone); a file in the way, or a read-only ancestor, is an error."""
    ancestor = folder.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HarpError(f"cannot create {folder}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HarpError(f"cannot write to {ancestor}: permission denied")


def check_out_spares(out: Path, source: str | Path) -> None:
    """HarpError if --out is, or holds, the input checkpoint `source` (replacing --out would delete it)."""
    src, dest = Path(source).resolve(), Path(out).resolve()
    if src == dest or dest in src.parents:
        raise HarpError(f"--out {out} {'is' if src == dest else 'holds'} the input checkpoint {source}; "
                        "write to another directory")


def never_finished_an_epoch(out: Path) -> bool:
    """Whether `out` holds only the state/ folder of a run that failed or was stopped in its first
    epoch (no state.json): nothing to resume, so a plain re-run may start over in it."""
    return [p.name for p in out.iterdir()] == ["state"] and (out / "state").is_dir() \
        and not (out / "state" / "state.json").exists()


def make_out_dir(out: Path, *, force: bool, resume: bool) -> None:
    if resume:
        return
    if out.exists() and (force or never_finished_an_epoch(out)):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
