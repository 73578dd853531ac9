import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

from tests.trainers.sample_data import write_random_cifar10
from trainers.data import DataUnavailableError, vision
from trainers.data.vision import (
    CHANNEL_STATS,
    FASHION_MNIST_FILES,
    ImageBatches,
    eval_batches,
    load_image_dataset,
    prepare_fashion_mnist,
)
from trainers.workloads.vision import VisionWorkload

CIFAR_TRAIN_PER_BATCH = 4
CIFAR_TEST_IMAGES = 3
CIFAR_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


class Python2Pickler(pickle._Pickler):
    """Pickler that writes bytes as Python 2 str, as in the official CIFAR-10 files.

    Python 3 loads such strings as bytes with encoding="bytes" (so keys read
    b"data" and b"labels") and as str with encoding="latin1".
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, value: bytes) -> None:
        if len(value) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(value)]) + value)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(value)) + value)
        self.memoize(value)

    dispatch[bytes] = save_python2_str


def write_cifar_pickle(path: Path, content: dict, python2: bool) -> None:
    with open(path, "wb") as file:
        if python2:
            Python2Pickler(file, protocol=2).dump(content)
        else:
            pickle.dump(content, file)


def cifar_batch(images: np.ndarray, labels: list[int], name: bytes) -> dict:
    return {
        b"batch_label": name,
        b"labels": labels,
        b"data": images.reshape(len(images), 3 * 32 * 32),
        b"filenames": [f"image_{index}.png".encode() for index in range(len(labels))],
    }


def write_cifar_folder(
    root: Path, python2: bool = True
) -> tuple[np.ndarray, list[int]]:
    """Write a tiny cifar-10-batches-py folder and return its training images and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    train_images, train_labels = [], []
    for batch_index in range(1, 6):
        images = generator.integers(
            0, 256, size=(CIFAR_TRAIN_PER_BATCH, 3, 32, 32), dtype=np.uint8
        )
        labels = [
            (batch_index + offset) % 10 for offset in range(CIFAR_TRAIN_PER_BATCH)
        ]
        name = f"training batch {batch_index} of 5".encode()
        write_cifar_pickle(
            folder / f"data_batch_{batch_index}",
            cifar_batch(images, labels, name),
            python2,
        )
        train_images.append(images)
        train_labels += labels
    test_images = generator.integers(
        0, 256, size=(CIFAR_TEST_IMAGES, 3, 32, 32), dtype=np.uint8
    )
    write_cifar_pickle(
        folder / "test_batch",
        cifar_batch(test_images, [7, 8, 9], b"testing batch 1 of 1"),
        python2,
    )
    meta = {
        b"num_cases_per_batch": CIFAR_TRAIN_PER_BATCH,
        b"label_names": [name.encode() for name in CIFAR_LABEL_NAMES],
        b"num_vis": 3072,
    }
    write_cifar_pickle(folder / "batches.meta", meta, python2)
    return np.concatenate(train_images), train_labels


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the gzipped idx format of MNIST-style datasets."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def labelled_images(count: int, channels: int = 1, size: int = 8):
    generator = np.random.default_rng(1)
    images = generator.integers(
        0, 256, size=(count, channels, size, size), dtype=np.uint8
    )
    return torch.from_numpy(images), torch.arange(count, dtype=torch.int64)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    prepare_fashion_mnist(root)
    return root


# Fashion-MNIST


def test_fashion_mnist_prepared_from_debian_files(fashion_root):
    raw_dir = fashion_root / "FashionMNIST" / "raw"
    mtimes = {name: (raw_dir / name).stat().st_mtime_ns for name in FASHION_MNIST_FILES}

    assert prepare_fashion_mnist(fashion_root) == raw_dir
    assert {
        name: (raw_dir / name).stat().st_mtime_ns for name in FASHION_MNIST_FILES
    } == mtimes
    assert sorted(path.name for path in raw_dir.iterdir()) == sorted(
        FASHION_MNIST_FILES
    )


def test_fashion_mnist_loads_both_splits(fashion_root):
    train_images, train_labels = load_image_dataset("fashion_mnist", fashion_root, True)
    test_images, test_labels = load_image_dataset("fashion_mnist", fashion_root, False)

    assert train_images.shape == (60000, 1, 28, 28)
    assert test_images.shape == (10000, 1, 28, 28)
    assert train_images.dtype == torch.uint8
    assert train_labels.dtype == torch.int64
    assert train_labels.shape == (60000,)
    assert test_labels.shape == (10000,)
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    mean = train_images.double().mean().item() / 255
    assert mean == pytest.approx(CHANNEL_STATS["fashion_mnist"][0][0], abs=1e-4)


def test_fashion_mnist_from_source_dir(tmp_path):
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    generator = np.random.default_rng(2)
    splits = {"train": 6, "t10k": 4}
    expected = {}
    for prefix, count in splits.items():
        images = generator.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx_gz(source_dir / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(source_dir / f"{prefix}-labels-idx1-ubyte.gz", labels)
        expected[prefix] = (images, labels)

    prepare_fashion_mnist(tmp_path / "root", source_dir)
    images, labels = load_image_dataset("fashion_mnist", tmp_path / "root", train=True)

    assert images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(images[:, 0].numpy(), expected["train"][0])
    np.testing.assert_array_equal(labels.numpy(), expected["train"][1])


def test_fashion_mnist_missing_names_fix(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="data.source_dir"):
        prepare_fashion_mnist(tmp_path / "root", tmp_path / "empty")

    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(
        DataUnavailableError, match="apt-get install dataset-fashion-mnist"
    ):
        load_image_dataset("fashion_mnist", tmp_path / "root", train=True)


# CIFAR-10


@pytest.mark.parametrize("python2", [True, False], ids=["python2", "python3"])
def test_cifar10_local_folder_loads(tmp_path, python2):
    train_images, train_labels = write_cifar_folder(tmp_path, python2=python2)

    images, labels = load_image_dataset("cifar10", tmp_path, train=True)
    test_images, test_labels = load_image_dataset("cifar10", tmp_path, train=False)

    assert images.shape == (5 * CIFAR_TRAIN_PER_BATCH, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), train_images)
    assert labels.tolist() == train_labels
    assert test_images.shape == (CIFAR_TEST_IMAGES, 3, 32, 32)
    assert test_labels.tolist() == [7, 8, 9]


def test_cifar10_python2_pickle_has_bytes_keys(tmp_path):
    write_cifar_folder(tmp_path, python2=True)

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as file:
        batch = pickle.load(file, encoding="bytes")

    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].shape == (CIFAR_TRAIN_PER_BATCH, 3072)


def test_cifar10_md5_check_rejects_local_folder(tmp_path):
    write_cifar_folder(tmp_path)

    with pytest.raises(RuntimeError, match="corrupted"):
        CIFAR10(tmp_path, train=True)


def test_cifar10_missing_names_fix(tmp_path):
    with pytest.raises(DataUnavailableError, match="data.root") as raised:
        load_image_dataset("cifar10", tmp_path, train=True)

    assert "`download: true`" in str(raised.value)
    assert "data_batch_1" in str(raised.value)


def test_cifar10_download_hint_is_yaml(tmp_path):
    with pytest.raises(DataUnavailableError) as raised:
        load_image_dataset("cifar10", tmp_path, train=False)

    folder = tmp_path / "cifar-10-batches-py"
    assert str(raised.value) == (
        f"CIFAR-10 files data_batch_1, data_batch_2, data_batch_3, data_batch_4, "
        f"data_batch_5, test_batch, batches.meta not found in {folder}. Extract "
        f"cifar-10-python.tar.gz so that {folder} exists, or set data.root to the "
        "folder that contains cifar-10-batches-py. Where the network is reachable, "
        "set `download: true` in data to download it into data.root."
    )


def _pickled(content) -> bytes:
    return pickle.dumps(content, protocol=2)


GOOD_TEST_BATCH = {
    "data": np.zeros((3, 3072), dtype=np.uint8),
    "labels": [7, 8, 9],
}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (_pickled(GOOD_TEST_BATCH)[:40], "file {} is not a readable python pickle"),
        (b"data_batch in binary form", "file {} is not a readable python pickle"),
        (_pickled([1, 2, 3]), "file {} does not contain a CIFAR batch dictionary"),
        (
            _pickled({"data": GOOD_TEST_BATCH["data"]}),
            "batch {} lacks the 'data' array or the 'labels' list",
        ),
        (
            _pickled({**GOOD_TEST_BATCH, "data": np.zeros((3, 1024), np.uint8)}),
            "batch {} has data of uint8 [3, 1024], expected uint8 rows of 3072 bytes",
        ),
        (
            _pickled({**GOOD_TEST_BATCH, "labels": [7]}),
            "batch {} has 3 images but 1 labels",
        ),
    ],
    ids=["truncated", "not_pickle", "list", "no_labels", "wrong_shape", "few_labels"],
)
def test_cifar10_bad_batch_names_file(tmp_path, content, problem):
    write_cifar_folder(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    test_batch.write_bytes(content)

    with pytest.raises(DataUnavailableError) as raised:
        load_image_dataset("cifar10", tmp_path, train=False)

    message = str(raised.value)
    assert message.startswith("CIFAR-10 " + problem.format(test_batch))
    assert "Extract cifar-10-python.tar.gz again" in message
    assert "\n" not in message


def test_fashion_mnist_truncated_gz_names_file(tmp_path):
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    for name in FASHION_MNIST_FILES:
        write_idx_gz(source_dir / f"{name}.gz", np.zeros((4, 28, 28), np.uint8))
    truncated = source_dir / "train-images-idx3-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:30])

    with pytest.raises(DataUnavailableError) as raised:
        prepare_fashion_mnist(tmp_path / "root", source_dir)

    assert str(raised.value) == (
        f"Fashion-MNIST file {truncated} is truncated or not a gzip file (Compressed "
        "file ended before the end-of-stream marker was reached). Download it "
        "again, or reinstall dataset-fashion-mnist if it came from there."
    )
    # No partly written file is left behind for the next run to trust.
    raw_dir = tmp_path / "root" / "FashionMNIST" / "raw"
    assert not (raw_dir / "train-images-idx3-ubyte").exists()


# Batches


def test_image_batches_are_deterministic():
    images, labels = labelled_images(50)
    first = ImageBatches(images, labels, seed=5, augment=True, mean=(0.5,), std=(0.25,))
    resumed = ImageBatches(
        images, labels, seed=5, augment=True, mean=(0.5,), std=(0.25,)
    )
    other_seed = ImageBatches(
        images, labels, seed=6, augment=True, mean=(0.5,), std=(0.25,)
    )

    x, y = first.train_batch(step=3, batch_size=16)
    x_again, y_again = resumed.train_batch(step=3, batch_size=16)
    x_next, _ = first.train_batch(step=4, batch_size=16)
    _, y_other = other_seed.train_batch(step=3, batch_size=16)

    assert torch.equal(x, x_again)
    assert torch.equal(y, y_again)
    assert not torch.equal(x, x_next)
    assert not torch.equal(y, y_other)


def test_image_batches_epoch_is_permutation():
    images, labels = labelled_images(40)
    batches = ImageBatches(
        images, labels, seed=0, augment=False, mean=(0.0,), std=(1.0,)
    )

    epoch = torch.cat([batches.train_batch(step, 8)[1] for step in range(5)])
    next_epoch = torch.cat([batches.train_batch(step, 8)[1] for step in range(5, 10)])

    assert sorted(epoch.tolist()) == list(range(40))
    assert sorted(next_epoch.tolist()) == list(range(40))
    assert epoch.tolist() != next_epoch.tolist()


def test_image_batches_normalize_without_augmentation():
    images, labels = labelled_images(10, channels=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    batches = ImageBatches(images, labels, seed=0, augment=False, mean=mean, std=std)

    x, y = batches.train_batch(step=0, batch_size=4)

    expected = (
        images[y].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, expected)


def test_batch_crossing_epoch_end():
    images, labels = labelled_images(10)
    batches = ImageBatches(
        images, labels, seed=1, augment=False, mean=(0.0,), std=(1.0,)
    )
    epoch_zero = torch.cat([batches.train_batch(step, 2)[1] for step in range(5)])
    epoch_one = torch.cat([batches.train_batch(step, 2)[1] for step in range(5, 10)])

    _, crossing = batches.train_batch(step=2, batch_size=4)

    assert crossing.tolist() == epoch_zero[8:].tolist() + epoch_one[:2].tolist()


def test_batch_size_8192_on_small_dataset():
    images, labels = labelled_images(100)
    batches = ImageBatches(
        images, labels, seed=2, augment=True, mean=(0.0,), std=(1.0,)
    )

    for step in (0, 1, 7):
        x, y = batches.train_batch(step=step, batch_size=8192)
        counts = torch.bincount(y, minlength=100)
        assert x.shape == (8192, 1, 8, 8)
        assert counts.sum().item() == 8192
        assert counts.min().item() >= 81
        assert counts.max().item() <= 83


def test_augmentation_crops_and_flips_padded_image():
    images, labels = labelled_images(32, channels=3)
    batches = ImageBatches(
        images, labels, seed=4, augment=True, mean=(0.0,) * 3, std=(1.0,) * 3
    )

    x, y = batches.train_batch(step=1, batch_size=32)

    assert x.shape == (32, 3, 8, 8)
    assert x.dtype == torch.float32
    pixels = torch.round(x * 255).to(torch.uint8)
    padded = F.pad(images, (4, 4, 4, 4))
    flipped_any = False
    for image, label in zip(pixels, y):
        candidates = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(
                image,
                padded[label, :, top : top + 8, left : left + 8].flip(-1)
                if flip
                else padded[label, :, top : top + 8, left : left + 8],
            )
        ]
        assert candidates, f"augmented image of {label} is no crop of its padded copy"
        flipped_any |= all(flip for _, _, flip in candidates)
    assert flipped_any


def test_image_batches_reject_mismatched_stats():
    images, labels = labelled_images(4, channels=3)

    with pytest.raises(ValueError, match="3 channels"):
        ImageBatches(images, labels, seed=0, augment=False, mean=(0.5,), std=(0.5,))


def test_eval_batches_cover_set_in_order():
    images, labels = labelled_images(10, channels=3)
    mean, std = CHANNEL_STATS["cifar10"]

    batches = list(eval_batches(images, labels, 4, mean, std))

    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    x = torch.cat([x for x, _ in batches])
    expected = (
        images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)


def test_workload_prepare_makes_relative_root_absolute(tmp_path, monkeypatch):
    write_random_cifar10(tmp_path / "images", train=10, test=10)
    monkeypatch.chdir(tmp_path)
    prepared = VisionWorkload.prepare(
        {"dataset": "cifar10", "root": "images"}, tmp_path / "cache"
    )
    # Ray Tune starts each trial in a folder of its own.
    assert prepared["root"] == str(tmp_path / "images")


def test_workload_prepare_passes_fashion_mnist_download(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "none")
    with pytest.raises(DataUnavailableError, match="Fashion-MNIST not found in"):
        VisionWorkload.prepare(
            {"dataset": "fashion_mnist", "root": str(tmp_path / "root")},
            tmp_path / "cache",
        )
