"""`harp run`: predictions of a bundle on a .npy batch; bad input is one line on stderr and exit 2."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from harp.cli import cli, run_cli
from harp.export.bundle import write_bundle
from harp.export.graph import Graph, Node
from harp.export.reference import run_reference


def tiny_graph() -> Graph:
    rng = np.random.default_rng(0)
    nodes = [
        Node("conv2d", "conv", ("x",), "c", {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
             {"weight": "conv.w", "bias": "conv.b"}),
        Node("relu", "relu", ("c",), "r"), Node("global_avgpool", "gap", ("r",), "g"),
        Node("flatten", "flat", ("g",), "f"), Node("linear", "fc", ("f",), "y", {}, {"weight": "fc.w"}),
    ]
    tensors = {"conv.w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
               "conv.b": rng.standard_normal(4).astype(np.float32),
               "fc.w": rng.standard_normal((3, 4)).astype(np.float32) * 5}
    return Graph("x", (2, 6, 6), "y", nodes, tensors)


@pytest.fixture
def artifact(tmp_path):
    (tmp_path / "art").mkdir()
    write_bundle(tiny_graph(), tmp_path / "art" / "model.harpz")
    x = np.random.default_rng(1).random((5, 2, 6, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path, x


def _run(capsys, *args):
    code = run_cli(cli, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_one_prediction_per_line(capsys, artifact):
    tmp, x = artifact
    expected = run_reference(tiny_graph(), x)
    code, out, err = _run(capsys, "run", tmp / "art", "--input", tmp / "x.npy", "--threads", "1")
    assert code == 0 and err == ""
    assert [int(line) for line in out.split()] == expected.argmax(axis=1).tolist()


def test_big_endian_float32_input_runs(capsys, artifact):
    tmp, x = artifact
    np.save(tmp / "be.npy", x.astype(">f4"))  # as numpy writes it on a big-endian machine
    code, out, err = _run(capsys, "run", tmp / "art", "--input", tmp / "be.npy", "--json")
    assert code == 0, err
    np.testing.assert_allclose(np.array(json.loads(out)["logits"]), run_reference(tiny_graph(), x),
                               rtol=1e-5, atol=1e-5)


def test_run_json_has_predictions_and_logits(capsys, artifact):
    tmp, x = artifact
    expected = run_reference(tiny_graph(), x)
    code, out, _ = _run(capsys, "run", tmp / "art" / "model.harpz", "--input", tmp / "x.npy", "--batch", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["predictions"] == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(np.array(result["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_input, message", [
    (lambda x: np.where(x > 0.9, np.nan, x).astype(np.float32), "NaN or infinite"),
    (lambda x: x[:, :1], r"input shape \(5, 1, 6, 6\) is not \(N, C, H, W\) = \(N, 2, 6, 6\)"),
    (lambda x: x.astype(np.float64), "dtype float64 is not float32"),
    (lambda x: np.zeros((0, 2, 6, 6), np.float32), "batch is empty"),
    (lambda x: np.array([x], dtype=object), "not a readable .npy array"),
    (b"\x93NUMPY garbage", "not a readable .npy array"),
    (b"garbage", r"input \S+bad.npy: not a .npy file$"),  # numpy itself would blame pickles
    (b"PK\x03\x04 not a zip", "expected one .npy array, got a zip"),  # numpy's zip reader raised BadZipFile
    (lambda x: x * 1e38, "the logits of image 0 are not finite"),  # overflowed to NaN: argmax said class 0
    ("header_shape", "not a readable .npy array"),  # had been an OverflowError traceback
    ("unclosed", "not a readable .npy array"),  # numpy's tokenize.TokenError had been a traceback
    ("trailing", "bytes follow the 2x2x6x6 array its header describes"),  # had run on 2 images silently
    ("fifo", "is not a regular file"),  # had blocked forever
])
def test_bad_input_is_one_line_and_exit_2(capsys, artifact, make_input, message):
    tmp, x = artifact
    path = tmp / "bad.npy"
    if isinstance(make_input, bytes):
        path.write_bytes(make_input)
    elif make_input == "header_shape":
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2, 6, 6), }"
        path.write_bytes(b"\x93NUMPY\x01\x00" + len(header.ljust(117) + "\n").to_bytes(2, "little")
                         + (header.ljust(117) + "\n").encode() + x.tobytes())
    elif make_input == "unclosed":
        np.save(path, x)
        path.write_bytes(path.read_bytes().replace(b"(5, 2, 6, 6)", b"(5, 2, 6, 6 ", 1))
    elif make_input == "trailing":
        np.save(path, x[:2])
        path.write_bytes(path.read_bytes() + x[2:].tobytes())
    elif make_input == "fifo":
        os.mkfifo(path)
    else:
        np.save(path, make_input(x), allow_pickle=True)
    code, out, err = _run(capsys, "run", tmp / "art", "--input", path)
    assert code == 2 and out == ""
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["{tmp}/art", "--input", "{tmp}/missing.npy"], "no such file"),
    (["{tmp}/art", "--input", "{tmp}"], "is a directory, not a .npy file"),
    (["{tmp}/nowhere", "--input", "{tmp}/x.npy"], "cannot read"),
    (["{tmp}", "--input", "{tmp}/x.npy"], "holds no model.harpz"),
    (["{tmp}/art", "--input", "{tmp}/x.npy", "--threads", "999"], "--threads must be in 1.."),
    (["{tmp}/art", "--input", "{tmp}/x.npy", "--batch", "0"], "Invalid value for '--batch'"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, artifact, args, message):
    tmp, _ = artifact
    code, _, err = _run(capsys, "run", *[a.replace("{tmp}", str(tmp)) for a in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_exports_bundle_must_match_its_manifest(capsys, artifact, digits_ckpt, tmp_path):
    from harp.export.exporter import export_checkpoint

    exported = tmp_path / "exported"
    export_checkpoint(digits_ckpt, exported, formats=("csr",), n_parity=8, n_adversarial=0)
    np.save(tmp_path / "digits.npy", np.zeros((2, 1, 8, 8), np.float32))
    code, out, err = _run(capsys, "run", exported, "--input", tmp_path / "digits.npy")
    assert code == 0 and len(out.split()) == 2, err
    shutil.copy(artifact[0] / "art" / "model.harpz", exported / "model.harpz")  # another model's bundle
    code, out, err = _run(capsys, "run", exported, "--input", tmp_path / "digits.npy")
    assert code == 2 and "the manifest says" in err, err  # had run the other model
    (exported / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, err = _run(capsys, "run", exported, "--input", tmp_path / "digits.npy")
    assert code == 2 and "nested too deeply" in err, err  # had been a RecursionError traceback
    (exported / "manifest.json").unlink()
    (exported / "manifest.json").symlink_to(tmp_path / "nowhere.json")
    code, out, err = _run(capsys, "run", exported, "--input", tmp_path / "digits.npy")
    assert code == 2 and "no manifest.json" in err, err  # a broken link had skipped the check


def test_pixels_outside_0_1_run_with_a_warning(capsys, artifact):
    tmp, x = artifact
    np.save(tmp / "bytes.npy", np.round(x * 255))  # 8-bit pixels, not divided by 255
    code, out, err = _run(capsys, "run", tmp / "art", "--input", tmp / "bytes.npy", "--batch", "2")
    assert code == 0 and len(out.split()) == len(x)
    assert err.startswith("harp: warning: input values span [") and "divide 8-bit pixels by 255" in err
    assert len(err.strip().splitlines()) == 1
    np.save(tmp / "centred.npy", x - 0.5)
    _, _, err = _run(capsys, "run", tmp / "art", "--input", tmp / "centred.npy")
    assert "the model expects raw pixels in [0, 1]; its predictions" in err


def test_unknown_wait_policy_is_one_line_and_exit_2(capsys, artifact, monkeypatch):
    tmp, _ = artifact
    monkeypatch.setenv("HARP_WAIT_POLICY", "busy")
    code, _, err = _run(capsys, "run", tmp / "art", "--input", tmp / "x.npy")
    assert code == 2 and "HARP_WAIT_POLICY must be one of spin, passive, active, got 'busy'" in err
    assert len(err.strip().splitlines()) == 1


def test_a_large_input_runs_in_batches_and_errors_count_from_its_first_image(capsys, tmp_path, artifact):
    from harp.commands.run import DEFAULT_BATCH, load_input

    tmp, _ = artifact
    x = np.random.default_rng(2).random((2 * DEFAULT_BATCH + 8, 2, 6, 6), dtype=np.float32)
    np.save(tmp / "many.npy", x)
    assert isinstance(load_input(tmp / "many.npy"), np.memmap)  # read a batch at a time, not all at once
    code, out, _ = _run(capsys, "run", tmp / "art", "--input", tmp / "many.npy", "--json")
    assert code == 0
    np.testing.assert_allclose(np.array(json.loads(out)["logits"]), run_reference(tiny_graph(), x),
                               rtol=1e-5, atol=1e-5)
    x[DEFAULT_BATCH + 5, 1, 2, 3] = np.inf
    np.save(tmp / "many.npy", x)
    code, _, err = _run(capsys, "run", tmp / "art", "--input", tmp / "many.npy")
    assert code == 2 and f"first at index ({DEFAULT_BATCH + 5}, 1, 2, 3)" in err
    np.save(tmp / "many.npy", x[:, :1])
    code, _, err = _run(capsys, "run", tmp / "art", "--input", tmp / "many.npy")
    assert code == 2 and f"input shape ({len(x)}, 1, 6, 6) is not" in err


def test_run_works_on_a_device_with_only_numpy_numba_and_click(artifact, device_harp):
    # The other commands need torch; `harp run` must not import their modules.
    tmp, x = artifact
    result = device_harp("run", tmp / "art", "--input", tmp / "x.npy", "--json")
    assert result.returncode == 0, result.stderr
    logits = np.array(json.loads(result.stdout)["logits"])
    np.testing.assert_allclose(logits, run_reference(tiny_graph(), x), rtol=1e-5, atol=1e-5)


def test_commands_needing_torch_fail_in_one_line_on_a_device(device_harp):
    result = device_harp("train", "--dataset", "digits", "--epochs", "1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "harp: error: harp train needs torch, which is not installed here"
    result = device_harp("export", "some-checkpoint", "--out", "somewhere")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "harp: error: harp export needs torch and onnx, which are not installed here"

    listing = device_harp("--help")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.split("Commands:")[1].strip().splitlines()}
    assert list(lines) == ["train", "prune", "finetune", "pipeline", "eval", "info", "export", "verify", "run"]
    assert "unavailable here: needs torch" in lines["train"]
    assert "unavailable here: needs torch and onnx" in lines["export"]
    assert "Run an exported model" in lines["run"] and "Check DIRECTORY" in lines["verify"]
