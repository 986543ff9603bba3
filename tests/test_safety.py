"""Faults made for real: crafted files that would run code, a full disk, two processes on one run.

Each test creates the fault (a pickle whose loading would create a file, an OSError from the
kernel's /dev/full or injected where the kernel cannot be made to fail, a second live process)
and checks that nothing was lost: no code ran, the previous file is intact, no temporary file
is left, the run still completes.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normsweep import data
from normsweep.base import results
from normsweep.base.results import UnsafeFileError, WriteError, write_json
from normsweep.data import CLASSES, DataError, load_raw, make_splits, source_fingerprint
from normsweep.run.build import model_from_config
from normsweep.run.job import RUN_LOCK_FILE, RunDirInUse, hold_run_dir
from normsweep.run.train import CheckpointError, load_checkpoint, train

from . import warm_python
from .conftest import REPO, TINY, class_images, make_cfg, normsweep_run, parked_in_epoch_2, small_data_args

DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC: a full disk, for real
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full (Linux)")


class Payload:
    """Pickles as ``func(*args)``: what a crafted file uses to run code while it is loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Two ways a pickle can create ``marker`` when loaded: a shell command and ``open(..., 'w')``."""
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
    }


PAYLOAD_GLOBAL = {"os.system": r"(posix|nt|os)\.system", "builtins.open": r"(io|builtins)\.open"}


def temporary_files_on_a_full_disk(monkeypatch) -> None:
    """Files that normsweep.base.results opens by name for writing (its temporary files) go to /dev/full."""
    real_open = builtins.open

    def open_(path, mode="r", *args, **kwargs):
        return real_open(DEV_FULL, mode) if str(path).endswith(".tmp") else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(results, "open", open_, raising=False)


def tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.tmp"))


# ------------------------------------------------------------------ CIFAR-10 pickles: a restricted unpickler


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, protocol: int, numpy1_names: bool = False) -> None:
    """A batch as CIFAR-10 holds it: data (N, 3072) uint8, labels, batch_label, filenames."""
    batch = {
        "batch_label": "training batch 1 of 5",
        "labels": labels.tolist(),
        "data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
        "filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    blob = pickle.dumps(batch, protocol=protocol)
    if numpy1_names:  # as written by numpy 1.x (the original files): numpy.core, not numpy._core
        assert protocol <= 3
        blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(blob)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_in_every_pickle_protocol_are_read_exactly(
    tmp_path: Path, cache_dir: Path, protocol: int
) -> None:
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images, labels = class_images(2, seed=20 + k)
        write_batch(folder / name, images, labels, protocol, numpy1_names=protocol == 2 and k % 2 == 0)
        written[name] = (images, labels)
    names = [c.upper() for c in CLASSES]
    meta = {"num_cases_per_batch": 20, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))

    raw = load_raw(tmp_path / "cifar", cache_dir=cache_dir)
    images, labels = written["data_batch_4"]
    assert torch.equal(raw.train_x[60:80], torch.from_numpy(images).permute(0, 3, 1, 2))
    assert raw.train_y[60:80].tolist() == labels.tolist()
    assert torch.equal(raw.test_x, torch.from_numpy(written["test_batch"][0]).permute(0, 3, 1, 2))
    assert raw.classes == tuple(names)  # from batches.meta, read by the same restricted unpickler


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
@pytest.mark.parametrize("victim", ["data_batch_3", "batches.meta"])
def test_crafted_cifar_pickle_is_refused_and_runs_nothing(
    pickle_data: Path, cache_dir: Path, tmp_path: Path, how: str, protocol: int, victim: str
) -> None:
    marker = tmp_path / "pwned"
    payload = payloads(marker)[how]
    crafted = pickle.dumps({"data": payload, "labels": [0], "label_names": payload}, protocol=protocol)
    pickle.loads(crafted)  # the payload is real: plain pickle creates the file
    assert marker.exists()
    marker.unlink()

    path = pickle_data / "cifar-10-batches-py" / victim
    path.write_bytes(crafted)
    refused = rf"{victim} refers to {PAYLOAD_GLOBAL[how]}, which a CIFAR-10 batch never holds"
    with pytest.raises(DataError, match=refused):
        load_raw(pickle_data, cache_dir=cache_dir)
    assert not marker.exists()
    assert not list(cache_dir.glob("*.pt")) and not tmp_files(cache_dir)  # nothing cached from a refused source


def test_crafted_data_cache_is_ignored_and_runs_nothing(
    folder_data: Path, cache_dir: Path, tmp_path: Path, caplog
) -> None:
    good = load_raw(folder_data, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("cifar10-folder-*.pt")
    marker = tmp_path / "pwned"
    torch.save({"version": 1, "train_x": payloads(marker)["os.system"]}, cache_file)
    again = load_raw(folder_data, cache_dir=cache_dir)
    assert not marker.exists()
    assert "ignoring the data cache" in caplog.text and "posix.system" in caplog.text
    assert torch.equal(again.train_x, good.train_x)  # rebuilt from the images
    assert torch.load(cache_file, weights_only=True)["version"] == data.CACHE_VERSION  # and rewritten


# ------------------------------------------------------------------ hidden files in class folders


def test_hidden_files_are_skipped_but_a_visible_broken_image_still_stops(folder_data: Path, cache_dir: Path) -> None:
    before = source_fingerprint(folder_data, "folder")
    ship = folder_data / "train" / "ship"
    (ship / "._00096.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")  # not an image
    (ship / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder_data / "train" / ".DS_Store").write_bytes(b"Bud1")
    hidden_dir = folder_data / "test" / ".ipynb_checkpoints"  # a hidden folder is not a class
    hidden_dir.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(hidden_dir / "x.png")

    raw = load_raw(folder_data, cache_dir=cache_dir)
    images, labels = class_images(12, seed=0)  # exactly what the fixture wrote, nothing more
    assert raw.classes == CLASSES
    assert torch.equal(raw.train_x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(raw.train_y, torch.from_numpy(labels)) and len(raw.test_y) == 40
    assert source_fingerprint(folder_data, "folder") == before  # hidden files do not invalidate the cache

    broken = ship / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"broken\.jpg could not be decoded as an image"):
        load_raw(folder_data, cache_dir=cache_dir)


# ------------------------------------------------------------------ atomic writes: fsync, full disk, read-only


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "results.json"
    results.write_json(target, {"epoch": 3})
    assert json.loads(target.read_text()) == {"epoch": 3}
    file_ino, dir_ino = target.stat().st_ino, tmp_path.stat().st_ino
    assert events == [
        ("fsync", "file", file_ino, target.stat().st_size),  # the full contents, on disk before the name
        ("replace", "results.json"),
        ("fsync", "dir", dir_ino, events[2][3]),  # the rename itself made durable
    ]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_an_atomically_written_file_gets_the_permissions_of_a_plain_open_not_the_temp_file_s(
    tmp_path: Path, umask: int, mode: int
) -> None:
    old = os.umask(umask)
    try:
        results.write_json(tmp_path / "results.json", {"epoch": 1})  # new: 0666 less the umask
        results.save_torch(tmp_path / "model.pt", {"w": 1})
        assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode
        assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == mode
        os.chmod(tmp_path / "results.json", 0o604)  # an existing file keeps its own, as open(path, "w") would
        results.write_json(tmp_path / "results.json", {"epoch": 2})
        assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o604
    finally:
        os.umask(old)


def test_atomic_write_skips_the_directory_fsync_where_a_directory_cannot_be_opened(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def windows_like_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", windows_like_open)
    results.write_text(tmp_path / "model_summary.txt", "summary\n")
    assert (tmp_path / "model_summary.txt").read_text() == "summary\n" and tmp_files(tmp_path) == []


def test_full_disk_while_writing_results_json_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "results.json"
    results.write_json(target, {"status": "running", "epochs_completed": 4})
    good = target.read_bytes()
    real_write_text = Path.write_text

    def disk_fills_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)  # a partial temporary file...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...then the disk is full

    monkeypatch.setattr(Path, "write_text", disk_fills_halfway)
    message = rf"could not write {target}.*free disk space.*previous results.json.*intact"
    with pytest.raises(WriteError, match=message) as e:
        results.write_json(target, {"status": "running", "epochs_completed": 5, "history": list(range(1000))})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no stray temporary file


@needs_dev_full
def test_full_disk_through_the_kernel_is_reported_as_such(tmp_path: Path, monkeypatch) -> None:
    """A real ENOSPC (writes redirected to /dev/full) for a plot and for a torch file saved by results."""
    target = tmp_path / "model.pt"
    results.save_torch(target, {"state_dict": {"w": torch.ones(3)}})
    good = target.read_bytes()
    temporary_files_on_a_full_disk(monkeypatch)
    with pytest.raises(WriteError, match=rf"could not write {target} \(No space left on device\); the disk"):
        results.save_torch(target, {"state_dict": {"w": torch.zeros(100_000)}})
    assert target.read_bytes() == good and tmp_files(tmp_path) == []


def test_read_only_directory_at_the_rename_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "predictions.npz"
    results.save_predictions(target, torch.arange(3), torch.arange(3), torch.arange(3))
    good = target.read_bytes()

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(WriteError, match=rf"could not write {target} .*not writable: check its permissions"):
        results.save_predictions(target, torch.zeros(3), torch.zeros(3), torch.zeros(3))
    assert target.read_bytes() == good and tmp_files(tmp_path) == []


@needs_dev_full
def test_full_disk_while_saving_a_checkpoint_keeps_the_last_one_and_the_run_resumes(
    folder_data: Path, cache_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    cfg = make_cfg("trainer.epochs=3", "augment=seed", *TINY)
    torch.manual_seed(0)
    straight = train(model_from_config(cfg), cfg, splits, torch.device("cpu"))

    ckpt = tmp_path / "run" / "checkpoint.pt"
    real_save = torch.save
    full = {"disk": False}

    def save(obj, f, *args, **kwargs):  # torch writes to a path itself: send it to a full disk
        return real_save(obj, DEV_FULL if full["disk"] else f, *args, **kwargs)

    def disk_fills_after_epoch_1(history):
        full["disk"] = True

    monkeypatch.setattr(torch, "save", save)
    torch.manual_seed(0)
    with pytest.raises(WriteError, match=rf"(?s)could not write {ckpt} .*free space.*previous checkpoint.pt.*intact"):
        train(model_from_config(cfg), cfg, splits, torch.device("cpu"), disk_fills_after_epoch_1, checkpoint=ckpt)
    assert load_checkpoint(ckpt)["epoch"] == 1  # epoch 1's checkpoint, whole
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]

    full["disk"] = False  # space freed: the same run resumes and loses nothing
    torch.manual_seed(123)
    resumed = train(model_from_config(cfg), cfg, splits, torch.device("cpu"), checkpoint=ckpt)
    strip = lambda h: [(e.epoch, e.train_loss, e.train_acc, e.val_acc, e.test_acc, e.lr) for e in h]  # noqa: E731
    assert strip(resumed) == strip(straight)


@needs_dev_full
def test_full_disk_while_writing_the_data_cache_keeps_the_run_and_the_cache_dir(
    folder_data: Path, cache_dir: Path, monkeypatch, caplog
) -> None:
    cache_dir.mkdir()
    (cache_dir / "cifar10-pickle-0123456789abcdef.pt").write_bytes(b"another source's cache")
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    temporary_files_on_a_full_disk(monkeypatch)

    raw = load_raw(folder_data, cache_dir=cache_dir)  # the run goes on without a cache
    images, _ = class_images(12, seed=0)
    assert torch.equal(raw.train_x, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert "not caching the decoded images: could not write" in caplog.text
    assert "No space left on device" in caplog.text and "free disk space" in caplog.text
    after = {p.name: p.read_bytes() for p in cache_dir.iterdir() if not p.name.endswith(".lock")}  # the writers' lock
    assert after == before  # nothing added, nothing damaged

    monkeypatch.undo()  # space freed: the next load writes the cache
    load_raw(folder_data, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("cifar10-folder-*.pt"))) == 1 and tmp_files(cache_dir) == []


# ------------------------------------------------------------------ checkpoints and model.pt: weights only


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(
    folder_data: Path, cache_dir: Path, tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "epoch": 1, "model": {}, "optimizer": payloads(marker)[how]}, ckpt)
    torch.load(ckpt, weights_only=False)  # the payload is real: an unrestricted load creates the file
    assert marker.exists()
    marker.unlink()

    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    cfg = make_cfg("trainer.epochs=1", *TINY)
    refused = rf"cannot resume from {ckpt}: refused to load .* {PAYLOAD_GLOBAL[how]}, .*nothing in it was run"
    with pytest.raises(CheckpointError, match=refused):
        train(model_from_config(cfg), cfg, splits, torch.device("cpu"), checkpoint=ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
def test_crafted_model_file_is_refused_and_runs_nothing(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": payloads(marker)[how], "classes": []}, path)
    refused = rf"refused to load {path}: it holds a reference to {PAYLOAD_GLOBAL[how]}"
    with pytest.raises(UnsafeFileError, match=refused):
        results.load_model(path)
    assert not marker.exists()


def test_real_checkpoints_and_models_load_with_weights_only(folder_data: Path, cache_dir: Path, tmp_path: Path) -> None:
    """What normsweep writes needs no allow-list: optimizer states (Adam's tuples), scheduler, RNG states."""
    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    cfg = make_cfg("trainer.epochs=1", "optimizer=adamw", *TINY)
    model = model_from_config(cfg)
    ckpt = tmp_path / "checkpoint.pt"
    train(model, cfg, splits, torch.device("cpu"), checkpoint=ckpt, config_record={"a": [None, 1.5]})
    state = load_checkpoint(ckpt)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert state["generator"].dtype == torch.uint8 and state["config"] == {"a": [None, 1.5]}
    results.save_model(tmp_path / "model.pt", model, {"norm": {"kind": "batch"}}, CLASSES)
    blob = results.load_model(tmp_path / "model.pt")
    assert blob["classes"] == list(CLASSES)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in blob["state_dict"].items())


# ------------------------------------------------------------------ one writer per run directory


def holder_process(run_dir: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from normsweep.run.job import hold_run_dir\n"
        "with hold_run_dir(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"
    )
    proc = warm_python.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_dir_refuses_a_second_holder_until_the_first_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = holder_process(run_dir)
    try:
        held = rf"pid {holder.pid} on host {re.escape(socket.gethostname())} since .*wait for"
        with pytest.raises(RunDirInUse, match=held):
            with hold_run_dir(run_dir):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert f"pid {holder.pid} " in (run_dir / RUN_LOCK_FILE).read_text()  # the stale file is still there
    with hold_run_dir(run_dir):  # ...and does not block
        assert (run_dir / RUN_LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on host ")


def test_the_new_holder_removes_temp_files_a_killed_writer_left_and_keeps_the_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / "results.json", {"status": "running", "epochs_completed": 3})
    # A writer killed between mkstemp and the rename leaves a partial temp file (made here for real
    # by a process that is SIGKILLed while it writes one, its rename never reached).
    code = (
        "import os, time; f = open(os.path.join(%r, '.results.json.abc123.tmp'), 'w'); f.write('{\"partial'); "
        "f.flush(); print('written', flush=True); time.sleep(600)"
    ) % str(run_dir)
    writer = warm_python.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"  # mid-write, however long the start took
    writer.kill()
    writer.wait()
    assert (run_dir / ".results.json.abc123.tmp").exists()
    with hold_run_dir(run_dir):
        assert not list(run_dir.glob(".*.tmp"))
        assert json.loads((run_dir / "results.json").read_text())["epochs_completed"] == 3


PER_CLASS = 60  # training images of each class in the CLI tests' dataset


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory, n_train=PER_CLASS, n_test=10), "trainer.threads=1",
            "trainer.progress=false"]  # fmt: skip


@pytest.mark.slow
def test_a_second_process_on_a_live_run_stops_at_once_and_a_killed_holder_does_not_block_the_resume(
    tmp_path: Path, data_args
) -> None:
    args = ("trainer.epochs=4", "augment=seed", "model.dropout=0.1", *data_args)
    reference = tmp_path / "reference"
    ref = normsweep_run(*args, f"hydra.run.dir={reference}", wait=False)  # runs alongside

    run_dir = tmp_path / "run"
    # Parked in epoch 2: alive and holding the directory, but going nowhere (a hung run).
    holder = parked_in_epoch_2(tmp_path, len(CLASSES) * PER_CLASS, *args, f"hydra.run.dir={run_dir}")
    try:
        second = normsweep_run(*args, f"hydra.run.dir={run_dir}")
        assert holder.poll() is None  # the holder was alive throughout
        out = second.stdout + second.stderr
        assert second.returncode == 2, out[-3000:]
        assert f"is being written by another normsweep run: pid {holder.pid} on host {socket.gethostname()}" in out
        assert "pass another hydra.run.dir" in out and "Traceback" not in out
        assert "Total params" not in out and "epoch  1/" not in out  # stopped before building or training anything
        record = json.loads((run_dir / "results.json").read_text())
        assert record["pid"] == holder.pid and record["status"] == "running"  # the second wrote nothing
    finally:
        holder.kill()  # SIGKILL: no handler, no cleanup
        holder.communicate(timeout=60)
    assert (run_dir / RUN_LOCK_FILE).exists() and (run_dir / "checkpoint.pt").exists()

    again = normsweep_run(*args, f"hydra.run.dir={run_dir}", wait=False)
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert "resuming from" in output
    ref_output = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_output[-3000:]
    resumed, ref = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert resumed["status"] == "completed" and resumed["pid"] == again.pid
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(ref["history"])  # the kill lost nothing but time
