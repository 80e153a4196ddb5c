"""Data sets for training: the embedded digits set (no download), CIFAR-10/100 from a local
folder in the python-pickle format, and ImageFolder-style directories.

Every loader returns `Splits`: train / validation / test datasets of (image, label) pairs with
images as normalised float32 (C, H, W) tensors. Hyperparameters are tuned on `val`; `test` is
read only for the final tables.

The embedded set is scikit-learn's digits (1,797 real 8x8 handwritten digits, grey levels
0..16), stored once in ffr_fast/study/datasets/digits.npz so that nothing needs scikit-learn at run
time. It was written by this one-off (kept here, not in a script, because it never reruns):

    import numpy as np
    from sklearn.datasets import load_digits
    d = load_digits()
    np.savez_compressed("ffr_fast/study/datasets/digits.npz", images=d.images.astype(np.uint8),
                        labels=d.target.astype(np.uint8))
"""
import codecs
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS_FILE = Path(__file__).with_name("datasets") / "digits.npz"
DATASETS = ("digits", "cifar10", "cifar100", "folder")
EVALUATION_SPLITS = ("val", "test")  # Splits' held-out parts: tune on val, report on test
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".npy")


class ImageTensors(Dataset):
    """Images held in memory as uint8 (N, C, H, W); normalised per item so that CIFAR's
    50,000 images stay at 150 MB instead of 600 MB of float32."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor):
        self.images, self.labels = images, labels.long()
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = (self.images[index].float() - self.mean) / self.std
        return image, self.labels[index]


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: Tuple[int, int]

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (self.in_channels, *self.image_size)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int):
    """Index arrays, one per fraction, with every class split in the same proportions.

    The permutation depends only on `seed`, so a split is the same on every machine."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(bounds * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


def _channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a uint8 (N, C, H, W) training set, in its own units."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return flat.mean(1).float(), flat.std(1).float().clamp_min(1e-6)


def _from_arrays(train, val, test, num_classes: int) -> Splits:
    """Splits from (images uint8 NCHW, labels) pairs, normalised with training statistics."""
    mean, std = _channel_stats(train[0])

    def make(pair) -> ImageTensors:
        return ImageTensors(pair[0], torch.as_tensor(pair[1]), mean, std)

    _, channels, height, width = train[0].shape
    return Splits(make(train), make(val), make(test), num_classes, channels, (height, width))


def load_digits(seed: int = 0, size: int = 16, fractions=(0.7, 0.15, 0.15)) -> Splits:
    """The embedded digits, upsampled (bilinear) from 8x8 to size x size, split 70/15/15."""
    with np.load(DIGITS_FILE) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    pixels = torch.from_numpy(images).float().unsqueeze(1) * (255 / 16)
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    pixels = pixels.round().clamp(0, 255).to(torch.uint8)
    parts = stratified_split(labels, fractions, seed)
    return _from_arrays(*[(pixels[idx], labels[idx]) for idx in parts], num_classes=10)


def _cifar_globals() -> dict:
    """What a CIFAR pickle may name, by (module, name): the parts of a numpy array and the
    codec Python 3 writes bytes with at protocol 2; everything else in the format is dicts,
    lists, strings and ints. The functions are taken from numpy itself, so that the names
    numpy 1 wrote (numpy.core, in the original Python 2 files) and numpy 2 writes
    (numpy._core) both map to this numpy's, without importing the deprecated numpy.core."""
    array = np.zeros(0)
    reconstruct, frombuffer = array.__reduce__()[0], array.__reduce_ex__(5)[0]
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,  # protocol 5
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR files hold: a pickle naming any other
    function or class (os.system, ...) is refused before anything is called."""

    allowed = _cifar_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which CIFAR files never do; not loaded, since "
                "unpickling it could run code") from None


def _read_pickle(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as handle:
            return _CifarUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a readable {what} pickle ({error})") from error


def _cifar_batch(path: Path, label_key: str) -> Tuple[torch.Tensor, np.ndarray]:
    batch = _read_pickle(path, "CIFAR batch")
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: a CIFAR batch needs the keys 'data' and {label_key!r}; "
                         f"found {keys}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: 'data' must be (N, 3072) with N = len({label_key!r}) = "
                         f"{len(labels)}; got shape {data.shape}")
    return torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32)), labels


def load_cifar(root, num_classes: int = 10, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, meta)
    from the folder `root` (or its cifar-10-batches-py / cifar-100-python subfolder); a
    seeded stratified `val_fraction` of the training set is held out for validation."""
    if num_classes == 10:
        subfolder, train_files, test_files = "cifar-10-batches-py", [
            f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        expected, label_key = train_files + test_files + ["batches.meta"], "labels"
    elif num_classes == 100:
        subfolder, train_files, test_files = "cifar-100-python", ["train"], ["test"]
        expected, label_key = train_files + test_files + ["meta"], "fine_labels"
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    root = Path(root)
    if (root / subfolder).is_dir():
        root = root / subfolder
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{num_classes} folder {root} lacks {missing}; expected the python-pickle "
            f"files {expected} (as unpacked from cifar-{num_classes}-python.tar.gz)")
    _read_pickle(root / expected[-1], "CIFAR meta")
    train = [_cifar_batch(root / name, label_key) for name in train_files]
    images, labels = torch.cat([b[0] for b in train]), np.concatenate([b[1] for b in train])
    test = [_cifar_batch(root / name, label_key) for name in test_files]
    test_images, test_labels = torch.cat([b[0] for b in test]), np.concatenate([b[1] for b in test])
    for split, split_labels in (("training", labels), ("test", test_labels)):
        if split_labels.min() < 0 or split_labels.max() >= num_classes:
            raise ValueError(f"{root}: {split} labels span {split_labels.min()}.."
                             f"{split_labels.max()}, outside 0..{num_classes - 1}")
    fit, held_out = stratified_split(labels, (1 - val_fraction, val_fraction), seed)
    return _from_arrays((images[fit], labels[fit]), (images[held_out], labels[held_out]),
                        (test_images, test_labels), num_classes)


def _read_image(path: Path, size: Tuple[int, int]) -> np.ndarray:
    """An image file as uint8 (C, H, W) resized to `size`; .npy holds (H, W) or (H, W, C)."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path)
        else:
            from PIL import Image  # pillow comes with matplotlib, a dependency

            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB")).copy()
    except (OSError, ValueError) as error:  # pillow's errors are OSErrors; a damaged .npy
        raise ValueError(f"{path} is not a readable image ({type(error).__name__}: {error}); "
                         "replace or remove it") from error
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"{path}: .npy images must be uint8 (H, W) or (H, W, C), got "
                         f"{array.dtype} of shape {array.shape}")
    tensor = torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1)
    if tuple(tensor.shape[1:]) != tuple(size):
        tensor = F.interpolate(tensor[None].float(), size=size, mode="bilinear",
                               align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    return tensor


def _scan_folder(folder: Path):
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    samples = [(path, label) for label, name in enumerate(classes)
               for path in sorted((folder / name).iterdir())
               if path.suffix.lower() in IMAGE_SUFFIXES]
    return classes, samples


def load_image_folder(root, size: int = 32, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """An ImageFolder-style tree: root/train/<class>/<image> and root/test/<class>/<image>
    (root/val/ too, else a seeded stratified `val_fraction` of train). Images (.png, .jpg,
    ... through pillow, or uint8 .npy) are resized to size x size and held in memory."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "no such folder"
        raise FileNotFoundError(f"image folder {root} needs the subfolders train/ and test/ "
                                f"(each with one folder of images per class); found {found}")
    classes = _scan_folder(root / "train")[0]

    def load(split: str):
        split_classes, samples = _scan_folder(root / split)
        if not samples:
            raise FileNotFoundError(f"{root / split} has no class folders with images "
                                    f"({', '.join(IMAGE_SUFFIXES)})")
        unknown = sorted(set(split_classes) - set(classes))
        if unknown:
            raise ValueError(f"{root / split} has classes {unknown} that train/ lacks")
        labels = np.array([classes.index(split_classes[label]) for _, label in samples])
        images = torch.stack([_read_image(path, (size, size)) for path, _ in samples])
        return images, labels

    images, labels = load("train")
    present = [classes[label] for label in np.unique(labels)]
    if len(present) < 2:
        raise ValueError(f"{root / 'train'} has images of {len(present)} class {present}: a "
                         "classifier needs at least 2 (one folder of images per class)")
    if (root / "val").is_dir():
        val = load("val")
    else:
        fit, held_out = stratified_split(labels, (1 - val_fraction, val_fraction), seed)
        if not len(held_out):
            per_class = np.unique(labels, return_counts=True)[1]
            raise ValueError(
                f"{root / 'train'} has {len(labels)} images over {len(present)} classes "
                f"({per_class.min()} to {per_class.max()} per class): the validation split, "
                f"{val_fraction:.0%} of each class, gets none; add images (at least "
                f"{int(np.ceil(0.5 / val_fraction))} per class), or give a {root / 'val'} "
                "folder")
        (images, labels), val = (images[fit], labels[fit]), (images[held_out], labels[held_out])
    return _from_arrays((images, labels), val, load("test"), len(classes))


DIGITS_SIZE, FOLDER_SIZE, CIFAR_SIZE = 16, 32, 32


def load(name: str = "digits", root=None, seed: int = 0, image_size=None) -> Splits:
    """The data set `name` (one of DATASETS); `root` is its folder for everything but digits.
    `seed` picks the split; `image_size` (None: the set's own) resizes digits and folders."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if name == "digits":
        return load_digits(seed, image_size or DIGITS_SIZE)
    if root is None:
        raise ValueError(f"data set {name!r} is read from a local folder: pass --data-root")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root} does not exist")
    if name == "folder":
        return load_image_folder(root, image_size or FOLDER_SIZE, seed)
    if image_size not in (None, CIFAR_SIZE):
        raise ValueError(f"CIFAR images are {CIFAR_SIZE}x{CIFAR_SIZE}; --image-size "
                         f"{image_size} is not supported for {name}")
    return load_cifar(root, 10 if name == "cifar10" else 100, seed)
