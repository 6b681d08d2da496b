"""Output folders: one harp process writes a folder at a time (`harp.outdir.writing`)."""

import os
import signal
import subprocess
import sys

import pytest

from harp.errors import HarpError
from harp.outdir import _lock_path, make_out_dir, writing

HOLD = """
import sys, time
from pathlib import Path
from harp.outdir import writing
with writing(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_writing_the_same_folder_is_refused(tmp_path):
    # two runs into one --out had both printed success; the folder held the last one's files only
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        done = subprocess.run([sys.executable, "-m", "harp", "train", "--epochs", "1", "--subset", "100", "--quiet",
                               "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (f"harp: error: {out} is being written by another harp process (pid {holder.pid}); "
                               "wait for it to finish, or write to another folder\n")
        with pytest.raises(HarpError, match="is being written by another harp process"):
            with writing(tmp_path / "sub" / ".." / "run"):  # the same folder by another name
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder that dies in any way releases the folder
        holder.wait()
    with writing(out):
        assert _lock_path(out).read_text() == str(os.getpid())
    assert not _lock_path(out).exists()  # removed once released
    with writing(tmp_path / "other"), writing(out):  # other folders are independent
        pass


@pytest.mark.parametrize("stop", [KeyboardInterrupt, HarpError])
def test_a_run_stopped_before_its_first_epoch_leaves_no_folder_it_made(tmp_path, stop):
    # Ctrl-C or SIGTERM in the first epoch of train/prune/finetune had left an empty --out (or state/)
    def run(out, state_json=False):
        with pytest.raises(stop):
            with writing(out):
                make_out_dir(out, force=False, resume=False)
                (out / "state").mkdir()
                (out / "state" / "model-1.safetensors").write_bytes(b"weights")
                if state_json:  # an epoch finished: --resume continues it, so it stays
                    (out / "state" / "state.json").write_text("{}")
                raise stop()

    run(tmp_path / "new" / "run")
    assert not (tmp_path / "new" / "run").exists()
    run(tmp_path / "resumable", state_json=True)
    assert (tmp_path / "resumable" / "state" / "state.json").is_file()
    (tmp_path / "mine").mkdir()  # a folder the user made stays, emptied or not
    run(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()
