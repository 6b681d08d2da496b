"""numba's on-disk kernel cache failing: one NumbaSetupError that says what to do, not a traceback."""

from __future__ import annotations

import importlib.util
import sys

import click
import numba
import numpy as np
import pytest
from numba.core import caching

from harp.cli_errors import run_script
from harp.kernels.threads import NumbaSetupError, numba_cache_error

PROBE = "from numba import njit\n\n@njit(cache=True)\ndef plus_one(x):\n    return x + 1\n"


def load_probe(tmp_path, monkeypatch):
    """A fresh module holding one cached kernel, written to disk as numba caches only functions of files."""
    path = tmp_path / "harp_cache_probe.py"
    path.write_text(PROBE)
    spec = importlib.util.spec_from_file_location("harp_cache_probe", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "harp_cache_probe", module)
    spec.loader.exec_module(module)
    return module


def damaged_cache_error(tmp_path, monkeypatch) -> Exception:
    # numba re-reads its settings from the environment when that changes: set both
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    assert load_probe(tmp_path, monkeypatch).plus_one(1) == 2  # compiled and cached
    data = list((tmp_path / "cache").rglob("*.nbc"))
    assert data
    for file in data:
        file.write_bytes(b"")  # cut short, as by a power loss
    with pytest.raises(Exception) as error:
        load_probe(tmp_path, monkeypatch).plus_one(1)  # the next process reads the cache back
    return error.value


def no_cache_folder_error(tmp_path, monkeypatch) -> Exception:
    # no locator: what numba finds where the package, $HOME and $NUMBA_CACHE_DIR are all read-only
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(Exception) as error:
        load_probe(tmp_path, monkeypatch)
    return error.value


def test_a_damaged_cache_file_is_named_with_what_to_delete(tmp_path, monkeypatch):
    error = damaged_cache_error(tmp_path, monkeypatch)
    assert isinstance(error, EOFError)  # numba's own error, which click reports as "aborted"
    converted = numba_cache_error(error)
    assert isinstance(converted, NumbaSetupError)
    assert "kernel cache is damaged" in str(converted) and str(tmp_path / "cache") in str(converted)


def test_no_writable_cache_folder_says_to_set_numba_cache_dir(tmp_path, monkeypatch):
    error = no_cache_folder_error(tmp_path, monkeypatch)
    assert "cannot cache function" in str(error)
    assert "set NUMBA_CACHE_DIR" in str(numba_cache_error(error))


def test_other_errors_are_not_taken_for_cache_errors():
    for error in (EOFError("input"), RuntimeError("cannot cache function 'f'"), ValueError("x")):
        assert numba_cache_error(error) is None  # not raised inside numba's cache


def test_the_clis_print_cache_errors_as_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    no_folder = no_cache_folder_error(tmp_path / "a", monkeypatch)
    monkeypatch.undo()
    damaged = damaged_cache_error(tmp_path / "b", monkeypatch)

    def raising(error):
        def main():
            raise error
        return main

    def aborted_by_click():  # click turns an EOFError inside a command into Abort
        raise click.Abort() from damaged

    for main, message in [(raising(no_folder), "set NUMBA_CACHE_DIR"), (raising(damaged), "cache is damaged"),
                          (aborted_by_click, "cache is damaged")]:
        assert run_script(main, "harp") == 2
        err = capsys.readouterr().err
        assert err.startswith("harp: error: numba") and message in err and err.count("\n") == 1


def test_load_runtime_raises_a_cache_error_as_numba_setup_error(tmp_path, monkeypatch):
    from harp.export.bundle import write_bundle
    from harp.export.graph import Graph, Node
    from harp.kernels import runtime as runtime_module

    damaged = damaged_cache_error(tmp_path, monkeypatch)
    weight = np.eye(3, 8, dtype=np.float32)
    graph = Graph("x", (2, 2, 2), "y", [Node("flatten", "flat", ("x",), "f"),
                                        Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.w"})], {"fc.w": weight})
    write_bundle(graph, tmp_path / "model.harpz")

    def warmup(self):  # the kernels' first call is where numba reads the cache back
        raise damaged

    monkeypatch.setattr(runtime_module.Runtime, "warmup", warmup)
    with pytest.raises(NumbaSetupError, match="kernel cache is damaged"):
        runtime_module.load_runtime(tmp_path / "model.harpz")
    monkeypatch.undo()  # the same bundle loads once the cache is sound
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    np.testing.assert_allclose(runtime_module.load_runtime(tmp_path / "model.harpz").run(x), [[0, 1, 2]])
