"""`harp-bench latency`: every backend x batch size x thread count on one artifact, each in its own process.

    run_latency(artifact_dir, LatencyOptions(...)) -> {"artifact", "machine", "protocol", "results": [...]}

Protocol (`harp.bench.latency` and `harp.bench.measure` hold the details):
seeded uniform [0, 1) inputs, the same for every backend; one process per
(backend, thread count) with OMP_NUM_THREADS = NUMBA_NUM_THREADS = threads and
the backend's own thread setting (numba threads, onnxruntime intra-op threads with
one inter-op thread and sequential execution, torch.set_num_threads); load,
compilation, per-batch kernel choice and `warmup` calls outside the timed region;
then `iters` (>= 50) timed calls, or as many as fill `seconds`; p50/p90/p99, mean
and min per call. Throughput is batch / p50. Peak memory is the process's
peak resident set size (see `measure`). Speedup is onnxruntime-on-model.onnx p50 / this p50
at the same batch size and thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click

from harp.commands.options import POSITIVE, SEED, FiniteFloat
from harp.errors import HarpError
from harp.export.artifact import Artifact, open_artifact
from harp.io import atomic_write_bytes, atomic_write_json

from .artifact import BACKEND_FILES, check_backend_packages, check_backends, default_backends
from .latency import DEFAULT_WARMUP, MIN_ITERS
from .machine import machine_info, usable_cores
from .options import CommaList, check_distinct_outputs, json_out, md_out, plot_out, shape
from .tables import fmt
from .whatif import PRUNINGS, build_whatif_artifact

BACKEND_ORDER = ("torch", "onnxruntime", "onnxruntime-sparse", "harp")
BASELINE = "onnxruntime"  # speedups are relative to onnxruntime on the dense model.onnx
CHILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class LatencyOptions:
    backends: tuple[str, ...] = BACKEND_ORDER
    batches: tuple[int, ...] = (1, 16)
    threads: tuple[int, ...] = (1,)
    warmup: int = DEFAULT_WARMUP
    iters: int = 100
    seconds: float | None = None  # when set, timed calls fill about this many seconds (>= MIN_ITERS calls)
    seed: int = 0

    def check(self) -> None:
        if not self.backends or not self.batches or not self.threads:
            raise HarpError("backends, batch sizes and thread counts must each name at least one value")
        if min(self.batches) < 1 or min(self.threads) < 1:
            raise HarpError(f"batch sizes and thread counts must be >= 1, got {self.batches} and {self.threads}")
        cores = usable_cores()  # more threads than that would time them taking turns
        if max(self.threads) > cores:
            raise HarpError(f"--threads {max(self.threads)} exceeds the {cores} cores this process may use")
        if self.iters < MIN_ITERS:
            raise HarpError(f"--iters must be >= {MIN_ITERS} (percentiles need them), got {self.iters}")
        if self.warmup < 0:
            raise HarpError(f"--warmup must be >= 0, got {self.warmup}")
        if self.seconds is not None and self.seconds <= 0:
            raise HarpError(f"--seconds must be > 0, got {self.seconds}")


def run_latency(artifact: str | os.PathLike[str] | Artifact, options: LatencyOptions = LatencyOptions(),
                *, warn_busy: bool = True) -> dict[str, Any]:
    """Time every (backend, batch, threads) of `options` on the artifact; see the module doc."""
    art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
    check_latency(art, options)
    machine = machine_info(max(options.threads), warn=warn_busy)
    results = []
    for threads in options.threads:
        for backend in options.backends:
            child = run_isolated(art, backend, threads, options)
            for row in child["rows"]:
                results.append(_result_row(art, backend, row, child["memory"]))
    _add_speedups(results)
    return {"artifact": {"path": str(art.root), "name": art.name, "architecture": art.architecture,
                         "dataset": art.dataset, "sparsity": art.sparsity, "input_shape": list(art.input_shape)},
            "machine": machine, "protocol": asdict(options) | {
                "iters": None if options.seconds else options.iters,  # with --seconds, each row counts its own
                "isolation": "one process per backend and thread count"},
            "results": results}


def check_latency(art: Artifact, options: LatencyOptions) -> None:
    """HarpError for what `run_latency` would refuse: bad options, a backend the artifact or machine lacks."""
    options.check()
    check_backends(art, list(options.backends))
    check_backend_packages(list(options.backends))


def run_isolated(art: Artifact, backend: str, threads: int, options: LatencyOptions) -> dict[str, Any]:
    """`harp.bench.measure` in a fresh process with the thread environment set; its parsed JSON."""
    args = {"artifact": str(art.root), "backend": backend, "threads": threads, "batches": list(options.batches),
            "warmup": options.warmup, "iters": options.iters, "seconds": options.seconds, "seed": options.seed}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    try:
        done = subprocess.run([sys.executable, "-m", "harp.bench.measure", json.dumps(args)], env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise HarpError(f"{backend} with {threads} thread(s) took longer than {CHILD_TIMEOUT_S} s") from e
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if "error" in result:
        raise HarpError(f"backend {backend} ({BACKEND_FILES[backend]}) failed: {result['error']}")
    if done.returncode != 0 or "rows" not in result:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarpError(f"backend {backend} with {threads} thread(s) crashed (exit {done.returncode}): {tail}")
    return result


def _result_row(art: Artifact, backend: str, stats: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    return {
        "backend": backend, "batch": stats["batch"], "threads": stats["threads"],
        "p50_ms": stats["median_ms"], "p90_ms": stats["p90_ms"], "p99_ms": stats["p99_ms"],
        "threads_applied": stats["threads_applied"],
        "mean_ms": stats["mean_ms"], "min_ms": stats["min_ms"], "iters": stats["iters"], "warmup": stats["warmup"],
        "throughput": stats["batch"] / (stats["median_ms"] / 1e3),
        "size_bytes": art.file(BACKEND_FILES[backend]).stat().st_size, "size_file": BACKEND_FILES[backend],
        "peak_rss_mb": stats["peak_rss_mb"], "base_rss_mb": memory["base_rss_mb"],
        "model_rss_mb": stats["peak_rss_mb"] - memory["base_rss_mb"], "load_s": memory["load_s"],
        "load_before": stats["load_before"], "busy": stats["busy"], "speedup_vs_onnxruntime": None,
    }


def _add_speedups(results: list[dict[str, Any]]) -> None:
    base = {(r["batch"], r["threads"]): r["p50_ms"] for r in results if r["backend"] == BASELINE}
    for r in results:
        ref = base.get((r["batch"], r["threads"]))
        r["speedup_vs_onnxruntime"] = ref / r["p50_ms"] if ref else None


HEADERS = ("backend", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "img/s", "peak RSS MB", "model MB",
           "file kB", "vs ORT")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The cells of the latency table (HEADERS), one row per result."""
    return [[r["backend"], str(r["batch"]), str(r["threads"]), fmt(r["p50_ms"]), fmt(r["p90_ms"]),
             fmt(r["p99_ms"]), fmt(r["throughput"], ",.0f"), fmt(r["peak_rss_mb"], ".0f"),
             fmt(r["model_rss_mb"], ".1f"), fmt(r["size_bytes"] / 1000, ",.1f"),
             fmt(r["speedup_vs_onnxruntime"], ".2f") + ("x" if r["speedup_vs_onnxruntime"] else "")]
            for r in result["results"]]


def latency_markdown(result: dict[str, Any]) -> str:
    from .machine import describe
    from .tables import markdown_table

    p = result["protocol"]
    timed = f"{p['iters']} timed calls" if p["seconds"] is None else f"timed calls filling ~{p['seconds']} s"
    busy = [r for r in result["results"] if r["busy"]]
    lines = [
        f"Artifact `{result['artifact']['path']}` ({result['artifact']['architecture']}, "
        f"sparsity {result['artifact']['sparsity']:.2%}).",
        "",
        f"Machine: {describe(result['machine'])}.",
        "",
        f"Protocol: seeded uniform [0, 1) inputs (seed {p['seed']}); one process per backend and thread count; "
        f"{p['warmup']} warm-up calls outside the timed region, then {timed}; thread count aligned across "
        "torch, onnxruntime and numba. *peak RSS* = the backend process's peak resident set size (VmHWM); "
        "*model MB* = peak minus the RSS after importing the backend's library. *vs ORT* = onnxruntime "
        "(dense model.onnx) p50 / p50.",
        "",
        markdown_table(HEADERS, table_rows(result)),
    ]
    if busy:
        lines += ["", f"Warning: {len(busy)} of {len(result['results'])} rows were timed on a busy machine "
                      "(load average above the free cores); their times are inflated."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], json_path: str | None, md_path: str | None,
                  markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write the result as JSON ('-' = stdout) and as Markdown (`markdown(result)`), where asked."""
    if json_path == "-":
        click.echo(json.dumps(result, indent=2))
    elif json_path:
        atomic_write_json(json_path, result)
    if md_path:
        atomic_write_bytes(md_path, markdown(result).encode())


def latency_text(result: dict[str, Any]) -> str:
    from .machine import describe
    from .tables import text_table

    return f"{result['artifact']['path']}\n{describe(result['machine'])}\n\n" + text_table(HEADERS,
                                                                                          table_rows(result))


WHATIF_OPTIONS = ("input_shape", "classes", "sparsity", "pruning")  # latency_command's what-if mode only


@click.command("latency")
@click.argument("artifact", required=False, type=click.Path())
@click.option("--backends", type=CommaList(choices=BACKEND_ORDER), default=None,
              help=f"Comma-separated backends ({', '.join(BACKEND_ORDER)}). Default: every one that the artifact "
                   "and this machine can run.")
@click.option("--batch", "batches", type=CommaList(int, minimum=1), default="1,16", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--threads", type=CommaList(int, minimum=1), default="1", show_default=True,
              help="Comma-separated thread counts (every backend gets the same).")
@click.option("--warmup", type=click.IntRange(min=0), default=DEFAULT_WARMUP, show_default=True,
              help="Untimed calls before timing.")
@click.option("--iters", type=click.IntRange(min=MIN_ITERS), default=100, show_default=True,
              help="Timed calls per cell.")
@click.option("--seconds", type=POSITIVE, default=None,
              help="Instead of --iters: time calls for about this long per cell.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--arch", default=None, help="What-if mode: benchmark this architecture with random weights.")
@click.option("--input-shape", default="3,32,32", show_default=True, help="What-if mode: C,H,W.")
@click.option("--classes", type=click.IntRange(min=2), default=10, show_default=True, help="What-if mode.")
@click.option("--sparsity", type=FiniteFloat(min=0, max=1, max_open=True), default=0.99, show_default=True,
              help="What-if mode.")
@click.option("--pruning", type=click.Choice(PRUNINGS), default="global-magnitude", show_default=True,
              help="What-if mode: one global magnitude threshold, or every layer at the same density.")
@json_out
@md_out
@plot_out
@click.pass_context
def latency_command(ctx, artifact, backends, batches, threads, warmup, iters, seconds, seed, arch, input_shape,
                    classes, sparsity, pruning, json_path, md_path, plot_path):
    """Latency, throughput and memory of every backend on ARTIFACT (or on a what-if --arch)."""
    options = LatencyOptions(tuple(backends or BACKEND_ORDER), tuple(batches), tuple(threads), warmup, iters,
                             seconds, seed)
    options.check()  # before a what-if export
    check_distinct_outputs(json=json_path, md=md_path, plot=plot_path)
    if seconds is not None and ctx.get_parameter_source("iters") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("give --iters or --seconds, not both")
    if artifact is None and arch is None:
        raise click.UsageError("give an ARTIFACT to time, or --arch to time a random model (what-if mode)")
    if artifact is not None and arch is not None:
        raise click.UsageError("give either ARTIFACT or --arch (what-if mode), not both")
    if artifact is not None:  # the what-if options describe a random model; ARTIFACT has its own
        given = [f"--{name.replace('_', '-')}" for name in WHATIF_OPTIONS
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --arch "
                                   "(what-if mode); ARTIFACT is timed as exported")
    if arch is None:
        art = open_artifact(artifact)  # once: opening checks every file's hash
        result = run_latency(art, options if backends else with_runnable_backends(art, options))
    else:
        with tempfile.TemporaryDirectory(prefix="harp-bench-whatif-") as work:
            click.echo(f"what-if: exporting {arch} {input_shape} with random weights at {sparsity:.2%} "
                       f"({pruning}) ...", err=True)
            out = build_whatif_artifact(arch, shape(input_shape), classes, sparsity, pruning, Path(work) / arch)
            art = open_artifact(out)
            result = run_latency(art, options if backends else with_runnable_backends(art, options))
        result["artifact"]["path"] = f"what-if {arch} (random weights, exported to a temporary folder)"
    emit(result, json_path, md_path, plot_path)


def with_runnable_backends(art: Artifact, options: LatencyOptions) -> LatencyOptions:
    """`options` timing the backends that the artifact and this machine can run; a note on stderr
    names the others (`--backends` makes a missing one an error instead)."""
    note = lambda s: click.echo(f"harp-bench: note: {s}", err=True)  # noqa: E731
    return replace(options, backends=default_backends(art, "timing", note))


def emit(result: dict[str, Any], json_path: str | None, md_path: str | None, plot_path: str | None) -> None:
    """The terminal table (unless the JSON goes to stdout) and the files asked for."""
    if json_path != "-":
        click.echo(latency_text(result))
    write_outputs(result, json_path, md_path, latency_markdown)
    if plot_path:
        from .plots import latency_plot

        latency_plot(result, plot_path)
