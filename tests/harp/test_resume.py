"""A training run killed with SIGKILL mid-epoch resumes and ends where an uninterrupted run ends."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from harp.cli import cli, run_cli

ARGS = ["train", "--dataset", "digits", "--epochs", "12", "--steps", "3", "--subset", "600", "--quiet"]


def _harp(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "harp", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _kill_after_epochs(proc, out, epochs: int) -> int:
    """SIGKILL `proc` once its saved state in `out` has `epochs` finished epochs; the epochs it had."""
    state = out / "state" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= epochs:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())["epoch"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    done = _kill_after_epochs(_harp(*ARGS, "--out", str(killed)), killed, 3)
    assert 3 <= done < 12, "the run must be killed mid-way"
    assert not (killed / "meta.json").exists()
    killed_seconds = json.loads((killed / "state" / "state.json").read_text())["wall_seconds"]
    stale = killed / "state" / f".model-{done + 1}.safetensors.k1ll3d.tmp"  # a write the kill cut short
    stale.write_bytes(b"\0" * 1000)

    resumed = _harp(*ARGS, "--out", str(killed), "--resume")
    reference = _harp(*ARGS, "--out", str(clean))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()

    meta = json.loads((killed / "meta.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == list(range(1, 13))
    assert not stale.exists()  # swept at the next save, not kept for good
    # the wall time counts the killed session's epochs as well as the resumed ones
    resumed_epochs = sum(h["epoch_seconds"] for h in meta["history"][done:])
    assert meta["metrics"]["wall_seconds"] >= killed_seconds + resumed_epochs - 0.1
    assert killed_seconds >= sum(h["epoch_seconds"] for h in meta["history"][:done]) - 0.1
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(clean / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_resume_with_another_architecture_is_refused(tmp_path):
    out = tmp_path / "run"
    assert _harp("train", "--epochs", "1", "--subset", "200", "--quiet", "--out", str(out)).wait() == 0
    (out / "meta.json").unlink()  # pretend it was interrupted
    proc = _harp("train", "--epochs", "1", "--subset", "200", "--quiet", "--out", str(out), "--resume",
                 "--arch", "vgg16_bn")
    assert proc.wait() == 2
    assert b"--arch small_cnn" in proc.stderr.read()


def test_sigkill_during_harp_prune_then_resume_matches(digits_robust_ckpt, tmp_path):
    args = ["prune", str(digits_robust_ckpt), "--method", "harp", "--sparsity", "0.99", "--epochs", "10",
            "--steps", "2", "--subset", "600", "--quiet"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    done = _kill_after_epochs(_harp(*args, "--out", str(killed)), killed, 2)
    assert 2 <= done < 10, "the run must be killed mid-way"
    assert not (killed / "meta.json").exists()
    killed_seconds = json.loads((killed / "state" / "state.json").read_text())["wall_seconds"]

    resumed = _harp(*args, "--out", str(killed), "--resume")
    reference = _harp(*args, "--out", str(clean))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()
    a, b = load_file(str(killed / "masks.safetensors")), load_file(str(clean / "masks.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((killed / "meta.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == list(range(1, 11))
    # the adversarial-example count carries over the interruption: 10 epochs x 600 examples, each counted once
    assert meta["metrics"]["adversarial_examples"] == 10 * 600
    assert meta["metrics"]["wall_seconds"] > killed_seconds > 0  # the killed session's time counts too
    assert meta["pruning"]["achieved_sparsity"] == json.loads((clean / "meta.json").read_text())["pruning"][
        "achieved_sparsity"]


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(history=None), "'history' is missing or not a JSON array"),
    (lambda s: s.update(epoch=5), "'epoch' 5 does not count the 2 records of 'history'"),
    (lambda s: s["history"].__setitem__(0, {}), "'history' record 1 does not say epoch 1"),
    # these had been copied into the finished meta.json as they were
    (lambda s: s["history"][1].update(epoch=7), "'history' record 2 does not say epoch 2"),
    (lambda s: s["history"][0].update(epoch_seconds=-4.0), "record 1 lacks a non-negative epoch_seconds"),
    (lambda s: s["history"][1].update(loss="low"), "record 2 lacks a numeric loss"),
    (lambda s: s["history"][0].update(adversarial_examples=-1), "record 1 lacks a count of adversarial_examples"),
    (lambda s: s["history"][0].update(val_robust=3), "record 1 lacks val_natural and val_robust fractions"),
    (lambda s: s["best"].update(epoch=9), "'best' is not an epoch run so far"),
    (lambda s: s["best"].update(epoch=1, robust=0.999), "'best' robust accuracy 0.999 is not its epoch's"),
    (lambda s: s.update(best="x"), "'best' is missing or not a JSON object"),
    (lambda s: s.update(epoch=1, history=s["history"][:1]), "model-1.safetensors are missing"),
])
def test_a_damaged_saved_state_is_one_line_and_exit_2(capsys, tmp_path, edit, message):
    # Each of these had ended in a TypeError, KeyError or AttributeError traceback.
    def damage(state_dir):
        state = json.loads((state_dir / "state.json").read_text())
        edit(state)
        (state_dir / "state.json").write_text(json.dumps(state))

    err = _resume_after(damage, capsys, tmp_path)
    assert message in err and len(err.strip().splitlines()) == 1, err


def _resume_after(damage, capsys, tmp_path) -> str:
    """stderr of `--resume` of a 2-epoch run whose state/ `damage` changed (meta.json removed: as if
    interrupted after its last epoch); the resume must fail with exit status 2."""
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--adv", "none", "--epochs", "2", "--subset", "200", "--quiet",
            "--out", str(out)]
    assert run_cli(cli, args) == 0
    (out / "meta.json").unlink()
    damage(out / "state")
    capsys.readouterr()
    assert run_cli(cli, [*args, "--resume"]) == 2
    return capsys.readouterr().err


def _damage_saved_tensors(state_dir, what):
    from safetensors.torch import save_file

    if what == "variance":
        state = load_file(str(state_dir / "model-2.safetensors"))
        state[next(k for k in state if k.endswith("running_var"))].fill_(-1.0)
        save_file(state, str(state_dir / "model-2.safetensors"))
        return
    saved = torch.load(state_dir / "optim-2.pt", weights_only=True)
    if what == "scheduler":  # optim-N.pt of another epoch than state.json's
        saved["scheduler"]["last_epoch"] -= 1
    elif what == "moment":
        moments = next(iter(saved["optimizer"]["state"].values()))
        key = next(k for k, v in moments.items() if v.dim() > 0)
        moments[key] = torch.zeros(3)
    elif what in ("string", "missing", "nan-step", "negative"):  # tracebacks, or a NaN loss blamed on --lr
        moments = next(iter(saved["optimizer"]["state"].values()))
        if what == "string":
            moments["exp_avg"] = "x"
        elif what == "missing":
            del moments["exp_avg_sq"]
        elif what == "nan-step":
            moments["step"] = torch.tensor(float("nan"))
        else:
            moments["exp_avg_sq"] = -moments["exp_avg_sq"].abs() - 1
    elif what == "lr":
        saved["optimizer"]["param_groups"][0]["lr"] = "x"
    elif what == "rng":
        saved["rng"] = 5
    torch.save(saved, state_dir / "optim-2.pt")


@pytest.mark.parametrize("what,message", [
    ("variance", "BatchNorm variance 'net."),  # had trained on to 9.5% accuracy, exit 0
    ("scheduler", "scheduler steps, not the 2 epochs state.json records"),  # these had been tracebacks mid-epoch
    ("moment", "has shape [3], its parameter"),
    ("string", "optimizer state 'exp_avg' is a str, not a tensor"),
    ("missing", "optimizer state keys ['exp_avg', 'step'] are not ['exp_avg', 'exp_avg_sq', 'step']"),
    ("nan-step", "optimizer state 'step' is nan, not a step count"),
    ("negative", "optimizer state 'exp_avg_sq' holds negative second moments"),
    ("lr", "optimizer setting 'lr' is 'x', not a number"),
    ("rng", "'int' object has no attribute 'cpu'"),
])
def test_damaged_saved_tensors_are_one_line_and_exit_2(capsys, tmp_path, what, message):
    err = _resume_after(lambda state_dir: _damage_saved_tensors(state_dir, what), capsys, tmp_path)
    assert message in err and len(err.strip().splitlines()) == 1, err


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran while loading",))


@pytest.mark.parametrize("content", [b"garbage", pickle.dumps(_RunsCode())])
def test_a_foreign_optimizer_state_is_refused_without_unpickling_it(capsys, tmp_path, content):
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--adv", "none", "--epochs", "1", "--subset", "200", "--quiet",
            "--out", str(out)]
    assert run_cli(cli, args) == 0
    (out / "meta.json").unlink()
    (out / "state" / "optim-1.pt").write_bytes(content)
    capsys.readouterr()
    assert run_cli(cli, [*args, "--resume"]) == 2
    captured = capsys.readouterr()
    assert "code ran" not in captured.out
    assert captured.err == f"harp: error: --resume: {out}/state/optim-1.pt is not an optimizer state written by " \
                           "harp (not unpickled: torch.load with weights_only=True refused it)\n"


def test_resume_with_other_options_is_refused(capsys, tmp_path):
    # Accepted before, the resumed epochs trained without attacks and meta.json recorded only the new options.
    out = tmp_path / "run"
    args = ["train", "--epochs", "2", "--steps", "2", "--subset", "200", "--quiet", "--out", str(out)]
    assert run_cli(cli, args) == 0
    (out / "meta.json").unlink()  # as if interrupted after its last epoch
    assert run_cli(cli, [*args, "--resume", "--adv", "trades", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "was started with" in err and "training.adv 'pgd' (now 'trades')" in err and "seed 0 (now 7)" in err, err
    assert run_cli(cli, [*args, "--resume", "--optimizer", "sgd"]) == 2  # had been a KeyError from torch's SGD
    assert "run.optimizer 'adam' (now 'sgd')" in capsys.readouterr().err
    # the README's example: the options that differ, not the settings that follow from them (the eps ramp)
    plain = ["train", "--epochs", "1", "--subset", "200", "--quiet", "--out", str(tmp_path / "x")]
    assert run_cli(cli, plain) == 0
    (tmp_path / "x" / "meta.json").unlink()
    assert run_cli(cli, [*plain, "--resume", "--adv", "none"]) == 2
    assert capsys.readouterr().err.endswith(f"harp: error: --resume: {tmp_path / 'x'} was started with training.adv "
                                            "'pgd' (now 'none'); pass the same options, or --force to start over\n")
    assert run_cli(cli, [*args, "--resume", "--eps", "0.2", "--device", "cpu"]) == 0  # the default eps; a device


def test_prune_and_finetune_resume_with_other_stage_options_is_refused(capsys, digits_ckpt, tmp_path):
    # Accepted before: the resumed epochs trained with the new attack or data (a larger --subset then
    # overflowed the one-cycle schedule in a traceback), and meta.json recorded neither.
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    stage = ["--epochs", "1", "--steps", "1", "--subset", "100", "--quiet"]
    prune = ["prune", str(digits_ckpt), "--method", "hydra", "--sparsity", "0.9", *stage, "--out", str(pruned)]
    assert run_cli(cli, prune) == 0
    assert json.loads((pruned / "meta.json").read_text())["prune"]["subset"] == 100
    (pruned / "meta.json").unlink()  # as if interrupted after its last epoch
    capsys.readouterr()
    for change, message in ((["--subset", "120"], "prune.subset 100 (now 120)"),
                            (["--adv", "trades"], "prune.adv 'pgd' (now 'trades')"),
                            (["--eps", "0.1"], "prune.attack.eps 0.2 (now 0.1)")):
        assert run_cli(cli, [*prune, "--resume", *change]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
    assert run_cli(cli, [*prune, "--resume", "--device", "cpu"]) == 0
    finetune = ["finetune", str(pruned), *stage, "--out", str(tuned)]
    assert run_cli(cli, finetune) == 0
    (tuned / "meta.json").unlink()
    capsys.readouterr()
    assert run_cli(cli, [*finetune, "--resume", "--subset", "200"]) == 2
    assert "finetune.subset 100 (now 200)" in capsys.readouterr().err


def test_resume_under_another_process_count_is_refused(capsys, tmp_path):
    # torchrun's ranks each take a share of a step's batches: 2 ranks then 1 overran the one-cycle schedule
    # in a traceback, 1 then 2 silently cut its anneal short
    out = tmp_path / "run"
    args = ["train", "--adv", "none", "--epochs", "2", "--subset", "200", "--quiet", "--out", str(out)]
    assert run_cli(cli, args) == 0
    (out / "meta.json").unlink()  # as if interrupted after its last epoch
    state_file, optim_file = out / "state" / "state.json", out / "state" / "optim-2.pt"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    capsys.readouterr()
    assert run_cli(cli, [*args, "--resume"]) == 2
    assert "was started with processes 2 (now 1)" in capsys.readouterr().err
    # a state that does not record it (older harp): the schedule's length still tells
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "processes"}))
    extra = torch.load(optim_file, weights_only=True)
    extra["scheduler"]["total_steps"] *= 2
    torch.save(extra, optim_file)
    assert run_cli(cli, [*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was started with a schedule of" in err and len(err.splitlines()) == 1, err


def test_a_run_stopped_in_its_first_epoch_can_be_run_again(tmp_path):
    # It leaves state/ without state.json: a re-run had been refused ("already exists; pass --force or
    # --resume") and --resume too ("holds no interrupted run").
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)
    (out / "state" / "model-0.safetensors").write_bytes(b"half")
    assert run_cli(cli, ["train", "--epochs", "1", "--steps", "1", "--subset", "100", "--quiet",
                         "--out", str(out)]) == 0
    assert (out / "meta.json").is_file()
