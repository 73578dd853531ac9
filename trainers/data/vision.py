"""Image datasets for the ResNet workloads, held in memory as uint8 tensors.

`load_image_dataset` reads Fashion-MNIST or CIFAR-10 through torchvision.
`ImageBatches` draws training batches as a pure function of (seed, step), so a resumed
trial gets the same batches as an uninterrupted one. `eval_batches` walks a split in
order.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, FashionMNIST
from torchvision.datasets.vision import VisionDataset

from trainers.data.errors import DataUnavailableError, one_line
from trainers.tables import ImageDatasetName

# Installed by Debian's dataset-fashion-mnist package.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Per-channel mean and standard deviation of the training images on the 0-1 scale,
# over all pixels. The Fashion-MNIST values were computed from the 60,000 training
# images in Debian's dataset-fashion-mnist files.
# NOTE: the CIFAR-10 values are the ones commonly published for its 50,000 training
# images and were not recomputed from the data.
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CROP_PADDING = 4
# Seed-sequence tags that keep the epoch permutations and the augmentation draws of
# one seed independent of each other.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1


# Fashion-MNIST


def prepare_fashion_mnist(
    root: Path, source_dir: Path | None = None, *, download: bool = True
) -> Path:
    """Put the four decompressed idx files in ``root/FashionMNIST/raw`` and return it.

    Files come from ``source_dir`` (as ``.gz`` or already decompressed), by default the
    Debian directory /usr/share/datasets/fashion-mnist. When the default directory is
    missing and ``download`` is true, torchvision downloads them. Files already in
    place are kept, so a second call does nothing.

    Raises DataUnavailableError naming the package to install or the path to pass.
    """
    raw_dir = Path(root) / "FashionMNIST" / "raw"
    if not _missing_files(raw_dir, FASHION_MNIST_FILES):
        return raw_dir

    directory = Path(source_dir) if source_dir is not None else DEBIAN_FASHION_MNIST_DIR
    sources = {name: _find_idx_file(directory, name) for name in FASHION_MNIST_FILES}
    missing = [name for name, path in sources.items() if path is None]
    if not missing:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name, path in sources.items():
            if not (raw_dir / name).is_file():
                _copy_idx_file(path, raw_dir / name)
        return raw_dir

    if source_dir is not None:
        raise DataUnavailableError(
            f"Fashion-MNIST files {', '.join(missing)} (.gz or decompressed) not found "
            f"in data.source_dir {directory}. Set data.source_dir to a directory that "
            "contains all four idx files, or remove it to use the files of "
            "`apt-get install dataset-fashion-mnist`."
        )
    fix = (
        f"Install them with `apt-get install dataset-fashion-mnist` (which fills "
        f"{DEBIAN_FASHION_MNIST_DIR}), or set data.source_dir to a directory that "
        "contains the four idx .gz files."
    )
    if not download:
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {raw_dir} or {DEBIAN_FASHION_MNIST_DIR}. {fix}"
        )
    # NOTE: the download paths of Fashion-MNIST and CIFAR-10 (torchvision 0.29) are
    # untested.
    try:
        FashionMNIST(root, train=True, download=True)
    except (RuntimeError, OSError) as error:
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST_DIR} and the download "
            f"into {raw_dir} failed ({one_line(error)}). {fix}"
        ) from error
    return raw_dir


def _missing_files(directory: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if not (directory / name).is_file()]


def _find_idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _copy_idx_file(source: Path, destination: Path) -> None:
    """Copy one Fashion-MNIST idx file with `_copy_decompressed`, raising
    DataUnavailableError when a .gz file is truncated or not gzip."""
    try:
        _copy_decompressed(source, destination)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataUnavailableError(
            f"Fashion-MNIST file {source} is truncated or not a gzip file "
            f"({one_line(error)}). Download it again, or reinstall "
            "dataset-fashion-mnist if it came from there."
        ) from None


def _copy_decompressed(source: Path, destination: Path) -> None:
    """Write ``source``, gunzipped if it ends in .gz, to ``destination`` atomically."""
    opener = gzip.open if source.suffix == ".gz" else open
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", dir=destination.parent
    )
    try:
        with opener(source, "rb") as reader, os.fdopen(handle, "wb") as writer:
            shutil.copyfileobj(reader, writer)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# CIFAR-10


class _LocalCIFAR10(CIFAR10):
    """CIFAR-10 read from an existing ``cifar-10-batches-py`` folder.

    torchvision's CIFAR10 compares each file's md5 with the official archive, which
    rejects any other folder in the same format (a subset, or one written by tests),
    so this subclass only checks that the files exist.
    """

    def __init__(self, root: Path, train: bool) -> None:
        VisionDataset.__init__(self, root)
        self.train = train
        folder = Path(self.root, self.base_folder)
        names = self.train_list if train else self.test_list
        paths = [folder / name for name, _ in names]
        batches = [_read_cifar_pickle(path) for path in paths]
        data = np.vstack(
            [_cifar_batch_rows(path, batch) for path, batch in zip(paths, batches)]
        )
        # Rows are 3072 bytes: the red, green and blue 32x32 planes in turn.
        self.data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = [label for batch in batches for label in batch["labels"]]
        self._load_meta()

    def _check_integrity(self) -> bool:
        return not self.missing_files(self.root)

    def _load_meta(self) -> None:
        meta = _read_cifar_pickle(
            Path(self.root, self.base_folder, self.meta["filename"])
        )
        if self.meta["key"] not in meta:
            path = Path(self.root, self.base_folder, self.meta["filename"])
            raise DataUnavailableError(
                f"CIFAR-10 file {path} lacks {self.meta['key']!r}. Extract "
                "cifar-10-python.tar.gz again."
            )
        self.classes = [_as_text(name) for name in meta[self.meta["key"]]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    @classmethod
    def missing_files(cls, root: Path | str) -> list[str]:
        names = [name for name, _ in cls.train_list + cls.test_list]
        names.append(cls.meta["filename"])
        return _missing_files(Path(root, cls.base_folder), names)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle and return it with str keys.

    The official files are Python 2 pickles, whose str keys load as str with the
    latin1 encoding (and their numpy arrays load correctly only with it). Pickles
    written by Python 3 with bytes keys such as b"data" are accepted too. Raises
    DataUnavailableError naming the file when it is not such a pickle.
    """
    fix = (
        "Extract cifar-10-python.tar.gz again. The folder must contain the python "
        "version of CIFAR-10, not the binary or MATLAB one."
    )
    try:
        with open(path, "rb") as file:
            content = pickle.load(file, encoding="latin1")
    # Truncated or foreign files raise any of these while unpickling, and a pickle
    # of objects from a module that is not installed raises ImportError.
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        OverflowError,
        ImportError,
        AttributeError,
    ) as error:
        raise DataUnavailableError(
            f"CIFAR-10 file {path} is not a readable python pickle "
            f"({type(error).__name__}: {one_line(error)}). {fix}"
        ) from None
    if not isinstance(content, dict):
        raise DataUnavailableError(
            f"CIFAR-10 file {path} does not contain a CIFAR batch dictionary. {fix}"
        )
    return {_as_text(key): value for key, value in content.items()}


def _cifar_batch_rows(path: Path, batch: dict[str, Any]) -> np.ndarray:
    """Return a batch's ``data`` as uint8 rows of 3072 bytes, raising
    DataUnavailableError when its data or labels are missing or do not match."""
    data = batch.get("data")
    labels = batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataUnavailableError(
            f"CIFAR-10 batch {path} lacks the 'data' array or the 'labels' list. "
            "Extract cifar-10-python.tar.gz again."
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataUnavailableError(
            f"CIFAR-10 batch {path} has data of {data.dtype} {list(data.shape)}, "
            "expected uint8 rows of 3072 bytes. Extract cifar-10-python.tar.gz again."
        )
    if len(labels) != len(data):
        raise DataUnavailableError(
            f"CIFAR-10 batch {path} has {len(data)} images but {len(labels)} labels. "
            "Extract cifar-10-python.tar.gz again."
        )
    return data


def _as_text(value: str | bytes) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _load_cifar10(root: Path, train: bool, download: bool) -> CIFAR10:
    missing = _LocalCIFAR10.missing_files(root)
    if not missing:
        return _LocalCIFAR10(root, train)
    folder = Path(root, CIFAR10.base_folder)
    fix = (
        f"Extract cifar-10-python.tar.gz so that {folder} exists, or set data.root "
        "to the folder that contains cifar-10-batches-py. Where the network is "
        "reachable, set `download: true` in data to download it into data.root."
    )
    if not download:
        raise DataUnavailableError(
            f"CIFAR-10 files {', '.join(missing)} not found in {folder}. {fix}"
        )
    try:
        # The download path keeps torchvision's md5 checks.
        return CIFAR10(root, train=train, download=True)
    except (RuntimeError, OSError) as error:
        raise DataUnavailableError(
            f"CIFAR-10 download into {folder} failed ({one_line(error)}). {fix}"
        ) from error


def load_image_dataset(
    name: ImageDatasetName, root: Path, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as uint8 images [N, C, H, W] and int64 labels [N].

    Fashion-MNIST comes from ``root/FashionMNIST/raw``, filled by
    `prepare_fashion_mnist` from the Debian files when empty. CIFAR-10 comes from
    ``root/cifar-10-batches-py``. ``download`` allows torchvision to download a
    dataset that is not found locally.
    """
    root = Path(root)
    if name == "fashion_mnist":
        prepare_fashion_mnist(root, download=download)
        dataset = FashionMNIST(root, train=train, download=False)
        images = dataset.data.unsqueeze(1)
        labels = dataset.targets.to(torch.int64)
    elif name == "cifar10":
        dataset = _load_cifar10(root, train, download)
        images = torch.from_numpy(np.ascontiguousarray(dataset.data))
        images = images.permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(dataset.targets, dtype=torch.int64)
    else:
        raise ValueError(
            f"unknown image dataset {name!r}, expected 'fashion_mnist' or 'cifar10'"
        )
    return images, labels


def write_cifar10_folder(
    root: Path | str,
    train_images: np.ndarray,
    train_labels: Sequence[int],
    test_images: np.ndarray,
    test_labels: Sequence[int],
) -> Path:
    """Write images in the layout of the official CIFAR-10 python archive.

    Creates ``root/cifar-10-batches-py`` with ``data_batch_1`` to ``data_batch_5``
    (the training images split in order), ``test_batch`` and ``batches.meta``.
    Each batch is a pickled dict whose ``data`` is a uint8 array of rows of 3072
    bytes (the red, green and blue 32x32 planes) and whose ``labels`` is a list of
    ints. Images are uint8 arrays [N, 3, 32, 32]. Returns the folder, which
    `load_image_dataset` reads with ``root``. Meant for synthetic data
    (benchmarks) and small test sets.
    """
    folder = Path(root, CIFAR10.base_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
            raise ValueError(
                f"CIFAR-10 images must be uint8 [N, 3, 32, 32], got {images.dtype} "
                f"{images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{len(images)} images but {len(labels)} labels; give one label "
                "per image"
            )
    train_labels = [int(label) for label in train_labels]
    splits = np.array_split(np.arange(len(train_images)), len(CIFAR10.train_list))
    for number, ((name, _), indices) in enumerate(
        zip(CIFAR10.train_list, splits), start=1
    ):
        _write_cifar_batch(
            folder / name,
            train_images[indices],
            [train_labels[index] for index in indices],
            f"training batch {number} of {len(splits)}",
        )
    _write_cifar_batch(
        folder / CIFAR10.test_list[0][0],
        test_images,
        [int(label) for label in test_labels],
        "testing batch 1 of 1",
    )
    meta = {
        "num_cases_per_batch": len(splits[0]),
        "label_names": list(CIFAR10_CLASSES),
        "num_vis": 3 * 32 * 32,
    }
    with open(folder / CIFAR10.meta["filename"], "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return folder


def _write_cifar_batch(
    path: Path, images: np.ndarray, labels: list[int], batch_label: str
) -> None:
    content = {
        "batch_label": batch_label,
        "labels": labels,
        "data": np.ascontiguousarray(images).reshape(len(images), 3 * 32 * 32),
        "filenames": [f"image_{index:05d}.png" for index in range(len(images))],
    }
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


# Batches


@lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    generator = np.random.default_rng((seed, _PERMUTATION_STREAM, epoch))
    permutation = generator.permutation(size)
    permutation.flags.writeable = False
    return permutation


def _channel_tensor(
    values: Sequence[float], channels: int, device: torch.device, name: str
) -> torch.Tensor:
    if len(values) != channels:
        raise ValueError(
            f"{name} has {len(values)} values but the images have {channels} channels"
        )
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def _check_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} with "
            f"shape {list(images.shape)}"
        )
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(
            f"labels must have shape [{len(images)}], got {list(labels.shape)}"
        )
    if len(images) == 0:
        raise ValueError("the image set is empty")


def _normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    return (images.to(torch.float32) / 255.0 - mean) / std


class ImageBatches:
    """Training batches drawn from in-memory uint8 images.

    Epoch e visits the images in a permutation seeded by (seed, e), and step s takes
    positions s * batch_size up to (s + 1) * batch_size of the concatenated epochs. A
    batch that crosses an epoch end therefore continues with the next epoch's
    permutation, and a batch larger than the dataset spans several epochs. Keep
    ``batch_size`` fixed within a run, because a different batch size maps a step to
    other positions. Batches are built on the device of ``images``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        seed: int,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        _check_images(images, labels)
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.seed = seed
        self.augment = augment
        channels = images.shape[1]
        self._mean = _channel_tensor(mean, channels, images.device, "mean")
        self._std = _channel_tensor(std, channels, images.device, "std")

    def __len__(self) -> int:
        return len(self.images)

    def train_batch(
        self, step: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return normalized float32 images [B, C, H, W] and int64 labels [B] of a step.

        With ``augment``, each image is randomly cropped from a copy padded with
        CROP_PADDING black pixels on every side and flipped horizontally with
        probability 0.5, both drawn from a generator seeded by (seed, step).
        """
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        indices = torch.from_numpy(self._indices(step, batch_size))
        indices = indices.to(self.images.device)
        images = self.images[indices]
        if self.augment:
            images = self._crop_and_flip(images, step)
        return _normalize(images, self._mean, self._std), self.labels[indices]

    def _indices(self, step: int, batch_size: int) -> np.ndarray:
        size = len(self.images)
        first = step * batch_size
        end = first + batch_size
        indices = np.empty(batch_size, dtype=np.int64)
        for epoch in range(first // size, (end - 1) // size + 1):
            # Positions [start, stop) of this batch fall into this epoch.
            start = max(first, epoch * size)
            stop = min(end, (epoch + 1) * size)
            permutation = _epoch_permutation(self.seed, epoch, size)
            indices[start - first : stop - first] = permutation[
                start - epoch * size : stop - epoch * size
            ]
        return indices

    def _crop_and_flip(self, images: torch.Tensor, step: int) -> torch.Tensor:
        count, channels, height, width = images.shape
        generator = np.random.default_rng((self.seed, _AUGMENTATION_STREAM, step))
        top = generator.integers(0, 2 * CROP_PADDING, size=count, endpoint=True)
        left = generator.integers(0, 2 * CROP_PADDING, size=count, endpoint=True)
        flip = generator.random(count) < 0.5

        device = images.device
        padded = F.pad(images, (CROP_PADDING,) * 4)
        rows = torch.from_numpy(top).to(device)[:, None] + torch.arange(
            height, device=device
        )
        columns = torch.from_numpy(left).to(device)[:, None] + torch.arange(
            width, device=device
        )
        cropped = padded[
            torch.arange(count, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]
        flip_mask = torch.from_numpy(flip).to(device)[:, None, None, None]
        return torch.where(flip_mask, cropped.flip(-1), cropped)


def eval_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized float32 images and int64 labels of the whole set in order.

    The last batch is smaller when the set size is not a multiple of ``batch_size``.
    """
    _check_images(images, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    channels = images.shape[1]
    mean_tensor = _channel_tensor(mean, channels, images.device, "mean")
    std_tensor = _channel_tensor(std, channels, images.device, "std")
    labels = labels.to(device=images.device, dtype=torch.int64)
    for first in range(0, len(images), batch_size):
        batch = images[first : first + batch_size]
        yield (
            _normalize(batch, mean_tensor, std_tensor),
            labels[first : first + batch_size],
        )
