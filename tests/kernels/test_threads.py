"""Thread-count control."""

import pytest

from harp.kernels.threads import get_num_threads, init_threads, max_threads, set_num_threads


def test_set_and_get_num_threads():
    before = get_num_threads()
    try:
        set_num_threads(1)
        assert get_num_threads() == 1
        set_num_threads(max_threads())
        assert get_num_threads() == max_threads()
    finally:
        set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 10**6, 1.5, True])
def test_set_num_threads_rejects(bad):
    with pytest.raises(ValueError, match="set_num_threads"):
        set_num_threads(bad)


def test_init_threads_rejects_unknown_policy():
    with pytest.raises(ValueError, match="wait_policy"):
        init_threads(wait_policy="busy")


def test_init_threads_reports_pool_already_running():
    before = get_num_threads()  # numba's pool is running once anything asked for threads
    try:
        assert init_threads(1) is False
        assert get_num_threads() == 1
    finally:
        set_num_threads(before)


def test_wait_policy_comes_from_the_environment(monkeypatch):
    from harp.kernels.threads import env_wait_policy

    monkeypatch.delenv("HARP_WAIT_POLICY", raising=False)
    assert env_wait_policy() == "spin"
    monkeypatch.setenv("HARP_WAIT_POLICY", "passive")
    assert env_wait_policy() == "passive"
    monkeypatch.setenv("HARP_WAIT_POLICY", "sleepy")
    with pytest.raises(ValueError, match="HARP_WAIT_POLICY must be one of spin, passive, active, got 'sleepy'"):
        init_threads()


@pytest.mark.parametrize("env, message", [
    # each had been a numba ValueError traceback from `import numba` or from the first kernel
    ({"NUMBA_NUM_THREADS": "0"}, "harp: error: NUMBA_NUM_THREADS=0: numba needs at least one thread"),
    ({"NUMBA_THREADING_LAYER": "bogus"}, "harp: error: numba cannot start its threads "
                                         "(NUMBA_THREADING_LAYER=bogus): The threading layer requested 'bogus'"),
])
def test_a_numba_environment_that_cannot_start_is_one_line(env, message):
    import os
    import subprocess
    import sys

    code = ("from harp.cli_errors import run_script\n"
            "from harp.kernels.threads import init_threads\n"
            "raise SystemExit(run_script(init_threads, 'harp'))\n")  # what a runtime does at load
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
