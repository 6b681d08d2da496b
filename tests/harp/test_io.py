"""Atomic writes: symlinks and device files keep what they are; output paths are checked up front."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harp.errors import HarpError
from harp.io import atomic_write_bytes, check_output_file


def test_writing_through_a_symlink_replaces_the_file_it_names(tmp_path: Path) -> None:
    target = tmp_path / "results" / "latency.md"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.md"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["latency.md"]  # no temp file left


def test_a_device_file_is_written_in_place_not_replaced() -> None:
    atomic_write_bytes("/dev/null", b"discarded")  # a rename over it would make /dev/null a regular file
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("case, expected", [
    ("missing_folder", "folder .* does not exist"),
    ("folder", "is a folder, not a file"),
    ("file_as_folder", "Not a directory"),
])
def test_check_output_file_refuses_what_cannot_be_written(tmp_path: Path, case: str, expected: str) -> None:
    (tmp_path / "a_file").write_text("x")
    path = {"missing_folder": tmp_path / "nope" / "out.json", "folder": tmp_path,
            "file_as_folder": tmp_path / "a_file" / "out.json"}[case]
    with pytest.raises(HarpError, match=expected):
        check_output_file(path)


def test_check_output_file_accepts_new_and_existing_files_and_devices(tmp_path: Path) -> None:
    (tmp_path / "old.md").write_text("x")
    for path in (tmp_path / "new.md", tmp_path / "old.md", "/dev/null"):
        check_output_file(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_file_refuses_a_read_only_folder(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(HarpError, match="permission denied"):
            check_output_file(tmp_path / "out.json")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_streams_path_is_appended_to_not_renamed_over(tmp_path: Path) -> None:
    # `--json /dev/stdout >> log.txt`: /dev/stdout resolves to log.txt, which a rename would replace.
    log = tmp_path / "log.txt"
    log.write_text("earlier lines\n")
    with open(log, "ab") as stdout:
        atomic_write_bytes(f"/proc/self/fd/{stdout.fileno()}", b"{}\n")
    assert log.read_text() == "earlier lines\n{}\n"


def test_check_output_file_refuses_a_symlink_loop_and_a_name_too_long(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(HarpError, match="symbolic links"):
        check_output_file(tmp_path / "a")
    with pytest.raises(HarpError, match="File name too long"):
        check_output_file(tmp_path / ("x" * 256))
    atomic_write_bytes(tmp_path / ("x" * 255), b"fits")  # the temporary name beside it is shorter
    assert (tmp_path / ("x" * 255)).read_bytes() == b"fits"


def test_read_json_reads_only_regular_files_of_bounded_size(tmp_path: Path) -> None:
    from harp.io import read_json

    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    os.mkfifo(tmp_path / "fifo.json")  # a manifest.json that is a fifo had blocked `harp run` forever
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(tmp_path / "fifo.json")
    (tmp_path / "dir.json").mkdir()  # had been "[Errno 21] Is a directory: 12", naming a leaked fd
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(tmp_path / "dir.json")
    assert len(os.listdir("/proc/self/fd")) == fds  # the refused file's descriptor is closed
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # had been read until memory ran out
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(tmp_path / "zero.json")
    with open(tmp_path / "big.json", "wb") as f:  # sparse: no disk space taken
        f.truncate((64 << 20) + 1)
    with pytest.raises(ValueError, match="more than the 64 MiB"):
        read_json(tmp_path / "big.json")
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
