"""`harp info` on an exported artifact: the checkpoint's facts from the checked manifest, on a device too."""

import json
import shutil

import pytest

from harp.cli import cli, run_cli
from harp.export.verify import MANIFEST


def _info(capsys, *args) -> tuple[int, str, str]:
    code = run_cli(cli, ["info", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_artifact_info_matches_the_checkpoint_it_was_exported_from(capsys, digits_export, pruned_digits_ckpt):
    code, out, err = _info(capsys, digits_export, "--json")
    assert code == 0, err
    artifact = json.loads(out)
    code, out, err = _info(capsys, pruned_digits_ckpt, "--json")
    assert code == 0, err
    checkpoint = json.loads(out)
    for key in ("architecture", "dataset", "metrics"):
        assert artifact[key] == checkpoint[key], key
    assert artifact["sparsity"] == pytest.approx(checkpoint["sparsity"])
    assert [(a["name"], a["shape"]) for a in artifact["layers"]] == [(c["name"], c["shape"])
                                                                     for c in checkpoint["layers"]]
    assert [a["density"] for a in artifact["layers"]] == pytest.approx([c["density"] for c in checkpoint["layers"]])
    manifest = json.loads((digits_export / MANIFEST).read_text())
    assert artifact["files"] == {name: entry["bytes"] for name, entry in manifest["files"].items()}
    assert artifact["export"]["values_dtype"] == "float32" and artifact["export"]["channel_trimming"] is True


def test_artifact_info_runs_on_a_device_and_a_checkpoint_there_is_one_line(digits_export, pruned_digits_ckpt,
                                                                           device_harp):
    done = device_harp("info", digits_export)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("small_cnn on digits: sparsity ")
    assert any(line.strip().startswith("files: model.onnx ") for line in lines)
    assert "  export: values float32, opset 17, dead channels trimmed" in lines
    assert sum(line.strip().startswith("net.") for line in lines) == 5
    done = device_harp("info", pruned_digits_ckpt)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().endswith("reading a checkpoint needs torch, which is not installed here "
                                        "(an exported artifact does not)")


def test_a_csr_only_export_names_no_opset(capsys, pruned_digits_ckpt, tmp_path):
    from harp.export.exporter import export_checkpoint

    export_checkpoint(pruned_digits_ckpt, tmp_path / "csr", formats=["csr"], n_parity=8, n_adversarial=0)
    code, out, err = _info(capsys, tmp_path / "csr")
    assert code == 0, err
    assert "  export: values float32, dead channels trimmed\n" in out  # it had said "opset 17"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["model"]["layers"][0].update(density="high"), "model.layers[0] is not a layer"),
    (lambda m: m["model"].update(layers={"net.features.0": 0.5}), "model.layers is not a list"),
    (lambda m: m["model"].update(sparsity="99%"), "model.sparsity '99%' is not a fraction"),
    # readers fed inputs of this shape: harp-bench kernels had ended in a RuntimeInputError traceback
    (lambda m: m["model"].update(input_shape=[1, 9, 9]),
     "model.input_shape [1, 9, 9] differs from model.harpz's [1, 8, 8] (the manifest was edited)"),
    (lambda m: m["model"].update(classes=3), "model.classes 3 differs from model.harpz's 10"),
])
def test_a_malformed_manifest_layer_is_one_line(capsys, digits_export, tmp_path, edit, message):
    art = tmp_path / "art"
    shutil.copytree(digits_export, art)
    manifest = json.loads((art / MANIFEST).read_text())
    edit(manifest)
    (art / MANIFEST).write_text(json.dumps(manifest))
    code, out, err = _info(capsys, art)
    assert code == 2 and out == ""
    assert err.startswith("harp: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_json_output_stays_strict_json_when_a_checkpoint_records_nan(capsys, pruned_digits_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pruned_digits_ckpt, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["metrics"]["train_loss"] = float("nan")  # as a diverged run might record (accuracies must be fractions)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, out, err = _info(capsys, ckpt, "--json")
    assert code == 0, err

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(out, parse_constant=refuse)["metrics"]["train_loss"] is None  # had printed NaN


def test_a_manifest_nested_too_deeply_is_one_line(capsys, digits_export, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(digits_export, art)
    (art / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    for command in ("info", "verify"):
        code = run_cli(cli, [command, str(art)])
        out, err = capsys.readouterr()
        assert code == 2 and "nested too deeply" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", [MANIFEST, "meta.json"])
def test_a_record_that_is_a_folder_or_a_symlink_loop_is_named(capsys, tmp_path, name):
    # both had been "neither a harp checkpoint (no meta.json) nor an export (no manifest.json)"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / name).mkdir()
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / name).symlink_to(tmp_path / "loop" / name)
    for root, cause in [("folder", "not a regular file"), ("loop", "Too many levels of symbolic links")]:
        assert run_cli(cli, ["info", str(tmp_path / root)]) == 2
        err = capsys.readouterr().err
        assert cause in err and "neither" not in err and err.count("\n") == 1, err
