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
import time
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
    other = {**os.environ, "OMP_NUM_THREADS": "2" if os.environ.get("OMP_NUM_THREADS") != "2" else "1"}
    assert warm_python._get_server(other).proc.pid != default
    for n in ("1", "2"):
        if os.environ.get("OMP_NUM_THREADS") != n:
            warm_python.stop_server({**os.environ, "OMP_NUM_THREADS": n})  # each server holds about 1 GB
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


def test_output_is_buffered_as_a_cold_start_buffers_it():
    # stdout to a pipe is block-buffered (flushed at exit), stderr line-buffered: the order shows it.
    code = "import sys; print('out 1'); sys.stderr.write('err\\n'); print('out 2')"
    for unbuffered in ({}, {"PYTHONUNBUFFERED": "1"}):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | unbuffered
        warm, cold = both([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)  # fmt: skip
        assert warm.stdout == cold.stdout, unbuffered


def test_a_large_command_and_stdin_reach_the_process():
    code = "import sys; data = sys.stdin.read(); print(len(data), " + repr("x" * 100_000) + "[:3])"
    for start in (warm_python.Popen, subprocess.Popen):
        proc = start([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proc.stdin.write("hello")
        out, _ = proc.communicate(timeout=120)
        assert out == "5 xxx\n" and proc.returncode == 0


def test_an_ended_process_keeps_its_pid_until_the_test_has_its_status():
    # As with subprocess: a finished child stays a zombie until it is waited for, so a signal the test
    # sends to proc.pid can never reach another process that took the pid.
    proc = warm_python.Popen([sys.executable, "-c", "print('bye')"], stdout=subprocess.DEVNULL)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 60
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the process did not end"
        time.sleep(0.05)
    time.sleep(0.2)  # the server has seen it end by now; it must not have reaped it
    assert stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    proc.kill()  # a no-op on an ended process, as subprocess's
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while stat.exists() and time.monotonic() < deadline:  # reaped once the test has the status
        time.sleep(0.05)
    assert not stat.exists()


def test_the_cold_fallback_reports_the_exit_status_through_poll_wait_and_communicate(monkeypatch):
    monkeypatch.setenv(warm_python.COLD, "1")
    proc = warm_python.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(4)"])
    assert proc.poll() is None
    assert proc.wait(timeout=60) == 4 and proc.returncode == 4 and proc.poll() == 4


def test_a_server_that_stopped_accepting_is_replaced_and_the_command_runs(monkeypatch):
    """Its socket left with nobody listening (ConnectionRefusedError), then gone (FileNotFoundError): each time the
    next command gets a new server instead of failing, as every later test of a test process once did."""
    import socket

    env = {**os.environ, "OMP_NUM_THREADS": "3"}  # a server of this test's own, not the one other tests share
    for fault in ("refused", "missing"):
        assert warm_python.run([sys.executable, "-c", "pass"], env=env).returncode == 0
        server = warm_python._get_server(env)
        os.unlink(server.socket)
        listener = None
        if fault == "refused":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(server.socket)  # bound, never listening
        try:
            proc = warm_python.run([sys.executable, "-c", "print('ran')"], env=env, capture_output=True, text=True)
        finally:
            if listener is not None:
                listener.close()
        assert (proc.returncode, proc.stdout) == (0, "ran\n"), fault
        assert not server.alive() and warm_python._get_server(env) is not server
    warm_python.stop_server(env)
