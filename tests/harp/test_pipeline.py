"""The whole job: every stage runs once, and a re-run reuses the stages that finished."""

from harp.checkpoint import load_checkpoint
from harp.pipeline import PipelineOptions, run_pipeline, stage_done


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
