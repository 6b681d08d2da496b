"""Kernel tests run with sleeping (not spinning) idle threads: robust on a busy machine."""

from harp.kernels.threads import init_threads


def pytest_configure(config):
    init_threads()
