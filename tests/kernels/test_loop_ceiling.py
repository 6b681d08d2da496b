"""The sparse inner-loop benchmark script: its table, and bad options as one line and exit 2."""

import pytest

from harp.cli_errors import run_script
from harp.kernels import _loop_ceiling


def test_writes_one_row_per_working_set(tmp_path):
    out = tmp_path / "loop.md"
    assert run_script(lambda: _loop_ceiling.main(["--budget", "0.001", "--md", str(out)]), "_loop_ceiling") == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and ("KiB" in line or "MiB" in line)]
    assert len(rows) == len(_loop_ceiling.CASES)
    for row in rows:
        aligned, unaligned = (float(cell) for cell in row.strip("|").split("|")[2:4])
        assert aligned > 0 and unaligned > 0


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "--budget must be > 0"),
    (["--budget", "x"], "invalid float value"),
    (["--md", "/nonexistent/loop.md"], "does not exist"),
])
def test_bad_options_are_one_line_and_exit_2(argv, message, capsys):
    assert run_script(lambda: _loop_ceiling.main(argv), "_loop_ceiling") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
