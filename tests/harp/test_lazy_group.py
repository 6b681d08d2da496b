"""The `harp` and `harp-bench` command registries: listed without importing the commands,
and a command whose packages are missing fails in one line."""

import importlib
import json
import subprocess
import sys

import click
import pytest

from harp.bench.cli import COMMANDS as BENCH_COMMANDS
from harp.cli import COMMANDS, run_cli
from harp.lazy_group import LazyCommand, LazyGroup
from tests.conftest import NOT_ON_DEVICE

REGISTRIES = {"harp": ("harp.cli", COMMANDS), "harp-bench": ("harp.bench.cli", BENCH_COMMANDS)}


@pytest.mark.parametrize("prog", REGISTRIES)
def test_each_summary_is_the_first_line_of_its_commands_help(prog):
    for name, entry in REGISTRIES[prog][1].items():
        command = getattr(importlib.import_module(entry.module), entry.attr)
        assert command.name == name
        assert command.help.strip().splitlines()[0] == entry.summary, f"{prog} {name}"


@pytest.mark.parametrize("prog", REGISTRIES)
def test_help_imports_no_command(prog):
    # Listing the commands used to import all of them, torch included: 4 s for `harp --help`.
    module = REGISTRIES[prog][0]
    code = (f"import sys, json\nfrom {module} import cli\ncli.main(['--help'], prog_name={prog!r}, "
            "standalone_mode=False)\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or '.commands.' in m or m.endswith(('_bench', '.robustness', '.report')))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listing, imported = result.stdout.rsplit("\n", 2)[:2]
    assert json.loads(imported) == []
    assert [line.split()[0] for line in listing.split("Commands:")[1].strip().splitlines()] == \
        list(REGISTRIES[prog][1])


def test_commands_declared_torch_free_import_on_a_device(device_python):
    # A command whose declared needs a device has must not import a package it does not declare.
    free = [entry.module for registry in (COMMANDS, BENCH_COMMANDS) for entry in registry.values()
            if not set(entry.needs) & set(NOT_ON_DEVICE)]
    assert "harp.commands.run" in free and "harp.bench.latency_bench" in free
    result = device_python("import importlib\nfor m in sys.argv[1:]: importlib.import_module(m)", *free)
    assert result.returncode == 0, result.stderr


def _group(**commands: LazyCommand) -> click.Group:
    return LazyGroup("tool", commands=commands, help="A tool.")


def test_a_missing_declared_package_is_found_without_importing_the_command(capsys):
    group = _group(build=LazyCommand("harp.no_such_module", "cmd", "Build it.", ("harp_absent_pkg", "click")))
    assert run_cli(group, ["--help"], prog="tool") == 0
    assert "build  (unavailable here: needs harp_absent_pkg)" in capsys.readouterr().out
    assert run_cli(group, ["build", "--out", "x"], prog="tool") == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "tool: error: tool build needs harp_absent_pkg, which is not installed here\n"


def test_an_undeclared_missing_package_still_fails_in_one_line(capsys):
    group = _group(build=LazyCommand("harp_absent_pkg.cli", "cmd", "Build it."))
    assert run_cli(group, ["build"], prog="tool") == 2
    assert capsys.readouterr().err == "tool: error: tool build needs harp_absent_pkg, which is not installed here\n"
    broken = _group(build=LazyCommand("harp.no_such_module", "cmd", "Build it."))
    with pytest.raises(ModuleNotFoundError):  # part of harp missing is a broken install, not bad input
        run_cli(broken, ["build"], prog="tool")
