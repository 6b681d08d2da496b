"""verify_artifact / `harp verify`: an untouched export passes; any tampering is exit 2 naming the file."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from harp.cli import cli, run_cli
from harp.export.errors import ExportError
from harp.export.verify import (
    MANIFEST,
    PARITY_FILE,
    VerifyError,
    compare_logits,
    parity_tolerance,
    sha256_file,
    verify_artifact,
)


@pytest.fixture
def export_copy(digits_export, tmp_path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(digits_export, out)
    return out


def _verify_cli(capsys, directory: Path) -> tuple[int, str, str]:
    code = run_cli(cli, ["verify", str(directory)])
    out, err = capsys.readouterr()
    return code, out, err


def _rewrite_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_untouched_export_verifies_with_the_exporters_numbers(capsys, export_copy):
    result = verify_artifact(export_copy)
    recorded = json.loads((export_copy / MANIFEST).read_text())["parity"]["results"]
    assert result["ok"] and set(result["parity"]) == set(recorded)
    for fmt, r in result["parity"].items():
        assert r["passed"] and r["max_abs_diff"] == pytest.approx(recorded[fmt]["max_abs_diff"], abs=1e-9)
        assert r["executor"] == recorded[fmt]["executor"] and r["tolerance"] == recorded[fmt]["tolerance"]
    code, out, _ = _verify_cli(capsys, export_copy)
    assert code == 0 and "ok" in out and "model.harpz" in out and "onnx-sparse" in out


def test_verify_runs_without_the_checkpoint(export_copy, pruned_digits_ckpt, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(export_copy, moved)  # the manifest's checkpoint path is never read
    assert verify_artifact(moved)["ok"]


def test_flipped_byte_in_a_file_is_exit_2_naming_it(capsys, export_copy):
    path = export_copy / "model.harpz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = _verify_cli(capsys, export_copy)
    assert code == 2 and "model.harpz" in err and "SHA-256" in err and len(err.strip().splitlines()) == 1


def test_wrong_logits_with_a_matching_hash_fail_parity(capsys, export_copy):
    with np.load(export_copy / PARITY_FILE, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["logits_clean"][3, 0] += 1.0
    with open(export_copy / PARITY_FILE, "wb") as f:
        np.savez(f, **arrays)
    _rewrite_manifest(export_copy, lambda m: m["files"][PARITY_FILE].update(
        bytes=(export_copy / PARITY_FILE).stat().st_size, sha256=sha256_file(export_copy / PARITY_FILE)))
    code, _, err = _verify_cli(capsys, export_copy)
    assert code == 2 and "parity failed for onnx" in err


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _claiming(shape: tuple[int, ...], data: bytes) -> bytes:
    """A float32 .npy member whose header claims `shape` over `data`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


@pytest.mark.parametrize("edit,compression,message", [
    (None, zipfile.ZIP_STORED, "not a readable parity file"),
    (lambda m: m, zipfile.ZIP_DEFLATED, "x_clean.npy is compressed"),  # what could expand without bound
    (lambda m: m | {"x_adv.npy": _claiming((10**9, 3, 8, 8), b"\0" * 16)}, zipfile.ZIP_STORED,
     r"x_adv.npy: shape \(1000000000, 3, 8, 8\) does not match its"),
    (lambda m: m | {"logits_adv.npy": _npy(np.zeros((2, 10)))}, zipfile.ZIP_STORED, "must be float32, got float64"),
    (lambda m: {k: v for k, v in m.items() if k != "x_clean.npy"}, zipfile.ZIP_STORED, "expected the arrays"),
    (lambda m: m | {"x_clean.npy": _npy(np.full((4, 1, 8, 8), np.nan, np.float32))}, zipfile.ZIP_STORED,
     "NaN or infinite"),
    # the two sets are concatenated: other image shapes or class counts had been a ValueError traceback
    (lambda m: m | {"x_adv.npy": _npy(np.zeros((2, 1, 8, 9), np.float32)),
                    "logits_adv.npy": _npy(np.zeros((2, 10), np.float32))}, zipfile.ZIP_STORED,
     "are not images and logits of one model"),
    (lambda m: m | {"x_adv.npy": _npy(np.zeros((2, 1, 8, 8), np.float32)),
                    "logits_adv.npy": _npy(np.zeros((2, 11), np.float32))}, zipfile.ZIP_STORED,
     "are not images and logits of one model"),
    (lambda m: m | {"x_adv.npy": _npy(np.zeros((2, 1, 8, 8), np.float32)).replace(b"(2, 1, 8, 8)", b"(2, 1, 8, 8 ")},
     zipfile.ZIP_STORED, "not a readable parity file"),  # numpy's TokenError had been a traceback
])
def test_crafted_parity_archive_is_one_line_and_exit_2(capsys, export_copy, edit, compression, message):
    # np.load had raised BadZipFile or NotImplementedError tracebacks here, and sized arrays by their headers.
    path = export_copy / PARITY_FILE
    if edit is None:
        path.write_bytes(b"PK\x03\x04 not a zip archive")
    else:
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        with zipfile.ZipFile(path, "w", compression) as archive:
            for name, data in edit(members).items():
                archive.writestr(name, data)
    _rewrite_manifest(export_copy, lambda m: m["files"][PARITY_FILE].update(
        bytes=path.stat().st_size, sha256=sha256_file(path)))
    code, out, err = _verify_cli(capsys, export_copy)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert re.search(message, err) and "Traceback" not in err, err


def test_onnx_with_tensors_in_another_file_is_refused(capsys, export_copy):
    # Only model.onnx's hash is pinned: weights read from a file beside it would escape the check.
    import onnx

    path = export_copy / "model.onnx"
    model = onnx.load(path)
    tensor = model.graph.initializer[0]
    (export_copy / "weights.bin").write_bytes(onnx.numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    onnx.save(model, path)
    _rewrite_manifest(export_copy, lambda m: m["files"]["model.onnx"].update(
        bytes=path.stat().st_size, sha256=sha256_file(path)))
    code, _, err = _verify_cli(capsys, export_copy)
    assert code == 2 and f"keeps tensor {tensor.name!r} in another file" in err


def test_manifest_cannot_loosen_the_tolerance(export_copy):
    _rewrite_manifest(export_copy, lambda m: m["export"].update(values_dtype="float16"))
    with pytest.raises(VerifyError, match="float32 weight values"):
        verify_artifact(export_copy)


def _dense_as_sparse(out: Path) -> None:
    """model.onnx copied over model.sparse.onnx, with the manifest's hash updated to match."""
    shutil.copy(out / "model.onnx", out / "model.sparse.onnx")
    path = out / "model.sparse.onnx"
    _rewrite_manifest(out, lambda m: m["files"]["model.sparse.onnx"].update(bytes=path.stat().st_size,
                                                                           sha256=sha256_file(path)))


@pytest.mark.parametrize("damage,message", [
    (lambda out: (out / "model.onnx").unlink(), "missing"),
    (lambda out: (out / MANIFEST).unlink(), "not a harp export"),
    (lambda out: (out / MANIFEST).write_text("{"), "not readable JSON"),
    (lambda out: _rewrite_manifest(out, lambda m: m["files"].update({"../escape": m["files"][PARITY_FILE]})),
     "unexpected file"),
    (lambda out: _rewrite_manifest(out, lambda m: m.update(version=99)), "version 99"),
    (lambda out: _rewrite_manifest(out, lambda m: m["files"].pop("model.onnx")), "does not list model.onnx"),
    (lambda out: _rewrite_manifest(out, lambda m: m["export"].update(formats=[["csr"]])), "export.formats"),
    (lambda out: _rewrite_manifest(out, lambda m: m["export"].update(values_dtype=[])), "export.values_dtype"),
    (lambda out: _rewrite_manifest(out, lambda m: m.update(version=True)), "version True"),  # True == 1
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(classes=-3)), "model.classes -3"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(classes=10**30)), "model.classes 1000"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(input_shape=[True, 8, 8])), "model.input_shape"),
    (lambda out: _dense_as_sparse(out), "stores no sparse tensor"),
    # these had verified "ok" while harp info and harp-bench refused them
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(sparsity=2)), "model.sparsity 2 is not a fraction"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(layers={})), "model.layers is not a list"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(layers=[{"name": 1}])), r"model.layers\[0\]"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"]["dataset"].update(class_names=["a"])),
     "class_names is not"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"]["dataset"].update(name=5)),  # harp-bench: a traceback
     "model.dataset.name 5 is not a string"),
    (lambda out: _rewrite_manifest(out, lambda m: m["model"].update(dataset=5)),  # had named a .name it lacks
     r"model.dataset 5 is not a string"),
])
def test_damaged_directory_is_a_verify_error(export_copy, damage, message):
    damage(export_copy)
    with pytest.raises(ExportError, match=message):  # VerifyError, or check_onnx's ExportError
        verify_artifact(export_copy)


def test_compare_logits_policy():
    expected = np.array([[2.0, 1.0, 0.0], [0.5, 0.5 + 5e-5, 0.0]])  # row 1 is a near-tie
    tol = parity_tolerance("float32", 2.0)
    assert tol == pytest.approx(2e-4)
    swapped = expected.copy()
    swapped[1, 0] += 1e-4  # flips the near-tie's argmax, within tolerance
    r = compare_logits("csr", "reference", swapped, expected, "float32")
    assert r.passed and r.argmax_agree == 1 and r.near_ties == 1
    r = compare_logits("csr", "reference", expected + 3e-4, expected, "float32")
    assert not r.passed and r.max_abs_diff == pytest.approx(3e-4)
    r = compare_logits("csr", "reference", expected + 3e-4, expected, "float16")
    assert r.passed and r.tolerance == pytest.approx(2e-2)


def test_verify_module_imports_without_torch():
    code = "import sys, harp.export.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_json_and_forced_reference_executor(capsys, export_copy):
    code = run_cli(cli, ["verify", str(export_copy), "--executor", "reference", "--json"])
    out, _ = capsys.readouterr()
    result = json.loads(out)
    assert code == 0 and result["ok"] and result["parity"]["csr"]["executor"] == "reference"


def test_formats_choose_what_is_rerun_but_every_hash_is_checked(export_copy):
    result = verify_artifact(export_copy, formats=["csr"])
    assert list(result["parity"]) == ["csr"] and len(result["files"]) == 4
    with pytest.raises(VerifyError, match="holds the formats onnx, onnx-sparse, csr; it has no tflite"):
        verify_artifact(export_copy, formats=["csr", "tflite"])
    with pytest.raises(VerifyError, match="executor 'reference' runs the CSR bundle, and the formats re-run "
                                          "here are onnx: add csr or drop the executor"):  # had been ignored
        verify_artifact(export_copy, formats=["onnx"], executor="reference")
    with pytest.raises(VerifyError, match="no format was asked for"):
        verify_artifact(export_copy, formats=[])
    onnx = export_copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(VerifyError, match="model.onnx: SHA-256 does not match"):
        verify_artifact(export_copy, formats=["csr"])


def test_a_device_without_onnx_verifies_the_csr_bundle_alone(export_copy, device_harp):
    result = device_harp("verify", export_copy)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "onnx: needs onnx, which is not installed here" in result.stderr and "--formats csr" in result.stderr
    result = device_harp("verify", export_copy, "--formats", "csr", "--json")
    assert result.returncode == 0, result.stderr
    parity = json.loads(result.stdout)["parity"]
    assert list(parity) == ["csr"] and parity["csr"]["passed"]
    assert parity["csr"]["executor"] == "harp.kernels.runtime (sparse kernels)"
