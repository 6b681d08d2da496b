"""run_script: how every way a command can end maps to one stderr line and an exit status."""

import errno

import click
import pytest

from harp.cli_errors import run_script
from harp.errors import HarpError


def _raise(error: BaseException):
    def main():
        raise error
    return main


@pytest.mark.parametrize("error, code, line", [
    (HarpError("bad input"), 2, "tool: error: bad input"),
    (HarpError("first\nsecond\nthird"), 2, "tool: error: first [2 more lines]"),
    (click.UsageError("no such option: --x"), 2, "tool: error: no such option: --x"),
    (OSError(errno.ENOSPC, "No space left on device", "out.md"), 2, "tool: error: No space left on device: out.md"),
    (PermissionError(errno.EACCES, "Permission denied"), 2, "tool: error: Permission denied"),
    (ModuleNotFoundError("No module named 'onnx'", name="onnx"), 2,
     "tool: error: this needs onnx, which is not installed here"),
    (click.Abort(), 130, "tool: aborted"),
    (KeyboardInterrupt(), 130, "tool: interrupted"),
])
def test_each_ending_is_one_line_and_its_exit_status(capsys, error, code, line):
    assert run_script(_raise(error), "tool") == code
    out, err = capsys.readouterr()
    assert out == "" and err == line + "\n"


def test_success_and_click_exits_keep_their_status(capsys):
    assert run_script(lambda: None, "tool") == 0
    assert run_script(_raise(click.exceptions.Exit(3)), "tool") == 3
    assert capsys.readouterr().err == ""


def test_bugs_are_not_hidden_as_user_errors():
    # a traceback is the right output for a bug in harp, or a part of harp missing (a broken install)
    with pytest.raises(ZeroDivisionError):
        run_script(_raise(ZeroDivisionError()), "tool")
    with pytest.raises(ModuleNotFoundError):
        run_script(_raise(ModuleNotFoundError("No module named 'harp.gone'", name="harp.gone")), "tool")
