"""Reading both CIFAR-10 layouts, caching, splitting, and the errors for bad data roots (the other sources:
test_datasets.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normsweep import data
from normsweep.data import CLASSES, DataError, detect_format, load_raw, make_splits

from .conftest import class_images


def test_folder_layout_is_detected_and_read_exactly(folder_data: Path, cache_dir: Path) -> None:
    assert detect_format(folder_data) == "folder"
    raw = load_raw(folder_data, cache_dir=cache_dir)
    assert raw.classes == CLASSES
    assert raw.train_x.shape == (120, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (40, 3, 32, 32)
    assert torch.equal(raw.train_y.bincount(), torch.full((10,), 12))
    images, labels = class_images(12, seed=0)  # what the fixture wrote, in class order
    assert torch.equal(raw.train_x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(raw.train_y, torch.from_numpy(labels))


def test_pickle_layout_is_detected_and_read_exactly(pickle_data: Path, cache_dir: Path) -> None:
    assert detect_format(pickle_data) == "pickle"
    raw = load_raw(pickle_data, cache_dir=cache_dir)
    assert raw.train_x.shape == (5 * 20, 3, 32, 32) and raw.test_x.shape == (30, 3, 32, 32)
    with open(pickle_data / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    assert torch.equal(raw.train_x[20:40].reshape(20, -1), torch.from_numpy(batch["data"]))
    assert raw.train_y[20:40].tolist() == batch["labels"]


def test_jpeg_folders_are_read(tmp_path: Path, cache_dir: Path) -> None:
    from .conftest import write_folder_dataset

    root = write_folder_dataset(tmp_path / "jpg", n_train=2, n_test=1, suffix=".jpg")
    raw = load_raw(root, cache_dir=cache_dir)
    assert raw.train_x.shape == (20, 3, 32, 32)


def test_second_load_comes_from_the_cache(folder_data: Path, cache_dir: Path, monkeypatch) -> None:
    first = load_raw(folder_data, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("cifar10-folder-*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data.cifar10, "read_folder", no_decoding)
    second = load_raw(folder_data, cache_dir=cache_dir)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)


def test_corrupt_cache_is_rebuilt_not_trusted(folder_data: Path, cache_dir: Path, caplog) -> None:
    first = load_raw(folder_data, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.pt")
    blob = torch.load(cache_file, weights_only=True)
    blob["train_x"][0] += 1  # silently changed pixels: the checksum must catch it
    torch.save(blob, cache_file)
    again = load_raw(folder_data, cache_dir=cache_dir)
    assert torch.equal(again.train_x, first.train_x)
    assert "checksum" in caplog.text
    cache_file.write_bytes(b"not a tensor file")
    assert torch.equal(load_raw(folder_data, cache_dir=cache_dir).train_x, first.train_x)


def test_changed_source_files_invalidate_the_cache(folder_data: Path, cache_dir: Path) -> None:
    load_raw(folder_data, cache_dir=cache_dir)
    img = folder_data / "train" / "cat" / "00036.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    raw = load_raw(folder_data, cache_dir=cache_dir)
    assert raw.train_x[36].sum() == 0


def test_missing_root_says_what_was_found_expected_and_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"data.root=.*nowhere has no 'cifar-10-batches-py/' or 'train/' \(it does not exist\).*data.download=true",
    ):
        load_raw(tmp_path / "nowhere", download=False)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"it holds \['notes.txt'\]"):
        load_raw(tmp_path / "wrong", download=False)


def test_failed_download_is_reported_with_the_fix(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10.*network unreachable.*data.root=PATH"):
        load_raw(tmp_path / "empty", download=True)


def test_malformed_folder_trees_name_the_problem(folder_data: Path, cache_dir: Path) -> None:
    import shutil

    shutil.rmtree(folder_data / "test" / "dog")
    with pytest.raises(DataError, match=r"only in train/: \['dog'\]"):
        load_raw(folder_data, cache_dir=cache_dir)
    (folder_data / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=r"test/dog holds no .png/.jpg images"):
        load_raw(folder_data, cache_dir=cache_dir)


def test_unreadable_or_wrong_size_images_name_the_file(folder_data: Path, cache_dir: Path) -> None:
    bad = folder_data / "train" / "ship" / "00096.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"00096.png could not be decoded"):
        load_raw(folder_data, cache_dir=cache_dir)
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match=r"00096.png is 24x16 pixels; CIFAR-10 images are 32x32"):
        load_raw(folder_data, cache_dir=cache_dir)


def test_truncated_batch_file_names_the_file(pickle_data: Path, cache_dir: Path) -> None:
    path = pickle_data / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR-10 batch"):
        load_raw(pickle_data, cache_dir=cache_dir)


def test_splits_are_deterministic_disjoint_and_sized(folder_data: Path, cache_dir: Path) -> None:
    raw = load_raw(folder_data, cache_dir=cache_dir)
    a = make_splits(raw, val_size=20, split_seed=0)
    b = make_splits(raw, val_size=20, split_seed=0)
    assert torch.equal(a.val.index, b.val.index) and torch.equal(a.train.index, b.train.index)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 20, 40)
    assert not set(a.val.index.tolist()) & set(a.train.index.tolist())
    assert torch.equal(a.val.x, raw.train_x[a.val.index])
    c = make_splits(raw, val_size=20, split_seed=1)
    assert not torch.equal(a.val.index, c.val.index)
    small = make_splits(raw, val_size=20, train_size=30, test_size=10)
    assert (len(small.train), len(small.val), len(small.test)) == (30, 20, 10)
    assert torch.equal(small.val.index, a.val.index)  # a subset never moves the validation split
    assert set(small.train.index.tolist()) <= set(a.train.index.tolist())


def test_impossible_split_sizes_are_explained(folder_data: Path, cache_dir: Path) -> None:
    raw = load_raw(folder_data, cache_dir=cache_dir)
    with pytest.raises(DataError, match="data.val_size=120 leaves no training images"):
        make_splits(raw, val_size=120)
    with pytest.raises(DataError, match="data.train_size=500 is more than the 100 training images"):
        make_splits(raw, val_size=20, train_size=500)


def test_cifar10_keeps_its_published_mean_and_std(folder_data: Path, pickle_data: Path, cache_dir: Path) -> None:
    """Every earlier run normalized with these constants; CIFAR-10 from either layout still does."""
    published = data.DataInfo("cifar10", CLASSES, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert load_raw(folder_data, cache_dir=cache_dir).info == published
    assert load_raw(pickle_data, cache_dir=cache_dir).info == published
    assert make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20).info == published
