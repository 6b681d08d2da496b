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
