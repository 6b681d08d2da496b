import json

import pytest
import torch

from harp.checkpoint import load_checkpoint
from harp.errors import HarpError


def test_round_trip_rebuilds_the_same_model(digits_ckpt):
    ckpt = load_checkpoint(digits_ckpt)
    model = ckpt.build_model().eval()
    again = load_checkpoint(digits_ckpt).build_model().eval()
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model(x), again(x))
    meta = ckpt.meta
    assert meta["architecture"] == "small_cnn" and meta["dataset"]["input_shape"] == [1, 8, 8]
    assert {"torch", "harp"} <= set(meta["versions"])
    assert 0.85 < meta["metrics"]["natural_accuracy"] <= 1


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_weights_are_refused(digits_ckpt, tmp_path):
    bad = _copy(digits_ckpt, tmp_path / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(HarpError, match="SHA-256"):
        load_checkpoint(bad)


def test_truncated_and_missing_files_are_refused(digits_ckpt, tmp_path):
    bad = _copy(digits_ckpt, tmp_path / "trunc")
    from harp.io import sha256_file

    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:100])
    with pytest.raises(HarpError, match="does not match its SHA-256"):
        load_checkpoint(bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(bad / "model.safetensors")  # the hash passes: the reader
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HarpError, match="model.safetensors is unreadable"):  # must refuse it in one line
        load_checkpoint(bad)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(HarpError, match="not valid JSON"):
        load_checkpoint(bad)
    with pytest.raises(HarpError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_architecture_mismatch_is_refused(digits_ckpt, tmp_path):
    bad = _copy(digits_ckpt, tmp_path / "arch")
    meta = json.loads((bad / "meta.json").read_text())
    meta["architecture"] = "vgg16_bn"
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HarpError, match="do not fit architecture"):
        load_checkpoint(bad).build_model()


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(metrics=None), "field 'metrics' is not an object"),  # `harp info` and export had crashed
    (lambda m: m.update(pruning=[]), "field 'pruning' is not an object"),
    (lambda m: m.update(training="pgd"), "field 'training' is not an object"),
    # harp info had printed them, harp pipeline crashed formatting them as percentages
    (lambda m: m["metrics"].update(natural_accuracy="high"), "metric 'natural_accuracy' is 'high', not a fraction"),
    (lambda m: m["metrics"].update(robust_accuracy=float("nan")), "metric 'robust_accuracy' is nan"),
])
def test_wrongly_typed_sections_of_meta_are_refused(digits_ckpt, tmp_path, edit, message):
    bad = _copy(digits_ckpt, tmp_path / "meta")
    meta = json.loads((bad / "meta.json").read_text())
    edit(meta)
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HarpError, match=message):
        load_checkpoint(bad)
    meta.update(training=None, source=None)  # what a checkpoint made without these stages holds
    meta.pop("metrics"), meta.pop("pruning", None)
    (bad / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(bad).meta["training"] is None


@pytest.mark.parametrize("suffix,value,message", [
    ("weight", float("nan"), "holds NaN or infinite values"),  # finetune had blamed the learning rate
    ("running_var", -1.0, "BatchNorm variance .* is negative"),  # export had printed numpy's sqrt warning
    ("normalize.std", 0.0, r"input normalization std \[0.0\] is not positive"),  # harp eval: 10%, NaN logits
])
def test_weights_no_training_writes_are_refused(digits_ckpt, tmp_path, suffix, value, message):
    from safetensors.torch import load_file, save_file

    from harp.io import sha256_file

    bad = _copy(digits_ckpt, tmp_path / "values")
    state = load_file(str(bad / "model.safetensors"))
    name = next(k for k in state if k.endswith(suffix))
    state[name] = torch.full_like(state[name], value)
    save_file(state, str(bad / "model.safetensors"))
    meta = json.loads((bad / "meta.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(bad / "model.safetensors")
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HarpError, match=message):
        load_checkpoint(bad)


def _resave(ckpt, state):
    from safetensors.torch import save_file

    from harp.io import sha256_file

    save_file(state, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(ckpt / "model.safetensors")
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_version_true_is_not_version_1(digits_ckpt, tmp_path):
    bad = _copy(digits_ckpt, tmp_path / "version")
    meta = json.loads((bad / "meta.json").read_text())
    meta["version"] = True  # true == 1 in Python: had been accepted
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HarpError, match="version True is not supported"):
        load_checkpoint(bad)


def test_weights_of_another_dtype_are_refused_not_cast(digits_ckpt, tmp_path):
    from safetensors.torch import load_file

    bad = _copy(digits_ckpt, tmp_path / "f64")
    state = load_file(str(bad / "model.safetensors"))
    name = next(k for k in state if k.endswith("weight"))
    state[name] = state[name].double()
    state[name].view(-1)[0] = 1e300  # finite in float64: had become inf in the float32 model, evaluated at 8%
    _resave(bad, state)
    with pytest.raises(HarpError, match=f"tensor '{name}' is float64, not the float32 harp writes"):
        load_checkpoint(bad)
    state[name] = state[name].float().ne(0)  # a bool weight had been cast to 0/1 and evaluated
    _resave(bad, state)
    with pytest.raises(HarpError, match=f"tensor '{name}' is bool, architecture 'small_cnn' has float32"):
        load_checkpoint(bad).build_model()
