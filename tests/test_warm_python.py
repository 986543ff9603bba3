"""The tests' warm start (``tests/warm_python.py``) behaves as a cold ``python`` does where the tests look.

Every CLI test starts its processes through it, so what it gets wrong every test would inherit:
here the same commands run warm and cold (``subprocess`` itself) and must agree on exit status,
output, argv, working directory, environment, ``atexit`` and thread shutdown, a ``sitecustomize``
on ``PYTHONPATH``, death by signal, and a real normsweep run's numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import warm_python
from .conftest import REPO, small_data_args

PROBE = r"""
import atexit, json, os, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread finished", flush=True))).start()
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                  "injected": "injected" in sys.modules, "path0": sys.path[0]}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def both(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return warm_python.run(cmd, **kwargs), subprocess.run(cmd, **kwargs)


def test_a_warm_process_is_a_fork_of_the_server_and_not_a_new_interpreter():
    proc = warm_python.Popen([sys.executable, "-c", "import os; print(os.getppid())"], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    assert int(out) == warm_python._get_server().proc.pid and proc.returncode == 0


@pytest.mark.parametrize("status", [0, 3])
def test_argv_cwd_environment_streams_exit_status_atexit_and_threads_as_a_cold_start(tmp_path: Path, status: int):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys; sys.modules['injected'] = sys\n")
    env = {**os.environ, "PROBE": "value", "PYTHONPATH": str(site)}
    warm, cold = both([sys.executable, "-c", PROBE, str(status), "x y"], cwd=tmp_path, env=env,
                      capture_output=True, text=True, timeout=120)  # fmt: skip
    assert warm.returncode == cold.returncode == status
    assert warm.stdout == cold.stdout and warm.stderr == cold.stderr == "to stderr\n"
    seen = json.loads(warm.stdout.splitlines()[0])
    assert seen == {"argv": ["-c", str(status), "x y"], "cwd": str(tmp_path), "probe": "value", "injected": True,
                    "path0": ""}  # fmt: skip
    assert warm.stdout.splitlines()[1:] == ["thread finished", "atexit ran"]


def test_an_uncaught_exception_and_a_string_exit_as_a_cold_start():
    for code in ("raise KeyError('boom')", "import sys; sys.exit('a message')"):
        warm, cold = both([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert warm.returncode == cold.returncode == 1
        assert warm.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1]


def test_signals_reach_the_process_and_its_death_is_reported_as_subprocess_does():
    code = "import signal, sys, time; print('up', flush=True); time.sleep(60)"
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = warm_python.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "up\n" and proc.poll() is None
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == -sig
        proc.stdout.close()
    slow = warm_python.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    with pytest.raises(subprocess.TimeoutExpired):
        slow.wait(timeout=0.1)
    slow.kill()
    assert slow.wait(timeout=30) == -signal.SIGKILL


def test_an_import_time_variable_gets_a_server_started_with_it_and_the_rest_starts_cold(monkeypatch):
    threads = [sys.executable, "-c", "import os, torch; print(os.getppid(), torch.get_num_threads())"]
    default = warm_python._get_server().proc.pid
    for n in (1, 2):  # torch reads OMP_NUM_THREADS when it is imported: the server must have been given it
        env = {**os.environ, "OMP_NUM_THREADS": str(n)}
        warm, cold = both(threads, env=env, capture_output=True, text=True, timeout=120)
        (ppid, warm_threads), (_, cold_threads) = (map(int, p.stdout.split()) for p in (warm, cold))
        assert warm_threads == cold_threads == n and ppid == warm_python._get_server(env).proc.pid
    assert warm_python._get_server({**os.environ, "OMP_NUM_THREADS": "2"}).proc.pid != default
    probe = [sys.executable, "-c", "import os; print(os.getppid())"]
    assert int(warm_python.run(probe, capture_output=True, text=True, start_new_session=True).stdout) == os.getpid()
    monkeypatch.setenv(warm_python.COLD, "1")
    assert int(warm_python.run(probe, capture_output=True, text=True).stdout) == os.getpid()


@pytest.mark.slow
def test_a_normsweep_run_started_warm_gives_the_numbers_of_one_started_cold(tmp_path: Path, tmp_path_factory):
    args = [*small_data_args(tmp_path_factory), "trainer.epochs=2", "trainer.threads=1", "trainer.progress=false"]
    records = []
    for start, name in ((warm_python.run, "warm"), (subprocess.run, "cold")):
        cmd = [sys.executable, "-m", "normsweep", *args, f"hydra.run.dir={tmp_path / name}"]
        proc = start(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records.append(json.loads((tmp_path / name / "results.json").read_text()))
    warm, cold = records
    assert warm["pid"] != cold["pid"]
    for key in ("final_val_acc", "final_test_acc", "final_train_loss", "params", "bf16"):
        assert warm[key] == cold[key], key
    assert [e["train_loss"] for e in warm["history"]] == [e["train_loss"] for e in cold["history"]]
