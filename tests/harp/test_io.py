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
    ("file_as_folder", "does not exist"),
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
