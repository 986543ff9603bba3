"""Credentials never leak (normsweep/base/credentials.py): a password reaches no file, no tracker, no study.

End to end against real servers that ask for the password: a PostgreSQL server with scram-sha-256
and an MLflow server behind a proxy that answers 401 to any request without the right basic-auth
header. A password typed inline is refused before anything is written; one given the documented
way (``PGPASSWORD``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, a ``${oc.env:VAR}`` interpolation)
connects, and afterwards the password string occurs in no file under the launch directory (the
sweep and job directories, Hydra's ``.hydra/``, logs, the report, model files, event files), in
no Optuna study or trial attribute, no MLflow param or tag, no TensorBoard hparam and not in the
command's output.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from normsweep.base.credentials import (
    CLIENT_QUERY_SECRETS,
    InlinePassword,
    RedactingFilter,
    inline_passwords,
    is_secret_name,
    recorded_config,
    redact,
    secret_arguments,
)
from normsweep.search.trials import study_name_for

from . import warm_python
from .conftest import _free_port, compose_config, hparams, postgres_server, small_data_args

# One xdist worker runs every test of this file (--dist loadgroup): its module fixture is costly to start.
pytestmark = pytest.mark.xdist_group("credentials")

PG_PASSWORD = "pg-" + secrets.token_hex(8)
MLFLOW_USER, MLFLOW_PASSWORD = "alice", "ml-" + secrets.token_hex(8)
TIMEOUT = 900  # generous: these runs share 2 cores with whatever else is running


# ---------------------------------------------------------------------------- without servers


@pytest.mark.parametrize("text,shown", [
    ("postgresql+psycopg://user:s3cret@db:5432/optuna", "postgresql+psycopg://user:***@db:5432/optuna"),
    ("http://alice:s3cret@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    ("mysql://u:pa/ss@db/optuna", "mysql://u:***@db/optuna"),  # "/" unencoded: SQLAlchemy's password
    ("https://u:p@ss@host/x", "https://u:***@host/x"),  # "@" unencoded: the URL's authority ends at the last
    ("API request to http://u:s3cret@h:1/api failed; retry http://v:t0p@h:2",
     "API request to http://u:***@h:1/api failed; retry http://v:***@h:2"),
    ("postgresql+psycopg://user@db:5432/optuna", None),  # no password: nothing to mask
    ("http://host:5000/path", None),
    ("postgresql+psycopg://user:${oc.env:PG_PASSWORD}@db/optuna", None),  # the way to give one, kept as written
    ("http://u:***@h", None),
])  # fmt: skip
def test_redact_masks_every_url_password_and_keeps_interpolations(text: str, shown: str | None) -> None:
    assert redact(text) == (shown or text)


# The rule (normsweep/base/credentials.py, "What is a secret") as a table: what is refused, what is not.
def _group_for(key: str) -> list[str]:
    return ["search=optuna"] if key.startswith("search.") else ["logger=mlflow"] if key.startswith("logger.") else []


def _quoted(override: str) -> str:
    """A URL with a query, quoted as Hydra's override grammar needs it (``key="scheme://h/?a=b"``)."""
    key, value = override.split("=", 1)
    return f'{key}="{value}"' if "?" in value else override


@pytest.mark.parametrize("override", [
    "search.storage=postgresql+psycopg://bob@db:5432/opt?password=hunter2",  # libpq reads it from the query
    "search.storage=postgresql://bob@db/opt?sslmode=verify-full&sslpassword=hunter2",  # libpq: the key's passphrase
    "search.storage=mysql+pymysql://bob@db/opt?passwd=hunter2&charset=utf8mb4",  # PyMySQL / mysqlclient
    "search.storage=mysql://bob@db/opt?password=hunter2",
    "logger.tracking_uri=http://127.0.0.1:5000/?token=hunter2",  # a proxy's token in MLflow's URI
    "logger.tracking_uri=https://mlflow.example.org/?access_token=hunter2",
    "+hydra.job.env_set.PGPASSWORD=hunter2", "+hydra.job.env_set.HF_TOKEN=hunter2",
    "+hydra.job.env_set.AWS_SECRET_ACCESS_KEY=hunter2", "+hydra.job.env_set.password=hunter2",
    "+hydra.job.env_set.apiKey=hunter2", "+hydra.job.env_set.MY_API_KEY=hunter2", "+hydra.job.env_set.credentials=hunter2",
    "search.storage=postgresql://bob:hunter2@db/opt",  # userinfo, as before
])  # fmt: skip
def test_every_form_of_a_secret_is_refused_with_the_key_named_and_the_value_masked(override: str) -> None:
    key, value = override.split("=", 1)
    key = key.lstrip("+")
    found = inline_passwords(compose_config([*_group_for(key), _quoted(override)], return_hydra_config=True))
    assert list(found) == [key] and "hunter2" not in found[key]
    for argument in (override, _quoted(override)):  # the command line is refused before Hydra parses it too
        assert list(secret_arguments([argument])) == [key] and "hunter2" not in redact(argument)


@pytest.mark.parametrize("override", [
    "norm.eps=1e-6", "search.n_trials=3", "optimizer.lr=0.1", "trainer.label_smoothing=0.1",
    "search.storage=postgresql+psycopg://bob@db/opt?sslmode=require&application_name=password_study",
    "search.storage=postgresql://bob@db/opt?passfile=/home/bob/.pgpass",  # a path to the secret, not the secret
    "search.storage=postgresql://bob@db/opt?password=${oc.env:PG_PASSWORD}",  # the way to give one
    "logger.tracking_uri=http://127.0.0.1:5000/?experiment=token_study",  # a value that merely holds the word
    "logger.experiment=password-reset-ablation", "+hydra.job.env_set.TOKENIZERS_PARALLELISM=false",
    "+hydra.job.env_set.max_tokens=512", "+hydra.job.env_set.PGPASSWORD=${oc.env:PGPASSWORD_FILE_VALUE}",
    "search.storage=journal:/shared/token_search/optuna.journal",
])  # fmt: skip
def test_ordinary_keys_values_and_urls_are_not_taken_for_secrets(override: str) -> None:
    key = override.split("=", 1)[0].lstrip("+")
    assert inline_passwords(compose_config([*_group_for(key), _quoted(override)], return_hydra_config=True)) == {}
    assert secret_arguments([override]) == {} and redact(override) == override


def test_every_credential_parameter_a_client_documents_is_a_secret_by_name() -> None:
    assert all(is_secret_name(name) for names in CLIENT_QUERY_SECRETS.values() for name in names)
    assert not any(is_secret_name(k) for k in ("norm.eps", "search.n_trials", "max_tokens", "passfile", "sslkey"))


def test_a_secret_named_key_is_recorded_as_written_when_interpolated_and_masked_when_not(monkeypatch) -> None:
    monkeypatch.setenv("MY_TOKEN", "tok-s3cret")
    cfg = OmegaConf.create({"env_set": {"HF_TOKEN": "${oc.env:MY_TOKEN}"}, "kwargs": {"api_key": "plain-s3cret"},
                            "max_tokens": "${oc.env:MY_TOKEN}"})  # fmt: skip
    record = recorded_config(cfg)
    assert record["env_set"]["HF_TOKEN"] == "${oc.env:MY_TOKEN}" and record["kwargs"]["api_key"] == "***"
    assert record["max_tokens"] == "tok-s3cret"  # not a secret's name: resolved, as any other interpolation


def test_an_interpolated_query_password_connects_resolved_and_is_recorded_as_written(monkeypatch) -> None:
    monkeypatch.setenv("MY_PASSWORD", "q-s3cret")
    written = "postgresql+psycopg://u@db/optuna?password=${oc.env:MY_PASSWORD}"
    cfg = compose_config(["search=optuna", f'search.storage="{written}"'])
    assert cfg.search.storage == "postgresql+psycopg://u@db/optuna?password=q-s3cret"  # what the run connects with
    assert inline_passwords(cfg) == {} and recorded_config(cfg)["search"]["storage"] == written


def test_inline_passwords_are_found_in_values_and_secret_env_set_entries_but_interpolations_are_not() -> None:
    cfg = compose_config(["search=optuna", "search.storage=postgresql+psycopg://u:s3cret@db/optuna", "logger=mlflow",
                          "logger.tracking_uri=http://alice:${oc.env:MY_PASSWORD}@h:5000",
                          "+hydra.job.env_set.PGPASSWORD=s3cret", "+hydra.job.env_set.TOKENIZERS_PARALLELISM=false"],
                         return_hydra_config=True)  # fmt: skip
    assert inline_passwords(cfg) == {"search.storage": "postgresql+psycopg://u:***@db/optuna",
                                     "hydra.job.env_set.PGPASSWORD": "***"}  # fmt: skip


def test_a_job_given_an_inline_password_writes_nothing(tmp_path: Path) -> None:
    from normsweep.run.job import run

    cfg = compose_config(["logger=mlflow", "logger.tracking_uri=http://alice:s3cret@127.0.0.1:1"])
    with pytest.raises(InlinePassword, match=r"(?s)tracking_uri=http://alice:\*\*\*@.*MLFLOW_TRACKING_PASSWORD") as e:
        run(cfg, tmp_path / "job")
    assert "s3cret" not in str(e.value) and not (tmp_path / "job").exists()


def test_the_record_holds_an_interpolated_password_as_written(monkeypatch) -> None:
    monkeypatch.setenv("MY_PASSWORD", "s3cret")
    written = "postgresql+psycopg://u:${oc.env:MY_PASSWORD}@db/optuna"
    cfg = compose_config(["search=optuna", f"search.storage={written}", "optimizer.lr=${oc.env:LR,0.05}"])
    assert cfg.search.storage == "postgresql+psycopg://u:s3cret@db/optuna"  # what the run connects with
    record = recorded_config(cfg)
    assert record["search"]["storage"] == written and "s3cret" not in json.dumps(record)
    assert record["optimizer"]["lr"] == 0.05  # any other interpolation is recorded resolved, as before


def test_job_directories_and_study_names_never_hold_a_url() -> None:
    urls = ["search.storage=postgresql+psycopg://u:${oc.env:PW}@db/optuna", "logger=mlflow",
            "logger.tracking_uri=http://alice:${oc.env:PW}@h:5000"]  # fmt: skip
    cfg = compose_config(["search=optuna", "norm=group", *urls], return_hydra_config=True)
    assert cfg.hydra.job.override_dirname == "norm=group,search=optuna"  # a plain multirun's job dir name
    assert study_name_for(cfg, ("norm=group",), urls) == study_name_for(cfg, ("norm=group",), [])


def test_the_log_filter_masks_messages_and_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("normsweep.test_credentials")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("cannot reach %s", "http://alice:s3cret@h:1")
        try:
            raise ConnectionError("API request to http://alice:s3cret@h:1/api/2.0 failed")
        except ConnectionError:
            logger.exception("tracker failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = out.getvalue()
    assert "s3cret" not in text
    assert "cannot reach http://alice:***@h:1" in text
    assert "ConnectionError: API request to http://alice:***@h:1" in text


# ---------------------------------------------------------------------------- real servers that ask for it


class _AuthProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the MLflow server only requests with the right basic-auth header; 401 to the rest."""

    def _forward(self) -> None:
        server = self.server
        if self.headers.get("Authorization") != server.expected:
            server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        server.passed += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization", "connection")}
        conn = http.client.HTTPConnection("127.0.0.1", server.backend, timeout=120)
        conn.request(self.command, self.path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


class TrackingServer:
    """``mlflow server`` on a free port behind :class:`_AuthProxy`; :attr:`url` is the proxy's."""

    def __init__(self, root: Path) -> None:
        self.backend = _free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.backend),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthProxy)
        token = base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode()).decode()
        self.proxy.expected, self.proxy.backend = f"Basic {token}", self.backend
        self.proxy.passed = self.proxy.refused = 0  # requests forwarded / answered 401
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        self.root = root

    def wait(self) -> TrackingServer:
        """Block until the server answers (it starts in the background while other tests run)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.backend, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-3000:]}")

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=f"http://127.0.0.1:{self.backend}")  # straight to the server

    def stop(self) -> None:
        self.proxy.shutdown()
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    pytest.importorskip("mlflow")
    server = TrackingServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg():
    """The URL, without the password, of a PostgreSQL server that asks for :data:`PG_PASSWORD`."""
    with postgres_server(password=PG_PASSWORD) as url:
        yield url


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return [*small_data_args(tmp_path_factory), "trainer.epochs=1", "trainer.threads=1", "trainer.progress=false"]


def with_password(url: str, password: str) -> str:
    return url.replace("normsweep@", f"normsweep:{password}@") if "normsweep@" in url else \
        url.replace("://", f"://{MLFLOW_USER}:{password}@")  # fmt: skip


def cli(launch: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m normsweep ARGS`` from ``launch``, with none of the passwords in its environment but ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MLFLOW_"))}
    cmd = [sys.executable, "-m", "normsweep", *args]
    return warm_python.Popen(cmd, cwd=launch, env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    output = proc.communicate(timeout=TIMEOUT)[0]
    return proc.returncode, output


def studies(pg_url: str) -> dict[str, str]:
    """Every study of the server, as the text of everything it holds: names, attributes, trials."""
    storage = optuna.storages.RDBStorage(with_password(pg_url, PG_PASSWORD))
    out = {}
    for s in storage.get_all_studies():
        trials = storage.get_all_trials(s._study_id)
        out[s.study_name] = repr((s.user_attrs, s.system_attrs, [(t.state, t.params, t.user_attrs, t.system_attrs)
                                                                 for t in trials]))  # fmt: skip
    return out


def complete_trials(pg_url: str, name: str) -> int:
    study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(with_password(pg_url, PG_PASSWORD)))
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def files_holding(secret: str, root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if secret in p.name or (p.is_file() and secret.encode() in p.read_bytes())]


def assert_nowhere(output: str, launch: Path, pg_url: str | None = None) -> None:
    """Neither password in the command's output, a file (name or content) under ``launch``, or a study."""
    for secret in (PG_PASSWORD, MLFLOW_PASSWORD):
        assert secret not in output
        assert files_holding(secret, launch) == []
        if pg_url:
            assert [name for name, text in studies(pg_url).items() if secret in name + text] == []


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/trial_*/results.json"))


@pytest.mark.slow
def test_an_inline_password_is_refused_before_anything_is_written(tmp_path: Path, pg, tracking, data_args) -> None:
    before, requests = studies(pg), tracking.proxy.passed + tracking.proxy.refused
    uri = with_password(tracking.url, MLFLOW_PASSWORD)
    storage = with_password(pg, PG_PASSWORD)
    search = cli(
        tmp_path,
        "-m",
        "search=optuna",
        "search.n_trials=2",
        f"search.storage={storage}",
        "logger=mlflow",
        f"logger.tracking_uri={uri},{uri}/",
        *data_args,
        "hydra.sweep.dir=sweep",
    )  # a sweep, too
    single = cli(tmp_path, "logger=mlflow", f"logger.tracking_uri={uri}", *data_args, "hydra.run.dir=run")
    expected = {search: ["search.storage=postgresql+psycopg://normsweep:***@", "PGPASSWORD",
                         f"logger.tracking_uri=http://{MLFLOW_USER}:***@", "MLFLOW_TRACKING_PASSWORD"],
                single: [f"logger.tracking_uri=http://{MLFLOW_USER}:***@", "MLFLOW_TRACKING_PASSWORD"]}  # fmt: skip
    for proc, says in expected.items():
        rc, output = finish(proc)
        assert rc == 2, output[-3000:]
        assert [s for s in says if s not in output] == [], output[-3000:]  # each key, masked, and where to put it
        assert PG_PASSWORD not in output and MLFLOW_PASSWORD not in output
    assert list(tmp_path.iterdir()) == []  # no sweep dir, no run dir, no .hydra, no log
    assert studies(pg) == before  # never connected
    assert tracking.proxy.passed + tracking.proxy.refused == requests


@pytest.mark.slow
def test_a_search_with_the_passwords_in_the_environment_connects_and_leaks_them_nowhere(
    tmp_path: Path, pg, tracking, data_args
) -> None:
    env = {"PGPASSWORD": PG_PASSWORD, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
           "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}  # fmt: skip
    tracking.wait()
    passed = tracking.proxy.passed
    rc, output = finish(cli(tmp_path, "-m", "search=optuna", "search.n_trials=2", f"search.storage={pg}",
                            "logger=mlflow", f"logger.tracking_uri={tracking.url}", "logger.experiment=env",
                            *data_args, "hydra.sweep.dir=sweep", env=env))  # fmt: skip
    assert rc == 0, output[-3000:]
    jobs = job_dirs(tmp_path / "sweep")
    assert len(jobs) == 2 and complete_trials(pg, jobs[0].parent.name) == 2  # the storage took the password
    assert tracking.proxy.refused == 0 and tracking.proxy.passed > passed  # so did the tracking server
    assert_nowhere(output, tmp_path, pg)
    client = tracking.client()
    runs = client.search_runs([client.get_experiment_by_name("env").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    for run in runs:
        logged = json.dumps([run.data.params, run.data.tags])
        assert PG_PASSWORD not in logged and MLFLOW_PASSWORD not in logged
        assert run.data.params["search.storage"] == pg and run.data.params["logger.tracking_uri"] == tracking.url


@pytest.mark.slow
def test_a_search_with_an_interpolated_password_records_it_as_written(tmp_path: Path, pg, data_args) -> None:
    storage = pg.replace("normsweep@", "normsweep:${oc.env:NS_TEST_PG_PASSWORD}@")
    rc, output = finish(cli(tmp_path, "-m", "search=optuna", "search.n_trials=2", f"search.storage={storage}",
                            "logger=tensorboard", "trainer.seed=1", *data_args, "hydra.sweep.dir=sweep",
                            env={"NS_TEST_PG_PASSWORD": PG_PASSWORD}))  # fmt: skip
    assert rc == 0, output[-3000:]
    jobs = job_dirs(tmp_path / "sweep")
    assert len(jobs) == 2 and complete_trials(pg, jobs[0].parent.name) == 2
    assert_nowhere(output, tmp_path, pg)
    for job in jobs:
        shown = hparams(job)  # TensorBoard's HParams view of the trial
        assert PG_PASSWORD not in json.dumps(shown) and shown["search.storage"] == storage
        assert json.loads((job / "results.json").read_text())["config"]["search"]["storage"] == storage


@pytest.mark.slow
def test_a_run_with_an_interpolated_tracking_password_connects_and_leaks_it_nowhere(
    tmp_path: Path, tracking, data_args
) -> None:
    uri = tracking.url.replace("://", f"://{MLFLOW_USER}:${{oc.env:NS_TEST_MLFLOW_PASSWORD}}@")
    tracking.wait()
    passed = tracking.proxy.passed
    rc, output = finish(cli(tmp_path, "logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment=interpolated",
                            *data_args, "hydra.run.dir=run",
                            env={"NS_TEST_MLFLOW_PASSWORD": MLFLOW_PASSWORD}))  # fmt: skip
    assert rc == 0, output[-3000:]
    assert tracking.proxy.refused == 0 and tracking.proxy.passed > passed
    assert_nowhere(output, tmp_path)
    client = tracking.client()
    (run,) = client.search_runs([client.get_experiment_by_name("interpolated").experiment_id])
    assert run.info.status == "FINISHED" and MLFLOW_PASSWORD not in json.dumps([run.data.params, run.data.tags])
    assert run.data.params["logger.tracking_uri"] == uri


@pytest.mark.slow
def test_a_client_error_that_quotes_the_url_is_masked_everywhere(tmp_path: Path, data_args) -> None:
    # Nothing listens on the port: MLflow's error quotes the URL it tried, password and all.
    uri = f"http://{MLFLOW_USER}:${{oc.env:NS_TEST_MLFLOW_PASSWORD}}@127.0.0.1:{_free_port()}"
    env = {"NS_TEST_MLFLOW_PASSWORD": MLFLOW_PASSWORD, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # fmt: skip
    rc, output = finish(cli(tmp_path, "logger=mlflow", f"logger.tracking_uri={uri}", *data_args, "hydra.run.dir=run",
                            env=env))  # fmt: skip
    assert rc == 1 and f"{MLFLOW_USER}:***@127.0.0.1" in output, output[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and f"{MLFLOW_USER}:***@127.0.0.1" in record["error"] + record["traceback"]
    assert_nowhere(output, tmp_path)


@pytest.mark.slow
def test_a_password_in_the_storage_urls_query_is_refused_before_anything_is_written(
    tmp_path: Path, pg, data_args
) -> None:
    """The form a user tried (issue 33): SQLAlchemy hands ``?password=`` to libpq, which connects with it."""
    before = studies(pg)
    query = f"{pg}?password={PG_PASSWORD}"
    for override in (f'search.storage="{query}"', f"search.storage={query}"):  # quoted, and as Hydra cannot parse
        rc, output = finish(cli(tmp_path, "-m", "search=optuna", "search.n_trials=2", override, *data_args,
                                "hydra.sweep.dir=sweep"))  # fmt: skip
        assert rc == 2, output[-3000:]
        assert "search.storage" in output and "password=***" in output and "PGPASSWORD" in output, output[-3000:]
        assert PG_PASSWORD not in output
    assert list(tmp_path.iterdir()) == [] and studies(pg) == before  # nothing written, never connected


@pytest.mark.slow
def test_a_token_in_the_tracking_uris_query_is_refused_before_anything_is_written(
    tmp_path: Path, tracking, data_args
) -> None:
    requests = tracking.proxy.passed + tracking.proxy.refused
    uri = f"{tracking.url}/?token={MLFLOW_PASSWORD}"
    rc, output = finish(cli(tmp_path, "logger=mlflow", f'logger.tracking_uri="{uri}"', *data_args, "hydra.run.dir=run"))
    assert rc == 2 and "logger.tracking_uri" in output and "token=***" in output, output[-3000:]
    assert "MLFLOW_TRACKING_TOKEN" in output and MLFLOW_PASSWORD not in output
    assert list(tmp_path.iterdir()) == [] and tracking.proxy.passed + tracking.proxy.refused == requests


@pytest.mark.slow
def test_a_password_key_in_a_users_experiment_preset_is_refused_before_anything_is_written(
    tmp_path: Path, data_args
) -> None:
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        f"# @package _global_\nhydra:\n  job:\n    env_set:\n      password: {PG_PASSWORD}\n"
    )
    launch = tmp_path / "launch"
    launch.mkdir()
    rc, output = finish(cli(launch, "--config-dir", str(tmp_path / "conf"), "experiment=mine", *data_args,
                            "hydra.run.dir=run"))  # fmt: skip
    assert rc == 2 and "hydra.job.env_set.password=***" in output, output[-3000:]
    assert PG_PASSWORD not in output and list(launch.iterdir()) == []
    assert files_holding(PG_PASSWORD, launch) == []
