"""`python -m harp.kernels._microbench`: bad options are one line and exit 2, before any timing."""

from __future__ import annotations

import pytest

from harp.cli_errors import run_script
from harp.kernels import _microbench


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be in 1.."),  # had been a ValueError traceback
    (["--budget", "-1"], "--budget must be >= 0"),  # these had been accepted and run
    (["--densities", "1.5"], "--densities must be in (0, 1]"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--threads", "x"], "invalid int value"),
])
def test_bad_options_are_one_line_and_exit_2(argv, message, capsys):
    assert run_script(lambda: _microbench.main(argv), "_microbench") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
