"""run_script: how every way a command can end maps to one stderr line and an exit status."""

import errno
import subprocess
import sys

import click
import pytest

from harp.cli_errors import Terminated, run_cli, run_script
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
    (Terminated(), 143, "tool: terminated"),
])
def test_each_ending_is_one_line_and_its_exit_status(capsys, error, code, line):
    assert run_script(_raise(error), "tool") == code
    out, err = capsys.readouterr()
    assert out == "" and err == line + "\n"


def test_ctrl_c_in_a_click_command_is_interrupted_not_aborted(capsys):
    # click turns KeyboardInterrupt into Abort outside standalone mode: `harp train` had said "aborted"
    @click.command()
    def stopped():
        raise KeyboardInterrupt

    assert run_cli(stopped, [], prog="tool") == 130
    assert capsys.readouterr().err.strip() == "tool: interrupted"


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


def test_sigterm_stops_a_command_as_ctrl_c_does_leaving_no_temporary_file(tmp_path):
    # kill, timeout and schedulers send SIGTERM: it had ended the process on the spot, leaving an
    # atomic write's temporary file (an export's whole temporary folder) behind
    script = f"""
import os, signal, sys
from harp.cli_errors import run_script
from harp.io import atomic_writer

def main():
    with atomic_writer({str(tmp_path / "out.bin")!r}) as f:
        f.write(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        f.write(b"never")

sys.exit(run_script(main, "tool"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr == "tool: terminated\n", done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry, prog", [("harp", "harp"), ("harp_bench", "harp-bench")])
def test_the_console_scripts_without_click_say_so_in_one_line(device_python, entry, prog):
    # a device that installed only numpy and numba for the runtime had a traceback from `import click`
    code = ("class _NoClick:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'click':\n"
            "            raise ModuleNotFoundError(\"No module named 'click'\", name='click')\n"
            "sys.meta_path.insert(0, _NoClick())\n"
            f"from harp.console import {entry}\n"
            f"sys.argv = ['{prog}', 'info', '.']\n"
            f"{entry}()\n")
    result = device_python(code)
    assert result.returncode == 2
    assert result.stderr == (f"{prog}: error: the {prog} command needs click, which is not installed here "
                             "(pip install click; the Python API harp.kernels.runtime does not need it)\n")
