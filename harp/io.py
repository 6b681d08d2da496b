"""Atomic file writes and hashing: a crash never leaves a half-written file behind.

Imports nothing heavy at module level: the bundle writer and the torch-free runtime
use it too (torch and safetensors are imported only by the tensor helpers).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import HarpError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0600
DIR_MODE = 0o777 & ~_umask()  # what mkdir would give; mkdtemp alone gives 0700


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside `directory` durable where the platform allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


NAME_MAX = 255  # bytes in a file name on Linux, macOS and Windows file systems
# An open stream's paths, not files (/dev/shm/x is a file; /dev/null is a device, see below).
STREAM_PREFIXES = ("/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")


def _written_in_place(given: Path, target: Path) -> bool:
    """Whether a write to `given` (resolving to `target`) goes straight into it instead of a rename: a
    device or fifo (a rename would replace /dev/null), or a stream's path, which may resolve to the
    file a shell redirected stdout to (a rename would drop what was there and what is printed next)."""
    return str(given.absolute()).startswith(STREAM_PREFIXES) or (
        target.exists() and not target.is_file() and not target.is_dir())


def check_output_file(path: str | Path) -> None:
    """HarpError unless `atomic_writer` can write `path`: an existing, writable folder, and not a folder
    itself. Commands check their output files before the work, not after minutes of it."""
    given = Path(path)
    try:
        os.stat(given)
    except FileNotFoundError:
        pass  # a new file, or a symlink to one
    except OSError as e:  # a symlink loop, a file in the way of a folder, a name over NAME_MAX
        raise HarpError(f"cannot write {path}: {e.strerror}") from None
    target = Path(os.path.realpath(given))
    if target.is_dir():
        raise HarpError(f"{path} is a folder, not a file")
    if _written_in_place(given, target):
        if not os.access(target, os.W_OK):
            raise HarpError(f"cannot write to {path}: permission denied")
        return
    if not target.parent.is_dir():
        raise HarpError(f"cannot write {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise HarpError(f"cannot write {path}: permission denied")


def temp_prefix(name: str) -> str:
    """A hidden temporary name's start beside `name`, short enough that a name within NAME_MAX fits."""
    return f".{name[:64]}."


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at `path` only if the block completes (temp file, fsync, rename).

    A symlink keeps pointing where it did: the file it names is replaced. A device, a fifo or a
    stream's path (/dev/null, /dev/stdout) is appended to in place (`_written_in_place`).
    An OSError names `path`.
    """
    given = Path(path)
    path = Path(os.path.realpath(given))
    try:
        if _written_in_place(given, path):
            with open(given, "ab") as f:
                yield f
            return
        with _renamed_into_place(path) as f:
            yield f
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a failed write() names no file (a full disk)
            e.filename = str(given)
        raise


@contextmanager
def _renamed_into_place(path: Path) -> Iterator[IO[bytes]]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2,
                      default: Callable[[Any], Any] | None = None) -> None:
    """`obj` as JSON; `default` turns values json cannot encode into ones it can (e.g. `str`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False, default=default) + "\n").encode())


def atomic_save_tensors(path: str | Path, tensors: dict) -> None:
    """safetensors file (no pickle) written atomically."""
    from safetensors.torch import save as safetensors_bytes

    atomic_write_bytes(path, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """For optimizer state: plain containers of tensors, read back with weights_only=True."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


MAX_JSON_BYTES = 64 << 20  # far above any meta, manifest or state harp writes


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """`path` opened for binary reading; ValueError("not a regular file") for a fifo, which would block
    the open and then the read forever, or a device such as /dev/zero, which never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a fifo must not wait for a writer
    try:
        # checked before fdopen, which refuses a directory with an error naming the fd, not the path
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: str | Path) -> Any:
    """A JSON file harp reads back (meta, manifest, state): UTF-8; OSError if unreadable, ValueError if
    not JSON, including nesting too deep for the parser (a RecursionError from json, else a traceback),
    or not a regular file of at most MAX_JSON_BYTES (a fifo blocked the read, /dev/zero filled memory)."""
    with open_regular(path) as f:
        info = os.fstat(f.fileno())
        if info.st_size > MAX_JSON_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB a harp JSON file has")
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"more than the {MAX_JSON_BYTES >> 20} MiB a harp JSON file has")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
