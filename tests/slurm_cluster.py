"""A private single-node Slurm for tests: munge, MariaDB + slurmdbd (accounting), slurmctld, slurmd.

Everything lives in one temporary directory (configs, sockets, state, logs), on free ports, with
the node's real CPU count and memory; nothing of the machine's own Slurm or munge setup is used or
changed. Accounting is part of it because submitit learns that a job ended through ``sacct``:
without it a cancelled job is never seen to end (see ``shared/SLURM.md``). Debian packages:
``slurmd slurmctld slurmdbd munge mariadb-server`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = ("install Slurm, munge and MariaDB: `sudo apt-get install slurmd slurmctld slurmdbd munge "
                "mariadb-server` (Debian/Ubuntu), or run .ci/run")  # fmt: skip
BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "scontrol", "sacct", "sacctmgr", "mariadbd",
            "mariadb-install-db", "mariadb")  # fmt: skip
PARTITION = "normsweep"


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition()`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class PrivateSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is the environment its commands need."""

    def __init__(self) -> None:
        # Short path: Unix socket paths are limited to ~100 characters.
        self.dir = Path(tempfile.mkdtemp(prefix="ns-slurm-", dir="/tmp"))
        self.dir.chmod(0o755)  # MariaDB runs as the mysql user and must reach its data directory
        self.host = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))
        self.memory_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 * 9 // 10
        self.env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ commands

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmdbd.log", "slurmdbd.out", "munged.log", "db/mariadb.err"):
            p = self.dir / name
            if p.exists():
                out.append(f"--- {name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def job_state(self, job_id: str) -> str:
        """The job's state as accounting records it (``RUNNING``, ``PENDING``, ``COMPLETED``, ...), or ''."""
        out = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id, check=False).stdout.split()
        return out[0] if out else ""

    def queue(self) -> list[dict[str, str]]:
        """Jobs slurmctld holds now: id, state, name."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%j", check=False).stdout.splitlines()
        return [dict(zip(("id", "state", "name"), line.split("|"))) for line in out if line]

    # ------------------------------------------------------------------ daemons

    def start(self) -> "PrivateSlurm":
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_configs()
            self._start_slurmdbd()
            self._start_slurm()
        except Exception as e:
            logs = self.logs()
            self.stop()
            raise RuntimeError(f"the private Slurm did not start: {e}\n{logs}") from e
        return self

    def _daemon(self, *cmd: str, log: str, user: str | None = None) -> subprocess.Popen:
        """A daemon in the foreground, so that its process is ours to stop."""
        prefix = ["runuser", "-u", user, "--"] if user else []
        proc = subprocess.Popen([*prefix, *cmd], env=self.env, stdout=(self.dir / log).open("ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def _start_munge(self) -> None:
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.dir / "munge.sock"
        self._daemon(_bin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                     f"--pid-file={self.dir / 'munged.pid'}", f"--seed-file={self.dir / 'munge.seed'}",
                     f"--log-file={self.dir / 'munged.log'}", log="munged.out")  # fmt: skip
        wait_for(self.munge_socket.exists, 30, "munged's socket")

    def _start_mariadb(self) -> None:
        mysql = pwd.getpwnam("mysql")
        db = self.dir / "db"  # the server runs as the mysql user: its data, socket and logs go here
        db.mkdir()
        os.chown(db, mysql.pw_uid, mysql.pw_gid)
        data, tmp = db / "data", db / "tmp"
        # A private tmpdir and no option files: two servers set up at once (or a leftover of an earlier
        # one) must not meet in /tmp, where MariaDB names its temporary tables by pid
        # ("Unknown table 'mysql.tmp_user_sys'"), and the machine's /etc/mysql must not change the setup.
        tmp.mkdir()
        os.chown(tmp, mysql.pw_uid, mysql.pw_gid)
        setup = subprocess.run([_bin("mariadb-install-db"), "--no-defaults", "--user=mysql", f"--datadir={data}",
                                f"--tmpdir={tmp}", "--auth-root-authentication-method=socket", "--skip-test-db"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        if setup.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db exited {setup.returncode}:\n{setup.stdout[-3000:]}{setup.stderr[-3000:]}"
            )
        self.db_port, self.db_socket = _free_port(), db / "mariadb.sock"
        self._daemon(_bin("mariadbd"), "--no-defaults", "--user=mysql", f"--datadir={data}", f"--socket={self.db_socket}",
                     f"--port={self.db_port}", f"--tmpdir={tmp}", "--bind-address=127.0.0.1", f"--pid-file={db / 'mariadb.pid'}",
                     f"--log-error={db / 'mariadb.err'}", "--innodb-flush-log-at-trx-commit=0",
                     "--innodb-buffer-pool-size=64M", log="mariadb.out")  # fmt: skip
        wait_for(self.db_socket.exists, 120, "MariaDB's socket")
        self.db_password = os.urandom(8).hex()
        sql = (f"CREATE DATABASE slurm_acct_db; CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")  # fmt: skip
        wait_for(lambda: subprocess.run([_bin("mariadb"), f"--socket={self.db_socket}", "-u", "root", "-e", sql],
                                        capture_output=True).returncode == 0, 60, "MariaDB accepting the setup")  # fmt: skip

    def _write_configs(self) -> None:
        d = self.dir
        self.ctld_port, self.slurmd_port, self.dbd_port = _free_port(), _free_port(), _free_port()
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        dbd = d / "slurmdbd.conf"
        dbd.write_text(
            f"{auth}DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"PidFile={d / 'slurmdbd.pid'}\nLogFile={d / 'slurmdbd.log'}\nStorageType=accounting_storage/mysql\n"
            f"StorageHost=127.0.0.1\nStoragePort={self.db_port}\nStorageUser=slurm\nStoragePass={self.db_password}\n"
            f"StorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds the database password)
        (d / "slurm.conf").write_text(
            f"ClusterName=normsweep\nSlurmctldHost={self.host}(127.0.0.1)\n{auth}CredType=cred/munge\n"
            f"SlurmUser=root\nSlurmdUser=root\nSlurmctldPort={self.ctld_port}\nSlurmdPort={self.slurmd_port}\n"
            f"StateSaveLocation={d / 'state'}\nSlurmdSpoolDir={d / 'spool'}\n"
            f"SlurmctldPidFile={d / 'slurmctld.pid'}\nSlurmdPidFile={d / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={d / 'slurmctld.log'}\nSlurmdLogFile={d / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nReturnToService=2\nMpiDefault=none\n"
            # KillWait 40 s (Slurm's default is 30): a worker SIGKILLed while it held the journal's lock leaves it to
            # Optuna's 30 s stale-lock grace, and a scancel'd worker must outwait that to free its own trial.
            "SchedulerType=sched/backfill\nKillWait=40\nMinJobAge=600\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={self.dbd_port}\nAccountingStoragePass={self.munge_socket}\n"  # munge for slurmdbd
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _start_slurmdbd(self) -> None:
        self._daemon(_bin("slurmdbd"), "-D", log="slurmdbd.out")
        wait_for(lambda: self.run("sacctmgr", "-n", "list", "cluster", check=False).returncode == 0, 120,
                 f"slurmdbd answering\n{self.logs()}")  # fmt: skip
        self.run("sacctmgr", "-i", "add", "cluster", "normsweep")

    def _start_slurm(self) -> None:
        self._daemon(_bin("slurmctld"), "-D", "-f", str(self.dir / "slurm.conf"), log="slurmctld.out")
        self._daemon(_bin("slurmd"), "-D", "-f", str(self.dir / "slurm.conf"), log="slurmd.out")
        wait_for(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, 120,
                 f"the node idle in sinfo\n{self.logs()}")  # fmt: skip

    def stop(self, keep_dir: bool = False) -> None:
        """Cancel the jobs, stop the daemons this object started (newest first), remove the directory."""
        if any(p.poll() is None for p in self.procs) and (self.dir / "slurm.conf").exists():
            self.run("scancel", f"--partition={PARTITION}", check=False)
            try:
                wait_for(lambda: not self.queue(), 60, "the cancelled jobs to end")
            except TimeoutError:
                pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
