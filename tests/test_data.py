"""Data: the embedded digits split, CIFAR pickle folders and image folders (synthetic ones
written to tmp_path), and the errors for missing or malformed folders."""
import pickle

import numpy as np
import pytest
import torch

from ffr_fast.study import data
from ffr_fast.testing import write_cifar10


def _labels(dataset):
    return np.array([int(dataset[i][1]) for i in range(len(dataset))])


def test_digits_split_is_stratified_normalised_and_fixed():
    splits = data.load_digits(seed=0)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797 and sizes[0] > 1200 and min(sizes[1:]) > 250
    image, label = splits.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert splits.input_shape == (1, 16, 16) and splits.num_classes == 10
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert abs(train.mean().item()) < 1e-3 and abs(train.std().item() - 1) < 1e-3
    for part in (splits.val, splits.test):  # every class at ~15% of its 174..183 digits
        counts = np.bincount(_labels(part), minlength=10)
        assert counts.min() >= 25 and counts.max() <= 29
    again = data.load_digits(seed=0)
    assert torch.equal(again.test[7][0], splits.test[7][0])
    assert not torch.equal(data.load_digits(seed=1).test.images, splits.test.images)


def test_stratified_split_partitions_every_class():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    parts = data.stratified_split(labels, (0.5, 0.3, 0.2), seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(60))
    assert [np.bincount(labels[p]).tolist() for p in parts] == [[5, 10, 15], [3, 6, 9],
                                                                [2, 4, 6]]


def test_cifar10_pickle_folder(tmp_path):
    write_cifar10(tmp_path)
    splits = data.load("cifar10", tmp_path)
    assert len(splits.train) + len(splits.val) == 50 and len(splits.test) == 10
    image, _ = splits.test[0]
    assert image.shape == (3, 32, 32) and splits.num_classes == 10
    raw = pickle.loads((tmp_path / "test_batch").read_bytes())["data"][0].reshape(3, 32, 32)
    mean, std = splits.test.mean, splits.test.std  # per-channel training statistics
    assert torch.allclose(image * std + mean, torch.from_numpy(raw).float(), atol=1e-4)


def test_cifar100_pickle_folder(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("train", 20), ("test", 5)):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [int(v) for v in rng.integers(0, 100, n)]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    (tmp_path / "meta").write_bytes(pickle.dumps({"fine_label_names": []}))
    splits = data.load("cifar100", tmp_path)
    assert splits.num_classes == 100 and len(splits.test) == 5


def test_cifar_missing_files_are_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3.*batches\.meta"):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "not a readable CIFAR batch"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "3072"),
    (pickle.dumps({"pixels": 1}), "'data' and 'labels'"),
])
def test_cifar_malformed_batch_is_named(tmp_path, content, message):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        data.load("cifar10", tmp_path)
    assert "data_batch_2" in str(error.value)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    np.save(tmp_path / "train" / "dog" / "extra.npy", rng.integers(0, 256, (8, 8, 3),
                                                                  dtype=np.uint8))
    splits = data.load("folder", tmp_path, image_size=8)
    assert splits.num_classes == 2 and splits.input_shape == (3, 8, 8)
    assert len(splits.train) + len(splits.val) == 13 and len(splits.test) == 4
    assert sorted(_labels(splits.test).tolist()) == [0, 0, 1, 1]


def test_bad_folders_say_what_is_missing(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train/ and test/"):
        data.load("folder", tmp_path)
    (tmp_path / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="train has no class folders with images"):
        data.load("folder", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--data-root"):
        data.load("cifar100")
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        data.load("mnist", tmp_path)
