"""Credentials never leak: a password goes where its client reads it, never into the config.

normsweep records its config in many places (``results.json``, ``model.pt``, the run log,
TensorBoard hparams, MLflow params and tags, Optuna study attributes), and Hydra does too
(``.hydra/*.yaml``, ``multirun.yaml``, job directory names; a parallel launcher pickles the job).
A URL with a password in it (``search.storage``, ``logger.tracking_uri``) would reach all of them,
and every user of the machine would see it in ``ps`` for as long as the run lasts. So:

* **An inline password is refused at start** (:func:`refuse_inline_passwords`, run by
  :class:`CredentialsCallback` before Hydra writes anything, and again by the job): the message
  names the key and says where the password goes instead (:data:`WHERE`): ``PGPASSWORD`` or
  ``~/.pgpass`` for PostgreSQL, MySQL's option file, ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` for an MLflow server, or a ``${oc.env:VAR}`` interpolation.
* **An interpolation is recorded unresolved**: ``user:${oc.env:PG_PASSWORD}@host`` is resolved
  only where normsweep connects; its records hold the text as written (:func:`recorded_config`),
  as Hydra's own files do.
* **Every log line passes through** :func:`redact` (:class:`RedactingFilter`), so a URL that holds a
  password anyway (``$MLFLOW_TRACKING_URI``, a client's error message quoting the URL) is logged as
  ``user:***@host``.

Refusing, not redacting: redaction would have to reach every copy of the command line, including
the copies normsweep does not write (Hydra's launcher log and its "Error executing job with
overrides", submitit's pickled jobs, the process list); one missed copy leaks the password. A
refusal before anything is written leaves no copy to miss, and the documented places cost the user
one ``export``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normsweep.base.errors import ConfigError

log = logging.getLogger(__name__)

URL_KEYS = ("search.storage", "logger.tracking_uri")  # the keys that hold a URL normsweep connects to

# scheme://user:PASSWORD@ : the password runs to the last "@" of the URL's authority, or, as
# SQLAlchemy reads it, to the first "@" (a "/" in it unencoded).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<password>[^\s/?#]*|[^@\s]*)@")
_SECRET_ENV = re.compile(r"PASSWORD|PASSWD|SECRET|API_?KEY|(?:^|_)TOKEN(?:_|$)", re.IGNORECASE)  # env var names
MASK = "***"

WHERE = {  # URL scheme -> where its client reads a password
    "postgresql": "PGPASSWORD=... in the environment, or a line in ~/.pgpass (psycopg reads them when the URL "
                  "has no password)",
    "mysql": "a MySQL option file: [client] password=... in ~/.my.cnf, read with ?read_default_file=~/.my.cnf "
             "at the URL's end",
    "http": "MLFLOW_TRACKING_USERNAME=... and MLFLOW_TRACKING_PASSWORD=... in the environment (MLflow sends "
            "them to its server)",
}  # fmt: skip
_SCHEME_FAMILY = {"postgres": "postgresql", "mariadb": "mysql", "https": "http"}


def _family(url: str) -> str:
    """``postgresql`` for ``postgresql+psycopg://...`` and ``postgres://...``: a key of :data:`WHERE`, if known."""
    scheme = url.split("://")[0].split("+")[0].lower()
    return _SCHEME_FAMILY.get(scheme, scheme)


def _is_secret(password: str) -> bool:
    """A password as written: not empty, not already masked, not an interpolation resolved later."""
    return bool(password) and password != MASK and not password.startswith("${")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked: ``postgresql://user:***@host/db``.

    An interpolation in a password's place (``user:${oc.env:PG_PASSWORD}@host``) is kept: it is
    the way to give a password, not the password.
    """
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@" if _is_secret(m["password"]) else m[0], text)


def has_password(text: Any) -> bool:
    return isinstance(text, str) and redact(text) != text


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) of every string in a plain container."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def inline_passwords(cfg: DictConfig) -> dict[str, str]:
    """``{key: value redacted}`` of each key whose value, as written, holds a password.

    The values are read unresolved, so an interpolation is not one; command-line overrides are read
    as typed (a sweep ``key=a,b`` is only there), and ``hydra.job.env_set`` entries named like a
    secret (``PGPASSWORD``) count too: Hydra records them in ``.hydra/hydra.yaml``.
    """
    found: dict[str, str] = {}
    for key, value in _strings(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)):
        if key.startswith("hydra.overrides.") and "=" in value:
            key, value = value.split("=", 1)
            key = key.lstrip("+~")
        if key == "hydra.job.override_dirname":  # the overrides again
            continue
        if has_password(value):
            found.setdefault(key, redact(value))
        elif key.startswith("hydra.job.env_set.") and _SECRET_ENV.search(key.rsplit(".", 1)[1]) and _is_secret(value):
            found.setdefault(key, MASK)
    return found


class InlinePassword(ConfigError):
    """A password written into the config or the command line."""


def refuse_inline_passwords(cfg: DictConfig) -> None:
    """Raise :class:`InlinePassword` if any value of ``cfg``, as written, holds a password."""
    found = inline_passwords(cfg)
    if not found:
        return
    urls = {k: v for k, v in found.items() if f"{MASK}@" in v}
    families = {_family(m["head"]) for value in urls.values() for m in _URL_PASSWORD.finditer(value)}
    where = [f"{family}: {WHERE[family]}" for family in sorted(families & WHERE.keys())]
    if urls:
        key, value = next(iter(urls.items()))
        example = value.replace(f"{MASK}@", "${oc.env:MY_PASSWORD}@")
        where.append(f"any URL: an interpolation in the password's place, resolved only to connect and recorded as "
                     f"written: {key}='{example}' with MY_PASSWORD in the environment")  # fmt: skip
    for key in found.keys() - urls.keys():  # hydra.job.env_set.NAME
        where.append(f"{key}: export {key.rsplit('.', 1)[1]} in the shell that starts normsweep instead")
    raise InlinePassword(
        f"{', '.join(f'{k}={v}' for k, v in found.items())}: a password is written into the command line or "
        f"config. normsweep stopped before writing anything: it would be copied into every record of the run "
        f"(results.json, .hydra/, logs, trackers) and shown by `ps` to every user of this machine. Give the "
        f"password where its client reads it, and the URL without it:" + "".join(f"\n  - {w}" for w in where)
    )


def recorded_config(cfg: DictConfig) -> dict:
    """The config as a run records it: resolved, except a value whose resolution holds a password,
    which is kept as written (``user:${oc.env:PG_PASSWORD}@host``; a password written inline is masked)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    written = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return _unresolved_secrets(resolved, written)


def _unresolved_secrets(resolved: Any, written: Any) -> Any:
    if isinstance(resolved, dict):
        written = written if isinstance(written, dict) else {}
        return {k: _unresolved_secrets(v, written.get(k)) for k, v in resolved.items()}
    if isinstance(resolved, list):
        written = written if isinstance(written, list) and len(written) == len(resolved) else [None] * len(resolved)
        return [_unresolved_secrets(v, w) for v, w in zip(resolved, written)]
    if has_password(resolved):
        return redact(written) if isinstance(written, str) else redact(resolved)
    return resolved


class RedactingFilter(logging.Filter):
    """Masks URL passwords in a log record's message and traceback (see :func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: the handler reports it as it would without this filter
            return True
        if has_password(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logs() -> None:
    """Put a :class:`RedactingFilter` on every log handler (once each): the root logger's, and those of
    libraries that keep their own (MLflow's does not pass its records on to the root logger)."""
    known = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(lg for lg in known if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class CredentialsCallback(Callback):
    """Hydra callback (``conf/train.yaml``): refuse an inline password before Hydra writes anything,
    and redact every log handler Hydra sets up.

    Hydra turns an exception raised by a callback into a warning and goes on, so the refusal is
    logged and ends the process (exit status 2, as any other config error).
    """

    def _check(self, config: DictConfig) -> None:
        redact_logs()
        try:
            refuse_inline_passwords(config)
        except InlinePassword as e:
            log.error("%s", e)
            raise SystemExit(2) from None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_logs()  # the job's own handlers (its log file), configured just before
