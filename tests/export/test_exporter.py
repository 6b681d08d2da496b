"""export_checkpoint / export_model / `harp export`: files, manifest, parity, atomic output, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from harp.checkpoint import META
from harp.cli import cli, run_cli
from harp.export import exporter
from harp.export.errors import ExportError
from harp.export.exporter import export_checkpoint, export_model
from harp.export.verify import FORMAT_FILES, MANIFEST, PARITY_FILE
from harp.io import sha256_file
from harp.models.normalize import Normalize


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _siblings(path: Path) -> list[str]:
    """Hidden temporary directories the exporter might have left beside `path`."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


class _Tiny(nn.Module):
    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = Normalize((0.5,), (0.25,))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = act or nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):  # (N, 1, 8, 8)
        return self.fc(torch.flatten(self.act(self.conv(self.norm(x))), 1))


# -- the export of a pruned checkpoint -----------------------------------------------


def test_export_writes_every_file_and_a_manifest_that_pins_them(digits_export, pruned_digits_ckpt):
    manifest = _manifest(digits_export)
    names = {p.name for p in digits_export.iterdir()}
    assert names == {*FORMAT_FILES.values(), PARITY_FILE, MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (digits_export / name).stat().st_size
        assert entry["sha256"] == sha256_file(digits_export / name)
    assert manifest["format"] == "harp-export" and manifest["version"] == 1
    assert manifest["source"]["checkpoint"] == str(pruned_digits_ckpt.resolve())
    assert manifest["source"]["meta_sha256"] == sha256_file(pruned_digits_ckpt / META)

    model = manifest["model"]
    assert model["architecture"] == "small_cnn" and model["dataset"]["name"] == "digits"
    assert model["input_shape"] == [1, 8, 8] and model["classes"] == 10
    assert model["normalization"]["mean"] == [0.3]
    assert model["pruning"]["granularity"] == "weight"
    assert model["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert {layer["name"] for layer in model["layers"]} == set(model["pruning"]["layers"])
    assert "natural_accuracy" in model["metrics"]
    assert manifest["channel_trimming"]["channels_removed"] >= 0


def test_parity_passes_for_every_format_on_clean_and_adversarial_inputs(digits_export):
    parity = _manifest(digits_export)["parity"]
    assert parity["inputs"]["clean"] == 128 and parity["inputs"]["adversarial"] == 32
    assert set(parity["results"]) == set(FORMAT_FILES)
    for fmt, r in parity["results"].items():
        assert r["passed"] and r["n_inputs"] == 160
        assert r["max_abs_diff"] <= r["tolerance"] == pytest.approx(1e-4 * max(1.0, r["max_abs_logit"]))
        assert r["argmax_agree"] >= r["n_inputs"] - r["near_ties"]
    assert parity["results"]["csr"]["executor"] in ("reference", "harp.kernels.runtime (sparse kernels)")
    assert parity["results"]["onnx"]["executor"] == "onnxruntime"

    with np.load(digits_export / PARITY_FILE, allow_pickle=False) as npz:
        x_clean, x_adv = npz["x_clean"], npz["x_adv"]
    assert x_clean.shape == (128, 1, 8, 8) and x_adv.shape == (32, 1, 8, 8)
    perturbation = np.abs(x_adv - x_clean[:32]).max()
    assert 0 < perturbation <= 0.2 + 1e-6  # digits' PGD budget
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_bundle_is_far_smaller_than_dense_onnx(digits_export):
    files = _manifest(digits_export)["files"]
    assert files["model.harpz"]["bytes"] * 5 < files["model.onnx"]["bytes"]
    assert files["model.harpz"]["bytes"] < files["model.sparse.onnx"]["bytes"]


def test_onnxruntime_runs_both_onnx_files_like_torch(digits_export):
    with np.load(digits_export / PARITY_FILE, allow_pickle=False) as npz:
        x = np.concatenate([npz["x_clean"], npz["x_adv"]])
        expected = np.concatenate([npz["logits_clean"], npz["logits_adv"]])
    dense = onnx.load(str(digits_export / "model.onnx"))
    onnx.checker.check_model(dense, full_check=True)
    sparse = onnx.load(str(digits_export / "model.sparse.onnx"))
    onnx.checker.check_model(sparse)
    weights = {n.input[1] for n in sparse.graph.node if n.op_type in ("Conv", "Gemm")}
    assert weights == {sp.values.name for sp in sparse.graph.sparse_initializer}
    assert not weights & {init.name for init in sparse.graph.initializer}
    for name in ("model.onnx", "model.sparse.onnx"):
        session = ort.InferenceSession(str(digits_export / name), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_dense_checkpoint_exports_with_sparsity_zero_and_a_note(capsys, digits_ckpt, tmp_path):
    out = tmp_path / "dense"
    code, stdout, err = _run(capsys, "export", str(digits_ckpt), "--out", str(out), "--formats", "csr",
                             "--n-parity", "32", "--n-adversarial", "8")
    assert code == 0, err
    model = _manifest(out)["model"]
    assert model["sparsity"] == 0.0 and model["pruning"] is None
    assert "dense checkpoint" in model["note"]
    assert {p.name for p in out.iterdir()} == {"model.harpz", PARITY_FILE, MANIFEST}
    assert "sparsity 0.00%" in stdout and "csr" in stdout and "model.harpz" in stdout


def test_fp16_values_use_the_looser_documented_tolerance(tmp_path):
    torch.manual_seed(0)
    model = _Tiny().eval()
    manifest = export_model(model, (1, 8, 8), tmp_path / "fp16", values_dtype="float16", meta={"architecture": "tiny"})
    assert manifest["parity"]["criterion"]["rtol"] == 1e-2
    for r in manifest["parity"]["results"].values():
        assert r["passed"] and r["tolerance"] == pytest.approx(1e-2 * max(1.0, r["max_abs_logit"]))
        assert r["max_abs_diff"] > 0  # the weights really were rounded
    assert manifest["parity"]["inputs"]["clean_source"].startswith("16 uniform")


# -- refusing, and writing nothing -------------------------------------------------------


def test_non_empty_out_without_force_is_exit_2_and_untouched(capsys, pruned_digits_ckpt, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", str(out))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and _siblings(out) == []
    code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", str(out), "--force")
    assert code == 2 and "not a harp export" in err  # --force only replaces an export
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "manifest.json").write_text('{"name": "a browser extension", "version": "1.0"}')
    code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", str(out), "--force")
    assert code == 2 and "not a harp export" in err  # a manifest.json of another tool had been enough
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt"]


def test_force_replaces_an_export_atomically(digits_export, pruned_digits_ckpt, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(digits_export, out)
    (out / "stale.txt").write_text("from the old export")
    manifest = export_checkpoint(pruned_digits_ckpt, out, formats=["csr"], n_parity=16, n_adversarial=0,
                                 force=True)
    assert {p.name for p in out.iterdir()} == {"model.harpz", PARITY_FILE, MANIFEST}
    assert manifest["export"]["formats"] == ["csr"] and _siblings(out) == []


def test_force_never_replaces_a_folder_holding_the_checkpoint(capsys, digits_export, pruned_digits_ckpt, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "exp"
    shutil.copytree(digits_export, out)
    shutil.copytree(pruned_digits_ckpt, out / "ckpt")
    code, _, err = _run(capsys, "export", str(out / "ckpt"), "--out", str(out), "--force")
    assert code == 2 and "holds the input checkpoint" in err, err  # had deleted it with the old export
    assert (out / "ckpt" / META).is_file()
    monkeypatch.chdir(tmp_path / "exp" / "ckpt")
    code, _, err = _run(capsys, "export", ".", "--out", ".", "--force")
    assert code == 2 and "is the input checkpoint" in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # renamed over, the shell's folder would be gone
    code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", ".")
    assert code == 2 and "is the current folder" in err, err


def test_bad_arguments_are_exit_2_and_write_nothing(capsys, pruned_digits_ckpt, tmp_path):
    out = tmp_path / "o"
    for args, message in ((["--formats", "onnx,tflite"], "unknown format 'tflite'"),
                          (["--opset", "5"], "opset 5 is not supported"),
                          (["--n-parity", "0", "--n-adversarial", "0"], "no parity check"),
                          (["--n-parity", "451"], "test split of digits has 450 images, fewer than the 451 "
                                                  "requested (--n-parity, --n-adversarial)")):
        code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", str(out), *args)
        assert code == 2 and message in err, err
        assert not out.exists() and _siblings(out) == []
    code, _, err = _run(capsys, "export", str(tmp_path / "nowhere"), "--out", str(out))
    assert code == 2 and "does not exist" in err and not out.exists()


def test_an_opset_onnx_writes_but_onnxruntime_cannot_run_is_refused_up_front(capsys, pruned_digits_ckpt, tmp_path):
    newest = onnx.defs.onnx_opset_version()
    if exporter._onnxruntime_runs(newest):
        pytest.skip(f"this onnxruntime runs onnx's newest opset {newest}")
    code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", str(tmp_path / "o"), "--opset",
                        str(newest))
    assert code == 2 and re.search(r"opset \d+ is not supported \(expected 11\.\.\d+, the opsets onnx writes and "
                                      r"onnxruntime runs\)", err), err
    assert not (tmp_path / "o").exists()  # had failed after tracing and writing, naming a temporary file
    code, _, err = _run(capsys, "export", str(pruned_digits_ckpt), "--out", str(tmp_path / "o"), "--opset",
                        str(newest), "--formats", "csr", "--n-parity", "8", "--n-adversarial", "0")
    assert code == 0, err  # no ONNX file, no onnxruntime needed


def test_the_default_parity_set_is_capped_at_a_small_test_split(tmp_path):
    # An imagefolder with 12 test images: the default 256 + 64 had stopped the export (and a pipeline
    # at its last stage, after all the training).
    from PIL import Image

    from harp.training.train import TrainOptions, train

    for split, n in (("train", 20), ("val", 6)):
        for label, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), colour).save(tmp_path / "data" / split / label / f"{i}.png")
    train(TrainOptions(dataset=f"imagefolder:{tmp_path / 'data'}", arch="small_cnn", adv="none", epochs=1),
          tmp_path / "ckpt", quiet=True)
    manifest = export_checkpoint(tmp_path / "ckpt", tmp_path / "art")
    assert manifest["parity"]["inputs"]["clean"] == manifest["parity"]["inputs"]["adversarial"] == 12
    # `harp info` names the class behind each prediction index, from the checkpoint and from the artifact
    from harp.commands.info import read_info

    assert read_info(str(tmp_path / "ckpt"))["class_names"] == read_info(str(tmp_path / "art"))["class_names"] \
        == ["cat", "dog"]


def test_unsupported_layer_is_named_and_nothing_is_written(tmp_path):
    model = _Tiny(act=nn.GELU()).eval()
    with pytest.raises(ExportError, match=r"'act' \(GELU\)"):
        export_model(model, (1, 8, 8), tmp_path / "o", meta={})
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_is_an_error_naming_the_format_and_leaves_nothing(monkeypatch, tmp_path):
    real = exporter.run_format

    def skewed(fmt, path, x, **kw):
        executor, logits = real(fmt, path, x, **kw)
        return executor, logits + (0.01 if fmt == "onnx-sparse" else 0.0)

    monkeypatch.setattr(exporter, "run_format", skewed)
    torch.manual_seed(0)
    with pytest.raises(ExportError, match=r"parity failed for onnx-sparse: max \|diff\| 0\.01"):
        export_model(_Tiny().eval(), (1, 8, 8), tmp_path / "o", meta={})
    assert list(tmp_path.iterdir()) == []


def test_a_crash_mid_export_leaves_no_directory(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "write_bundle", boom)
    torch.manual_seed(0)
    with pytest.raises(OSError, match="disk full"):
        export_model(_Tiny().eval(), (1, 8, 8), tmp_path / "o", meta={})
    assert list(tmp_path.iterdir()) == []
