"""harp-bench: latency schema, robustness across backends, sanity checks, bad input (one line, exit 2)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harp.bench import sanity
from harp.bench.cli import cli
from harp.bench.latency_bench import LatencyOptions, run_latency
from harp.bench.robustness import RobustnessOptions, run_robustness
from harp.bench.sparse_attack import greedy_pixel_attack
from harp.bench.torch_graph import HANDLERS, load_torch_model
from harp.cli import cli as harp_cli
from harp.cli_errors import run_cli
from harp.export.artifact import open_artifact


@pytest.fixture(scope="module")
def artifact(digits_ckpt, tmp_path_factory) -> Path:
    """digits_ckpt pruned one-shot to 50% (global magnitude: 90% would break it) and exported, small parity set."""
    from harp.checkpoint import load_checkpoint, save_checkpoint
    from harp.export.exporter import export_checkpoint
    from harp.pruning.masks import apply_masks, global_magnitude_masks

    ckpt = load_checkpoint(digits_ckpt)
    model = ckpt.build_model()
    masks = global_magnitude_masks(model, 0.5)
    apply_masks(model, masks)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version", "versions", "files")}
    meta["pruning"] = {"method": "global_magnitude", "granularity": "weight", "target_sparsity": 0.5,
                       "layers": sorted(masks)}
    work = tmp_path_factory.mktemp("bench")
    save_checkpoint(work / "pruned", model, meta, masks)
    export_checkpoint(work / "pruned", work / "artifact", n_parity=32, n_adversarial=8)
    return work / "artifact"


@pytest.fixture(scope="module")
def csr_artifact(artifact) -> Path:
    """The same pruned model exported as a CSR bundle only (no ONNX files)."""
    from harp.export.exporter import export_checkpoint

    export_checkpoint(artifact.parent / "pruned", artifact.parent / "csr-only", formats=("csr",), n_parity=8,
                      n_adversarial=0)
    return artifact.parent / "csr-only"


def bench(args: list[str], capsys) -> tuple[int, str, str]:
    """Run harp-bench in-process: (exit status, stdout, stderr)."""
    code = run_cli(cli, [str(a) for a in args], prog="harp-bench")
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- latency


def test_latency_json_schema_and_positive_numbers(artifact, tmp_path, capsys):
    from harp.bench.machine import usable_cores

    threads = min(2, usable_cores())
    path = tmp_path / "lat.json"
    code, out, _ = bench(["latency", artifact, "--backends", "torch,onnxruntime,harp", "--batch", "1,4",
                          "--threads", threads, "--iters", "50", "--warmup", "2", "--seed", "3", "--json", path,
                          "--md", tmp_path / "lat.md"], capsys)
    assert code == 0
    result = json.loads(path.read_text())
    assert {"cpu", "isa", "cores", "os", "libraries", "load_average_start", "busy"} <= set(result["machine"])
    assert result["protocol"]["seed"] == 3 and result["protocol"]["warmup"] == 2
    rows = result["results"]
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in ("torch", "onnxruntime", "harp")
                                                          for n in (1, 4)}
    files = {"torch": "model.harpz", "onnxruntime": "model.onnx", "harp": "model.harpz"}
    markdown = (tmp_path / "lat.md").read_text()
    for r in rows:
        # the count each library reports it uses, read back in the timed process
        assert r["threads"] == r["threads_applied"] == threads, r
        assert r["warmup"] == 2 and r["iters"] == 50  # what the timed process did, not what was asked
        for key in ("p50_ms", "p90_ms", "p99_ms", "throughput", "size_bytes", "peak_rss_mb", "speedup_vs_onnxruntime"):
            assert r[key] > 0, key
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(r["batch"] / r["p50_ms"] * 1e3)
        assert r["size_file"] == files[r["backend"]] and r["size_bytes"] == (artifact / r["size_file"]).stat().st_size
        assert r["model_rss_mb"] == pytest.approx(r["peak_rss_mb"] - r["base_rss_mb"])
        # the Markdown table shows the JSON's own numbers
        assert f"| {r['backend']} | {r['batch']} | {threads} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} |" in markdown
    assert all(r["speedup_vs_onnxruntime"] == 1.0 for r in rows if r["backend"] == "onnxruntime")
    assert "harp" in out and "| backend |" in markdown


def test_latency_speedup_is_onnxruntimes_time_over_the_backends(monkeypatch):
    from harp.bench import latency_bench

    rows = [{"backend": b, "batch": n, "threads": 1, "p50_ms": ms}
            for b, n, ms in (("onnxruntime", 1, 4.0), ("harp", 1, 1.0), ("harp", 16, 2.0), ("onnxruntime", 16, 10.0))]
    latency_bench._add_speedups(rows)
    assert [r["speedup_vs_onnxruntime"] for r in rows] == [1.0, 4.0, 5.0, 1.0]


def test_time_callable_times_only_the_timed_calls(monkeypatch):
    # A fake clock: each call advances it by its own duration, warm-up calls by a whole second.
    from harp.bench import latency

    now = [0.0]
    durations = iter([1.0] * 3 + [0.001 * (k % 50 + 1) for k in range(50)])  # 3 warm-ups, then 1..50 ms

    def call(_x):
        now[0] += next(durations)

    monkeypatch.setattr(latency.time, "perf_counter", lambda: now[0])
    stats = latency.time_callable(call, np.zeros((4, 1, 2, 2), np.float32), warmup=3, iters=50, warn_busy=False)
    ms = np.arange(1, 51, dtype=float)
    assert stats.batch == 4 and stats.iters == 50 and stats.warmup == 3
    assert stats.median_ms == pytest.approx(25.5) and stats.min_ms == pytest.approx(1.0)
    assert stats.p90_ms == pytest.approx(np.percentile(ms, 90)) and stats.mean_ms == pytest.approx(25.5)


def test_thread_counts_above_the_cores_this_process_may_use_are_refused(monkeypatch):
    from harp.bench import machine
    from harp.bench.latency_bench import LatencyOptions
    from harp.errors import HarpError

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda _pid: {0}, raising=False)  # as under taskset -c 0
    LatencyOptions(threads=(1,)).check()
    with pytest.raises(HarpError, match="--threads 2 exceeds the 1 cores this process may use"):
        LatencyOptions(threads=(2,)).check()
    with pytest.raises(HarpError, match="--threads 2 exceeds the 1 cores"):
        RobustnessOptions(threads=2).check()


def test_latency_what_if_mode_exports_and_times_a_random_model(capsys):
    code, out, _ = bench(["latency", "--arch", "small_cnn", "--input-shape", "1,8,8", "--classes", "10",
                          "--sparsity", "0.9", "--pruning", "uniform", "--backends", "harp", "--batch", "1",
                          "--iters", "50", "--warmup", "2", "--json", "-"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["artifact"]["architecture"] == "small_cnn"
    assert result["artifact"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert [r["backend"] for r in result["results"]] == ["harp"] and result["results"][0]["p50_ms"] > 0


def test_latency_by_default_times_what_the_artifact_and_machine_can_run(artifact, tmp_path, capsys, monkeypatch):
    # As on a device without torch, with an artifact exported without the sparse ONNX graph.
    from harp.export.exporter import export_checkpoint

    export_checkpoint(artifact.parent / "pruned", tmp_path / "art", formats=("onnx", "csr"), n_parity=8,
                      n_adversarial=0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    code, out, err = bench(["latency", tmp_path / "art", "--batch", "1", "--iters", "50", "--warmup", "1",
                            "--json", "-"], capsys)
    assert code == 0, err
    assert [r["backend"] for r in json.loads(out)["results"]] == ["onnxruntime", "harp"]
    assert ("note: art: not timing torch (Python package 'torch' not installed); onnxruntime-sparse (the artifact "
            "has no model.sparse.onnx)") in err
    # Named explicitly, a backend that cannot run is an error.
    code, _, err = bench(["latency", tmp_path / "art", "--backends", "onnxruntime-sparse"], capsys)
    assert code == 2 and "needs model.sparse.onnx" in err


DEVICE_BENCH = "from harp.bench.cli import main\nsys.argv = ['harp-bench', *sys.argv[1:]]\nmain()\n"


def test_latency_on_a_device_times_the_harp_runtime_by_default(artifact, device_python):
    done = device_python(DEVICE_BENCH, "latency", artifact, "--batch", "1", "--iters", "50", "--warmup", "1",
                         "--json", "-")
    assert done.returncode == 0, done.stderr
    assert [r["backend"] for r in json.loads(done.stdout)["results"]] == ["harp"]
    assert "not timing torch (Python package 'torch' not installed)" in done.stderr


def test_latency_options_are_checked(artifact):
    with pytest.raises(Exception, match="iters must be >= 50"):
        run_latency(artifact, LatencyOptions(iters=5))


# ---------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def robustness(artifact):
    options = RobustnessOptions(n=96, attacks=("fgsm", "pgd", "square"), steps=5, queries=40, curves=("linf", "l0"),
                                curve_steps=3)
    return run_robustness(artifact, options)


def test_pgd_lowers_accuracy(robustness):
    clean = robustness["clean"]["torch"]["accuracy"]
    assert clean > 0.5
    assert robustness["attacks"]["pgd"]["torch_accuracy"] < clean - 0.1


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_backends_agree_with_torch_on_shared_adversarial_examples(robustness, attack):
    result = robustness["attacks"][attack]
    assert set(result["backends"]) == {"torch", "onnxruntime", "onnxruntime-sparse", "harp"}
    for backend, r in result["backends"].items():
        assert abs(r["accuracy"] - result["torch_accuracy"]) <= 0.002, backend
        assert r["agreement_with_torch"] >= 0.99, backend


def test_blackbox_square_runs_on_exported_runtimes(robustness):
    square = robustness["blackbox"]["backends"]
    assert set(square) == {"onnxruntime", "onnxruntime-sparse", "harp"}
    clean = robustness["clean"]["harp"]["accuracy"]
    for r in square.values():
        # an attack that did nothing would pass a bound alone: Square must find adversarial examples
        assert 0.0 <= r["accuracy"] < clean - 0.05
        assert robustness["eps"] / 2 < r["max_perturbation"] <= robustness["eps"] + 1e-6


def test_square_queries_the_runtime_it_reports_on_and_keeps_its_budget(artifact, monkeypatch):
    from harp.bench import robustness as rob

    rows: dict[str, int] = {}
    build = rob.build_predictors

    def counted(*args, **kwargs):
        def count(name, fn):
            def run(x):
                rows[name] = rows.get(name, 0) + len(x)
                return fn(x)
            return run
        return {name: count(name, fn) for name, fn in build(*args, **kwargs).items()}

    monkeypatch.setattr(rob, "build_predictors", counted)
    n, queries = 16, 10
    result = run_robustness(artifact, RobustnessOptions(n=n, attacks=("square",), backends=("torch", "harp"),
                                                        queries=queries, curves=()))
    # torch and harp see the same clean and sanity-check images; Square's queries go to harp alone:
    # at least one per image, at most the budget plus pyautoattack's clean and final checks and the
    # accuracy on the images it returns
    square_rows = rows["harp"] - rows["torch"]
    assert n <= square_rows <= n * (queries + 3), rows
    assert set(result["blackbox"]["backends"]) == {"harp"}


def test_curves_and_sanity_checks_run(robustness):
    linf = robustness["curves"]["linf"]
    assert linf["budgets"][0] == 0 and linf["accuracy"][0] == robustness["clean"]["torch"]["accuracy"]
    assert linf["accuracy"][-1] < linf["accuracy"][0]
    # every curve starts at the clean accuracy, to the bit (the L0 curve's had been a float32 mean)
    assert robustness["curves"]["l0"]["accuracy"][0] == robustness["clean"]["torch"]["accuracy"]
    names = [c["name"] for c in robustness["sanity"]]
    for expected in ("iterative >= single-step", "accuracy ~0 at very large eps", "outputs are logits (harp)",
                     "deterministic outputs (harp)", "black-box not stronger than white-box (harp)",
                     "accuracy non-increasing in budget (linf)", "adversarial examples within budget"):
        assert expected in names
    assert {c["status"] for c in robustness["sanity"]} <= {"PASS", "WARN"}
    status = {c["name"]: c["status"] for c in robustness["sanity"]}
    assert status["deterministic outputs (harp)"] == "PASS"
    assert status["outputs are logits (onnxruntime)"] == "PASS"
    assert status["adversarial examples within budget"] == "PASS"


def test_sanity_checks_flag_broken_evaluations():
    attacks = {"fgsm": {"torch_accuracy": 0.2, "eps": 0.1, "max_perturbation": 0.1,
                        "backends": {"harp": {"accuracy": 0.2}}},
               "pgd": {"torch_accuracy": 0.5, "eps": 0.1, "max_perturbation": 0.3,
                       "backends": {"harp": {"accuracy": 0.5}}}}
    assert sanity.iterative_vs_single_step(attacks, 1000).status == "WARN"
    rising = {"linf": {"budgets": [0, 0.1, 0.2], "accuracy": [0.9, 0.3, 0.6]}}
    assert sanity.monotone_curves(rising, 1000)[0].status == "WARN"
    assert sanity.large_eps(0.4).status == "WARN"
    blackbox = {"eps": 0.1, "queries": 100, "backends": {"harp": {"accuracy": 0.05, "max_perturbation": 0.1}}}
    assert sanity.blackbox_vs_whitebox(attacks, blackbox, 1000)[0].status == "WARN"
    # AutoAttack (strongest white-box) exposes the model, but PGD alone is fooled: still a WARN
    masked = {**attacks, "autoattack": {"backends": {"harp": {"accuracy": 0.02}}}}
    checks = {c.name: c.status for c in sanity.blackbox_vs_whitebox(masked, blackbox, 1000)}
    assert checks == {"black-box not stronger than white-box (harp)": "PASS",
                      "black-box not stronger than PGD (harp)": "WARN"}
    probs = np.full((4, 10), 0.1, np.float32)
    assert sanity.logits_not_probabilities({"x": probs})[0].status == "WARN"
    assert sanity.deterministic({"x": probs}, {"x": probs + 1e-3})[0].status == "WARN"
    assert sanity.within_budget(attacks, blackbox).status == "WARN"


def test_sanity_checks_pass_a_sound_evaluation():
    # the other direction: a check that always warned would make every report cry wolf
    attacks = {"fgsm": {"torch_accuracy": 0.5, "eps": 0.1, "max_perturbation": 0.1,
                        "backends": {"harp": {"accuracy": 0.5}}},
               "pgd": {"torch_accuracy": 0.3, "eps": 0.1, "max_perturbation": 0.1,
                       "backends": {"harp": {"accuracy": 0.3}}}}
    assert sanity.iterative_vs_single_step(attacks, 1000).status == "PASS"
    falling = {"linf": {"budgets": [0, 0.1, 0.2], "accuracy": [0.9, 0.3, 0.3005]}}  # a rise within tolerance
    assert sanity.monotone_curves(falling, 1000)[0].status == "PASS"
    assert sanity.large_eps(0.01).status == "PASS"
    blackbox = {"eps": 0.1, "queries": 100, "backends": {"harp": {"accuracy": 0.4, "max_perturbation": 0.1}}}
    assert {c.status for c in sanity.blackbox_vs_whitebox(attacks, blackbox, 1000)} == {"PASS"}
    logits = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32) * 5
    assert sanity.logits_not_probabilities({"x": logits})[0].status == "PASS"
    assert sanity.deterministic({"x": logits}, {"x": logits.copy()})[0].status == "PASS"
    assert sanity.within_budget(attacks, blackbox).status == "PASS"


# ---------------------------------------------------------------- pieces


def test_torch_graph_covers_every_op_and_matches_reference(artifact):
    from harp.export.bundle import load_bundle
    from harp.export.graph import OPS
    from harp.export.reference import run_reference

    assert set(HANDLERS) == set(OPS)
    model = load_torch_model(open_artifact(artifact))
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run_reference(load_bundle(artifact / "model.harpz").graph, x), atol=1e-5)


def test_greedy_pixel_attack_changes_at_most_k_pixels(artifact):
    model = load_torch_model(open_artifact(artifact))
    x = torch.from_numpy(np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32))
    y = model(x).argmax(1)
    x_adv, fooled_at = greedy_pixel_attack(model, x, y, 3)
    changed = ((x_adv - x).abs() > 0).any(1).flatten(1).sum(1)
    assert int(changed.max()) <= 3
    assert bool(((x_adv >= 0) & (x_adv <= 1)).all())
    with torch.no_grad():
        fooled_now = model(x_adv).argmax(1) != y
    assert bool((fooled_now == (fooled_at <= 3)).all())


def test_runtime_report_reads_how_a_given_artifact_was_pruned(artifact):
    from harp.bench import runtime_report

    source = runtime_report.given_source(artifact)
    assert source["label"] == "small_cnn (global_magnitude, digits)"
    assert source["target_sparsity"] == 0.5  # the goals of a given artifact follow its pruning target
    layers = open_artifact(artifact).layers
    assert source["densities"] == [layer["density"] for layer in layers] and len(layers) >= 3
    assert 0.1 < source["metrics"]["natural_accuracy"] <= 1.0
    row = {"artifact": str(artifact), "name": source["label"], "source": source}
    notes = runtime_report._given_notes({"latency": [row, dict(row)]})  # one line per artifact, not per batch
    assert len([line for line in notes if line]) == 1
    assert "global_magnitude on digits, pruned to 50.0%; natural " in notes[1]


def test_runtime_report_cold_start_times_the_runtime_and_harp_run_in_both_settings(artifact):
    from harp.bench import runtime_report

    cold = runtime_report.cold_start(artifact, threads=1, repeats=1)  # a failing `harp run` raises here
    for setting in ("venv", "device"):
        best = cold[setting]["best"]
        assert 0 < best["in_process_s"] < best["process_wall_s"]
        assert len(cold[setting]["harp_run_wall_s"]) == 1 and cold[setting]["harp_run_wall_s"][0] > 0
    assert cold["device"]["best"]["heavy_modules"] == []
    report = json.loads((Path(__file__).resolve().parents[2] / "bench" / "results" / "runtime.json").read_text())
    report["cold_start"] = {"artifact": "small_cnn", **cold}
    section = runtime_report.render(report).split("## Cold start")[1]
    assert f"measured {cold['date']}" in section and "| `harp run` wall |" in section
    assert f"**{cold['device']['harp_run_wall_s'][0]:.3f} s**" in section


def test_kernels_on_a_device_leave_out_the_libraries_it_lacks(artifact, device_python):
    # The torch and onnxruntime columns need those packages (and onnx, to build the one-node model).
    done = device_python(DEVICE_BENCH, "kernels", artifact, "--budget", "0.01", "--json", "-")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert rows and all(r["sparse_us"] > 0 and r["torch_us"] is None and r["onnxruntime_us"] is None for r in rows)


def test_kernels_table(artifact):
    from harp.bench.kernels_bench import run_kernels

    result = run_kernels(artifact, batches=(2,), repeats=3, budget_s=0.005)
    ops = {r["op"] for r in result["rows"]}
    assert ops == {"conv2d", "linear"}
    for r in result["rows"]:
        assert r["sparse_us"] > 0 and r["dense_us"] > 0 and r["torch_us"] > 0 and r["onnxruntime_us"] > 0
        assert r["auto_kernel"] in ("sparse", "dense", "winograd")
        assert r["unrolled_us"] is None  # offered at batch sizes of 16k only
    winograd = [r["winograd_us"] for r in result["rows"] if r["winograd_us"] is not None]
    assert winograd and all(t > 0 for t in winograd)  # the 3x3 stride-1 convs, and nothing else
    assert all(r["winograd_us"] is None for r in result["rows"] if r["op"] == "linear")


def test_kernels_baselines_pool_where_the_runtime_fused_a_pooling():
    from harp.bench.kernels_bench import _ort_layer, _torch_layer
    from harp.export.graph import Node

    rng = np.random.default_rng(0)
    node = Node("conv2d", "c", ("x",), "y", {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1})
    weight, bias = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((2, 3, 8, 6)).astype(np.float32)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), 1, 1)
    expected = torch.nn.functional.max_pool2d(conv, 2).numpy()
    pooled_torch = _torch_layer(node, weight, bias, x, 1, True)().numpy()
    pooled_ort = _ort_layer(node, weight, bias, x, 1, True)()[0]
    assert pooled_torch.shape == pooled_ort.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(pooled_torch, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled_ort, expected, rtol=1e-4, atol=1e-4)
    assert _ort_layer(node, weight, bias, x, 1, False)()[0].shape == (2, 4, 8, 6)


def test_report_writes_markdown_and_figures(artifact, tmp_path):
    from harp.bench.report import ReportOptions, write_report

    options = ReportOptions(LatencyOptions(backends=("harp",), batches=(1,), iters=50, warmup=2),
                            RobustnessOptions(n=32, attacks=("pgd",), steps=3, curves=("linf",), curve_steps=2,
                                              backends=("torch", "harp")))
    path = write_report([artifact], tmp_path / "report", options)
    text = path.read_text()
    for section in ("### Model card", "### Latency", "## Robustness", "Sanity checks", "Machine:"):
        assert section in text
    name = open_artifact(artifact).name  # the artifact's folder, or its parent's for OUT/artifact
    for png in (f"{name}-latency.png", f"{name}-sparsity.png", "robustness-curves.png"):
        data = (path.parent / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_figure_that_fails_midway_leaves_no_file(tmp_path):
    from harp.bench.plots import _save

    class FailsMidway:
        def savefig(self, f, **options):
            f.write(b"\x89PNG half a figure")
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        _save(FailsMidway(), tmp_path / "latency.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input


def _corrupt(artifact: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "corrupt"
    shutil.copytree(artifact, bad)
    data = bytearray((bad / "model.harpz").read_bytes())
    data[100] ^= 0xFF
    (bad / "model.harpz").write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("case, expected", [
    ("missing", "is not an artifact directory"),
    ("not_export", "is not a harp export"),
    ("corrupt", "SHA-256 does not match"),
    ("unknown_backend", "unknown value 'tvm'"),
    ("dataset_mismatch", "dataset mnist has 1x28x28 images"),
    ("missing_package", "needs the Python package 'onnxruntime'"),
    ("nan_seconds", "'--seconds': nan is not a finite number"),  # had failed inside the timing loop
    ("plot_folder_missing", "'--plot': cannot write"),  # had failed after the timing, with a traceback
    ("plot_without_curves", "--plot draws the robustness curves"),
    ("curves_without_curves", "--curves and --curve-steps set the curves that --no-curves skips"),  # ignored
    ("square_without_runtime", "attack square runs on the exported runtimes"),
    ("whatif_option_with_artifact", "--sparsity only applies with --arch"),  # had been ignored silently
    ("no_artifact", "give an ARTIFACT to time, or --arch"),
    ("demo_folder_taken", "runs/demo holds neither an artifact nor a harp pipeline run"),
    # the pipeline's own advice (pass the same options, or --force) had been printed: harp-bench takes neither
    ("demo_folder_other_run", "runs/demo holds a pipeline run made with other options than the demo's; `make demo`"),
    ("one_file_twice", "--json and --plot both write"),  # the plot had replaced the JSON
    ("md_to_stdout", "'-' (stdout) is for --json only"),  # had written a file named '-'
    ("iters_and_seconds", "give --iters or --seconds, not both"),  # --iters had been ignored
    ("report_figure_blocked", "report.md is a folder, not a file"),  # had failed after the benchmarks
])
def test_bad_input_is_one_line_and_exit_2(artifact, tmp_path, capsys, monkeypatch, case, expected):
    args = {
        "missing": ["latency", tmp_path / "nope"],
        "not_export": ["latency", tmp_path],
        "corrupt": ["latency", _corrupt(artifact, tmp_path) if case == "corrupt" else ""],
        "unknown_backend": ["latency", artifact, "--backends", "harp,tvm"],
        "dataset_mismatch": ["robustness", artifact, "--dataset", "mnist", "--n", "4"],
        "missing_package": ["latency", artifact, "--backends", "onnxruntime"],
        "nan_seconds": ["latency", artifact, "--backends", "harp", "--seconds", "nan"],
        "plot_folder_missing": ["latency", artifact, "--backends", "harp", "--plot", tmp_path / "nope" / "l.png"],
        "plot_without_curves": ["robustness", artifact, "--no-curves", "--plot", tmp_path / "r.png"],
        "curves_without_curves": ["robustness", artifact, "--no-curves", "--curves", "l0", "--curve-steps", "3"],
        "square_without_runtime": ["robustness", artifact, "--backends", "torch", "--attacks", "square"],
        "whatif_option_with_artifact": ["latency", artifact, "--sparsity", "0.5"],
        "no_artifact": ["latency"],
        "demo_folder_taken": [],
        "demo_folder_other_run": [],
        "one_file_twice": ["latency", artifact, "--json", tmp_path / "o.json", "--plot", tmp_path / "o.json"],
        "md_to_stdout": ["latency", artifact, "--md", "-"],
        "iters_and_seconds": ["latency", artifact, "--iters", "60", "--seconds", "1"],
        "report_figure_blocked": ["report", artifact, "--out", tmp_path, "--no-robustness"],
    }[case]
    if case == "report_figure_blocked":
        (tmp_path / "report.md").mkdir()
    if case == "demo_folder_taken":  # no command: harp-bench builds runs/demo unless something else is there
        monkeypatch.chdir(tmp_path)
        (tmp_path / "runs" / "demo").mkdir(parents=True)
        (tmp_path / "runs" / "demo" / "notes.txt").write_text("mine")
    if case == "demo_folder_other_run":
        monkeypatch.chdir(tmp_path)
        (tmp_path / "runs" / "demo").mkdir(parents=True)
        (tmp_path / "runs" / "demo" / "pipeline.json").write_text(json.dumps({"options": {"sparsity": 0.9}}))
    if case == "missing_package":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, _, err = bench(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("harp-bench: warning:")]
    assert len(lines) == 1 and lines[0].startswith("harp-bench: error:") and expected in lines[0], err


def test_a_whatif_input_too_small_for_the_architecture_is_one_error_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the what-if artifact is written under runs/
    code, _, err = bench(["latency", "--arch", "small_cnn", "--input-shape", "1,2,2", "--iters", "50", "--batch",
                          "1", "--backends", "harp"], capsys)
    assert code == 2 and "Traceback" not in err, err  # had been a RuntimeError traceback from topk_mask
    assert err.splitlines()[-1].startswith("harp-bench: error: --arch small_cnn cannot run on the 1x2x2 images "
                                           "of what-if: ")


@pytest.mark.parametrize("classes", [3, 5])
def test_autoattack_runs_on_models_with_fewer_than_ten_classes(classes):
    # the standard version's 9 target classes had ended in an IndexError traceback below 10 classes
    from harp.bench.robustness import autoattack, autoattack_plan

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, classes)).eval()
    x = torch.rand(16, 1, 4, 4)
    y = model(x).argmax(1)  # every clean prediction right
    x_adv = autoattack(model, x, y, 0.3, seed=0)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert (model(x_adv).argmax(1) == y).float().mean() < 0.5
    attacks, targets = autoattack_plan(classes)
    assert targets == classes - 1 and ("apgd-t" in attacks) == (classes >= 4)


def test_an_imagefolder_whose_classes_were_renamed_is_refused(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from harp.bench.robustness import evaluation_spec
    from harp.errors import HarpError

    for split in ("train", "val"):
        for label in ("cat", "dog", "fox"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "0.png")
    name = f"imagefolder:{tmp_path}"
    art = SimpleNamespace(root=tmp_path, name="cnn", dataset=name, input_shape=(3, 32, 32), classes=3,
                          class_names=["cat", "dog", "fox"])  # what its manifest records
    assert evaluation_spec(art, RobustnessOptions()).class_names == ("cat", "dog", "fox")
    for split in ("train", "val"):  # the same count: every label would now mean another class
        (tmp_path / split / "cat").rename(tmp_path / split / "zebra")
    with pytest.raises(HarpError, match="cnn was trained on classes cat, dog, fox; dataset imagefolder:"
                                        r"\S+ now has dog, fox, zebra"):
        evaluation_spec(art, RobustnessOptions())


def test_every_artifact_is_checked_before_any_is_evaluated(artifact, csr_artifact, tmp_path, capsys):
    # The CSR-only export has no model.onnx: refused before the first artifact's minutes of attacks.
    code, _, err = bench(["robustness", artifact, csr_artifact, "--backends", "torch,onnxruntime", "--n", "8",
                          "--attacks", "fgsm", "--no-curves"], capsys)
    assert code == 2 and "needs model.onnx" in err and "clean" not in err, err
    code, _, err = bench(["report", artifact, csr_artifact, "--out", tmp_path / "report", "--backends",
                          "onnxruntime", "--iters", "50", "--batch", "1", "--n", "8"], capsys)
    assert code == 2 and "needs model.onnx" in err and not (tmp_path / "report").exists(), err


def test_missing_evaluation_data_is_refused_before_anything_runs(artifact, tmp_path, capsys, monkeypatch):
    # The data was read only when the robustness part began: report had timed the latency and written
    # its PNGs first, robustness had evaluated every artifact before the one whose data was missing.
    import harp.data
    from harp.bench import robustness
    from harp.errors import HarpError

    def missing(name, train, **kw):
        raise HarpError(f"dataset {name!r} under nowhere is missing or unreadable")

    monkeypatch.setattr(harp.data, "load_split", missing)
    robustness._test_split.cache_clear()  # an earlier test's digits
    code, _, err = bench(["report", artifact, "--out", tmp_path / "report", "--backends", "torch", "--iters", "50",
                          "--batch", "1", "--n", "8", "--attacks", "fgsm"], capsys)
    assert code == 2 and "missing or unreadable" in err and not (tmp_path / "report").exists(), err


@pytest.mark.parametrize("edit, message", [  # each had been a traceback after the latency run, beside its PNGs
    (lambda m: m.update(channel_trimming="lots"), "channel_trimming does not count channels_removed"),
    (lambda m: m.update(source={"checkpoint": 5}), "source.checkpoint 5 is not a path"),
    (lambda m: m["model"].update(nonzero_params=-5), "nonzero_params -5 are not two counts"),  # had been printed
    (lambda m: m["model"]["metrics"].update(natural_accuracy="high"), "natural_accuracy 'high' is not a fraction"),
])
def test_a_manifest_fact_the_model_card_cannot_show_is_refused_before_timing(artifact, tmp_path, capsys, edit,
                                                                              message):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = bench(["report", art, "--out", tmp_path / "report", "--backends", "harp", "--iters", "50",
                          "--batch", "1", "--no-robustness"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "report").exists()
    assert run_cli(harp_cli, ["verify", str(art), "--formats", "csr"]) == 2  # verify refuses what reports do
    assert message in capsys.readouterr().err


def test_a_report_that_fails_midway_leaves_no_folder(artifact, tmp_path, monkeypatch):
    from harp.bench import report
    from harp.errors import HarpError

    def fails(*args, **kwargs):
        raise HarpError("attack diverged")

    monkeypatch.setattr(report, "run_robustness", fails)  # after the latency plots were written
    options = report.ReportOptions(LatencyOptions(backends=("harp",), batches=(1,), iters=50, warmup=2),
                                   RobustnessOptions(n=8, attacks=("fgsm",), curves=(), backends=("torch",)))
    with pytest.raises(HarpError, match="attack diverged"):
        report.write_report([artifact], tmp_path / "report", options)
    assert not (tmp_path / "report").exists()  # had held the latency and sparsity PNGs, no report.md


def test_robustness_by_default_evaluates_what_the_artifact_can_run(csr_artifact, capsys):
    code, out, err = bench(["robustness", csr_artifact, "--n", "8", "--attacks", "fgsm", "--no-curves",
                            "--json", "-"], capsys)
    assert code == 0, err
    assert list(json.loads(out)["runs"][0]["clean"]) == ["torch", "harp"]
    assert "not evaluating onnxruntime (the artifact has no model.onnx)" in err


def test_two_artifacts_of_one_name_keep_apart_in_tables_and_plots(artifact, tmp_path, capsys):
    code, _, err = bench(["robustness", artifact, artifact, "--n", "16", "--attacks", "fgsm", "--curves", "linf",
                          "--curve-steps", "2", "--backends", "torch", "--json", tmp_path / "r.json", "--md",
                          tmp_path / "r.md"], capsys)
    assert code == 0, err
    name = open_artifact(artifact).name
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [run["artifact"]["label"] for run in runs] == [name, f"{name}-2"]
    markdown = (tmp_path / "r.md").read_text()
    assert f"### {name} (" in markdown and f"### {name}-2 (" in markdown
    assert "Square runs on each runtime" not in markdown  # square did not run


def test_a_robustness_markdown_names_the_command_that_makes_it_again(artifact, tmp_path, capsys):
    code, _, err = bench(["robustness", artifact, "--n", "8", "--attacks", "fgsm", "--curves", "l2", "--curve-steps",
                          "2", "--backends", "torch", "--seed", "3", "--json", tmp_path / "r.json", "--md",
                          tmp_path / "r.md"], capsys)
    assert code == 0, err
    command = re.fullmatch(r"Generated by `(.*)`\.", (tmp_path / "r.md").read_text().splitlines()[0]).group(1)
    words = shlex.split(command)
    assert words[:2] == ["harp-bench", "robustness"]
    code, _, err = bench([*words[1:], "--json", tmp_path / "again.json"], capsys)
    assert code == 0, err
    first, again = (json.loads((tmp_path / name).read_text())["runs"][0] for name in ("r.json", "again.json"))
    assert again["options"] == first["options"] and again["options"]["seed"] == 3
    assert again["clean"] == first["clean"] and again["curves"] == first["curves"]


def test_markdown_links_reach_the_figure_from_where_the_markdown_is_written(tmp_path):
    from harp.bench.tables import markdown_link

    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "r.md").symlink_to(tmp_path / "deep" / "er" / "r.md")  # written through the symlink
    assert markdown_link(tmp_path / "c.png", tmp_path / "r.md") == "../../c.png"
    assert markdown_link(tmp_path / "my plots" / "c.png", tmp_path / "x.md") == "<my plots/c.png>"
