import pytest
import torch

from harp.data import dataset_spec, load_split
from harp.errors import HarpError
from harp.training.train import load_data
from tests.conftest import SHARED_DATA


def test_digits_split_is_stratified_and_deterministic():
    train, test = load_split("digits", True), load_split("digits", False)
    assert len(train) + len(test) == 1797
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # 25% of each class (~180 per class)
    assert torch.equal(load_split("digits", False).labels, test.labels)


def test_batches_are_pixels_in_unit_range_and_shards_are_disjoint():
    data = load_split("digits", True)
    x, _ = next(data.batches(64, shuffle=True, seed=1))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    seen = [torch.cat([y for _, y in data.batches(50, shuffle=True, seed=3, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == len(data) // 2
    index = [torch.cat([torch.arange(len(data))[idx] for idx in _batch_indices(data, r)]) for r in (0, 1)]
    assert len(set(index[0].tolist()) | set(index[1].tolist())) == 2 * (len(data) // 2)  # no example twice


def _batch_indices(data, rank):
    """The example indices of each batch rank `rank` gets (labels replaced by the examples' positions)."""
    from harp.data import ImageData

    numbered = ImageData(data.images, torch.arange(len(data)))
    return [y for _, y in numbered.batches(50, shuffle=True, seed=3, rank=rank, world_size=2)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_training_batches_never_hold_a_single_example_and_num_batches_counts_them(world_size):
    data = load_split("digits", True)
    for n in (1, 2, 9, 10, 11, 12, 17):
        part = data.subset(n)
        for batch_size in (2, 3, 4, 8):
            for drop_single in (False, True):
                sizes = [len(y) for _, y in part.batches(batch_size, shuffle=True, world_size=world_size,
                                                          drop_single=drop_single)]
                assert len(sizes) == part.num_batches(batch_size, world_size, drop_single=drop_single)
                shard = n // world_size
                assert sum(sizes) == shard - (drop_single and shard % batch_size == 1)
                assert not drop_single or 1 not in sizes


def test_a_training_set_one_past_a_multiple_of_the_batch_size_trains(tmp_path):
    # The last batch holds one example, on which BatchNorm cannot train: a ValueError traceback at the
    # end of the first epoch, for 1 in batch_size dataset sizes.
    from harp.training.train import TrainOptions, train

    n_train = len(load_data(dataset_spec("digits"), "data", False, seed=0, subset=60).train)
    metrics = train(TrainOptions(adv="none", epochs=1, subset=60, batch_size=n_train - 1), tmp_path / "o", quiet=True)
    assert 0 <= metrics["natural_accuracy"] <= 1


def test_validation_split_is_disjoint_from_training():
    split = load_data(dataset_spec("digits"), "data", False, seed=0)
    train_px = {bytes(x.numpy()) for x in split.train.images}
    assert len(split.val) == int(1347 * 0.1)
    assert sum(bytes(x.numpy()) in train_px for x in split.val.images) < 5  # digits has a few exact duplicates


def test_unknown_dataset_and_missing_root_are_user_errors(tmp_path):
    with pytest.raises(HarpError, match="unknown dataset"):
        dataset_spec("imagenet42")
    with pytest.raises(HarpError, match=r"missing or unreadable \(pass --download to fetch it"):
        load_split("mnist", False, root=tmp_path, download=False)
    # commands without --download (export, harp-bench) had suggested it as well
    with pytest.raises(HarpError, match=r"missing or unreadable \(pass --data-root to point at it\)") as error:
        load_split("mnist", False, root=tmp_path)
    assert "download=True" not in str(error.value)  # torchvision's own advice, for its Python API


def _write_idx(path, array):
    """The plain idx format torchvision reads from MNIST/raw."""
    import numpy as np

    codes = {np.uint8: 8, np.int32: 12}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


@pytest.mark.parametrize("damage,message", [
    ("garbage", "missing or unreadable"),  # torchvision's parser had raised an AssertionError
    ("int32-labels", "missing or unreadable"),  # a TypeError
    ("short-labels", "the test split has 12 images but 10 labels"),  # had scored mismatched pairs
    ("label-12", "label 12 at index 3, outside 0..9"),  # had crashed in cross_entropy with a traceback
])
def test_damaged_mnist_files_are_user_errors(tmp_path, damage, message):
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12).astype(np.uint8)
    for split in ("train", "t10k"):  # torchvision wants all four files
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    assert len(load_split("mnist", True, root=tmp_path)) == 12  # written as torchvision reads them
    if damage == "garbage":
        (raw / "t10k-images-idx3-ubyte").write_bytes(rng.bytes(500))
    if damage == "int32-labels":
        _write_idx(raw / "t10k-labels-idx1-ubyte", labels.astype(np.int32))
    if damage == "short-labels":
        _write_idx(raw / "t10k-labels-idx1-ubyte", labels[:10])
    if damage == "label-12":
        labels[3] = 12
        _write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(HarpError, match=message) as error:
        load_split("mnist", False, root=tmp_path)
    assert "Dataset not found" not in str(error.value)


class _RunsOnLoad:
    """A pickle that, when loaded, creates the file it names: what a crafted CIFAR batch could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_cifar_batch_is_refused_without_unpickling_it(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(_RunsOnLoad(marker)))
    with pytest.raises(HarpError, match="missing or unreadable"):
        load_split("cifar10", False, root=tmp_path)
    assert not marker.exists()


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="shared MNIST not present")
def test_mnist_loads_offline_from_shared_data():
    test = load_split("mnist", False, root=SHARED_DATA)
    assert len(test) == 10_000 and test.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(test.labels).tolist()[:3] == [980, 1135, 1032]


def test_an_unreadable_imagefolder_image_is_a_user_error_naming_it(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / split / label / "0.png")
    assert len(load_split(f"imagefolder:{tmp_path}", train=True).labels) == 2
    (tmp_path / "train" / "dog" / "1.png").write_bytes(b"not a png")  # PIL had raised a traceback
    with pytest.raises(HarpError, match=r"imagefolder image \S+dog/1.png cannot be read"):
        load_split(f"imagefolder:{tmp_path}", train=True)


def test_imagefolder_labels_follow_the_training_classes_when_the_test_split_lacks_one(tmp_path):
    from PIL import Image

    colours = {"cat": (200, 0, 0), "dog": (0, 200, 0), "fox": (0, 0, 200)}
    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("cat", "fox"))):
        for label in classes:
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), colours[label]).save(tmp_path / split / label / "0.png")
    test = load_split(f"imagefolder:{tmp_path}", train=False)
    # fox is class 2, as in train/; ImageFolder alone had labelled it 1 (dog's index), silently
    assert sorted(test.labels.tolist()) == [0, 2]
    assert test.images[test.labels == 2][0, 2].float().mean() > 150  # the blue image
    (tmp_path / "val" / "owl").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "owl" / "0.png")
    with pytest.raises(HarpError, match=r"imagefolder \S+val has class folders that \S+train lacks: owl"):
        load_split(f"imagefolder:{tmp_path}", train=False)


def test_imagefolder_reads_every_format_pil_opens_but_no_hidden_file(tmp_path):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / split / label / "0.png")
    cat = tmp_path / "train" / "cat"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(cat / "1.gif")  # torchvision's list had skipped it, silently
    Image.fromarray(np.full((8, 8), 0.8, np.float32)).save(cat / "2.tif")  # mode F, values in [0, 1]
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "._0.png").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble companion of 0.png
    (cat / "notes.pdf").write_bytes(b"%PDF-1.4")  # PIL writes PDFs but cannot read them
    train = load_split(f"imagefolder:{tmp_path}", train=True)
    images = train.images[train.labels == 0]
    assert len(images) == 3
    red = {int(x[0].float().mean()) for x in images}
    assert red == {0, 200, 204}, red  # the float image is 0.8 * 255, not clipped to black


def test_imagefolder_skips_hidden_folders_and_refuses_an_empty_training_class(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "0.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # not a third class
    (tmp_path / "val" / "dog" / "0.png").unlink()  # a test class may be empty
    assert dataset_spec(f"imagefolder:{tmp_path}").classes == 2
    assert load_split(f"imagefolder:{tmp_path}", train=False).labels.tolist() == [0]
    (tmp_path / "train" / "eel").mkdir()  # had been a FileNotFoundError traceback
    with pytest.raises(HarpError, match=r"imagefolder \S+train: Found no valid file for the classes eel"):
        load_split(f"imagefolder:{tmp_path}", train=True)


def test_a_checkpoint_refuses_an_imagefolder_whose_classes_changed(tmp_path):
    # Same number of classes, another folder: every label would silently mean another class.
    from PIL import Image

    from harp.checkpoint import spec_from_json

    for label in ("cat", "dog", "fox"):
        for split in ("train", "val"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / label / "0.png")
    saved = dataset_spec(f"imagefolder:{tmp_path}").to_json()  # what a checkpoint's meta.json records
    assert saved["class_names"] == ["cat", "dog", "fox"]
    assert spec_from_json(saved).class_names == ("cat", "dog", "fox")
    (tmp_path / "train" / "fox").rename(tmp_path / "train" / "wolf")
    with pytest.raises(HarpError, match="was trained on classes cat, dog, fox; the folder now has cat, dog, wolf"):
        spec_from_json(saved)
    assert "class_names" not in dataset_spec("digits").to_json()  # built-in datasets: checkpoints unchanged


def _colour_folder(root, per_class: int) -> None:
    from PIL import Image

    colours = {"cat": (200, 0, 0), "dog": (0, 200, 0), "fox": (0, 0, 200)}
    for split in ("train", "val"):
        for label, colour in colours.items():
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), colour).save(root / split / label / f"{i}.png")


def test_the_first_images_of_an_imagefolder_mix_its_classes(tmp_path):
    # ImageFolder lists class by class: --n 10 (and --subset, the parity images) had scored only
    # the first class, so a model answering "cat" to everything had 100% accuracy
    _colour_folder(tmp_path, 10)
    for train in (True, False):
        first = load_split(f"imagefolder:{tmp_path}", train=train).subset(10)
        assert len(set(first.labels.tolist())) == 3
        colour = first.images[:, :, 0, 0].float().argmax(1)  # the image's own colour names its class
        assert torch.equal(colour, first.labels)


def test_an_imagefolder_checkpoint_is_described_wherever_it_is_read(tmp_path, monkeypatch):
    from harp.checkpoint import spec_from_json

    _colour_folder(tmp_path / "pics", 1)
    monkeypatch.chdir(tmp_path)
    saved = dataset_spec("imagefolder:pics").to_json()
    assert saved["name"] == f"imagefolder:{tmp_path / 'pics'}"  # absolute: readable from another folder
    (tmp_path / "pics").rename(tmp_path / "moved")
    # the folder is gone: info and export still read the checkpoint's own record of it
    assert spec_from_json(saved).class_names == ("cat", "dog", "fox")
    with pytest.raises(HarpError, match="needs subfolders train/"):
        load_split(saved["name"], False)


def test_sixteen_bit_greyscale_images_keep_their_values(tmp_path):
    import numpy as np
    from PIL import Image

    _colour_folder(tmp_path, 1)
    grey = np.full((8, 8), 30000, dtype=np.uint16)  # 46% of full scale: PIL's convert("RGB") made it white
    Image.fromarray(grey).save(tmp_path / "val" / "dog" / "0.png")
    test = load_split(f"imagefolder:{tmp_path}", train=False)
    dog = test.images[test.labels == 1][0]
    assert abs(int(dog[0, 0, 0]) - round(30000 / 257)) <= 1 and int(dog[1, 0, 0]) == int(dog[0, 0, 0])
