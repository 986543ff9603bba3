"""Shared fixtures: small CIFAR-10-shaped datasets the tests make themselves, a throwaway PostgreSQL server."""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from normsweep.data import CLASSES

# Under pytest-xdist (pyproject's addopts: -n 4) four test processes share the cores. A torch process
# takes one thread per core by default, and 4 x 2 spinning OpenMP threads on 2 cores ran the training
# tests up to 30x slower than one process alone: one thread per test process, and for the runs it starts
# (OMP_NUM_THREADS is torch's default where trainer.threads is null; a launcher's share is set explicitly).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpg"


def class_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (N, 32, 32, 3) whose mean colour depends on the class, and labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    base = np.random.default_rng(1234).integers(0, 256, size=(len(CLASSES), 1, 1, 3))  # same in every split
    noise = rng.integers(-40, 41, size=(len(labels), 32, 32, 3))
    return np.clip(base[labels] + noise, 0, 255).astype(np.uint8), labels


def write_folder_dataset(root: Path, n_train: int = 12, n_test: int = 4, suffix: str = ".png") -> Path:
    """ROOT/train/<class>/*.png and ROOT/test/<class>/*.png (lossless, so pixels can be compared)."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = class_images(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}{suffix}")
    return root


def write_pickle_dataset(root: Path, n_per_batch_class: int = 2, n_test_class: int = 3) -> Path:
    """ROOT/cifar-10-batches-py/ with five training batches and a test batch, as in CIFAR-10."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        images, labels = class_images(n_test_class if name == "test_batch" else n_per_batch_class, 10 + k)
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1), "labels": labels.tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "cifar_folder")


@pytest.fixture
def pickle_data(tmp_path: Path) -> Path:
    return write_pickle_dataset(tmp_path / "cifar_pickle")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def small_data_args(tmp_path_factory, n_train: int = 30, n_test: int = 5) -> list[str]:
    """CLI overrides for a small class-folder dataset written here (10 classes x n_train images)."""
    root = write_folder_dataset(tmp_path_factory.mktemp("data") / "cifar", n_train=n_train, n_test=n_test)
    cache = tmp_path_factory.mktemp("cache")
    return [f"data.root={root}", f"data.cache_dir={cache}", "data.val_size=100", "trainer.batch_size=50",
            "trainer.device=cpu"]  # fmt: skip


def compose_config(overrides: list[str] = (), return_hydra_config: bool = False):
    """The job config ``python -m normsweep OVERRIDES`` would run, composed in-process through Hydra."""
    from hydra import compose, initialize_config_dir

    from normsweep.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


PG_INSTALL_HINT = "install the PostgreSQL server: `sudo apt-get install postgresql` (Debian/Ubuntu)"


# ------------------------------------------------------------------ a real PostgreSQL server


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(password: str | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL server: initdb into a temporary dir, 127.0.0.1 on a free port; stopped after.

    Yields its URL for the user ``normsweep`` (database ``postgres``), without a password: with
    ``password`` the server asks for it (scram-sha-256), else it trusts every connection.
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {PG_INSTALL_HINT}")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (normsweep's [postgres] extra)")
    run_as: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="normsweep-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as; " + PG_INSTALL_HINT)
        os.chown(workdir, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = workdir / "data", _free_port()
    auth = ["--auth=trust"]
    if password is not None:
        (workdir / "pwfile").write_text(password + "\n")
        os.chmod(workdir / "pwfile", 0o644)  # readable by the postgres user; the directory is temporary
        auth = ["--auth=scram-sha-256", f"--pwfile={workdir / 'pwfile'}"]
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "normsweep", *auth, "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    opts = f"-h 127.0.0.1 -p {port} -k {workdir} -c fsync=off"
    started = subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", opts, "-l", str(workdir / "log"), "-w", "start"],
                             capture_output=True, text=True)  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr + (workdir / "log").read_text()
        yield f"postgresql+psycopg://normsweep@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server that trusts every connection (:func:`postgres_server`)."""
    with postgres_server() as url:
        yield url
