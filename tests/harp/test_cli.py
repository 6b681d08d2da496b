"""Every bad input gives one line on stderr, exit status 2, and writes nothing."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from harp.cli import cli, run_cli


def _run(capsys, *args):
    code = run_cli(cli, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,message", [
    (["train", "--dataset", "imagenet42", "--out", "{tmp}/o"], "unknown dataset"),
    (["train", "--arch", "lenet99", "--out", "{tmp}/o"], "unknown architecture"),
    (["train", "--adv", "fgsm-free", "--out", "{tmp}/o"], "Invalid value for '--adv'"),
    (["train", "--seed", "99999999999999999999", "--out", "{tmp}/o"], "Invalid value for '--seed'"),  # overflowed in torch
    (["train", "--dataset", "mnist", "--data-root", "{tmp}/empty", "--out", "{tmp}/o"], "not found"),
    (["train", "--arch", "torchvision:nonet", "--out", "{tmp}/o"], "unknown torchvision model"),
    (["train", "--out", "{tmp}/o", "--resume"], "no interrupted run"),
    (["eval", "{tmp}/nowhere"], "does not exist"),
    (["info", "{tmp}/empty"], "neither a harp checkpoint (no meta.json) nor an export"),
    (["train", "--out", "{tmp}/file/o"], "is not a directory"),
    # each of these had been a traceback (nan eps, negative lr) or silently accepted (a negative subset)
    (["train", "--eps", "nan", "--out", "{tmp}/o"], "nan is not a finite number"),
    (["train", "--lr", "-1", "--out", "{tmp}/o"], "'--lr': -1.0 is not in the range x>0"),
    (["train", "--subset", "-1", "--out", "{tmp}/o"], "'--subset': -1 is not in the range x>=1"),
    (["eval", "{tmp}/empty", "--n", "0"], "'--n': 0 is not in the range x>=1"),
    (["train", "--batch-size", "1", "--out", "{tmp}/o"], "'--batch-size': 1 is not in the range x>=2"),
    (["eval", "{tmp}/empty", "--steps", "-1"], "'--steps': -1 is not in the range x>=0"),
    (["eval", "{tmp}/empty", "--restarts", "0"], "'--restarts': 0 is not in the range x>=1"),
    (["prune", "{tmp}/empty", "--out", "{tmp}/o", "--gamma0", "inf"], "inf is not a finite number"),
    # float32 overflows: torch's RuntimeError tracebacks mid-run, o/state left behind
    (["train", "--lr", "1e308", "--out", "{tmp}/o"], "'--lr': 1e+308 is beyond float32's range"),
    (["eval", "{tmp}/empty", "--eps", "1e39"], "'--eps': 1e+39 is beyond float32's range"),
    (["eval", "{tmp}/empty", "--attack", "fgsm", "--steps", "5"], "--attack fgsm takes one step"),  # ignored
    # a one-shot method had recorded training options it never used
    (["prune", "{tmp}/empty", "--method", "lwm", "--epochs", "5", "--lr", "3", "--out", "{tmp}/o"],
     "--method lwm prunes in one shot, with no training loop: --epochs, --lr would change nothing"),
    (["pipeline", "--method", "lwm", "--prune-epochs", "3", "--out", "{tmp}/o"],
     "--method lwm prunes in one shot: --prune-epochs would change nothing"),
    # had trained no batch and reported 100% accuracy, exit 0
    (["train", "--subset", "1", "--out", "{tmp}/o"], "1 training example(s) with --subset 1; a training batch"),
    # an ImageNet network pools 8x8 digits away: had been a traceback from the first PGD step, leaving o/state
    (["train", "--arch", "torchvision:squeezenet1_0", "--out", "{tmp}/o"],
     "--arch torchvision:squeezenet1_0 cannot run on the 1x8x8 images of digits: Given input size"),
    # the pipeline ends by exporting: an architecture harp cannot export stops it before any training
    (["pipeline", "--arch", "torchvision:efficientnet_b0", "--out", "{tmp}/o"],
     "harp cannot export --arch torchvision:efficientnet_b0: unsupported layer 'net.features.0.2' (SiLU)"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("in the way")
    code, out, err = _run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_harp_prune_that_never_meets_the_target_says_how_to_run_again(capsys, digits_ckpt, tmp_path):
    args = ["prune", digits_ckpt, "--method", "harp", "--sparsity", "0.9", "--epochs", "1", "--subset", "21",
            "--batch-size", "4", "--adv", "none", "--out", tmp_path / "o", "--quiet"]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "no epoch met the target; raise --epochs or --gamma0 and run again with --force" in err
    code, _, err = _run(capsys, *args[:7], "3", *args[8:], "--gamma0", "10", "--force")  # as the message says
    assert code == 0, err


def test_training_an_architecture_harp_cannot_export_warns_first(tmp_path):
    from harp.training.train import TrainOptions, train

    with pytest.warns(UserWarning, match=r"--arch torchvision:mobilenet_v3_small trains, but harp cannot export "
                                         r"it: unsupported layer '.*' \(Hardswish\)"):
        train(TrainOptions(arch="torchvision:mobilenet_v3_small", adv="none", epochs=1, subset=32), tmp_path / "o",
              quiet=True)
    assert (tmp_path / "o" / "meta.json").is_file()  # a warning, not an error: training it is fine


def test_a_model_that_trains_on_a_tuple_of_outputs_is_refused_or_fixed():
    # GoogLeNet's auxiliary heads return a namedtuple in training: it passed the eval-mode check and
    # training then stopped with a TypeError traceback in the loss
    import torch
    from torch import nn

    from harp.data import dataset_spec
    from harp.errors import HarpError
    from harp.models import build_model, check_model_runs

    spec = dataset_spec("mnist")
    model = build_model("torchvision:googlenet", spec)
    check_model_runs(model, "torchvision:googlenet", spec)  # built without the auxiliary heads
    assert isinstance(model.train()(torch.rand(2, *spec.input_shape)), torch.Tensor)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return (y, y) if self.training else y

    with pytest.raises(HarpError, match="--arch two returns a tuple in training, not a tensor of logits"):
        check_model_runs(TwoHeads(), "two", spec)


def test_warnings_print_as_one_line(capsys, monkeypatch):
    import warnings

    from harp.cli_errors import print_warnings_as_one_line

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    print_warnings_as_one_line("harp")
    warnings.warn_explicit("first line\nsecond line", UserWarning, "somewhere.py", 1)
    assert capsys.readouterr().err == "harp: warning: first line [1 more lines]\n"


def test_missing_parents_of_the_output_are_created(capsys, tmp_path):
    out = tmp_path / "runs" / "fresh" / "o"  # as `runs/demo` in a fresh clone
    code, _, err = _run(capsys, "train", "--out", str(out), "--epochs", "1", "--subset", "100", "--quiet")
    assert code == 0, err
    assert (out / "meta.json").is_file()


def test_existing_output_needs_force(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "o"), "--epochs", "1")
    assert code == 2 and "already exists" in err
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "o"), "--epochs", "1", "--force")
    assert code == 2 and "does not look like a harp output" in err
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("files, force", [
    ({"state/2025/ledger.db": "x", "state/terraform.tfstate": "x"}, False),  # had been taken for a harp run's state/
    ({"state/model-1.safetensors": "x", "state/notes.txt": "x"}, False),
    ({"model.safetensors": "x", "config.json": "{}"}, True),  # a Hugging Face model folder
    ({"state/notes.txt": "x", "thesis.tex": "x"}, True),
    ({"meta.json": '{"name": "mine"}', "data.csv": "x"}, True),
    ({"pipeline.json": '{"options": 1}', "results.csv": "x"}, True),
])
def test_a_folder_harp_did_not_write_is_never_deleted(capsys, tmp_path, files, force):
    # --force had deleted any folder holding a file or folder of one of harp's names, and without
    # --force a folder holding only state/ (taken for a run stopped in its first epoch)
    out = tmp_path / "o"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    code, _, err = _run(capsys, "train", "--out", out, "--epochs", "1", "--subset", "100", *(["--force"] * force))
    assert code == 2 and ("does not look like a harp output" if force else "already exists") in err, err
    assert {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()} == files


def test_force_refuses_the_current_folder_and_a_symlink(capsys, digits_ckpt, tmp_path, monkeypatch):
    # --out . --force had emptied the folder, then failed (rmdir of "."), writing nothing
    pipeline, run = tmp_path / "pipe", tmp_path / "pipe" / "dense"
    shutil.copytree(digits_ckpt, run)
    (pipeline / "pipeline.json").write_text('{"options": {}, "results": null}')
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.chdir(run)
    for out in (".", str(run), str(pipeline)):
        code, _, err = _run(capsys, "train", "--out", out, "--epochs", "1", "--force")
        assert code == 2 and "is the current folder or holds it" in err, err
    (tmp_path / "link").symlink_to(run)
    code, _, err = _run(capsys, "train", "--out", tmp_path / "link", "--epochs", "1", "--force")
    assert code == 2 and "is a symbolic link; name the folder it points to" in err, err
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, _, err = _run(capsys, "train", "--out", tmp_path / "dangling", "--epochs", "1")
    assert code == 2 and "is a symbolic link to" in err and "which does not exist" in err, err
    assert sorted(p.name for p in run.iterdir()) == before


def test_out_may_not_be_or_hold_the_input_checkpoint(capsys, digits_ckpt, tmp_path):
    # With --force, finetune X --out X had replaced the pruned checkpoint it was reading.
    ckpt = tmp_path / "runs" / "dense"
    shutil.copytree(digits_ckpt, ckpt)
    before = {f: f.read_bytes() for f in ckpt.rglob("*") if f.is_file()}
    for out, verb in ((ckpt, "is"), (tmp_path / "runs", "holds")):
        code, _, err = _run(capsys, "prune", ckpt, "--method", "global-magnitude", "--out", out, "--force")
        assert code == 2 and f"--out {out} {verb} the input checkpoint {ckpt}" in err
    assert {f: f.read_bytes() for f in ckpt.rglob("*") if f.is_file()} == before


def test_tampered_checkpoint_exits_2(capsys, digits_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(digits_ckpt, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[200] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(blob))
    code, _, err = _run(capsys, "eval", str(bad), "--quiet")
    assert code == 2 and "SHA-256" in err


def test_eval_and_info_json(capsys, digits_ckpt):
    code, out, _ = _run(capsys, "eval", str(digits_ckpt), "--json", "--quiet", "--n", "200", "--steps", "5")
    assert code == 0
    result = json.loads(out)
    assert 0.85 < result["natural_accuracy"] <= 1
    assert 0 <= result["robust_accuracy"] < result["natural_accuracy"]
    assert result["sparsity"] == 0.0
    code, out, _ = _run(capsys, "eval", str(digits_ckpt), "--json", "--quiet", "--n", "200", "--steps", "5")
    assert json.loads(out)["robust_accuracy"] == result["robust_accuracy"]  # seeded starts: had varied by run
    code, out, _ = _run(capsys, "eval", str(digits_ckpt), "--json", "--quiet", "--n", "200", "--steps", "3",
                        "--eps", "0.02", "--restarts", "2", "--attack", "all")
    small = json.loads(out)
    assert code == 0 and set(small["attacks"]) == {"pgd", "fgsm", "pgd-l2"}
    assert {k: small["attack"][k] for k in ("name", "eps", "steps", "restarts")} == {
        "name": "pgd", "eps": 0.02, "steps": 3, "restarts": 2}
    assert small["attacks"]["fgsm"]["eps"] == 0.02 and small["attacks"]["pgd-l2"]["restarts"] == 2
    assert small["robust_accuracy"] > result["robust_accuracy"]  # a smaller budget, measured as one
    code, out, _ = _run(capsys, "info", str(digits_ckpt), "--json")
    info = json.loads(out)
    assert info["sparsity"] == 0.0
    assert [layer["name"] for layer in info["layers"]] == [
        "net.features.0", "net.features.4", "net.features.8", "net.classifier.1", "net.classifier.4"]
    assert info["layers"][0] == {"name": "net.features.0", "shape": [32, 1, 3, 3], "density": 1.0}


def _shrink_first_mask(pruned):
    from safetensors.torch import load_file, save_file

    from harp.io import sha256_file

    masks = load_file(str(pruned / "masks.safetensors"))
    first = next(iter(masks))
    save_file({**masks, first: masks[first][:1]}, str(pruned / "masks.safetensors"))
    meta = json.loads((pruned / "meta.json").read_text())
    meta["files"]["masks.safetensors"] = sha256_file(pruned / "masks.safetensors")
    (pruned / "meta.json").write_text(json.dumps(meta))


def _drop_granularity(pruned):
    meta = json.loads((pruned / "meta.json").read_text())
    del meta["pruning"]["granularity"]
    (pruned / "meta.json").write_text(json.dumps(meta))


def test_quiet_prune_and_finetune_print_one_json_object(capsys, digits_ckpt, tmp_path):
    # as train does (README); prune and finetune had printed the text line under --quiet
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    for argv in (["prune", digits_ckpt, "--out", pruned, "--sparsity", "0.9", "--method", "lwm"],
                 ["finetune", pruned, "--out", tuned, "--epochs", "1", "--subset", "100", "--adv", "none"]):
        code, out, err = _run(capsys, *argv, "--quiet")
        assert code == 0, err
        assert set(json.loads(out)) == {"natural_accuracy", "robust_accuracy"}


@pytest.mark.parametrize("damage,message", [
    (_drop_granularity, "'pruning.granularity' None is not one of weight, channel"),  # had raised KeyError
    (_shrink_first_mask, "the masks do not fit the model: layer"),  # had raised a RuntimeError in training
])
def test_finetune_of_a_damaged_pruned_checkpoint_is_one_line(capsys, digits_ckpt, tmp_path, damage, message):
    pruned = tmp_path / "pruned"
    assert _run(capsys, "prune", digits_ckpt, "--out", pruned, "--sparsity", "0.9", "--method", "global-magnitude",
                "--quiet")[0] == 0
    damage(pruned)
    code, _, err = _run(capsys, "finetune", pruned, "--out", tmp_path / "tuned", "--epochs", "1", "--quiet")
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "tuned").exists()


@pytest.mark.parametrize("options,message", [
    (["--adv", "pgd", "--beta", "100"], "--beta weighs the robust term of --adv trades or mart"),
    (["--adv", "none", "--steps", "3", "--norm", "l2"], "--adv none trains on clean examples: --steps, --norm l2"),
])
def test_attack_options_the_loss_ignores_are_refused(capsys, tmp_path, options, message):
    # --beta with PGD-AT had trained bit-identical weights and recorded beta 100 in meta.json
    code, _, err = _run(capsys, "train", "--out", tmp_path / "o", "--epochs", "1", "--quiet", *options)
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    harp = shutil.which("harp") or str(__import__("pathlib").Path(sys.executable).parent / "harp")
    proc = subprocess.run([harp, "eval", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("harp: error:") and "Traceback" not in proc.stderr


def test_a_command_that_imports_torch_exits_without_leak_reports(tmp_path):
    # `harp run` freezes the garbage collector before exiting; a command that imported torch must
    # not, or torch's triton (nanobind) prints every object it still holds as leaked.
    code = "import sys\nfrom harp.cli import main\nsys.argv = ['harp', *sys.argv[1:]]\nmain()"
    result = subprocess.run([sys.executable, "-c", code, "train", "--dataset", "digits", "--adv", "none", "--epochs",
                             "1", "--subset", "200", "--out", str(tmp_path / "ckpt"), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "leaked" not in result.stderr, result.stderr[-500:]


def test_a_multi_line_error_is_printed_as_one_line(capsys):
    from harp.cli_errors import run_script
    from harp.errors import HarpError

    def fail():
        raise HarpError("onnx checker: node 1 is wrong\nnode 2 is wrong\nnode 3 is wrong")

    assert run_script(fail, "harp") == 2
    assert capsys.readouterr().err == "harp: error: onnx checker: node 1 is wrong [2 more lines]\n"


@pytest.mark.parametrize("name, gpus, local_rank, expected", [
    ("cuda:1", 2, None, "cuda:1"),
    ("cuda:2", 2, None, "--device cuda:2: this machine has 2 CUDA device(s)"),
    ("cuda:1", 0, None, "--device cuda:1: no CUDA device is available"),
    ("cuda:1", 2, "0", "under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda"),
    ("cuda", 2, "1", "cuda:1"),
    ("cuda:x", 2, None, "unknown device 'cuda:x' (choose from auto, cpu, cuda, cuda:N)"),
    ("cpu:0", 2, None, "unknown device 'cpu:0'"),
    ("cuda:", 2, None, "unknown device 'cuda:'"),  # had reached torch.device: a RuntimeError traceback
    ("cpu:", 2, None, "unknown device 'cpu:'"),
])
def test_device_names(monkeypatch, name, gpus, local_rank, expected):
    import torch

    from harp.errors import HarpError
    from harp.training.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    if expected.startswith("cuda:"):
        assert resolve_device(name) == torch.device(expected)
    else:
        with pytest.raises(HarpError, match=re.escape(expected)):
            resolve_device(name)

