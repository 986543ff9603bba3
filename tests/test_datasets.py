"""Every data source (issue 36): CIFAR-100, SVHN and a folder of the user's own images, written here in their real
formats (CIFAR-100's python pickles with its keys and 100 fine / 20 coarse names; SVHN's .mat files with X, y and
10 for the digit 0; a dozen class folders of JPEG, PNG, grayscale, palette and RGBA images of mixed sizes); the
numbers that flow from the data (class count, image size, mean and std, crop padding); each bad input's error; the
cache per (source, options); the registry and the schema agreeing; and each source end to end through the
CLI (slow): ``python -m normsweep -m data=... norm=batch,group trainer.epochs=1`` and the sweep's report, every job
recording the dataset, its class count and image size, its model with that many outputs.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from normsweep.base.results import load_model
from normsweep.data import DATASETS, DataError, DataInfo, Split, load_raw, make_splits
from normsweep.data import images as images_module

from . import warm_python
from .conftest import REPO, compose_config

# ------------------------------------------------------------------ the datasets, in their real formats

FINE = tuple(f"fine{i:02d}" for i in range(100))
COARSE = tuple(f"coarse{i:02d}" for i in range(20))


def coloured(labels: np.ndarray, n_classes: int, seed: int, size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3) images whose mean colour depends on the label (learnable), plus noise."""
    base = np.random.default_rng(99).integers(0, 256, size=(n_classes, 1, 1, 3))
    noise = np.random.default_rng(seed).integers(-40, 41, size=(len(labels), size, size, 3))
    return np.clip(base[labels] + noise, 0, 255).astype(np.uint8)


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """ROOT/cifar-100-python/{train,test,meta} as the release holds them: dicts of 'data' (N x 3072 uint8, CHW),
    'fine_labels', 'coarse_labels' (lists), 'filenames', 'batch_label'; meta's fine/coarse_label_names."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        fine = np.arange(n) % 100
        x = coloured(fine, 100, seed).transpose(0, 3, 1, 2).reshape(n, -1)
        batch = {"filenames": [f"img{i}.png" for i in range(n)], "batch_label": f"{name} batch", "data": x,
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": list(FINE), "coarse_label_names": list(COARSE)}))
    return root


def write_svhn(root: Path, n_train: int = 200, n_test: int = 60, n_extra: int = 0) -> Path:
    """ROOT/{train,test,extra}_32x32.mat: X (32, 32, 3, N) uint8 and y (N, 1) in 1..10, 10 for the digit 0."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1), ("extra", n_extra, 2)):
        if n:
            digit = np.arange(n) % 10
            x = coloured(digit, 10, seed).transpose(1, 2, 3, 0)  # N,H,W,C -> H,W,C,N
            savemat(
                root / f"{name}_32x32.mat",
                {"X": x, "y": np.where(digit == 0, 10, digit).reshape(-1, 1).astype(np.uint8)},
            )
    return root


FOLDER_CLASSES = tuple(f"class_{c}" for c in "abcdefghijkl")  # a dozen


def folder_image(label: int, i: int, size: tuple[int, int]) -> np.ndarray:
    return coloured(np.array([label]), len(FOLDER_CLASSES), 1000 * label + i, size=max(size))[0][: size[1], : size[0]]


def write_folder(root: Path, n_train: int = 6, n_test: int = 2, n_val: int = 0, mixed: bool = True) -> Path:
    """ROOT/{train,test[,val]}/<class>/: JPEG, PNG, grayscale PNG, palette GIF and RGBA PNG files, of mixed sizes
    (40x30, 64x64, 50x70, 32x32) unless ``mixed`` is false (all 40x40 PNG)."""
    kinds = [("RGB", ".jpg"), ("RGB", ".png"), ("L", ".png"), ("P", ".gif"), ("RGBA", ".png")]
    sizes = [(40, 30), (64, 64), (50, 70), (32, 32)]
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        for label, c in enumerate(FOLDER_CLASSES):
            d = root / split / c
            for i in range(n):
                d.mkdir(parents=True, exist_ok=True)
                mode, suffix = kinds[(label + i) % len(kinds)] if mixed else ("RGB", ".png")
                size = sizes[(label + 2 * i) % len(sizes)] if mixed else (40, 40)
                img = Image.fromarray(folder_image(label, i + 100 * len(split), size))
                img = img.convert("RGBA") if mode == "RGBA" else img.convert(mode) if mode != "RGB" else img
                img.save(d / f"{i:03d}{suffix}")
    return root


@pytest.fixture
def cifar100(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path / "c100")


@pytest.fixture
def svhn(tmp_path: Path) -> Path:
    return write_svhn(tmp_path / "svhn", n_extra=40)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "mine")


def numpy_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = x.numpy().astype(np.float64) / 255
    return a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3))


# ------------------------------------------------------------------ CIFAR-100


def test_cifar100_is_read_exactly_with_fine_or_coarse_labels(cifar100: Path, cache_dir: Path) -> None:
    raw = load_raw(cifar100, source="cifar100", labels="fine", cache_dir=cache_dir)
    batch = pickle.loads((cifar100 / "cifar-100-python" / "train").read_bytes())
    assert raw.info.name == "cifar100" and raw.info.classes == FINE and raw.info.num_classes == 100
    assert raw.info.image_size == 32 and raw.train_x.shape == (300, 3, 32, 32) and raw.test_x.shape == (100, 3, 32, 32)
    assert torch.equal(raw.train_x.reshape(300, -1), torch.from_numpy(batch["data"]))
    assert raw.train_y.tolist() == batch["fine_labels"]
    mean, std = numpy_stats(raw.train_x)  # computed once from the training images, in float64
    np.testing.assert_allclose(raw.info.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(raw.info.std, std, rtol=1e-12)

    coarse = load_raw(cifar100, source="cifar100", labels="coarse", cache_dir=cache_dir)
    assert coarse.info.classes == COARSE and coarse.train_y.tolist() == batch["coarse_labels"]
    assert len(list(cache_dir.glob("cifar100-fine-*.pt"))) == len(list(cache_dir.glob("cifar100-coarse-*.pt"))) == 1


def test_cifar100_bad_files_name_the_file_and_the_fix(cifar100: Path, cache_dir: Path, tmp_path: Path) -> None:
    folder = cifar100 / "cifar-100-python"
    meta = pickle.loads((folder / "meta").read_bytes())
    (folder / "meta").write_bytes(pickle.dumps({**meta, "fine_label_names": list(FINE[:50])}))
    with pytest.raises(DataError, match=r"train has fine labels 0..99, outside its meta file's 50 fine_label_names"):
        load_raw(cifar100, source="cifar100", labels="fine", cache_dir=cache_dir)
    (folder / "meta").write_bytes(pickle.dumps(meta))
    (folder / "test").write_bytes((folder / "test").read_bytes()[:500])
    with pytest.raises(DataError, match=r"cifar-100-python/test is not a readable CIFAR-100 file"):
        load_raw(cifar100, source="cifar100", labels="fine", cache_dir=cache_dir)
    crafted = b"cos\nsystem\n(S'echo pwned'\ntR."  # os.system('echo pwned'), protocol 0
    (folder / "train").write_bytes(crafted)
    with pytest.raises(DataError, match=r"refers to os.system, which a CIFAR-100 batch never holds"):
        load_raw(cifar100, source="cifar100", labels="fine", cache_dir=cache_dir)
    assert not list(cache_dir.glob("*.pt"))  # nothing cached from a refused source


def test_cifar100_absent_offline_names_data_root(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match=r"data.root=.*nowhere has no 'cifar-100-python/'.*data.download=true"):
        load_raw(tmp_path / "nowhere", source="cifar100", labels="fine", download=False)
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-100 into data.root=.*network unreachable"):
        load_raw(tmp_path / "nowhere", source="cifar100", labels="fine", download=True)


# ------------------------------------------------------------------ SVHN


def test_svhn_is_read_with_10_as_the_digit_0_and_extra_on_request(svhn: Path, cache_dir: Path) -> None:
    from scipy.io import loadmat

    raw = load_raw(svhn, source="svhn", extra=False, cache_dir=cache_dir)
    mat = loadmat(svhn / "train_32x32.mat")
    assert raw.info.classes == tuple("0123456789") and raw.train_x.shape == (200, 3, 32, 32)
    assert torch.equal(raw.train_x, torch.from_numpy(mat["X"]).permute(3, 2, 0, 1))  # H,W,C,N -> N,C,H,W
    assert raw.train_y.tolist() == [d % 10 for d in mat["y"].ravel().tolist()] and 0 in raw.train_y.tolist()
    np.testing.assert_allclose(raw.info.mean, numpy_stats(raw.train_x)[0], rtol=1e-12)
    more = load_raw(svhn, source="svhn", extra=True, cache_dir=cache_dir)
    assert len(more.train_y) == 240 and torch.equal(more.train_x[:200], raw.train_x) and len(more.test_y) == 60
    assert len(list(cache_dir.glob("svhn-extra-*.pt"))) == len(list(cache_dir.glob("svhn-train-*.pt"))) == 1


def test_svhn_truncated_or_missing_files_name_them(svhn: Path, cache_dir: Path) -> None:
    path = svhn / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(DataError, match=r"test_32x32.mat is not a readable SVHN .mat file.*delete it"):
        load_raw(svhn, source="svhn", extra=False, cache_dir=cache_dir)
    path.unlink()
    with pytest.raises(DataError, match=r"data.root=.*svhn has no \['test_32x32.mat'\].*data.download=true"):
        load_raw(svhn, source="svhn", extra=False, cache_dir=cache_dir)


# ------------------------------------------------------------------ a folder of the user's images


def test_a_folder_of_mixed_images_is_resized_to_data_image_size(folder: Path, cache_dir: Path) -> None:
    raw = load_raw(folder, source="folder", image_size=24, cache_dir=cache_dir)
    assert raw.info.name == "folder" and raw.info.classes == FOLDER_CLASSES and raw.info.image_size == 24
    assert raw.train_x.shape == (12 * 6, 3, 24, 24) and raw.test_x.shape == (12 * 2, 3, 24, 24)
    assert torch.equal(raw.train_y.bincount(), torch.full((12,), 6))
    np.testing.assert_allclose(raw.info.mean, numpy_stats(raw.train_x)[0], rtol=1e-12)
    np.testing.assert_allclose(raw.info.std, numpy_stats(raw.train_x)[1], rtol=1e-12)
    # A 50x70 PNG: shorter side to 24 (24x34, bilinear), the centre 24x24 kept, as Resize(24) + CenterCrop(24) do
    files = [f for c in FOLDER_CLASSES for f in sorted((folder / "train" / c).iterdir())]  # the decoding order
    png = next(
        f for f in files if f.suffix == ".png" and Image.open(f).size == (50, 70) and Image.open(f).mode == "RGB"
    )
    want = np.array(Image.open(png).resize((24, 34), Image.BILINEAR).crop((0, 5, 24, 29)))
    assert torch.equal(raw.train_x[files.index(png)], torch.from_numpy(want).permute(2, 0, 1))
    modes = [Image.open(f).mode for f in files]
    assert {"L", "P", "RGBA", "RGB"} <= set(modes) and {f.suffix for f in files} == {".jpg", ".png", ".gif"}
    gray = [i for i, m in enumerate(modes) if m == "L"]
    assert all(torch.equal(raw.train_x[i][0], raw.train_x[i][1]) for i in gray)  # L -> RGB: three equal channels


def test_mixed_sizes_without_data_image_size_name_the_key(folder: Path, cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"pixels.*data.image_size=N"):
        load_raw(folder, source="folder", cache_dir=cache_dir)
    same = write_folder(tmp_path / "same", n_train=3, n_test=1, mixed=False)
    raw = load_raw(same, source="folder", cache_dir=cache_dir)  # one size: used as it is
    assert raw.info.image_size == 40 and raw.train_x.shape == (36, 3, 40, 40)


def test_a_val_folder_is_the_validation_split(tmp_path: Path, cache_dir: Path) -> None:
    root = write_folder(tmp_path / "with_val", n_train=4, n_test=2, n_val=3)
    raw = load_raw(root, source="folder", image_size=16, cache_dir=cache_dir)
    splits = make_splits(raw, val_size=5000, train_size=20)  # val_size is not used: val/ is the split
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 36, 24)
    assert torch.equal(splits.val.x, raw.val_x) and splits.info == raw.info


@pytest.mark.parametrize(
    "damage, error",
    [
        ("one_class", r"train has one class folder only \(\['class_a'\]\).*2 classes or more"),
        ("test_class_not_in_train", r"only in test/: \['class_z'\]"),
        ("empty_class", r"class folder .*train/class_c holds no .png/.jpg images"),
        ("truncated_jpeg", r"train/class_a/000.jpg could not be decoded as an image"),
        ("no_test", r"has no 'test/'"),
    ],
)
def test_bad_folders_stop_naming_the_path_and_the_fix(tmp_path: Path, cache_dir: Path, damage: str, error: str) -> None:
    import shutil

    root = write_folder(tmp_path / "bad", n_train=2, n_test=1)
    if damage == "one_class":
        for c in FOLDER_CLASSES[1:]:
            shutil.rmtree(root / "train" / c)
            shutil.rmtree(root / "test" / c)
    elif damage == "test_class_not_in_train":
        shutil.copytree(root / "test" / "class_a", root / "test" / "class_z")
    elif damage == "empty_class":
        for f in (root / "train" / "class_c").iterdir():
            f.unlink()
    elif damage == "truncated_jpeg":
        f = root / "train" / "class_a" / "000.jpg"
        f.write_bytes(f.read_bytes()[:300])
    elif damage == "no_test":
        shutil.rmtree(root / "test")
    with pytest.raises(DataError, match=error):
        load_raw(root, source="folder", image_size=16, cache_dir=cache_dir)
    assert not list(cache_dir.glob("*.pt"))


def test_the_process_pool_decodes_what_one_process_does(folder: Path, monkeypatch) -> None:
    paths = sorted(folder.rglob("*.*"))
    one = images_module.decode_files(paths, 20, resize=True, workers=1)
    monkeypatch.setattr(images_module, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(images_module, "CHUNK", 7)
    assert np.array_equal(images_module.decode_files(paths, 20, resize=True, workers=2), one)
    paths[10].write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=rf"{paths[10].name} could not be decoded"):
        images_module.decode_files(paths, 20, resize=True, workers=2)


# ------------------------------------------------------------------ memory, cache


def test_a_dataset_over_data_max_memory_gb_stops_before_decoding(folder: Path, cache_dir: Path, monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although over the limit")

    monkeypatch.setattr("normsweep.data.folder.decode_files", no_decoding)
    need = 12 * (6 + 2) * 3 * 64 * 64 / 1e9
    with pytest.raises(
        DataError, match=rf"decodes to {need:.2f} GB.*data.max_memory_gb=1e-05.*smaller data.image_size"
    ):
        load_raw(folder, source="folder", image_size=64, cache_dir=cache_dir, max_memory_gb=1e-5)


def test_the_default_limit_is_half_the_machines_memory(folder: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr("normsweep.data.dataset.machine_memory", lambda: 100_000)  # a 100 kB machine
    with pytest.raises(DataError, match=r"over the limit of 0.00 GB \(data.max_memory_gb=null: half of this machine's"):
        load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)
    load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir, max_memory_gb=1.0)  # asked for: allowed


def test_a_crash_while_the_cache_is_written_leaves_no_cache(folder: Path, cache_dir: Path, monkeypatch) -> None:
    import torch as torch_module

    real_save = torch_module.save

    def torn(obj, f, *args, **kwargs):
        f.write(b"half a cache file")
        raise KeyboardInterrupt  # Ctrl-C half-way through the write

    monkeypatch.setattr(torch_module, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []  # nothing a run could trust
    monkeypatch.setattr(torch_module, "save", real_save)
    raw = load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)
    assert raw.info.image_size == 16 and len(list(cache_dir.glob("folder-16px-*.pt"))) == 1


def test_the_cache_is_per_size_and_another_sizes_file_is_not_trusted(
    folder: Path, cache_dir: Path, monkeypatch, caplog
) -> None:
    a = load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)
    b = load_raw(folder, source="folder", image_size=24, cache_dir=cache_dir)
    (f16,) = cache_dir.glob("folder-16px-*.pt")
    (f24,) = cache_dir.glob("folder-24px-*.pt")
    monkeypatch.setattr(
        "normsweep.data.folder.decode_files", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded"))
    )
    again = load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)  # from the cache
    assert torch.equal(again.train_x, a.train_x) and again.info == a.info
    monkeypatch.undo()
    f16.write_bytes(f24.read_bytes())  # another size's file under this size's name
    rebuilt = load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)
    assert "ignoring the data cache" in caplog.text and rebuilt.info.image_size == 16 and b.info.image_size == 24
    assert torch.equal(rebuilt.train_x, a.train_x)


# ------------------------------------------------------------------ what flows from the data


def test_the_model_gets_the_class_count_and_image_size_and_the_budget_counts_a_10_class_head() -> None:
    from normsweep.config import to_config
    from normsweep.models import count_params
    from normsweep.run.build import BudgetError, budget_params, check_budget, model_from_config

    cfg = to_config(compose_config(["data=cifar100"]))
    model = model_from_config(cfg, 100, 64)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 100)
    params, ten = count_params(model), count_params(model_from_config(cfg, 10, 64))
    assert params > 50_000 > ten and budget_params(cfg, params, 100, 64) == ten
    check_budget(cfg, budget_params(cfg, params, 100, 64), 100)  # within the budget as counted
    with pytest.raises(BudgetError, match=r"with a 10-class head instead of its 100 classes'.*budget=none"):
        check_budget(to_config(compose_config(["data=cifar100", "budget.max_params=40000"])), ten, 100)
    assert not to_config(compose_config(["data=cifar100", "budget=none"])).budget.enforce


def test_crop_padding_scales_with_the_image_size(monkeypatch) -> None:
    from normsweep.config import AugmentConfig
    from normsweep.run import augment

    assert [augment.crop_pixels(4, s) for s in (32, 64, 16, 96)] == [4, 8, 2, 12]
    seen = []
    real = augment.random_crop
    monkeypatch.setattr(augment, "random_crop", lambda x, p, g: (seen.append(p), real(x, p, g))[1])
    out = augment.augment_batch(
        torch.rand(3, 3, 64, 64), AugmentConfig(crop_padding=4), torch.Generator().manual_seed(0)
    )
    assert seen == [8] and out.shape == (3, 3, 64, 64)


def test_normalization_uses_the_datas_mean_and_std(folder: Path, cache_dir: Path) -> None:
    from normsweep.run.train import prepare_eval

    raw = load_raw(folder, source="folder", image_size=16, cache_dir=cache_dir)
    splits = make_splits(raw, val_size=12)
    assert isinstance(splits.info, DataInfo) and splits.info == raw.info
    every = Split(raw.train_x, raw.train_y, torch.arange(len(raw.train_y)))  # the images the mean and std are of
    x, _ = prepare_eval(every, torch.device("cpu"), splits.info)
    assert torch.allclose(x.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.double().std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5)


# ------------------------------------------------------------------ one registry, one schema


def test_the_registry_the_schema_and_conf_data_agree() -> None:
    import yaml

    from normsweep.config import DataSource

    assert [s.value for s in DataSource] == list(DATASETS)
    for name in DATASETS:
        assert yaml.safe_load((REPO / "conf" / "data" / f"{name}.yaml").read_text())["source"] == name
    assert sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")) == sorted(DATASETS)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.labels=fine"], "data.labels"),  # cifar10 has no labels option
        (["data=cifar100", "data.labels=null"], "data.labels"),
        (["data=cifar100", "data.labels=medium"], "data.labels"),
        (["data=svhn", "data.image_size=64"], "data.image_size"),
        (["data=folder", "data.extra=true"], "data.extra"),
        (["data=svhn", "data.format=pickle"], "data.format"),
        (["data=folder", "data.image_size=2"], "data.image_size"),
        (["data.max_memory_gb=0"], "data.max_memory_gb"),
    ],
)
def test_a_sources_own_keys_are_checked(overrides: list[str], key: str) -> None:
    from normsweep.config import ConfigError, to_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(compose_config(overrides))


# ------------------------------------------------------------------ end to end through the CLI (slow)

CASES = {
    "cifar100": (write_cifar100, ["data=cifar100", "data.labels=coarse", "data.val_size=50", "data.train_size=200"], 20, 32),
    "svhn": (write_svhn, ["data=svhn", "data.val_size=40", "data.train_size=150"], 10, 32),
    "folder": (write_folder, ["data=folder", "data.image_size=24", "data.val_size=12", "trainer.batch_size=30"],
               len(FOLDER_CLASSES), 24),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("source", list(CASES))
def test_a_two_norm_sweep_runs_and_records_the_dataset(tmp_path: Path, source: str) -> None:
    write, args, num_classes, size = CASES[source]
    root = write(tmp_path / "data")
    sweep = tmp_path / "multirun"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "normsweep", "-m", *args, "norm=batch,group", "trainer.epochs=1", f"data.root={root}",
           f"data.cache_dir={tmp_path / 'cache'}", "data.download=false", "trainer.device=cpu", "trainer.batch_size=50",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    if source == "folder":
        cmd.remove("trainer.batch_size=50")  # the case's own
    proc = warm_python.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 2
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        assert res["status"] == "completed", res.get("error")
        assert (res["dataset"], res["num_classes"], res["image_size"]) == (source, num_classes, size)
        assert len(res["classes"]) == num_classes
        state = load_model(job / "model.pt")["state_dict"]
        head = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2][-1]
        assert head.shape[0] == num_classes  # the model's head has the data's classes
    if source == "cifar100":  # 48,170 parameters with 20 classes; the budget counts a 10-class head
        assert "budget: 47,600 parameters counted" in proc.stdout + proc.stderr
    table = pd.read_csv(sweep / "results.csv")  # the sweep's report
    assert sorted(table["norm"]) == ["batch", "group"] and (table["status"] == "completed").all()
    for job in jobs:
        assert (sweep / "plots" / job.name / "mispredicted.png").stat().st_size > 1000  # the test images, read back
