"""Shared fixtures: small CIFAR-10-shaped datasets the tests make themselves, a throwaway PostgreSQL server."""

from __future__ import annotations

import contextlib
import glob
import math
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
def splits(folder_data: Path, cache_dir: Path):
    """The folder dataset's splits: 100 training, 20 validation and 40 test images of 10 classes."""
    from normsweep.data import load_raw, make_splits

    return make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)


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


# ---------------------------------------------------------------------------- helpers several test files use


def make_cfg(*overrides: str):
    """The typed, validated ``Config`` the overrides compose to (``config.to_config`` of :func:`compose_config`)."""
    from normsweep.config import to_config

    return to_config(compose_config(list(overrides)))


def record_config(norm: str, seed: int, lr: float = 0.2) -> dict:
    """The ``config`` of a fake results.json (:func:`write_run`)."""
    return {
        "norm": {"kind": norm, "groups": 4},
        "model": {"arch": "resnet", "dropout": 0.0},
        "optimizer": {"name": "sgd", "lr": lr, "weight_decay": 5e-4},
        "scheduler": {"name": "onecycle"},
        "trainer": {"batch_size": 512, "label_smoothing": 0.1, "epochs": 2, "seed": seed},
        "data": {"root": "unused", "format": "auto", "train_size": None},
    }


def write_run(
    job: Path,
    norm: str,
    seed: int,
    test: float,
    val: float,
    status: str = "completed",
    error=None,
    lr: float = 0.2,
    **fields,
) -> None:
    """A job directory with a results.json; ``fields`` are added to (or replace) the record's own."""
    import json

    job.mkdir(parents=True)
    history = [
        {"epoch": 1, "train_loss": 2.0, "train_acc": 30.0, "val_acc": val - 10, "test_acc": test - 10, "lr": 0.1, "seconds": 3.0},
        {"epoch": 2, "train_loss": 1.5, "train_acc": 50.0, "val_acc": val, "test_acc": test, "lr": 0.0, "seconds": 5.0},
    ]  # fmt: skip
    res = {
        "status": status, "error": error, "norm": norm, "params": 47600, "epochs": 2,
        "epochs_completed": 2 if status == "completed" else 1,
        "best_val_acc": val, "final_val_acc": val, "final_test_acc": test if status == "completed" else None,
        "final_train_loss": 1.5, "seconds_per_epoch": 4.0, "overrides": [f"norm={norm}", f"trainer.seed={seed}"],
        "choices": {"augment": "crop_flip"}, "config": record_config(norm, seed, lr),
        "history": history if status == "completed" else history[:1], **fields,
    }  # fmt: skip
    (job / "results.json").write_text(json.dumps(res))
    n = 20
    target = np.arange(n) % 10
    pred = target.copy()
    pred[: n // 4] = (pred[: n // 4] + 1) % 10
    np.savez(job / "predictions.npz", index=np.arange(n), target=target, pred=pred)


def wsgi_json(app, path: str) -> dict:
    """GET ``path`` from a WSGI app (plain wsgiref environ, no server) and decode its JSON."""
    import json
    import wsgiref.util

    environ: dict = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING="")
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:500])
    return json.loads(body)


def dashboard_trials(storage) -> tuple[dict, list[dict]]:
    """The one study of ``storage`` and its trials as optuna-dashboard's API shows them."""
    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage)
    (study,) = wsgi_json(app, "/api/studies")["study_summaries"]
    return study, wsgi_json(app, f"/api/studies/{study['study_id']}")["trials"]


def hparams(logdir: Path) -> dict:
    """The HParams plugin's view of one run: {name: value} of its session start."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


TINY = ("trainer.batch_size=25", "trainer.device=cpu", "trainer.progress=false", "model.dropout=0.1")


def normsweep_run(*args: str, wait: bool = True, environ: dict | None = None, multirun: bool = False, cwd: Path = REPO):
    """``python -m normsweep [-m] ARGS`` from ``cwd`` (a warm fork, tests/warm_python.py): the finished process, or
    with ``wait=False`` the running one (output on its stdout)."""
    import sys

    from . import warm_python

    cmd = [sys.executable, "-m", "normsweep", *(["-m"] if multirun else []), *args]
    environ = environ or {**os.environ, "PYTHONUNBUFFERED": "1"}
    if wait:
        return warm_python.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    return warm_python.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def normsweep_multirun(*args: str, cwd: Path = REPO, wait: bool = True, environ: dict | None = None):
    """``python -m normsweep -m ARGS`` (:func:`normsweep_run`)."""
    return normsweep_run(*args, wait=wait, environ=environ, multirun=True, cwd=cwd)


def parked_in_epoch_2(tmp_path: Path, images: int, *args: str) -> subprocess.Popen:
    """``python -m normsweep ARGS`` on ``images`` images, parked in its epoch 2's first step (:mod:`.crash_injector`).

    Epoch 1 is saved, and the run is live for good, however fast the machine: the test does to it
    what it tests (a signal, a second process on its directory), then kills it.
    """
    from .crash_injector import env, injector_dir, steps_per_epoch, wait_parked

    shim = injector_dir(tmp_path)
    proc = normsweep_run(*args, wait=False, environ=env(shim, f"step:{steps_per_epoch(images, args) + 1}:park"))
    wait_parked(proc, shim)
    return proc


def all_trials(spec: str) -> list:
    """The trials (``optuna.trial.FrozenTrial``) of the one study in ``spec``."""
    import optuna

    from normsweep.search.storage import open_storage

    storage = open_storage(spec)
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def overlapping(trials: list) -> bool:
    """Whether two trials of different workers ran at the same time."""
    import itertools

    return any(a.user_attrs["worker"] != b.user_attrs["worker"] and a.datetime_start < b.datetime_complete
               and b.datetime_start < a.datetime_complete for a, b in itertools.combinations(trials, 2))  # fmt: skip


def running_past_epoch_2(first: subprocess.Popen, log: Path, spec: str, n: int) -> list:
    """Wait until ``n`` trials are RUNNING with two epochs reported (a checkpoint to resume from); the search goes on."""
    import optuna

    from normsweep.search.storage import storage_file

    from .slurm_cluster import wait_for

    def running():
        assert first.poll() is None, log.read_text()[-3000:]
        if not storage_file(spec).exists():
            return None
        found = [t for t in all_trials(spec) if t.state == optuna.trial.TrialState.RUNNING
                 and len(t.intermediate_values) >= 2]  # fmt: skip
        return found if len(found) == n else None

    return wait_for(running, 300, f"{n} trials running past their second epoch", 0.2)


def check_retried_from_checkpoint(trials: dict, stopped, sweep: Path):
    """``stopped``'s slot ran again: its parameters, in its job directory, resumed from its checkpoint, completed."""
    import optuna

    from normsweep.search.trials import JOB_SUBDIR_ATTR

    (retry,) = [t for t in trials.values() if t.user_attrs.get("retry_of") == stopped.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == stopped.params
    job_dir = Path(retry.user_attrs["job_dir"])
    assert job_dir == sweep / stopped.user_attrs[JOB_SUBDIR_ATTR]
    assert "resuming from checkpoint.pt after epoch" in (job_dir / "normsweep.log").read_text()
    return retry


def batch_size_sweep(s: Path, accuracy) -> None:
    """The batch-size study faked: 3 norms x 4 batch sizes x 2 seeds; group runs its recipe (WS, weight decay)."""
    import json

    for i, (norm, batch, seed) in enumerate((n, b, sd) for n in ("batch", "group", "frn") for b in (2, 8, 64, 256)
                                           for sd in (0, 1)):  # fmt: skip
        job = s / f"{i}_norm={norm},trainer.batch_size={batch},trainer.seed={seed}"
        write_run(job, norm, seed, test=accuracy(norm, batch, seed), val=70.0)
        res = json.loads((job / "results.json").read_text())
        res["config"]["trainer"]["batch_size"] = batch
        res["config"]["norm"]["ws"] = norm == "group"  # a recipe's settings: the same in all of a norm's runs
        res["config"]["optimizer"]["weight_decay"] = 1e-3 if norm == "group" else 5e-4
        res["overrides"] += [f"trainer.batch_size={batch}"]
        (job / "results.json").write_text(json.dumps(res))


def power_by_integration(n: int, effect: float, alpha: float) -> float:
    """P(|T| > c) for T = (Z + δ)/sqrt(V/ν), ν = 2n − 2, δ = effect·sqrt(n/2): integrated over V ~ χ²(ν)
    (over all but 1e-12 of its mass on either side, where quad finds the peak of a large ν)."""
    from scipy import integrate, stats

    dof, ncp = 2 * n - 2, effect * math.sqrt(n / 2)
    c = stats.t.isf(alpha / 2, dof)

    def given_v(v: float) -> float:
        scale = c * math.sqrt(v / dof)
        return (stats.norm.sf(scale - ncp) + stats.norm.cdf(-scale - ncp)) * stats.chi2.pdf(v, dof)

    return integrate.quad(given_v, stats.chi2.ppf(1e-12, dof), stats.chi2.isf(1e-12, dof), limit=200)[0]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of one run directory as TensorBoard reads it: (step, value) per event."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class Killed(Exception):
    """A run stopped by a test after its first epoch (:func:`assert_resume_matches_uninterrupted`)."""


def assert_resume_matches_uninterrupted(cfg, splits, tmp_path: Path) -> Path:
    """Train ``cfg`` straight through; train it again, killed after epoch 1 with its checkpoint saved, and resume
    it from another seed (a fresh process: other weights and RNG). The resumed run must equal the straight one,
    every epoch's numbers and every weight and buffer (running statistics, step counts). Returns the checkpoint."""
    import torch

    from normsweep.run.build import model_from_config
    from normsweep.run.train import train

    def die_after_first_epoch(history):
        if len(history) == 1:
            raise Killed

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    straight_model = model_from_config(cfg)
    straight = train(straight_model, cfg, splits, cpu)
    ckpt = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(model_from_config(cfg), cfg, splits, cpu, die_after_first_epoch, checkpoint=ckpt)
    torch.manual_seed(99)  # the checkpoint, not the seed, restores the weights and the random state
    resumed_model = model_from_config(cfg)
    resumed = train(resumed_model, cfg, splits, cpu, checkpoint=ckpt)
    assert [h.as_dict() | {"seconds": 0} for h in resumed] == [h.as_dict() | {"seconds": 0} for h in straight]
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    return ckpt
