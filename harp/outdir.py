"""Output directories: refuse to clobber, clear only what harp wrote, create late."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import HarpError
from .io import read_json

# What a folder harp wrote holds, and how each is recognised (its file's "format", or the fields only
# harp writes); a file of the same name written by another tool (a Hugging Face model.safetensors, a
# browser extension's manifest.json, a project's state/) does not make a folder harp's.
_MARKERS = (("meta.json", lambda j: j.get("format") == "harp-checkpoint"),  # checkpoint.FORMAT
            ("state/state.json", lambda j: {"epoch", "kind", "run", "job"} <= set(j)),  # an interrupted run
            ("pipeline.json", lambda j: set(j) == {"options", "results"}),  # pipeline.PIPELINE_FILE
            ("manifest.json", lambda j: j.get("format") == "harp-export"))  # export.verify.MANIFEST_FORMAT
# state/ of a run stopped before its first state.json: weights, optimizer, and atomic writes' temp files
_STATE_FILE = re.compile(r"(model|best)-\d+\.safetensors|optim-\d+\.pt|\..+\.tmp")


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
    if out.is_symlink() and not out.exists():
        raise HarpError(f"output {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists():
        if not out.is_dir():
            raise HarpError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not never_finished_an_epoch(out):
            if not force:
                raise HarpError(f"output directory {out} already exists; pass --force to overwrite it or --resume")
            if not harp_wrote(out):
                raise HarpError(f"--force: {out} does not look like a harp output; refusing to delete it")
            if out.is_symlink():  # rmtree refuses a link; deleting what it points to is not what was asked
                raise HarpError(f"--force: {out} is a symbolic link; name the folder it points to")
            cwd = Path.cwd().resolve()
            if out.resolve() == cwd or out.resolve() in cwd.parents:
                raise HarpError(f"--force: {out} is the current folder or holds it, which --force would delete; "
                                "run from elsewhere or name another folder")
    check_can_create(out.absolute().parent)


def harp_wrote(out: Path, marker: str | None = None) -> bool:
    """Whether folder `out` is one harp wrote: a checkpoint, an interrupted run, a pipeline or an export
    (or only the kind whose marker file is `marker`, e.g. "manifest.json"), recognised by the content
    of its marker file, not only by the file's name."""
    return any(isinstance(j := _json_or_none(out / name), dict) and is_ours(j) for name, is_ours in _MARKERS
               if marker in (None, name))


def _json_or_none(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


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
    epoch (no state.json, and only files a run writes there): nothing to resume, so a plain re-run
    may start over in it."""
    state = out / "state"
    return [p.name for p in out.iterdir()] == ["state"] and state.is_dir() and not state.is_symlink() \
        and all(_STATE_FILE.fullmatch(p.name) and p.is_file() for p in state.iterdir())


def make_out_dir(out: Path, *, force: bool, resume: bool) -> None:
    """Clear (--force, or a run that never finished an epoch) and create `out`; call it inside `writing(out)`.
    `out` is checked again first: another process may have written it since the command's first check."""
    check_out_dir(out, force=force, resume=resume)
    if resume:
        return
    if out.exists() and (force or never_finished_an_epoch(out)):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


@contextmanager
def writing(out: Path, hold: bool = True) -> Iterator[None]:
    """Hold `out` for this process while the block writes it: a second harp process writing the same
    folder (two runs, or a run and its --resume) is refused in one line instead of mixing their files.
    `hold=False` holds nothing (torchrun's other ranks, which do not write it).

    The lock is an flock on a file named after `out`'s real path in a per-user folder of the temp
    directory (not beside `out`: --force replaces `out`, and a pipeline's stages are inside one);
    the kernel releases it when the process dies, however it dies. Where flock is missing (Windows)
    nothing is locked.

    A block that fails or is stopped (Ctrl-C, SIGTERM) before its first finished epoch removes the
    `out` it created: an empty folder, or a state/ with nothing to resume, would be all it left.
    """
    try:
        import fcntl
    except ImportError:
        hold = False
    path = _lock_path(out) if hold else None
    if path is None:
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise HarpError(f"{out} is being written by another harp process{f' (pid {holder})' if holder else ''}; "
                            "wait for it to finish, or write to another folder") from None
        try:  # the previous holder removes the file on release: lock the file that is there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    existed = os.path.lexists(out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    except BaseException:
        if not existed and out.is_dir() and (not any(out.iterdir()) or never_finished_an_epoch(out)):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _lock_path(out: Path) -> Path | None:
    """The lock file of `out`; None (no locking) where the lock folder is not this user's own."""
    folder = Path(tempfile.gettempdir()) / f"harp-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():  # another user made it: not to be trusted
        return None
    real = os.path.join(os.path.realpath(out.absolute().parent), out.name)  # out itself may not exist yet
    return folder / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.lock"
