"""The runtime report's goal accounting and its bad-input handling (the timed runs are a benchmark, not a test)."""

from harp.bench import runtime_report
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


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    for argv, message in [(["--iters", "10"], "--iters must be >= 50"),
                          (["--threads", "0"], "--threads must be in 1.."),
                          (["--archs", "alexnet"], "unknown architecture(s) alexnet"),
                          (["--artifact", str(tmp_path / "missing")], "not a directory")]:
        assert run_script(lambda: runtime_report.main(argv + ["--out", str(tmp_path / "r.md")]),
                          "runtime_report") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r.md").exists()
