"""One-line user errors for the `harp` and `harp-bench` commands (torch-free).

Imports neither torch nor any command, so that `harp run` and `harp-bench latency` on
a device with only numpy, numba, click (and onnxruntime) map bad input to the same one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import signal
import threading
import warnings
from collections.abc import Callable
from typing import NoReturn

import click

from .errors import HarpError


def user_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean bad input, not a bug in harp."""
    errors: list[type[Exception]] = [HarpError]
    for module, name in (("harp.export.graph", "GraphError"), ("harp.export.bundle", "BundleError"),
                         ("harp.export.errors", "ExportError"), ("harp.export.csr", "CSRError"),
                         ("harp.kernels.threads", "WaitPolicyError"), ("harp.kernels.threads", "NumbaSetupError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_cli(group: click.Group, args: list[str] | None = None, prog: str = "harp") -> int:
    """Invoke a click group; user errors become one line on stderr and exit status 2."""
    return run_script(lambda: group.main(args=args, prog_name=prog, standalone_mode=False), prog)


class Terminated(BaseException):
    """SIGTERM (kill, timeout, a scheduler stopping the job), raised in the main thread as Ctrl-C raises
    KeyboardInterrupt, so that the way out removes temporary files as it does for Ctrl-C. A
    BaseException: no `except Exception` on the way may swallow it."""


def _terminate(signum, frame) -> NoReturn:
    raise Terminated()


def run_script(main: Callable[[], object], prog: str) -> int:
    """Run a command's main (a click group's, or an argparse benchmark script's); user errors become one
    line on stderr and exit status 2; SIGTERM and Ctrl-C stop it cleanly (status 143 and 130)."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers live
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(main, prog)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def script_main(main: Callable[[], object], prog: str) -> int:
    """`run_script` for a script run as __main__ (`python -m harp.bench.X`): its warnings print as one
    line, as harp's and harp-bench's do."""
    print_warnings_as_one_line(prog)
    return run_script(main, prog)


def _run(main: Callable[[], object], prog: str) -> int:
    from harp.kernels.threads import check_numba_environment, numba_cache_error  # numba-free

    try:
        check_numba_environment()  # before anything imports numba
        main()
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.Abort as e:
        # click turns every EOFError into Abort: one from a damaged numba cache file is no Ctrl-D
        cache_error = numba_cache_error(e.__cause__) if e.__cause__ is not None else None
        if cache_error is not None:
            click.echo(f"{prog}: error: {one_line(str(cache_error))}", err=True)
            return 2
        # and every Ctrl-C, outside standalone mode: said as when a script is stopped
        click.echo(f"{prog}: {'interrupted' if isinstance(e.__cause__, KeyboardInterrupt) else 'aborted'}", err=True)
        return 130
    except Terminated:
        click.echo(f"{prog}: terminated", err=True)
        return 128 + signal.SIGTERM
    except click.ClickException as e:
        click.echo(f"{prog}: error: {one_line(e.format_message())}", err=True)
        return 2
    except user_errors() as e:
        click.echo(f"{prog}: error: {one_line(str(e))}", err=True)
        return 2
    except ModuleNotFoundError as e:  # a package this command needs, e.g. torch on a device
        package = missing_package(e)
        if package is None:
            raise
        click.echo(f"{prog}: error: this needs {package}, which is not installed here", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        return 130
    except OSError as e:  # the file system refused: a full disk, a read-only or missing folder
        click.echo(f"{prog}: error: {os_error_line(e)}", err=True)
        return 2
    except Exception as e:  # numba's kernel cache failing where a kernel module is imported, outside load_runtime
        cache_error = numba_cache_error(e)
        if cache_error is None:
            raise
        click.echo(f"{prog}: error: {one_line(str(cache_error))}", err=True)
        return 2
    return 0


def os_error_line(error: OSError) -> str:
    """'No space left on device: out.md' rather than '[Errno 28] No space left on device: ...'."""
    if error.strerror is None:
        return one_line(str(error))
    return error.strerror if error.filename is None else f"{error.strerror}: {error.filename}"


def print_warnings_as_one_line(prog: str) -> None:
    """Show Python warnings (harp's own and its libraries') as `prog: warning: message`, without the
    file, line and source that the default format adds."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(f"{prog}: warning: {one_line(str(message))}", err=True)

    warnings.showwarning = show


def one_line(message: str) -> str:
    """The first line of a message, with a count of the rest: a library's error (onnx's checker
    lists one line per node) must not turn a user error into a page."""
    lines = message.strip().splitlines() or [""]
    return lines[0] if len(lines) == 1 else f"{lines[0]} [{len(lines) - 1} more lines]"


def missing_package(error: ModuleNotFoundError) -> str | None:
    """The package whose absence raised `error`; None when part of harp itself is missing (a broken install)."""
    if error.name is None or error.name.split(".")[0] == "harp":
        return None
    return error.name.split(".")[0]


_freeze_at_exit = False


def freeze_at_exit() -> None:
    """Ask `exit_without_collecting` to skip the collector: for commands that import no torch."""
    global _freeze_at_exit
    _freeze_at_exit = True


def exit_without_collecting() -> None:
    """Freeze the cyclic garbage collector if the command asked for it; call last, right before sys.exit.

    At exit Python runs full collections over every object left: 0.3 s of numba's and
    scipy's after `harp run` had printed its result. Freezing moves them out of the
    collector's reach (files are closed and outputs written by then), but objects left
    unfinalized make torch's triton (nanobind) print every one it holds as leaked, so
    only a command that imports no torch asks for it (`freeze_at_exit`).
    """
    if _freeze_at_exit:
        gc.freeze()


class ScriptArgumentParser(argparse.ArgumentParser):
    """argparse for the benchmark scripts: a bad option is a HarpError, so `run_script` prints it as one line."""

    def error(self, message: str) -> NoReturn:
        raise HarpError(message)
