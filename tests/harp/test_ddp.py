"""torchrun with 2 CPU processes (gloo): ranks end with bit-identical weights."""

import json
import os
import subprocess
import sys


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    # torchrun's own logs go under tmp_path: by default it leaves a torchelastic_* directory in /tmp.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(tmp_path / "torchrun-logs"),
           "-m", "harp", "train", "--dataset", "digits", "--epochs", "4", "--steps", "2",
           "--device", "cpu", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "weights_identical": True}
    assert meta["metrics"]["natural_accuracy"] > 0.3  # learned something in 4 short epochs


def test_sharded_accuracy_scores_every_example_once():
    # Each rank got n // world_size examples: the last n % world_size were never scored, yet counted
    # in test_examples (449 test images on 2 ranks: 448 scored).
    import torch

    from harp.data import load_split
    from harp.evaluate import accuracy
    from harp.training.distributed import DistContext

    class Rank(DistContext):  # one rank of a world, its counts summed by the test instead of all_reduce
        def sum(self, values):
            return values

    test = load_split("digits", False).subset(449)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    scored = []  # the examples each call scores, counted in the model's forward
    model.register_forward_hook(lambda module, args, out: scored.append(len(out)))
    for world_size in (2, 3, 4):
        scored.clear()
        for rank in range(world_size):
            accuracy(model, test, torch.device("cpu"), dist_ctx=Rank(rank, world_size), batch_size=64)
        assert sum(scored) == len(test), world_size


def test_two_process_recorded_pgd_accuracy_is_the_one_harp_eval_measures(tmp_path):
    # each rank had drawn PGD's random starts from seed 0 for its own shard: 11.5% recorded, 11.25% by harp eval
    from harp.evaluate import evaluate_checkpoint

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(tmp_path / "torchrun-logs"), "-m", "harp", "train", "--dataset", "digits",
           "--epochs", "2", "--subset", "400", "--eps", "0.1", "--device", "cpu", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads((out / "meta.json").read_text())["metrics"]
    measured = evaluate_checkpoint(str(out), eps=0.1, steps=recorded["robust_attack"]["steps"],
                                   n=recorded["test_examples"], device="cpu", quiet=True)
    assert (recorded["natural_accuracy"], recorded["robust_accuracy"]) == \
        (measured["natural_accuracy"], measured["robust_accuracy"])
