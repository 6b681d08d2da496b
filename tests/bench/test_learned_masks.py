"""The learned-masks benchmark's dataset: digits written as an ImageFolder read back by harp as CIFAR-shaped data."""

import numpy as np
import pytest

from harp.bench.learned_masks import SPARSITY, learn_masks, main, write_imagefolder
from harp.checkpoint import load_checkpoint
from harp.cli_errors import run_script
from harp.data import dataset_spec, load_split


def _digits_imagefolder(root, per_class):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    for split, n in per_class.items():
        write_imagefolder(images, digits.target, root / split, n)
    return digits, images


def test_imagefolder_round_trip_gives_cifar_shaped_images_with_their_labels(tmp_path):
    digits, images = _digits_imagefolder(tmp_path, {"train": 3, "test": 2})
    assert write_imagefolder(images, digits.target, tmp_path / "again", 2) == 20
    name = f"imagefolder:{tmp_path}"
    assert dataset_spec(name).input_shape == (3, 32, 32)
    train = load_split(name, train=True)
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype.is_floating_point is False
    assert np.bincount(train.labels.numpy()).tolist() == [3] * 10
    # an image of class 7, upscaled: grey (R = G = B) and bright where the strokes of one of the three
    # sevens written are (harp reads an imagefolder in a fixed shuffled order)
    first7 = train.images[train.labels == 7][0].numpy().astype(int)
    assert (first7[0] == first7[1]).all() and (first7[1] == first7[2]).all()
    originals = images[np.flatnonzero(digits.target == 7)[:3]]
    assert max(np.corrcoef(first7[0, ::4, ::4].ravel(), o.ravel())[0, 1] for o in originals) > 0.8


def test_each_method_prunes_the_one_trained_model_into_checkpoints_named_after_it(tmp_path):
    _digits_imagefolder(tmp_path / "data", {"train": 2, "test": 1})
    dataset = f"imagefolder:{tmp_path / 'data'}"
    run = tmp_path / "run"
    tuned = learn_masks("resnet18", dataset, run, epochs=1, steps=1, method="global-magnitude")
    assert tuned == run / "finetuned-global-magnitude"
    dense = (run / "dense" / "meta.json").read_bytes()
    # a second method prunes the same trained model (not trained again) into its own checkpoints
    other = learn_masks("resnet18", dataset, run, epochs=1, steps=1, method="random")
    assert other == run / "finetuned-random" and (run / "dense" / "meta.json").read_bytes() == dense
    for path, method in ((tuned, "global-magnitude"), (other, "random")):
        meta = load_checkpoint(path).meta
        assert meta["pruning"]["method"] == method
        assert meta["pruning"]["achieved_sparsity"] == pytest.approx(SPARSITY, abs=1e-3)


@pytest.mark.parametrize("argv, message", [(["--epochs", "0"], "--epochs must be >= 1"),
                                           (["--methods", "obd"], "argument --methods: invalid choice: 'obd'"),
                                           (["--archs", "alexnet"], "argument --archs: invalid choice: 'alexnet'"),
                                           (["--data-root", "/nonexistent"], "MNIST not found under /nonexistent")])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert run_script(lambda: main(["--work", str(tmp_path / "w")] + argv), "learned_masks") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
