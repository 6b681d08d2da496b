"""harp's numba runtime against onnxruntime on the dense ONNX: bench/results/runtime.md (+ .json).

    .venv/bin/python -m harp.bench.runtime_report [--threads 2] [--iters 50] [--work DIR]
        [--passes 2] [--artifact DIR ...] [--checkpoint DIR ...] [--out bench/results/runtime.md]

Models: VGG16-BN and ResNet18 for CIFAR-10 shapes, random init (torch seed 0)
with randomised BatchNorm statistics (seeded, so folding matters), pruned one-shot
to 90%, 99% and 99.9% and exported with `export_model` (dense ONNX, sparse ONNX,
CSR bundle, parity checked), in three variants (`--variants`):
- global: global weight magnitude (`harp.pruning.masks`), shipped as `harp export`
  does, i.e. with dead channels trimmed from every format (the dense ONNX too);
- global-untrimmed: the same masks exported with trim=False, so model.onnx is the
  full-size dense architecture (harp's runtime trims the dead channels at load);
- uniform: every conv/linear pruned to the same density by its own magnitude
  (`layerwise_magnitude_masks`), shipped (trimmed).
`--artifact` adds existing artifact dirs and `--checkpoint` exports pruned
checkpoints first (e.g. HARP-learned masks).

Timing follows `latency`'s protocol: batch 1 and 16, the same seeded inputs and
thread count (default 2) everywhere, warm-up outside the timed region, >= 50
timed calls, medians with p90/p99; each (model, batch) is timed as three rounds of
harp then onnxruntime in each of `--passes` (default 2) sweeps over all models,
and each backend keeps its best round (a burst of load on this shared machine
hits one round, or one model in one sweep, not all of them). The machine load is
recorded with every row. Also: a per-layer table of VGG16 at 99%
(`Runtime.profile`), the cold start of the runtime in a fresh process (numba
cache warm), and parity of harp's logits with onnxruntime's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harp.cli_errors import ScriptArgumentParser, script_main
from harp.errors import HarpError
from harp.io import atomic_write_bytes, atomic_write_json
from harp.kernels.threads import WAIT_POLICIES, init_threads, max_threads

from . import check_report_files, results_dir
from .latency import (
    MIN_ITERS,
    LatencyStats,
    best_of,
    harp_backend,
    machine_load,
    onnxruntime_backend,
    seeded_input,
    time_callable,
)

ARCHS = ("vgg16_bn", "resnet18")
VARIANTS = {"global": ("global", True), "global-untrimmed": ("global", False), "uniform": ("uniform", True)}
SPARSITIES = (0.9, 0.99, 0.999)
BATCHES = (1, 16)
LAYER_TABLE = ("global", "vgg16_bn", 0.99)  # (variant, arch, sparsity) of the per-step table
GOALS = {(0.99, 1): 3.0, (0.99, 16): 8.0, (0.9, 1): 1.0, (0.9, 16): 1.0}  # minimum speedup over ORT dense
PARITY_RTOL = 1e-4
ROUNDS = 3  # timed rounds per backend and (model, batch), alternating harp and onnxruntime


# ---------------------------------------------------------------- artifacts


def build_artifact(arch: str, sparsity: float, variant: str, out: Path) -> Path:
    """Export `arch` (random init, randomised BN, pruned per `variant`) into `out` unless already there."""
    if (out / "manifest.json").is_file():
        return out
    from harp.data import dataset_spec
    from harp.export.exporter import export_model

    from .random_models import random_pruned_model

    method, trim = VARIANTS[variant]
    model = random_pruned_model(arch, dataset_spec("cifar10"), sparsity,
                                "global-magnitude" if method == "global" else "uniform")
    export_model(model, (3, 32, 32), out, force=True, trim=trim,
                 meta={"architecture": arch, "dataset": "cifar10",
                       "pruning": {"method": f"{method}_magnitude", "sparsity": sparsity, "trimmed": trim}})
    return out


def export_checkpoints(checkpoints: list[str], work: Path) -> list[Path]:
    """Export each checkpoint into `work`, reusing an export made from the same meta.json."""
    from harp.export.exporter import export_checkpoint
    from harp.io import sha256_file

    out = []
    for ckpt in checkpoints:
        path = Path(ckpt).resolve()
        target = work / f"ckpt-{path.parent.name}-{path.name}"  # e.g. ckpt-vgg16_bn-finetuned
        if target in out:  # two checkpoints of the same names in different folders
            target = target.with_name(f"{target.name}-{len(out)}")
        try:
            source = json.loads((target / "manifest.json").read_text())["source"]
            fresh = source["meta_sha256"] == sha256_file(path / "meta.json")
        except (OSError, ValueError, KeyError, TypeError):
            fresh = False
        if not fresh:
            export_checkpoint(path, target, force=True)
        out.append(target)
    return out


def describe(artifact: Path) -> dict[str, Any]:
    """Architecture and weight sparsity of an artifact, from its bundle."""
    from harp.export.bundle import load_bundle
    from harp.export.csr import CSRTensor

    bundle = load_bundle(artifact / "model.harpz")
    weights = [t for t in bundle.graph.tensors.values() if isinstance(t, CSRTensor)]
    total = sum(t.n_rows * t.n_cols for t in weights)
    nnz = sum(t.nnz for t in weights)
    return {"architecture": bundle.meta.get("architecture", artifact.name),
            "sparsity": 1.0 - nnz / total, "nnz": nnz, "weights": total,
            "input_shape": tuple(bundle.graph.input_shape)}


def given_source(artifact: Path) -> dict[str, Any]:
    """How a given artifact was made, from its checked manifest: label, pruning, accuracy, layer densities."""
    from harp.export.artifact import open_artifact

    art = open_artifact(artifact)
    dataset = art.dataset or "?"
    if dataset.startswith("imagefolder:"):
        dataset = f"imagefolder {Path(dataset.split(':', 1)[1]).name}"
    return {"label": f"{art.architecture} ({art.method}, {dataset})", "method": art.method, "dataset": art.dataset,
            "target_sparsity": art.target_sparsity, "metrics": art.metrics,
            "densities": [float(layer.get("density", 0.0)) for layer in art.layers]}


# ---------------------------------------------------------------- measurements


def time_pair(artifact: Path, batch: int, threads: int, iters: int, rounds: int = ROUNDS) -> dict[str, Any]:
    """harp vs onnxruntime (dense model.onnx) on one artifact and batch size."""
    harp = harp_backend(artifact, threads)
    ort = onnxruntime_backend(artifact, threads)
    x = seeded_input(harp.info["runtime"].input_shape, batch)
    harp.info["runtime"].prepare(batch)  # kernel choice for this batch size, outside the timed region
    runs: dict[str, list[LatencyStats]] = {"harp": [], "onnxruntime": []}
    for _ in range(rounds):
        for backend in (harp, ort):
            runs[backend.name].append(time_callable(backend.run, x, iters=iters, name=backend.name,
                                                    threads=threads, warn_busy=False))
    harp_stats, ort_stats = best_of(runs["harp"]), best_of(runs["onnxruntime"])
    y_harp, y_ort = harp.run(x), ort.run(x)
    tolerance = PARITY_RTOL * max(1.0, float(np.abs(y_ort).max()))
    kernels = [r["kernel"] for r in harp.info["runtime"].plan_report(batch)]
    macs = model_macs(harp.info["runtime"])
    return {
        "batch": batch, "harp": harp_stats.to_json(), "onnxruntime": ort_stats.to_json(),
        "speedup": ort_stats.median_ms / harp_stats.median_ms, "macs_per_image": macs,
        "gflops": {"harp": 2 * macs["nonzero"] * batch / (harp_stats.median_ms * 1e6),
                   "onnxruntime": 2 * macs["dense"] * batch / (ort_stats.median_ms * 1e6)},
        "kernels": {kind: kernels.count(kind) for kind in ("sparse", "dense", "winograd", "unrolled")},
        "parity": {"max_abs_diff": float(np.abs(y_harp - y_ort).max()), "tolerance": tolerance,
                   "argmax_equal": bool((y_harp.argmax(1) == y_ort.argmax(1)).all())},
        "load": [s.load_before for s in runs["harp"] + runs["onnxruntime"]],
    }


def merge_passes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (model, batch) row from its passes: each backend's best median, speedup and GFLOP/s from those."""
    merged = dict(rows[0])
    for name in ("harp", "onnxruntime"):
        merged[name] = min((r[name] for r in rows), key=lambda stats: stats["median_ms"])
    h, o = merged["harp"]["median_ms"], merged["onnxruntime"]["median_ms"]
    macs, batch = merged["macs_per_image"], merged["batch"]
    merged.update(speedup=o / h, load=[x for r in rows for x in r["load"]], passes=len(rows),
                  gflops={"harp": 2 * macs["nonzero"] * batch / (h * 1e6),
                          "onnxruntime": 2 * macs["dense"] * batch / (o * 1e6)})
    return merged


def layer_table(artifact: Path, threads: int, batches=BATCHES, repeats: int = 30) -> dict[int, list[dict[str, Any]]]:
    """Per-step profile of the runtime on one artifact, per batch size."""
    from harp.kernels.runtime import load_runtime

    runtime = load_runtime(artifact, threads=threads)
    tables = {}
    for batch in batches:
        x = seeded_input(runtime.input_shape, batch)
        rows = runtime.profile(x, repeats=repeats)
        for row in rows:
            dense_macs = _dense_macs(runtime, row["name"])
            row["dense_gflops"] = (2 * dense_macs * batch / (row["time_us"] * 1e3)) if dense_macs else None
            row["nnz_gflops"] = (2 * row["macs_per_image"] * batch / (row["time_us"] * 1e3)
                                 if row["macs_per_image"] else None)
        tables[batch] = rows
    return tables


def _dense_macs(runtime, step_name: str) -> int | None:
    for ex in runtime.executors:
        if ex.step.name == step_name and ex.density is not None:
            return ex.dense_macs_per_image
    return None


def model_macs(runtime) -> dict[str, int]:
    """Per-image multiply-adds of all conv/linear layers: dense (model.onnx's) and on nonzero weights only.

    Their ratio is the speedup a sparse engine would get at the dense engine's
    efficiency per multiply-add: the yardstick for the goals. The dense count is
    the bundle's as exported (the architecture of model.onnx), the nonzero one
    what the runtime computes, after trimming dead channels.
    """
    graph = runtime.bundle_graph
    shapes = graph.validate()
    dense = sum(math.prod(graph.tensors[node.params["weight"]].shape) * math.prod(shapes[node.output][1:])
                for node in graph.nodes if node.op in ("conv2d", "linear"))
    return {"dense": dense, "nonzero": sum(ex.macs_per_image for ex in runtime.executors if ex.density is not None)}


def dispatch_overhead(artifact: Path, threads: int, iters: int = 300) -> dict[str, Any]:
    """What a batch-1 run spends outside kernels: numba dispatch, parallel-region wake-up, the wrapper."""
    import functools

    import numba
    from numba import njit, prange

    from harp.kernels.runtime import load_runtime

    @njit
    def serial_noop(*args):  # as many arguments as the sparse conv kernel takes
        return 0

    @njit(parallel=True)
    def parallel_noop(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    runtime = load_runtime(artifact, threads=threads)
    x = seeded_input(runtime.input_shape, 1)
    state = runtime.prepare(1)
    args = state.steps[[s.executor.step.op for s in state.steps].index("conv2d")].calls[-1].args
    noop = functools.partial(serial_noop, *args)
    ones = np.zeros(threads, np.float32)

    def median_us(fn) -> float:
        for _ in range(20):
            fn()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples) * 1e6)

    def calls_only():
        for call in state.calls:
            call()

    def serial_noop_call():
        numba.set_num_threads(1)
        parallel_noop(ones)
        numba.set_num_threads(threads)

    run_us, calls_us = median_us(lambda: runtime.run(x)), median_us(calls_only)
    parallel_steps = sum(1 for s in state.steps if s.calls and s.threads > 1)
    serial_steps = sum(1 for s in state.steps if s.calls and s.threads == 1)
    return {"kernel_calls": len(state.calls), "steps": len(state.steps), "graph_nodes": runtime.plan.graph_nodes,
            "parallel_steps": parallel_steps, "serial_steps": serial_steps,
            "dispatch_us": median_us(noop), "parallel_region_us": median_us(lambda: parallel_noop(ones)),
            "one_thread_region_us": median_us(serial_noop_call),
            "run_us": run_us, "kernel_calls_us": calls_us, "wrapper_us": run_us - calls_us,
            "load": machine_load()}


# The "device" setting blocks the imports a device with only numpy, numba and click could not do.
DEVICE_BLOCK = """
import sys
if sys.argv[1] == "device":
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "onnx", "onnxruntime", "scipy"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
"""
COLD_START = """
import json, sys, time
t0 = time.perf_counter()
""" + DEVICE_BLOCK + """
import numpy as np
from harp.kernels.runtime import load_runtime
t1 = time.perf_counter()
rt = load_runtime(sys.argv[2], threads=int(sys.argv[3]))
t2 = time.perf_counter()
y = rt.run(np.random.default_rng(0).random((1, *rt.input_shape), dtype=np.float32))
t3 = time.perf_counter()
heavy = sorted(m for m in ("torch", "torchvision", "onnx", "onnxruntime", "scipy") if m in sys.modules)
print(json.dumps({"import_s": t1 - t0, "load_runtime_s": t2 - t1, "first_run_s": t3 - t2,
                  "in_process_s": t3 - t0, "load_breakdown_s": rt.load_seconds, "heavy_modules": heavy}))
"""
HARP_RUN = DEVICE_BLOCK + """
from harp.cli import main
sys.argv = ["harp", "run", *sys.argv[2:]]
main()
"""


def cold_start(artifact: Path, threads: int, repeats: int = 3) -> dict[str, Any]:
    """Fresh-process time to the first result (numba's cache is warm: the parent ran the same kernels).

    Two settings: this venv ("venv": numba imports scipy when it is installed, at
    the first kernel load) and a device with only numpy, numba and click ("device":
    torch, onnx, onnxruntime and scipy imports blocked). In each, the wall time of
    `harp run` on one image too, as a user at a shell sees it.
    """
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "x.npy"
        np.save(image, np.random.default_rng(0).random((1, *describe(artifact)["input_shape"]), dtype=np.float32))
        for setting in ("venv", "device"):
            results, cli_walls = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", COLD_START, setting, str(artifact), str(threads)],
                                      check=True, capture_output=True, text=True)
                wall = time.perf_counter() - start
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["process_wall_s"] = wall
                result["load"] = machine_load()
                results.append(result)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", HARP_RUN, setting, str(artifact), "--input", str(image),
                                "--threads", str(threads)], check=True, capture_output=True, text=True)
                cli_walls.append(time.perf_counter() - start)
            out[setting] = {"best": min(results, key=lambda r: r["in_process_s"]),
                            "all_in_process_s": [r["in_process_s"] for r in results], "harp_run_wall_s": cli_walls}
    return out


# ---------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    import numba
    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "onnxruntime": onnxruntime.__version__}


VARIANT_TITLES = {
    "global": "global magnitude, shipped (dead channels trimmed from every format)",
    "global-untrimmed": "global magnitude, exported with trim=False (model.onnx is the full dense architecture; "
                        "harp's runtime trims the dead channels at load)",
    "uniform": "uniform per-layer magnitude, shipped",
    "given": "given artifacts and checkpoints (pruning method, target and dataset from each manifest)",
}


def _step_label(row: dict[str, Any]) -> str:
    """'net.features.3 (32% dense, 49 nnz GFLOP/s)' for the per-step summary."""
    parts = []
    if row["density"] is not None:
        parts.append(f"{row['density']:.0%} dense")
    if row["nnz_gflops"] is not None:
        parts.append(f"{row['nnz_gflops']:.0f} nnz GFLOP/s")
    return f"{row['name']} ({', '.join(parts)})" if parts else row["name"]


def _needs(row: dict[str, Any]) -> str:
    """', needs N% of ORT's GFLOP/s, has M%' for a row that missed its goal (empty without MAC counts)."""
    macs, g = row.get("macs_per_image"), row.get("gflops")
    if not macs or not macs["nonzero"] or not g:
        return ""
    goal = GOALS[(row["target_sparsity"], row["batch"])]
    return (f"; needs {goal * macs['nonzero'] / macs['dense']:.0%} of ORT's GFLOP/s, "
            f"has {g['harp'] / g['onnxruntime']:.0%}")


def _mac_ratio(row: dict[str, Any]) -> str:
    macs = row.get("macs_per_image")
    return f"{macs['dense'] / macs['nonzero']:.1f}x" if macs and macs["nonzero"] else ""


def _gflops(row: dict[str, Any]) -> str:
    g = row.get("gflops")
    return f"{g['harp']:.0f} / {g['onnxruntime']:.0f}" if g else ""


def _given_notes(report: dict[str, Any]) -> list[str]:
    """One line per given artifact: its pruning target, recorded accuracy and per-layer densities."""
    lines = [""]
    seen = set()
    for row in report["latency"]:
        source = row.get("source")
        if source is None or row["artifact"] in seen:
            continue
        seen.add(row["artifact"])
        m = source["metrics"]
        accuracy = ""
        if "natural_accuracy" in m and "robust_accuracy" in m:
            accuracy = (f"; natural {m['natural_accuracy']:.1%}, PGD {m['robust_accuracy']:.1%} on "
                        f"{m.get('test_examples', '?')} test images")
        target = "" if source["target_sparsity"] is None else f"pruned to {source['target_sparsity']:.1%}"
        densities = " ".join(f"{d:.1%}" for d in source["densities"])
        lines.append(f"- {row['name']}: {source['method']} on {source['dataset']}, {target}{accuracy}; "
                     f"layer densities in order: {densities}.")
    return lines


def _times(speedup: float) -> str:
    """A speedup as '6.8x', or '0.95x' below 2x: '1.0x' would hide that a 'never slower' goal is missed."""
    return f"{speedup:.2f}x" if speedup < 2 else f"{speedup:.1f}x"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# harp runtime vs onnxruntime (dense model.onnx)",
        "",
        f"Generated by `.venv/bin/python -m harp.bench.runtime_report{report.get('arguments', '')}` on "
        f"{report['date']}: {m['cpu']}, "
        f"{m['cores']} cores; numpy {m['numpy']}, numba {m['numba']}, onnxruntime {m['onnxruntime']}; "
        f"{report['threads']} threads for every backend.",
        "",
        "Protocol (`harp.bench.latency`): seeded uniform [0, 1) inputs; warm-up outside the timed region; "
        f"{report['iters']} timed calls per round, {report.get('rounds', 2)} rounds per backend, alternating, "
        f"in each of {report.get('passes', 1)} passes over all models (the best median kept: the host's other "
        "tenants make single rounds, and sometimes a whole model's rounds, vary by up to 2x); "
        "onnxruntime with intra_op_num_threads = threads, inter_op_num_threads = 1, sequential execution, all "
        "graph optimisations and its default thread spinning; harp with `fallback=\"auto\"` (per-layer "
        "sparse/dense/Winograd/unrolled choice timed at prepare, inside whole runs of the model; `unrolled` "
        "code compiled before the timed runs, or loaded from its cache) and the "
        f"`{report.get('wait_policy', 'passive')}` wait policy "
        "for its idle threads (`harp.kernels.threads`). Load = 1-minute load average before each timed round "
        "(min..max); the machine is shared, so absolute times are inflated when the load exceeds "
        f"{m['cores']} - threads.",
        "",
        "Models: random init (seed 0) with randomised BatchNorm statistics, pruned one-shot, exported with "
        "`export_model`; the sparsity column gives the pruning target and the weight sparsity of the exported"
        " bundle (trimming dead channels removes zeros, so it can be lower). With random init, global "
        "magnitude pruning removes the deep layers first (their weights are smallest): at 99% VGG16 keeps "
        "30-86% of its first three convs and almost nothing after the fifth, which trimming then cuts away, "
        "so the shipped 'global' rows measure a small, moderately sparse network. harp's runtime trims dead "
        "channels itself when it loads a bundle (`harp.export.channels.trim_channels` on the CSR weights), so"
        " on the 'global-untrimmed' bundles it computes what the trimmed network computes, while onnxruntime "
        "runs the full model.onnx; its nonzero multiply-adds are counted after that trimming. Uniform pruning"
        " is closer to what learned masks look like. HARP's published masks of these architectures come from "
        "CIFAR-10 on a GPU, neither of which this machine has; `python -m harp.bench.learned_masks` trains "
        "the same architectures on MNIST digits (as 32x32 RGB, the same input shape; a short CPU schedule) "
        "and prunes them with HARP, and `--checkpoint DIR` exports and times such a checkpoint (or a CIFAR-10"
        " one) in the 'given' section. Global magnitude on those trained models (`learned_masks --methods "
        "global-magnitude`) gives the random-init profile again (VGG16 at 99%: 86, 31, 31, 7, 6%, then at "
        "most 0.1% and the last six convs empty; ResNet18: layer3 and layer4 convs at most 0.2%) and leaves "
        "both at chance accuracy after fine-tuning, so the random-init 'global' rows stand for what global "
        "magnitude gives at 99%.",
    ]
    variants = list(dict.fromkeys(row.get("variant", "global") for row in report["latency"]))
    for variant in variants:
        lines += ["", f"## Latency: {VARIANT_TITLES.get(variant, variant)}", "",
                  "| model | sparsity (after export) | batch | harp median (p90, p99) ms "
                  "| ORT dense median (p90, p99) ms | speedup | goal | dense/nonzero MACs "
                  "| GFLOP/s harp (nonzero) / ORT (dense) | sparse/dense/Winograd/unrolled layers | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["latency"]:
            if row.get("variant", "global") != variant:
                continue
            h, o = row["harp"], row["onnxruntime"]
            goal = GOALS.get((row.get("target_sparsity"), row["batch"]))
            goal_text = "" if goal is None else (f">= {goal:g}x " + ("met" if row["speedup"] >= goal else "**missed**"))
            target = "" if row.get("target_sparsity") is None else f"{row['target_sparsity']:.1%} pruned, "
            lines.append(
                f"| {row['name']} | {target}{row['sparsity']:.2%} | {row['batch']} | {h['median_ms']:.3f} "
                f"({h['p90_ms']:.3f}, {h['p99_ms']:.3f}) | {o['median_ms']:.3f} ({o['p90_ms']:.3f}, {o['p99_ms']:.3f}) "
                f"| {_times(row['speedup'])} | {goal_text} | {_mac_ratio(row)} | {_gflops(row)} "
                f"| {row['kernels']['sparse']}/{row['kernels']['dense']}/{row['kernels'].get('winograd', 0)}/"
                f"{row['kernels'].get('unrolled', 0)} | "
                f"{min(row['load']):.1f}..{max(row['load']):.1f} |")
        if variant == "given":
            lines += _given_notes(report)
    goal_rows = [r for r in report["latency"] if (r.get("target_sparsity"), r["batch"]) in GOALS]
    if goal_rows:
        lines += ["", "## Goals", "",
                  "Speedup over onnxruntime on the dense model.onnx: >= 3x at batch 1 and >= 8x at batch 16 at 99%, "
                  "never slower at 90%.", ""]
        for variant in variants:
            rows = [r for r in goal_rows if r.get("variant", "global") == variant]
            met = [r for r in rows if r["speedup"] >= GOALS[(r["target_sparsity"], r["batch"])]]
            missed = [f"{r['name']} {r['target_sparsity']:.0%} b{r['batch']} ({_times(r['speedup'])}{_needs(r)})"
                      for r in rows if r not in met]
            lines.append(f"- {variant}: {len(met)}/{len(rows)} met" + (f"; missed: {', '.join(missed)}" if missed
                                                                          else "") + ".")
        lines += ["",
                  "A sparse engine's speedup is the ratio of dense to nonzero multiply-adds times its speed per "
                  "multiply-add relative to the dense engine's. For each missed goal, 'needs' is the speed per "
                  "multiply-add (GFLOP/s on nonzeros over onnxruntime's GFLOP/s on the dense model) that would "
                  "meet it, and 'has' what harp reaches: the sparse kernel streams one input load per "
                  "multiply-add, and the unrolled one shares a load among only the 16 output channels whose "
                  "nonzeros meet at it (~2 at 9-13% density), while onnxruntime's dense GEMM runs near the "
                  "cores' FMA peak. Where 'needs' is "
                  "above 100%, no engine that skips only the zeros can meet the goal on that model."]
    lines += ["", "## Parity with onnxruntime", "",
              f"Same inputs as the latency rows; criterion max |harp - ORT| <= {PARITY_RTOL:g} * max(1, max |logit|) "
              "and identical argmax.", "",
              "| variant | model | sparsity | batch | max abs diff | tolerance | argmax equal |",
              "|---|---|---|---|---|---|---|"]
    for row in report["latency"]:
        p = row["parity"]
        lines.append(f"| {row.get('variant', '')} | {row['name']} | {row['sparsity']:.2%} | {row['batch']} | "
                     f"{p['max_abs_diff']:.2e} | {p['tolerance']:.1e} | {'yes' if p['argmax_equal'] else '**no**'} |")
    if report.get("layers"):
        name = report["layers"]["name"]
        tables = report["layers"]["tables"]
        batches = sorted(int(b) for b in tables)
        lines += ["", f"## Per step: {name}", "",
                  "`Runtime.profile` medians of 30 runs; fused graph nodes in parentheses. Effective GFLOP/s = "
                  "2 x dense-equivalent MACs / time; nnz GFLOP/s = 2 x (nonzero weights x output pixels) / time.",
                  "", "| step | op | density | " + " | ".join(
                      f"b{b} kernel | b{b} µs | b{b} eff. GFLOP/s | b{b} nnz GFLOP/s" for b in batches) + " |",
                  "|---|---|---|" + "---|---|---|---|" * len(batches)]
        rows = {b: tables[str(b)] if str(b) in tables else tables[b] for b in batches}
        for i, first in enumerate(rows[batches[0]]):
            density = "" if first["density"] is None else f"{first['density']:.2%}"
            fused = f" ({len(first['nodes'])})" if len(first["nodes"]) > 1 else ""
            cells = []
            for b in batches:
                r = rows[b][i]
                eff = "" if r["dense_gflops"] is None else f"{r['dense_gflops']:.1f}"
                nnz = "" if r["nnz_gflops"] is None else f"{r['nnz_gflops']:.1f}"
                cells.append(f"{r['kernel']} | {r['time_us']:.1f} | {eff} | {nnz}")
            lines.append(f"| {first['name']}{fused} | {first['op']} | {density} | " + " | ".join(cells) + " |")
        for b in batches:
            total = sum(r["time_us"] for r in rows[b])
            top = sorted(rows[b], key=lambda r: -r["time_us"])[:2]
            share = sum(r["time_us"] for r in top) / total
            names = " and ".join(_step_label(r) for r in top)
            lines.append(f"\nBatch {b}: step medians sum to {total / 1e3:.3f} ms; the two slowest steps, {names}, "
                         f"take {share:.0%} of it.")
    d = report.get("dispatch")
    if d:
        estimate = (d["kernel_calls"] * d["dispatch_us"] + d["parallel_steps"] * d["parallel_region_us"]
                    + d["serial_steps"] * d["one_thread_region_us"])
        lines += ["", "## Dispatch overhead (batch 1)", "",
                  f"{d['artifact']}: {d['graph_nodes']} graph nodes run as {d['steps']} steps, "
                  f"{d['kernel_calls']} kernel calls; {d['parallel_steps']} steps run on all threads, "
                  f"{d['serial_steps']} tiny ones on one thread (chosen at prepare, it skips waking the others). "
                  f"Medians of 300 calls; load {d['load']:.1f}.", "",
                  "| numba dispatch of a bound call | empty parallel region, all threads | empty region on one "
                  "thread (incl. switching) | all kernel calls | run() | run() outside the kernels (checks, "
                  "copies) |", "|---|---|---|---|---|---|",
                  f"| {d['dispatch_us']:.2f} µs | {d['parallel_region_us']:.2f} µs | "
                  f"{d['one_thread_region_us']:.2f} µs | {d['kernel_calls_us']:.1f} µs | {d['run_us']:.1f} µs | "
                  f"{d['wrapper_us']:.1f} µs |", "",
                  f"Fixed cost per run ≈ {d['kernel_calls']} x {d['dispatch_us']:.1f} + {d['parallel_steps']} x "
                  f"{d['parallel_region_us']:.1f} + {d['serial_steps']} x {d['one_thread_region_us']:.1f} = "
                  f"{estimate:.0f} µs of the {d['run_us']:.0f} µs run: compiling the plan into fewer numba calls "
                  "would save at most that (it matters only for models whose layers are nearly empty)."]
    cs = report.get("cold_start")
    if cs:
        when = f", measured {cs['date']}" if "date" in cs else ""
        lines += ["", "## Cold start", "",
                  f"Time to the first result in a fresh `python -c` process ({cs['artifact']}, batch 1, numba's "
                  f"cache warm{when}), best of 3 by in-process time. 'venv': this environment, where numba imports "
                  "scipy at its first kernel load; 'device': torch, onnx, onnxruntime and scipy imports blocked, as "
                  "on a device with only numpy, numba and click. The last column is the wall time of `harp run "
                  "ARTIFACT --input x.npy` on one image in the same setting, interpreter start and exit included.",
                  "", "| setting | import harp.kernels.runtime | load_runtime (bundle, plan, prepare + kernel choice, "
                  "warm-up) | first run | import to first result | process wall incl. interpreter start/exit | "
                  "heavy modules loaded | load | `harp run` wall |", "|---|---|---|---|---|---|---|---|---|"]
        for setting in ("venv", "device"):
            b = cs[setting]["best"]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in b["load_breakdown_s"].items())
            walls = cs[setting].get("harp_run_wall_s")
            cli = f"**{min(walls):.3f} s** (all: {', '.join(f'{t:.2f}' for t in walls)})" if walls else "-"
            lines.append(f"| {setting} | {b['import_s']:.3f} s | {b['load_runtime_s']:.3f} s ({parts}) | "
                         f"{b['first_run_s'] * 1e3:.2f} ms | **{b['in_process_s']:.3f} s** (all: "
                         f"{', '.join(f'{t:.2f}' for t in cs[setting]['all_in_process_s'])}) | "
                         f"{b['process_wall_s']:.3f} s | {', '.join(b['heavy_modules']) or 'none'} | {b['load']:.1f} | "
                         f"{cli} |")
    return "\n".join(lines) + "\n"


def _check_args(args: argparse.Namespace) -> None:
    """Bad options and missing inputs as HarpError (one line and exit 2 under run_script)."""
    if args.iters < MIN_ITERS:
        raise HarpError(f"--iters must be >= {MIN_ITERS}, got {args.iters}")
    if args.passes < 1:
        raise HarpError(f"--passes must be >= 1, got {args.passes}")
    if not 1 <= args.threads <= max_threads():
        raise HarpError(f"--threads must be in 1..{max_threads()}, got {args.threads}")
    unknown = sorted(set(args.archs) - set(ARCHS))
    if unknown:
        raise HarpError(f"unknown architecture(s) {', '.join(unknown)} (choose from {', '.join(ARCHS)})")
    for flag, paths in (("--artifact", args.artifact), ("--checkpoint", args.checkpoint)):
        for path in paths:
            if not Path(path).is_dir():
                raise HarpError(f"{flag} {path}: not a directory")
    check_report_files(args.out, args.out.with_suffix(".json"))


def main(argv: list[str] | None = None) -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--passes", type=int, default=2, help="Sweeps over all models; each row keeps its best.")
    parser.add_argument("--work", type=Path, default=None,
                        help="Where artifacts are exported (kept, reused); by default a temporary directory.")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--artifact", action="append", default=[], help="An extra artifact dir to time.")
    parser.add_argument("--checkpoint", action="append", default=[], help="A pruned checkpoint to export and time.")
    parser.add_argument("--out", type=Path, default=results_dir() / "runtime.md")
    parser.add_argument("--wait-policy", choices=WAIT_POLICIES, default="spin",
                        help="how harp's idle kernel threads wait (harp.kernels.threads); onnxruntime keeps "
                             "its default (spinning)")
    args = parser.parse_args(argv)
    _check_args(args)
    init_threads(args.threads, args.wait_policy)  # before any OpenMP pool starts
    os.environ["HARP_WAIT_POLICY"] = args.wait_policy  # the cold-start processes use it too
    arguments = "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        write_report(args, arguments, args.work)
        return
    # Without --work the exported models (about 0.9 GB) are not kept.
    with tempfile.TemporaryDirectory(prefix="harp-runtime-bench-") as work:
        write_report(args, arguments, Path(work))


def write_report(args: argparse.Namespace, arguments: str, work: Path) -> None:
    """Export the models into `work`, time them and write the report (.md and .json) to `args.out`;
    `arguments` is the command line the report names."""
    targets: list[tuple[str, str, float | None, Path]] = []
    for variant in args.variants:
        for arch in args.archs:
            for sparsity in args.sparsities:
                print(f"exporting {arch} at {sparsity:.1%} ({variant})", flush=True)
                targets.append((variant, arch, sparsity,
                                build_artifact(arch, sparsity, variant, work / f"{variant}-{arch}-{sparsity}")))
    given: dict[str, dict[str, Any]] = {}
    for path in [Path(a) for a in args.artifact] + export_checkpoints(args.checkpoint, work):
        source = given_source(path)
        given[str(path)] = source
        targets.append(("given", source["label"], source["target_sparsity"], path))

    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                              "threads": args.threads, "iters": args.iters, "rounds": ROUNDS,
                              "wait_policy": args.wait_policy,
                              "arguments": arguments,
                              "latency": []}
    # Whole sweeps, repeated: a burst of load on the shared host lasts long enough to hit every
    # round of one row, but rarely the same row in two passes minutes apart.
    passes: dict[tuple[str, int], list[dict[str, Any]]] = {}
    sparsity = {path: describe(path)["sparsity"] for _, _, _, path in targets}
    for number in range(1, args.passes + 1):
        for variant, arch, target, path in targets:
            for batch in BATCHES:
                row = time_pair(path, batch, args.threads, args.iters)
                row.update(variant=variant, name=arch, artifact=str(path), sparsity=sparsity[path],
                           target_sparsity=target)
                if str(path) in given:
                    row["source"] = given[str(path)]
                passes.setdefault((str(path), batch), []).append(row)
                print(f"pass {number}: {variant} {arch} {sparsity[path]:.2%} b{batch}: harp "
                      f"{row['harp']['median_ms']:.3f} ms, ORT {row['onnxruntime']['median_ms']:.3f} ms, "
                      f"{_times(row['speedup'])} (load {max(row['load']):.1f})", flush=True)
    report["passes"] = args.passes
    report["latency"] = [merge_passes(rows) for rows in passes.values()]
    layer_target = next((p for v, a, s, p in targets if (v, a, s) == LAYER_TABLE), None)
    if layer_target is not None:
        label = f"{LAYER_TABLE[1]} at {LAYER_TABLE[2]:.0%} ({LAYER_TABLE[0]} pruning, shipped)"
        report["layers"] = {"name": label, "tables": layer_table(layer_target, args.threads)}
        report["cold_start"] = {"artifact": label, **cold_start(layer_target, args.threads)}
        report["dispatch"] = {"artifact": label, **dispatch_overhead(layer_target, args.threads)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, render(report).encode())
    atomic_write_json(args.out.with_suffix(".json"), report, indent=1, default=str)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    sys.exit(script_main(main, "runtime_report"))
