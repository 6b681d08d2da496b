"""harp-bench: latency and robustness reports of exported artifacts."""

from pathlib import Path

from harp.errors import HarpError
from harp.io import check_output_file


def results_dir() -> Path:
    """Where the benchmark scripts write results by default: the tracked bench/results/ of a source
    checkout (editable install), else ./bench-results (an installed wheel: never inside site-packages)."""
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").is_file():
        return here / "results"
    return Path.cwd() / "bench-results"


def check_report_files(*paths: Path) -> None:
    """Create the folders of the result files a script writes when it ends, and check that they can be
    written there (HarpError if not): before its minutes of work, not after them."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise HarpError(f"cannot write {path}: {path.parent} is a file, not a folder") from None
        except OSError as e:
            raise HarpError(f"cannot write {path}: {e.strerror}") from None
        check_output_file(path)
