"""`harp-bench report`: one Markdown report of one or more artifacts, with its figures, in a folder.

    write_report([artifact_dir, ...], out_dir, ReportOptions(...)) -> Path of report.md

For each artifact: a model card (architecture, dataset, pruning method, sparsity
overall and per layer, with a bar chart), the latency table and plot
(`latency_bench`), and the robustness table (`robustness`); then the robustness
curves of all artifacts overlaid, the sanity checks and the machine. The raw
results are saved beside it as report.json.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from harp.commands.options import SEED
from harp.export.artifact import Artifact, open_artifact
from harp.io import atomic_write_bytes, atomic_write_json, check_output_file
from harp.outdir import check_can_create

from .latency_bench import (BACKEND_ORDER, LatencyOptions, check_latency, latency_markdown, run_latency,
                            with_runnable_backends)
from .machine import describe, machine_info, usable_cores
from .options import CommaList, data_root
from .robustness import ATTACKS, RobustnessOptions, checked_options, robustness_markdown, run_robustness
from .tables import distinct, fmt, markdown_table

REPORT = "report.md"
CURVES_PNG = "robustness-curves.png"


@dataclass(frozen=True)
class ReportOptions:
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    robustness: RobustnessOptions | None = field(default_factory=RobustnessOptions)  # None: no robustness section
    runnable_backends: bool = False  # time each artifact on the backends it and this machine can run


def model_card(art: Artifact, sparsity_png: str) -> str:
    """Markdown: what the model is, how it was pruned and exported, and its per-layer sparsity.

    HarpError for a manifest fact it cannot show (`Artifact` checks each), so `write_report` renders
    every card before it times anything."""
    pruning = art.model.get("pruning") if isinstance(art.model.get("pruning"), dict) else {}
    total, nonzero = art.params
    trim, metrics, target = art.channel_trimming, art.metrics, art.target_sparsity
    facts = [
        ("architecture", art.architecture),
        ("dataset", f"{art.dataset} (input {'x'.join(map(str, art.input_shape))}, {art.classes} classes)"),
        ("pruning method", f"{art.method} ({pruning.get('granularity', '?')} granularity)" if pruning else "none"),
        ("sparsity", f"{art.sparsity:.2%} of {total:,} prunable weights ({nonzero:,} nonzero)"
                     + (f"; target {target:.2%}" if target is not None else "")),
        ("channels trimmed at export", f"{trim[0]:,} of {trim[1]:,}" if trim else "no"),
        ("files", ", ".join(f"{name} {entry['bytes'] / 1000:,.1f} kB"
                            for name, entry in art.manifest["files"].items())),
        ("source checkpoint", str(art.source_checkpoint)),
    ]
    if "natural_accuracy" in metrics:
        facts.append(("accuracy recorded at training", f"natural {metrics['natural_accuracy']:.2%}, PGD "
                                                       f"{metrics.get('robust_accuracy', float('nan')):.2%} "
                                                       f"on {metrics.get('test_examples', '?')} test images"))
    layer_rows = [[layer["name"], "x".join(map(str, layer["shape"])), f"{layer['params']:,}", f"{layer['nonzero']:,}",
                   fmt(layer["density"], ".2%")] for layer in art.layers]
    return "\n".join([markdown_table(("", ""), [[f"**{k}**", v] for k, v in facts]), "",
                      "Per-layer density (the source model's prunable layers, before channel trimming):", "",
                      markdown_table(("layer", "shape", "params", "nonzero", "density"), layer_rows), "",
                      f"![per-layer density]({sparsity_png})", ""])


def write_report(artifacts: list[str | os.PathLike[str]], out: str | os.PathLike[str],
                 options: ReportOptions = ReportOptions(), *, log: Callable[[str], None] = lambda s: None,
                 note: Callable[[str], None] = lambda s: None) -> Path:
    """Benchmark every artifact and write out/report.md, its PNGs and report.json; returns the report's path."""
    opened = [open_artifact(a) for a in artifacts]
    checked = [_checked(art, options, note) for art in opened]  # everything refused before anything runs
    slugs = distinct([re.sub(r"[^A-Za-z0-9_.-]+", "-", art.name).strip("-") or "artifact" for art in opened])
    cards = [model_card(art, f"{slug}-sparsity.png") for art, slug in zip(opened, slugs)]
    out = Path(out)
    check_can_create(out)  # before the benchmarks run
    if out.is_dir():  # a folder in the way of a figure would fail after the benchmarks
        for name in [REPORT, "report.json", CURVES_PNG, *(f"{s}-{kind}.png" for s in slugs
                                                          for kind in ("latency", "sparsity"))]:
            check_output_file(out / name)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _benchmark_and_write(opened, slugs, cards, checked, out, options, log)
    except BaseException:
        if created:  # a benchmark failed or was stopped: no folder of plots without their report
            shutil.rmtree(out, ignore_errors=True)
        raise


def _benchmark_and_write(opened: list[Artifact], slugs: list[str], cards: list[str],
                         checked: list[tuple[LatencyOptions, RobustnessOptions | None]], out: Path,
                         options: ReportOptions, log: Callable[[str], None]) -> Path:
    from .plots import curves_plot, latency_plot, sparsity_plot

    machine = machine_info(max(options.latency.threads))
    sections, raw = [], {"machine": machine, "artifacts": []}
    robust_runs = []
    for art, slug, card, (latency_options, robustness_options) in zip(opened, slugs, cards, checked):
        log(f"{art.name}: latency")
        latency = run_latency(art, latency_options, warn_busy=False)
        latency_plot(latency, out / f"{slug}-latency.png")
        sparsity_plot(art.layers, art.sparsity, f"{art.name}: density per layer", out / f"{slug}-sparsity.png")
        entry: dict[str, Any] = {"name": slug, "path": str(art.root), "latency": latency}
        parts = [f"## {slug}", "", f"`{art.root}`", "", "### Model card", "",
                 card, "### Latency", "", latency_markdown(latency),
                 f"![latency]({slug}-latency.png)", ""]
        if robustness_options is not None:
            log(f"{art.name}: robustness")
            run = run_robustness(art, robustness_options, label=slug, log=log)
            robust_runs.append(run)
            entry["robustness"] = run
        raw["artifacts"].append(entry)
        sections.append("\n".join(parts))
    text = ["# harp-bench report", "", f"Machine: {describe(machine)}.", ""]
    if machine["busy"]:
        text += ["**Warning: the machine was busy when the report started; latencies are inflated.**", ""]
    text += sections
    if robust_runs:
        curves_png = None
        if any(run["curves"] for run in robust_runs):
            curves_png = CURVES_PNG
            curves_plot({run["artifact"]["label"]: run["curves"] for run in robust_runs}, out / curves_png)
        text += ["## Robustness", "", robustness_markdown({"machine": machine, "runs": robust_runs}, curves_png)]
    path = out / REPORT
    atomic_write_bytes(path, ("\n".join(text) + "\n").encode())
    atomic_write_json(out / "report.json", raw)
    return path


def _checked(art: Artifact, options: ReportOptions, note: Callable[[str], None]
             ) -> tuple[LatencyOptions, RobustnessOptions | None]:
    """The latency and robustness options for `art`, after everything either would refuse was checked."""
    latency = with_runnable_backends(art, options.latency) if options.runnable_backends else options.latency
    check_latency(art, latency)
    robustness = None if options.robustness is None else checked_options(art, options.robustness, note=note)
    return latency, robustness


@click.command("report")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for report.md and its PNGs.")
@click.option("--backends", type=CommaList(choices=BACKEND_ORDER), default=None,
              help=f"Comma-separated backends ({', '.join(BACKEND_ORDER)}). Default: every one that each artifact "
                   "and this machine can run.")
@click.option("--batch", "batches", type=CommaList(int, minimum=1), default="1,16", show_default=True)
@click.option("--threads", type=CommaList(int, minimum=1), default="1", show_default=True)
@click.option("--iters", type=click.IntRange(min=50), default=100, show_default=True)
@click.option("--dataset", default=None, help="Robustness test set. Default: the one each manifest names.")
@data_root
@click.option("--n", type=click.IntRange(min=1), default=1000, show_default=True, help="Robustness test images.")
@click.option("--attacks", type=CommaList(choices=ATTACKS), default=",".join(ATTACKS), show_default=True)
@click.option("--queries", type=click.IntRange(min=1), default=1000, show_default=True, help="Square queries.")
@click.option("--no-robustness", is_flag=True, help="Latency and model card only.")
@click.option("--threads-robustness", "robust_threads", type=click.IntRange(1, usable_cores()), default=1,
              show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
def report_command(artifacts, out, backends, batches, threads, iters, dataset, data_root, n, attacks, queries,
                   no_robustness, robust_threads, seed):
    """Write OUT/report.md: model card, latency, robustness, curves and sanity checks of each ARTIFACT."""
    if not out:
        raise click.UsageError("--out is empty; name the report's folder")
    latency = LatencyOptions(tuple(backends or BACKEND_ORDER), tuple(batches), tuple(threads), iters=iters, seed=seed)
    robustness = None if no_robustness else RobustnessOptions(
        dataset=dataset, data_root=data_root, n=n, attacks=tuple(attacks), queries=queries, threads=robust_threads,
        seed=seed, backends=backends and tuple(dict.fromkeys(("torch", *backends))))
    path = write_report(list(artifacts), out, ReportOptions(latency, robustness, runnable_backends=not backends),
                        log=lambda s: click.echo(s, err=True),
                        note=lambda s: click.echo(f"harp-bench: note: {s}", err=True))
    click.echo(f"wrote {path}")
