"""``python -m normsweep ...`` for the tests, started warm: a fork of a process that has imported torch once.

A cold ``python -m normsweep`` spends about 2.5 s of CPU importing torch, Hydra and Optuna before it
does anything, and the suite starts a few hundred such processes: on two cores that import was the
largest single cost of the suite. :func:`run` and :class:`Popen` take the arguments of their
``subprocess`` namesakes and start the same command as a fork of a *server* process (started on
first use) that has imported those modules and done nothing else: no Python thread, no torch
operation, no Hydra state. The child then does what starting the interpreter would have done: it
takes the command's standard streams (buffered as a cold start buffers them), working directory,
environment and ``sys.argv``, imports a ``sitecustomize`` found on the command's ``PYTHONPATH`` (the
crash injector), runs the module as ``python -m`` does (or the ``-c`` code) as ``__main__``, joins
its threads, runs the ``atexit`` handlers and exits with the status a cold interpreter would. It is
a real process, the test's to signal, kill -9 and wait for; its files, locks, exit status and
children are those of the command. As with ``subprocess``, a finished process stays a zombie until
the test has its status, so a signal sent after it ended never reaches a process that took its pid.

A module the server imported is not imported again, so the variables read at import time
(``OMP_*``, ``MKL_*``, ``TORCH*``, ``CUDA*``, ``PYTHON*`` other than ``PYTHONPATH``/``PYTHONUNBUFFERED``,
``LD_*``) are the server's: there is one server per set of them, started with the command's values.
What a warm start cannot reproduce, it does not try: an interpreter option (``python -X``, ``-W``), a
new session (``start_new_session``), or anything but ``python -m MODULE`` / ``python -c CODE`` starts
cold, through ``subprocess`` itself. So does every command when ``NORMSWEEP_TEST_COLD=1`` is set:
the whole suite can be run both ways.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Imported by the server before it forks: what every `python -m normsweep` imports at start (not pandas:
# pyarrow, which it loads, starts a thread). Modules run with -m (normsweep.__main__, .report, .storage)
# are not preloaded: runpy would warn that they were imported before being run.
PRELOAD = ("torch", "torchvision", "hydra", "omegaconf", "optuna", "sqlalchemy",
           "normsweep.config", "normsweep.run.job", "normsweep.search.sweeper", "normsweep.search.worker")  # fmt: skip
IMPORT_TIME_ENV = re.compile(r"^(OMP_|MKL_|KMP_|GOMP_|OPENBLAS_|TORCH|CUDA|LD_|PYTHON(?!PATH$|UNBUFFERED$)|MALLOC)")
COLD = "NORMSWEEP_TEST_COLD"
_HEADER = struct.Struct("!Q")  # the request's length, sent with the three file descriptors

_SERVER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[3]); import warm_python; warm_python.serve(sys.argv[1], sys.argv[2])"
)


def serve(socket_path: str, preload: str) -> None:
    """The server's loop (in its own process): fork a warm child per request, report its pid and its status."""
    import importlib
    import traceback

    sys.path.pop(0)  # this file's directory, put there to import it
    for name in json.loads(preload):
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    print("ready", flush=True)
    live: dict[int, socket.socket | None] = {}  # pid -> the connection that asked for it (None: the test hung up)
    ended: dict[socket.socket, int] = {}  # connection -> pid: its status was sent; reaped when the test hangs up

    def start(conn: socket.socket) -> None:
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        try:
            (size,) = _HEADER.unpack(header)
            message = b""
            while len(message) < size:
                chunk = conn.recv(size - len(message))
                if not chunk:
                    raise EOFError("the test hung up before its request was complete")
                message += chunk
            pid = os.fork()
            if pid == 0:
                for c in [listener, conn, *[c for c in live.values() if c], *ended]:
                    c.close()
                become(json.loads(message), fds)  # never returns
        finally:
            for fd in fds:
                os.close(fd)
        live[pid] = conn
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")

    while True:
        watched = [listener, sys.stdin, *[c for c in live.values() if c], *ended]
        ready, _, _ = select.select(watched, [], [], 0.02)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            break  # the test process has gone: so do we
        for conn in ready:
            if conn is listener:
                new, _ = listener.accept()
                try:
                    start(new)
                except Exception:  # noqa: BLE001 - one bad request must not end the server
                    traceback.print_exc()
                    new.close()
            elif conn is not sys.stdin and not conn.recv(1):  # the test hung up
                if conn in ended:
                    os.waitpid(ended.pop(conn), 0)
                else:
                    live.update({pid: None for pid, c in live.items() if c is conn})
                conn.close()
        for pid, conn in list(live.items()):  # who ended, without reaping: the pid stays taken
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is None:
                continue
            del live[pid]
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            if conn is None:  # no one is waiting for it
                os.waitpid(pid, 0)
                continue
            try:
                conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
                ended[conn] = pid
            except OSError:
                os.waitpid(pid, 0)
                conn.close()
    shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)


def become(request: dict, fds: list[int]) -> None:
    """In the forked child: take the command's streams, directory, environment and argv; run it; exit."""
    import atexit
    import builtins
    import importlib
    import io
    import runpy
    import traceback
    import types

    code: int = 1
    interrupted = False
    try:
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in set(fds) - {0, 1, 2}:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

        def stream(fd: int, write: bool, **kw):  # as CPython's create_stdio makes them
            raw = io.FileIO(fd, "w" if write else "r", closefd=False)
            if not write:
                return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8")
            buffered = raw if unbuffered else io.BufferedWriter(raw)
            line = os.isatty(fd) or fd == 2  # stderr is always line-buffered (3.9+), stdout on a terminal
            return io.TextIOWrapper(buffered, encoding="utf-8", line_buffering=line, write_through=unbuffered, **kw)

        sys.stdin = sys.__stdin__ = stream(0, False)
        sys.stdout = sys.__stdout__ = stream(1, True)
        sys.stderr = sys.__stderr__ = stream(2, True, errors="backslashreplace")
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[1:1] = extra  # where PYTHONPATH goes: after the script's (or the cwd's) entry
        if any((Path(p) / "sitecustomize.py").is_file() for p in extra):
            sys.modules.pop("sitecustomize", None)
            importlib.import_module("sitecustomize")
        main = types.ModuleType("__main__")  # a fresh __main__, not the server's
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        sys.argv = [request["mode"], *request["args"]]
        if request["mode"] == "-m":
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(request["target"], alter_argv=True)  # what `python -m` itself calls
        else:
            sys.path[0] = ""
            exec(compile(request["target"], "<string>", "exec"), main.__dict__)  # noqa: S102 - what `python -c` does
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:  # noqa: BLE001 - an uncaught exception: the interpreter prints it and exits 1
        traceback.print_exc()
        code = 1
    try:  # what the interpreter does on its way out
        threading._shutdown()
        atexit._run_exitfuncs()
        for f in (sys.stdout, sys.stderr):
            f.flush()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    if interrupted:  # as CPython does after an uncaught KeyboardInterrupt: die of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _import_time_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if IMPORT_TIME_ENV.match(k)}


class _Server:
    """A pre-imported process that forks warm children, for one import-time environment (started on first use)."""

    def __init__(self, import_env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="normsweep-warm-"))
        self.socket = str(self.dir / "server.sock")
        base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not IMPORT_TIME_ENV.match(k)}
        here = str(Path(__file__).resolve().parent)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER_CODE, self.socket, json.dumps(PRELOAD), here],
                                     env={**base, **import_env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the warm-start server did not start (exit {self.proc.wait()})")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """End the server (its running children go on) and remove its directory."""
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()


def _get_server(environ: dict[str, str] | None = None) -> _Server:
    """The server for ``environ``'s import-time variables (``os.environ``'s by default)."""
    import_env = _import_time_env(dict(os.environ if environ is None else environ))
    key = tuple(sorted(import_env.items()))
    with _servers_lock:
        if key not in _servers or not _servers[key].alive():
            _servers[key] = _Server(import_env)
        return _servers[key]


def stop_server(environ: dict[str, str] | None = None) -> None:
    """Stop the server for ``environ``'s import-time variables, if one runs (each holds about 1 GB)."""
    key = tuple(sorted(_import_time_env(dict(os.environ if environ is None else environ)).items()))
    with _servers_lock:
        server = _servers.pop(key, None)
    if server is not None:
        server.stop()


@atexit.register
def _stop_servers() -> None:
    for server in list(_servers.values()):
        server.stop()


def _connect(environ: dict[str, str]) -> socket.socket:
    """A connection to the server for ``environ``; a server that stopped accepting (seen once in a full suite
    under load: ConnectionRefusedError for every later test of that test process) is replaced, once."""
    for attempt in (1, 2):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(_get_server(environ).socket)
            return conn
        except (ConnectionRefusedError, FileNotFoundError):
            conn.close()
            if attempt == 2:
                raise
            stop_server(environ)
    raise AssertionError("unreachable")


def _warm_spec(cmd: Any, env: dict[str, str] | None, kwargs: dict) -> dict | None:
    """The request for a warm start of ``cmd``, or None where only a cold start is faithful."""
    if os.environ.get(COLD) == "1" or set(kwargs) - {"text", "universal_newlines", "encoding"}:
        return None
    if not isinstance(cmd, (list, tuple)) or len(cmd) < 3 or str(cmd[0]) != sys.executable:
        return None
    if cmd[1] not in ("-m", "-c"):
        return None
    environ = dict(os.environ if env is None else env)
    return {"mode": cmd[1], "target": str(cmd[2]), "args": [str(a) for a in cmd[3:]], "env": environ}


class Popen:
    """``subprocess.Popen`` for ``python -m MODULE`` / ``python -c CODE``: warm where faithful, else cold."""

    def __init__(self, cmd, cwd=None, env=None, stdin=None, stdout=None, stderr=None, **kwargs) -> None:
        self.args = cmd
        self.returncode: int | None = None
        spec = _warm_spec(cmd, env, kwargs)
        self._cold = None
        if spec is None:
            self._cold = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr, **kwargs)
            self.pid, self.stdin, self.stdout, self.stderr = (self._cold.pid, self._cold.stdin, self._cold.stdout,
                                                              self._cold.stderr)  # fmt: skip
            return
        text = bool(kwargs.get("text") or kwargs.get("universal_newlines") or kwargs.get("encoding"))
        spec["cwd"] = str(cwd if cwd is not None else os.getcwd())
        close_after: list[int] = []
        self.stdin = self.stdout = self.stderr = None

        def target(stream, name: str) -> int:
            """The fd the child gets as ``name``; a pipe's other end becomes ``self.<name>``."""
            if stream == subprocess.PIPE:
                r, w = os.pipe()
                ours, theirs = (w, r) if name == "stdin" else (r, w)
                mode = ("w" if name == "stdin" else "r") + ("" if text else "b")
                setattr(self, name, open(ours, mode, **({"encoding": "utf-8"} if text else {})))  # noqa: SIM115
                close_after.append(theirs)
                return theirs
            if stream == subprocess.DEVNULL or (name == "stdin" and stream is None):
                fd = os.open(os.devnull, os.O_RDWR)
                close_after.append(fd)
                return fd
            if stream is None:
                return {"stdout": 1, "stderr": 2}[name]
            return stream if isinstance(stream, int) else stream.fileno()

        fd_in = target(stdin, "stdin")
        fd_out = target(stdout, "stdout")
        fd_err = fd_out if stderr == subprocess.STDOUT else target(stderr, "stderr")
        message = json.dumps(spec).encode()
        try:
            self._conn = _connect(spec["env"])
            socket.send_fds(self._conn, [_HEADER.pack(len(message))], [fd_in, fd_out, fd_err])
            self._conn.sendall(message)
        finally:
            for fd in close_after:
                os.close(fd)
        self._buffer = b""
        self.pid = self._message(None)["pid"]

    def _message(self, timeout: float | None) -> dict | None:
        """The server's next line about this process, or None if none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"the warm-start server lost process {getattr(self, 'pid', '?')}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _status(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._cold is not None:
            self.returncode = self._cold.poll() if timeout == 0 else self._cold.wait(timeout)
        else:
            message = self._message(timeout)
            if message is not None:
                self.returncode = message["returncode"]
                self._conn.close()  # the server reaps the process now
        return self.returncode

    # -- what the tests use of Popen's interface
    def poll(self) -> int | None:
        return self._status(0)

    def wait(self, timeout: float | None = None) -> int:
        if self._status(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        if self._cold is not None:
            out = self._cold.communicate(timeout=timeout)
            self.returncode = self._cold.returncode
            return out
        if self.stdin is not None:
            self.stdin.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        results: dict[str, Any] = {}
        readers = [threading.Thread(target=lambda n=n, f=f: results.__setitem__(n, f.read()), daemon=True)
                   for n, f in (("stdout", self.stdout), ("stderr", self.stderr)) if f is not None]  # fmt: skip
        for t in readers:
            t.start()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for t in readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # until the test has its status the process is at most a zombie: the pid is its
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(cmd, cwd=None, env=None, capture_output: bool = False, timeout: float | None = None, check: bool = False,
        stdout=None, stderr=None, **kwargs) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run`` for ``python -m MODULE`` / ``python -c CODE``: warm where faithful, else cold."""
    if capture_output:
        stdout = stderr = subprocess.PIPE
    proc = Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
