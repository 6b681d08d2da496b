"""The `harp-bench` command: latency, kernels, robustness and report of exported artifacts.

Commands live one per module and are registered in COMMANDS below; each maps its
options to a typed function that tests call directly. With no command,
`harp-bench` times runs/demo/artifact on every backend installed (building it with
`harp pipeline --dataset digits --sparsity 0.99 --out runs/demo` first if it is
missing). Bad input is one line on stderr and exit status 2, as for `harp`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from harp.cli_errors import print_warnings_as_one_line, run_cli
from harp.lazy_group import LazyCommand, LazyGroup

DEMO_RUN = Path("runs/demo")
DEMO_ARTIFACT = DEMO_RUN / "artifact"
DEMO_ITERS = 50  # the tiny digits model: 4 backends x 2 batch sizes finish well within a minute


# A command's module is imported only when it runs, so that `harp-bench latency` works on a
# device without torch; each summary is the first line of its command's help.
COMMANDS: dict[str, LazyCommand] = {
    "latency": LazyCommand("harp.bench.latency_bench", "latency_command",
                           "Latency, throughput and memory of every backend on ARTIFACT (or on a what-if --arch)."),
    "kernels": LazyCommand("harp.bench.kernels_bench", "kernels_command",
                           "Per-layer sparse vs dense kernel vs torch vs onnxruntime on ARTIFACT's own layer shapes."),
    "robustness": LazyCommand("harp.bench.robustness", "robustness_command",
                              "Clean and adversarial accuracy of every backend of each ARTIFACT, curves and sanity "
                              "checks.", ("torch",)),
    "report": LazyCommand("harp.bench.report", "report_command",
                          "Write OUT/report.md: model card, latency, robustness, curves and sanity checks of each "
                          "ARTIFACT.", ("torch",)),
}


@click.group(cls=LazyGroup, commands=COMMANDS, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harp")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """harp-bench: latency, per-layer kernels and robustness of exported harp artifacts.

    With no command: time runs/demo/artifact on torch, onnxruntime, onnxruntime-sparse and harp (those installed).
    """
    from harp.kernels.threads import env_wait_policy

    env_wait_policy()  # the harp backend's thread policy: a typo fails here, before any backend runs
    if ctx.invoked_subcommand is None:
        demo_latency()


def demo_latency() -> None:
    """Build runs/demo/artifact if missing, then print its latency table (batch 1 and 16, one thread)."""
    from harp.export.artifact import open_artifact

    from .latency_bench import LatencyOptions, emit, run_latency, with_runnable_backends

    if not (DEMO_ARTIFACT / "manifest.json").is_file():
        from harp.errors import HarpError
        from harp.pipeline import PIPELINE_FILE

        if (DEMO_RUN.exists() and not DEMO_RUN.is_dir()) or (
                DEMO_RUN.is_dir() and any(DEMO_RUN.iterdir()) and not (DEMO_RUN / PIPELINE_FILE).is_file()):
            raise HarpError(f"{DEMO_RUN} holds neither an artifact nor a harp pipeline run; move it away to let "
                            "harp-bench build the demo there, or time an artifact: harp-bench latency ARTIFACT")
        from harp.pipeline import PipelineOptions, check_continues, run_pipeline

        options = PipelineOptions(dataset="digits", sparsity=0.99)
        try:
            check_continues(DEMO_RUN, options)
        except HarpError:  # its advice (the same options, or --force) is for `harp pipeline`, not harp-bench
            raise HarpError(f"{DEMO_RUN} holds a pipeline run made with other options than the demo's; `make demo` "
                            "rebuilds it, or time an artifact: harp-bench latency ARTIFACT") from None
        click.echo(f"{DEMO_ARTIFACT} is missing: running harp pipeline --dataset digits --sparsity 0.99 "
                   f"--out {DEMO_RUN} (about 2 minutes) ...", err=True)
        run_pipeline(options, DEMO_RUN, quiet=True, log=lambda *a, **k: None)
    art = open_artifact(DEMO_ARTIFACT)
    emit(run_latency(art, with_runnable_backends(art, LatencyOptions(iters=DEMO_ITERS, warmup=5))), None, None, None)


def main() -> None:
    print_warnings_as_one_line("harp-bench")
    sys.exit(run_cli(cli, prog="harp-bench"))
