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
