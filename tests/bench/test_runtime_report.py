"""The runtime report's goal accounting and its bad-input handling (the timed runs are a benchmark, not a test)."""

import pytest

from harp.bench import export_sizes, runtime_report
from harp.cli_errors import run_script


def row(speedup: float, dense: int, nonzero: int, harp_gflops: float, ort_gflops: float) -> dict:
    return {"target_sparsity": 0.99, "batch": 16, "speedup": speedup,
            "macs_per_image": {"dense": dense, "nonzero": nonzero},
            "gflops": {"harp": harp_gflops, "onnxruntime": ort_gflops}}


def test_missed_goal_states_the_speed_per_multiply_add_it_needs():
    # 3.5x fewer multiply-adds cannot give 8x unless each runs 2.29x faster than ORT's dense ones.
    assert runtime_report._needs(row(1.3, 350, 100, 29.0, 80.0)) == "; needs 229% of ORT's GFLOP/s, has 36%"
    assert runtime_report._mac_ratio(row(1.3, 350, 100, 29.0, 80.0)) == "3.5x"
    assert runtime_report._needs({"target_sparsity": 0.99, "batch": 1}) == ""  # rows from before MAC counts


def test_a_near_miss_of_never_slower_is_not_rounded_to_1x():
    assert runtime_report._times(0.954) == "0.95x" and runtime_report._times(1.004) == "1.00x"
    assert runtime_report._times(6.84) == "6.8x"


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    for argv, message in [(["--iters", "10"], "--iters must be >= 50"), (["--passes", "0"], "--passes must be >= 1"),
                          (["--threads", "0"], "--threads must be in 1.."),
                          (["--archs", "alexnet"], "unknown architecture(s) alexnet"),
                          (["--artifact", str(tmp_path / "missing")], "not a directory")]:
        assert run_script(lambda: runtime_report.main(argv + ["--out", str(tmp_path / "r.md")]),
                          "runtime_report") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("script", [runtime_report, export_sizes])
def test_the_report_file_is_checked_before_the_work(script, tmp_path, capsys):
    # both had exported and timed (or trained) for minutes, then failed in a traceback on writing
    (tmp_path / "afile").write_text("")
    for out, message in [(tmp_path / "afile" / "r.md", "afile is a file, not a folder"),
                         (tmp_path / "afile" / "sub" / "r.md", "Not a directory"),
                         (tmp_path, "is a folder, not a file")]:
        name = script.__name__.rsplit(".", 1)[1]
        assert run_script(lambda: script.main(["--out", str(out), "--work", str(tmp_path / "w")]), name) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_checkpoints_are_exported_once_each_even_with_the_same_folder_names(digits_ckpt, tmp_path):
    import shutil

    ckpts = [tmp_path / run / "finetuned" for run in ("a", "b")]
    for ckpt in ckpts:
        shutil.copytree(digits_ckpt, ckpt)
    work = tmp_path / "work"
    first = runtime_report.export_checkpoints([str(c) for c in ckpts], work)
    assert [p.name for p in first] == ["ckpt-a-finetuned", "ckpt-b-finetuned"]
    stamps = [(p / "manifest.json").stat().st_mtime_ns for p in first]
    assert runtime_report.export_checkpoints([str(c) for c in ckpts], work) == first  # reused, not re-exported
    assert [(p / "manifest.json").stat().st_mtime_ns for p in first] == stamps
    same = runtime_report.export_checkpoints([str(ckpts[0]), str(ckpts[0])], work)
    assert same[0] != same[1]  # the same checkpoint twice: two rows, two folders


def test_passes_merge_into_each_backends_best_median():
    def stats(ms):
        return {"median_ms": ms, "p90_ms": ms, "p99_ms": ms}

    rows = [{"batch": 16, "harp": stats(h), "onnxruntime": stats(o), "speedup": o / h, "load": [load],
             "macs_per_image": {"dense": 1000, "nonzero": 10}} for h, o, load in ((2.0, 50.0, 0.5), (1.0, 60.0, 1.5))]
    merged = runtime_report.merge_passes(rows)
    assert merged["harp"]["median_ms"] == 1.0 and merged["onnxruntime"]["median_ms"] == 50.0
    assert merged["speedup"] == 50.0 and merged["passes"] == 2 and merged["load"] == [0.5, 1.5]
    assert merged["gflops"] == {"harp": 2 * 10 * 16 / 1e6, "onnxruntime": 2 * 1000 * 16 / 50e6}
