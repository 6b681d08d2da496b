"""harp-bench: latency and robustness reports of exported artifacts."""

from pathlib import Path


def results_dir() -> Path:
    """Where the benchmark scripts write results by default: the tracked bench/results/ of a source
    checkout (editable install), else ./bench-results (an installed wheel: never inside site-packages)."""
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").is_file():
        return here / "results"
    return Path.cwd() / "bench-results"
