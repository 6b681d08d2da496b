"""The pruning report's tables: merging runs made in parallel, each row against its own dense reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harp.bench import pruning_report


def _row(method: str, sparsity: float, epoch: float | None, **extra) -> dict:
    return {"method": method, "sparsity": sparsity, "granularity": "weight", "achieved_sparsity": sparsity,
            "flops_reduction": 0.5, "pruned": {"natural": 0.5, "robust": 0.2},
            "finetuned": {"natural": 0.9, "robust": 0.6}, "finetune_loss": "pgd",
            "robust_attack": {"name": "pgd", "eps": 0.3, "steps": 40, "step_size": 0.01}, "test_examples": 2000,
            "layers": {"a": 0.5, "b": 0.01}, "prune_seconds": 100.0, "prune_epoch_seconds": epoch,
            "finetune_epoch_seconds": 10.0, "adversarial_examples": {"prune": 30000 if epoch else 0,
                                                                      "finetune": 30000}, **extra}


def _run(tmp_path, name: str, dense_epoch: float, rows: list[dict]):
    header = {"dataset": "mnist", "granularity": "weight", "dense": "runs/mnist-pgd",
              "dense_metrics": {"natural_accuracy": 0.99, "robust_accuracy": 0.95}, "dense_epoch_seconds": dense_epoch,
              "machine": "test", "command": f"run {name}", "seconds": 60.0}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"header": header, "rows": rows}))
    return path


def test_rerender_merges_runs_and_keeps_each_rows_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(pruning_report, "RESULTS", tmp_path / "results")
    curve = {"budgets": [0.0, 0.3], "accuracy": [0.9, 0.5], "attack": "PGD-linf", "steps": 40}
    aa = {"accuracy": 0.4, "examples": 1000, "seconds": 1.0}
    apgd = {"accuracy": 0.45, "examples": 1000, "seconds": 1.0}
    a = _run(tmp_path, "a", 100.0, [_row("harp", 0.99, 110.0, autoattack=aa, apgd_square=apgd, linf_curve=curve),
                                    _row("lwm", 0.99, None), _row("pwoa", 0.99, 20.0)])
    b = _run(tmp_path, "b", 50.0, [_row("harp", 0.999, 60.0), _row("lwm", 0.999, None)])
    pruning_report.main(["--from-json", f"{b},{a}", "--methods", "harp,lwm", "--name", "merged"])
    text = (tmp_path / "results" / "merged.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| harp") or line.startswith("| lwm")]
    # sorted by sparsity then by the order of --methods; pwoa left out
    assert [line.split(" | ")[0:2] for line in table[:4]] == [["| harp", "99.00%"], ["| lwm", "99.00%"],
                                                              ["| harp", "99.90%"], ["| lwm", "99.90%"]]
    assert "pwoa" not in text
    pruning_report.main(["--from-json", str(a), "--methods", "harp,pwoa", "--name", "pwoa"])
    pwoa = [line for line in (tmp_path / "results" / "pwoa.md").read_text().splitlines() if line.startswith("| pwoa")]
    assert "| 0.20x / 0.18x |" in pwoa[0]  # 20/100 of the dense epoch, 20/110 of HARP's
    # 110/100 and 60/50, not one shared dense reference; then the ratio to HARP's own epoch
    assert "| 1.10x / 1.00x |" in table[0] and "| 1.20x / 1.00x |" in table[2]
    assert "| 45.00% | 40.00% |" in table[0] and "30.0k + 30.0k" in table[0]  # APGD-CE + Square, then AutoAttack
    assert "| - | - |" in table[1]  # not measured: a dash, not a number
    assert "one-shot" in table[1] and "0 + 30.0k" in table[1]
    assert (tmp_path / "results" / "merged-linf.png").stat().st_size > 0
    merged = json.loads((tmp_path / "results" / "merged.json").read_text())
    assert [r["dense_epoch_seconds"] for r in merged["rows"]] == [100.0, 100.0, 50.0, 50.0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from harp.cli_errors import run_script

    monkeypatch.setattr(pruning_report, "RESULTS", tmp_path / "results")

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # had been a RecursionError traceback
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # had blocked forever on the read
    no_sparsity, short_row = tmp_path / "no_sparsity.json", tmp_path / "short_row.json"
    header = {"seconds": 1.0, "dense_epoch_seconds": 1.0, "command": "x"}
    no_sparsity.write_text(json.dumps({"header": header, "rows": [{"method": "lwm"}]}))  # had been a KeyError
    short_row.write_text(json.dumps({"header": header, "rows": [{"method": "lwm", "sparsity": 0.9}]}))
    for argv, message in [(["--methods", "obd"], "unknown method(s): obd"),
                          (["--from-json", str(bad)], "not a pruning report's results JSON"),
                          (["--from-json", str(tmp_path / "missing.json")], "No such file"),
                          (["--from-json", str(deep)], "nested too deeply"),
                          (["--from-json", str(fifo)], "not a regular file"),
                          (["--from-json", str(tmp_path)], "not a regular file"),
                          (["--from-json", str(no_sparsity), "--methods", "lwm"], "rows[0] lacks a method or a sparsity"),
                          (["--from-json", str(short_row), "--methods", "lwm"], "lacks a field the report shows"),
                          # these had been a ValueError traceback, and a refusal after the dense model's
                          # training and timing
                          (["--sparsity", "abc", "--work", str(tmp_path / "w")], "is not a comma-separated list"),
                          (["--sparsity", "1.5", "--work", str(tmp_path / "w")], "sparsity must be in [0, 1)"),
                          (["--dense", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")], "nowhere")]:
        assert run_script(lambda: pruning_report.main(argv), "pruning_report") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()  # nothing started
    assert not list((tmp_path / "results").glob("*"))  # and nothing written


def test_missing_data_is_one_line_that_suggests_no_option_the_script_lacks(tmp_path, monkeypatch, capsys):
    from harp.cli_errors import run_script

    monkeypatch.setattr(pruning_report, "RESULTS", tmp_path / "results")
    argv = ["--dataset", "mnist", "--data-root", str(tmp_path / "nodata"), "--work", str(tmp_path / "w")]
    assert run_script(lambda: pruning_report.main(argv), "pruning_report") == 2
    err = capsys.readouterr().err
    assert "missing or unreadable (pass --data-root to point at it)" in err, err  # had suggested --download
    assert err.count("\n") == 1


def test_an_unwritable_results_folder_is_refused_before_the_dense_model_trains(tmp_path, monkeypatch, capsys):
    from harp.cli_errors import run_script

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(pruning_report, "RESULTS", tmp_path / "afile")
    assert run_script(lambda: pruning_report.main(["--work", str(tmp_path / "w")]), "pruning_report") == 2
    err = capsys.readouterr().err
    assert "afile is a file, not a folder" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_winners_rank_by_worst_case_and_leave_chance_level_models_out():
    def row(method, natural, pgd, aa):
        return _row(method, 0.99, 1.0, finetuned={"natural": natural, "robust": pgd},
                    autoattack={"accuracy": aa, "examples": 1000, "seconds": 1.0})

    # HARP leads under PGD but is gradient-masked (AutoAttack 3%); PwoA is a constant classifier.
    rows = [row("harp", 0.95, 0.74, 0.03), row("hydra", 0.72, 0.56, 0.08), row("pwoa", 0.10, 0.10, 0.10)]
    lines = pruning_report.winners(rows, classes=10)
    assert "- 99.00%: natural harp (95.00%); PGD harp (74.00%); worst case hydra (8.00%); not ranked: pwoa." in lines
    assert lines[-2].endswith("pwoa 10.00% (not ranked): holds.")  # by PGD
    assert lines[-1].endswith("pwoa 10.00% (not ranked): does not hold.")  # by worst case: hydra 8% > harp 3%


def test_epoch_cost_refuses_counts_below_one(tmp_path, capsys):
    from harp.bench import epoch_cost
    from harp.cli_errors import run_script

    # --batches 0 had been a ZeroDivisionError after both models were built, --threads 0 torch's RuntimeError
    for flag in ("--batches", "--threads"):
        argv = ["--dense", str(tmp_path / "nowhere"), flag, "0"]
        assert run_script(lambda: epoch_cost.main(argv), "epoch_cost") == 2
        err = capsys.readouterr().err
        assert f"{flag} must be >= 1, got 0" in err and err.count("\n") == 1


def test_results_go_to_bench_results_of_a_checkout_and_never_into_an_installed_package(tmp_path, monkeypatch):
    # an installed wheel had written the reports into site-packages/harp/bench/results
    import importlib.util
    import shutil

    import harp.bench

    assert harp.bench.results_dir() == Path(harp.bench.__file__).resolve().parent / "results"
    installed = tmp_path / "site-packages" / "harp" / "bench"
    installed.mkdir(parents=True)
    shutil.copy(harp.bench.__file__, installed / "__init__.py")
    spec = importlib.util.spec_from_file_location("installed_bench", installed / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    assert module.results_dir() == tmp_path / "bench-results"
