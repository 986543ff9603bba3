"""Credentials never leak: a password goes where its client reads it, never into the config.

normsweep records its config in many places (``results.json``, ``model.pt``, the run log,
TensorBoard hparams, MLflow params and tags, Optuna study attributes), and Hydra does too
(``.hydra/*.yaml``, ``multirun.yaml``, job directory names; a parallel launcher pickles the job).
A URL with a password in it (``search.storage``, ``logger.tracking_uri``) would reach all of them,
and every user of the machine would see it in ``ps`` for as long as the run lasts. So:

**What is a secret** (:func:`is_secret_name`, :func:`redact`; one rule for the refusal, the log filter
and the records):

* a URL's userinfo password, ``scheme://user:PASSWORD@host``;
* a URL query parameter that carries a credential, ``?password=...``: every parameter named like a
  secret (below), which covers each credential parameter the clients normsweep talks to document
  (:data:`CLIENT_QUERY_SECRETS`: libpq's ``password`` and ``sslpassword``, PyMySQL's and mysqlclient's
  ``password`` and ``passwd``; MLflow and Optuna read none from a URL, so a ``?token=`` there is a
  proxy's and refused by name too);
* a config key (anywhere in the composed config, on the command line, in a sweep's values, in
  ``hydra.job.env_set``) or a ``name=value`` in text whose name says secret: one of its words
  (split at ``_ - .`` and camelCase) ends in ``password``, ``passwd``, ``passphrase``, ``secret``,
  ``token``, ``credential(s)`` or ``apikey``, or two words read ``api key``, ``access key`` or
  ``private key``. ``norm.eps``, ``search.n_trials`` or ``max_tokens`` are not secrets; a *value*
  that merely contains such a word is never one; a number, a boolean or null is never one.

A secret's value as written counts unless it is empty, the mask ``***``, or an interpolation
(``${oc.env:VAR}``), which is the way to give one.

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
  ``user:***@host``, ``?password=***``, and a ``token=...`` as ``token=***``.

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
MASK = "***"

WHERE = {  # URL scheme -> where its client reads a password
    "postgresql": "PGPASSWORD=... in the environment, or a line in ~/.pgpass (psycopg reads them when the URL "
                  "has no password)",
    "mysql": "a MySQL option file: [client] password=... in ~/.my.cnf, read with ?read_default_file=~/.my.cnf "
             "at the URL's end",
    "http": "MLFLOW_TRACKING_USERNAME=... and MLFLOW_TRACKING_PASSWORD=..., or MLFLOW_TRACKING_TOKEN=... (a "
            "bearer token), in the environment (MLflow sends them to its server)",
}  # fmt: skip
_SCHEME_FAMILY = {"postgres": "postgresql", "mariadb": "mysql", "https": "http"}


# The credential parameters each client reads from a URL's query string, from its documentation; the name
# rule (:func:`is_secret_name`) must cover every one (tests/test_credentials.py checks it).
CLIENT_QUERY_SECRETS = {
    "postgresql": ("password", "sslpassword"),  # libpq, "Parameter Key Words" (psycopg passes them on)
    "mysql": ("password", "passwd"),  # PyMySQL connect(password=, passwd=), mysqlclient connect(passwd=, password=)
}
SECRET_ENDINGS = ("password", "passwd", "passphrase", "secret", "token", "credential", "credentials", "apikey")
SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key")}
_WORD_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")
# name=value (a URL's query parameter, an override, a log line) or "name: value"; the value runs to a separator
_NAMED_VALUE = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>=|: )(?=(?P<value>\$\{[^}]*\}|[^\s&;,'\"\]\)}]+))"
)


def is_secret_name(name: str) -> bool:
    """Whether a key, a URL query parameter or an environment variable named ``name`` holds a secret
    (``search.storage_password``, ``PGPASSWORD``, ``apiKey``, ``MLFLOW_TRACKING_TOKEN``; not ``max_tokens``)."""
    name = name.rsplit(".", 1)[-1].split("[", 1)[0]
    words = [w.lower() for w in _WORD_SPLIT.split(name) if w]
    return any(w.endswith(SECRET_ENDINGS) for w in words) or any(pair in SECRET_PAIRS for pair in zip(words, words[1:]))


def _family(url: str) -> str:
    """``postgresql`` for ``postgresql+psycopg://...`` and ``postgres://...``: a key of :data:`WHERE`, if known."""
    scheme = url.strip("'\" ").split("://")[0].split("+")[0].lower()
    return _SCHEME_FAMILY.get(scheme, scheme)


def _is_secret(password: str) -> bool:
    """A password as written: not empty, not already masked, not an interpolation resolved later."""
    return bool(password) and password != MASK and not password.startswith("${")


def redact(text: str) -> str:
    """``text`` with every secret in it masked: a URL's password (``postgresql://user:***@host/db``), a
    secret query parameter (``?sslpassword=***``) and any ``name=value`` or ``name: value`` whose name
    says secret (``token=***``).

    An interpolation in a secret's place (``user:${oc.env:PG_PASSWORD}@host``) is kept: it is the way
    to give a password, not the password.
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@" if _is_secret(m["password"]) else m[0], text)
    out, end = [], 0  # name=value pairs may nest (key=scheme://h/?password=x): look inside every value
    for m in _NAMED_VALUE.finditer(text):
        if m.start() >= end and is_secret_name(m["name"]) and _is_secret(m["value"]):
            out += [text[end : m.start("value")], MASK]
            end = m.end("value")
    return "".join(out) + text[end:]


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
    """``{key: value redacted}`` of each key whose value, as written, is or holds a secret.

    The values are read unresolved, so an interpolation is not one; command-line overrides are read
    as typed (a sweep ``key=a,b`` is only there); a key named like a secret counts wherever it sits,
    ``hydra.job.env_set`` entries (``PGPASSWORD``, recorded in ``.hydra/hydra.yaml``) included.
    """
    found: dict[str, str] = {}
    for key, value in _strings(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)):
        if key.startswith("hydra.overrides.") and "=" in value:
            key, value = value.split("=", 1)
            key = key.lstrip("+~")
        if key == "hydra.job.override_dirname":  # the overrides again
            continue
        if is_secret_name(key) and _is_secret(value):
            found.setdefault(key, MASK)
        elif has_password(value):
            found.setdefault(key, redact(value))
    return found


class InlinePassword(ConfigError):
    """A password written into the config or the command line."""


def _advice(key: str, value: str) -> str:
    """Where the secret of ``key`` goes instead of the config."""
    if key.startswith("hydra.job.env_set."):
        return (
            f"{key} -> set the environment variable {key.rsplit('.', 1)[1]} in the shell that starts normsweep instead"
        )
    if value == MASK:
        return (f"{key} -> an interpolation, {key}='${{oc.env:MY_SECRET}}' with MY_SECRET in the environment "
                f"(resolved only where it is used, recorded as written)")  # fmt: skip
    family = _family(value) if "://" in value else ""
    where = f"{WHERE[family]}; or " if family in WHERE else ""
    example = value.replace(f":{MASK}@", ":${oc.env:MY_PASSWORD}@")
    example = re.sub(rf"=({re.escape(MASK)})", "=${oc.env:MY_PASSWORD}", example)
    return (f"{key} -> {where}an interpolation in the secret's place, resolved only to connect and recorded as "
            f"written: {key}='{example}' with MY_PASSWORD in the environment")  # fmt: skip


def refuse_inline_passwords(cfg: DictConfig) -> None:
    """Raise :class:`InlinePassword` if any value of ``cfg``, as written, is or holds a secret."""
    found = inline_passwords(cfg)
    if found:
        raise refusal(found)


def secret_arguments(argv: list[str]) -> dict[str, str]:
    """``{key: value masked}`` of each ``key=value`` command-line argument that is or holds a secret: read
    before Hydra parses them, so that an override Hydra cannot parse (an unquoted ``?password=``), whose
    error message would quote it, is refused too."""
    found: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if is_secret_name(key) and _is_secret(value):
            found.setdefault(key, MASK)
        elif has_password(value):
            found.setdefault(key, redact(value))
    return found


def refusal(found: dict[str, str]) -> InlinePassword:
    """The error for the secrets ``found`` (``{key: value masked}``): each key, and where its secret goes."""
    return InlinePassword(
        f"{', '.join(f'{k}={v}' for k, v in found.items())}: a secret is written into the command line or "
        f"config. normsweep stopped before writing anything: it would be copied into every record of the run "
        f"(results.json, .hydra/, logs, trackers) and shown by `ps` to every user of this machine. Give it "
        f"where its client reads it, and the config without it:"
        + "".join(f"\n  - {_advice(k, v)}" for k, v in found.items())
    )


def recorded_config(cfg: DictConfig) -> dict:
    """The config as a run records it: resolved, except a value whose resolution holds a password,
    which is kept as written (``user:${oc.env:PG_PASSWORD}@host``; a password written inline is masked)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    written = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return _unresolved_secrets(resolved, written)


def _unresolved_secrets(resolved: Any, written: Any, key: str = "") -> Any:
    if isinstance(resolved, dict):
        written = written if isinstance(written, dict) else {}
        return {k: _unresolved_secrets(v, written.get(k), str(k)) for k, v in resolved.items()}
    if isinstance(resolved, list):
        written = written if isinstance(written, list) and len(written) == len(resolved) else [None] * len(resolved)
        return [_unresolved_secrets(v, w, key) for v, w in zip(resolved, written)]
    if isinstance(resolved, str) and is_secret_name(key) and _is_secret(resolved):
        return written if isinstance(written, str) and not _is_secret(written) else MASK
    if has_password(resolved):
        return redact(written) if isinstance(written, str) else redact(resolved)
    return resolved


class RedactingFilter(logging.Filter):
    """Masks secrets in a log record's message and traceback (see :func:`redact`)."""

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
