"""The settings a sweep's runs are compared by: the columns the report's tables and the plots' labels share.

Plain data and pandas only: :mod:`normsweep.report.runs`, :mod:`normsweep.report.tables` and
:mod:`normsweep.report.plots` read it, and none imports another for it (tables -> plots is the one direction
between the tables and the plots).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

# (column, path into the run's config); the swept settings a reader compares runs by.
SETTINGS = [
    ("norm", "norm.kind"),
    ("groups", "norm.groups"),
    ("ws", "norm.ws"),
    ("model", "model.arch"),
    ("augment", None),  # path None: the config group's choice (results.json "choices")
    ("recipe", None),  # conf/recipe/<norm>.yaml (each norm's own) or shared
    ("optimizer", "optimizer.name"),
    ("scheduler", "scheduler.name"),
    ("lr", "optimizer.lr"),
    ("weight_decay", "optimizer.weight_decay"),
    ("dropout", "model.dropout"),
    ("batch_size", "trainer.batch_size"),
    ("label_smoothing", "trainer.label_smoothing"),
    ("ema_decay", "trainer.ema_decay"),
    ("epochs", "trainer.epochs"),
    ("train_size", "data.train_size"),
    ("seed", "trainer.seed"),
]


def varying_columns(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """Those of ``columns`` in ``df`` that take more than one value (NaN counted as a value)."""
    return [c for c in columns if c in df and df[c].astype(str).nunique(dropna=False) > 1]


def setting_text(v: Any) -> str:
    """A setting as it was given: 0.001 stays 0.001 (not 0.00), 256 stays 256 in a column with blanks
    (not 256.0), an unset one is blank."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:g}" if isinstance(v, float) else str(v)


def with_known_settings(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose settings were read: not those of a run with no readable record (every setting
    missing, e.g. an unreadable results.json), whose blanks would make every setting look swept."""
    present = [c for c, _ in SETTINGS if c in df]
    return df[df[present].notna().any(axis=1)] if present else df
