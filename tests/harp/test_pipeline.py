"""The whole job: every stage runs once, and a re-run reuses the stages that finished."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest

from harp.checkpoint import load_checkpoint
from harp.errors import HarpError
from harp.pipeline import PipelineOptions, check_continues, run_pipeline, stage_done


def test_pipeline_runs_every_stage_and_a_rerun_reuses_them(tmp_path):
    opts = PipelineOptions(dataset="digits", method="global-magnitude", sparsity=0.5, adv="none",
                           train_epochs=3, finetune_epochs=1, export=False)
    out = tmp_path / "run"
    results = run_pipeline(opts, out, quiet=True, log=lambda _: None)
    assert set(results) == {"dense", "pruned", "finetuned"}
    assert results["finetuned"]["natural_accuracy"] > 0.5  # ten classes: chance is 0.1
    tuned = load_checkpoint(out / "finetuned")
    assert abs(tuned.meta["pruning"]["achieved_sparsity"] - 0.5) < 0.01
    stamps = {stage: (out / stage / "meta.json").stat().st_mtime_ns for stage in ("dense", "pruned", "finetuned")}
    logged = []
    run_pipeline(opts, out, quiet=True, log=logged.append)
    assert logged == []  # no stage announced itself: all three were reused
    assert {stage: (out / stage / "meta.json").stat().st_mtime_ns for stage in stamps} == stamps
    (out / "finetuned" / "meta.json").unlink()  # an interrupted stage is not done, and runs again
    assert not stage_done(out / "finetuned")
    run_pipeline(opts, out, quiet=True, log=logged.append)
    assert len(logged) == 1 and "fine-tuning" in logged[0] and stage_done(out / "finetuned")


def test_a_rerun_with_other_options_is_refused_and_settings_may_change(tmp_path):
    opts = PipelineOptions(dataset="digits", method="global-magnitude", sparsity=0.5, adv="none",
                           train_epochs=2, finetune_epochs=1, export=False)
    out = tmp_path / "run"
    run_pipeline(opts, out, quiet=True, log=lambda _: None)
    # had reused the 50% stages silently, and recorded 60% in pipeline.json
    with pytest.raises(HarpError, match=re.escape(f"{out} holds a run made with --sparsity 0.5 (now 0.6), "
                                                  "--finetune-epochs 1 (now default); pass the same options")):
        run_pipeline(replace(opts, sparsity=0.6, finetune_epochs=None), out, quiet=True, log=lambda _: None)
    logged = []
    run_pipeline(replace(opts, device="cpu", data_root="elsewhere"), out, quiet=True, log=logged.append)
    assert logged == []  # where and on what it runs may change: every stage was reused
    assert json.loads((out / "pipeline.json").read_text())["options"]["sparsity"] == 0.5


@pytest.mark.parametrize("edit, shown", [
    (lambda o: o.pop("seed"), "--seed 0 (now 3)"),  # a missing key had matched any value
    (lambda o: o.update(seed=False), "--seed false (now 3)"),  # false == 0 had matched --seed 0
    (lambda o: o.update(sparsity="0.9"), '--sparsity "0.9" (now 0.9)'),  # had read '0.9 (now 0.9)'
], ids=["missing", "false", "string"])
def test_a_record_with_a_missing_or_mistyped_option_is_not_the_same_run(tmp_path, edit, shown):
    opts = PipelineOptions(sparsity=0.9, seed=0)
    options = asdict(opts)
    edit(options)
    (tmp_path / "pipeline.json").write_text(json.dumps({"options": options, "results": None}))
    now = replace(opts, seed=3) if "seed" in shown else opts
    with pytest.raises(HarpError, match=re.escape(f"holds a run made with {shown}; pass the same options")):
        check_continues(tmp_path, now)
    if shown.startswith("--seed 0"):
        check_continues(tmp_path, opts)  # a missing key is its default

def test_an_out_that_is_not_a_pipeline_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HarpError, match="is not a harp pipeline's output"):
        run_pipeline(PipelineOptions(export=False), tmp_path, quiet=True, log=lambda _: None)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_run_refused_before_its_first_stage_leaves_nothing(tmp_path):
    # pipeline.json had stayed behind, and then refused the corrected command as "a run made with --arch bogus".
    out = tmp_path / "run"
    with pytest.raises(HarpError, match="unknown architecture 'bogus'"):
        run_pipeline(PipelineOptions(arch="bogus", export=False), out, quiet=True, log=lambda _: None)
    assert not out.exists()
    with pytest.raises(HarpError, match="global-magnitude prunes weights only"):  # had trained first
        run_pipeline(PipelineOptions(method="global-magnitude", granularity="channel", export=False), out,
                     quiet=True, log=lambda _: None)
    assert not out.exists()


def test_an_interrupted_stage_resumes_from_its_last_epoch(tmp_path):
    args = [sys.executable, "-m", "harp", "pipeline", "--dataset", "digits", "--method", "global-magnitude",
            "--sparsity", "0.5", "--adv", "none", "--train-epochs", "40", "--finetune-epochs", "1", "--no-export",
            "--quiet", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    state = tmp_path / "run" / "dense" / "state" / "state.json"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 3:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 3 <= killed_at < 40, "the run must be killed mid-way"

    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "(resuming the interrupted run)" in second.stdout.splitlines()[0]
    history = load_checkpoint(tmp_path / "run" / "dense").meta["history"]
    assert [h["epoch"] for h in history] == list(range(1, 41))


def test_a_stage_that_records_no_accuracy_is_one_line(digits_ckpt, tmp_path):
    import shutil

    from harp.pipeline import _stage_metrics

    stage = tmp_path / "dense"
    shutil.copytree(digits_ckpt, stage)
    assert _stage_metrics(stage)["natural_accuracy"] > 0.5
    meta = json.loads((stage / "meta.json").read_text())
    del meta["metrics"]  # had been a KeyError traceback after the stage was taken as done
    (stage / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HarpError, match="records no natural and robust accuracy"):
        _stage_metrics(stage)


def test_subset_reaches_every_stage(tmp_path, capsys):
    from harp.cli import cli, run_cli

    out = tmp_path / "run"
    assert run_cli(cli, ["pipeline", "--dataset", "digits", "--method", "global-magnitude", "--sparsity", "0.5",
                         "--adv", "none", "--train-epochs", "1", "--finetune-epochs", "1", "--no-export",
                         "--subset", "200", "--out", str(out), "--quiet"]) == 0
    assert "finetuned" in capsys.readouterr().out
    for stage in ("dense", "pruned", "finetuned"):  # the full digits test split has 450 examples
        assert load_checkpoint(out / stage).meta["metrics"]["test_examples"] == 200, stage
    assert json.loads((out / "pipeline.json").read_text())["options"]["subset"] == 200


def test_pipeline_refuses_torchrun(tmp_path, monkeypatch):
    # every rank took the folder's lock: the second was refused with "being written by another harp
    # process (pid <its sibling rank>)" and torchrun stopped the other mid-training
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    opts = PipelineOptions(dataset="digits", method="hydra", sparsity=0.5, export=False)
    with pytest.raises(HarpError, match="harp pipeline runs in one process"):
        run_pipeline(opts, tmp_path / "run", quiet=True, log=lambda _: None)
    assert not (tmp_path / "run").exists()
