"""The figures of a sweep (matplotlib, PNG, in ``SWEEP_DIR/plots/``).

* ``loss.png``               training loss per epoch, every run on one figure, one colour per norm;
* ``accuracy.png``           validation and test accuracy per epoch, same style;
* ``test_accuracy.png``      final test accuracy per configuration: mean over seeds with its 95%
  confidence interval (t distribution, n-1 degrees of freedom), n in each bar's label;
* ``sensitivity_<key>.png``  for each numeric setting the sweep varies (``trainer.batch_size``,
  ``optimizer.lr``, ``data.train_size``, ...): final test accuracy against it, one line per norm,
  mean over seeds with the same 95% intervals, log-scaled x when the values span a ratio of 10 or more;
* ``<job>/mispredicted.png`` test images the run's *trained* model gets wrong (from its saved
  predictions), with true and predicted class;
* ``<job>/confusion.png``    the test-set confusion matrix.

Runs that differ only by seed share a colour: their mean is drawn with a band of ± one std.
"""

from __future__ import annotations

import functools
import logging
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from normsweep.base.results import PREDICTIONS_FILE, RESULTS_FILE, RunRecord, atomic_write  # noqa: E402
from normsweep.data import CLASSES  # noqa: E402
from normsweep.norms import NORMS  # noqa: E402
from normsweep.report.columns import SETTINGS, setting_text, varying_columns, with_known_settings  # noqa: E402

log = logging.getLogger(__name__)

# One colour per norm, in the registry's order: matplotlib's default cycle C0, C1, ...
NORM_COLOURS = {kind: f"C{i}" for i, kind in enumerate(NORMS)}
LABEL_WIDTH = 30  # characters per line of a bar's or a legend's label; longer labels wrap


def _save(fig, path: Path, dpi: int) -> None:
    """Write the figure atomically (a temporary file renamed onto ``path``)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def run_label(df: pd.DataFrame) -> pd.Series:
    """A legend label per run: its norm plus every other setting that varies (seed excluded) among the
    runs whose settings were read (an unreadable record's blanks do not make every setting vary)."""
    varying = varying_columns(with_known_settings(df), [c for c, _ in SETTINGS if c not in ("norm", "seed")])

    def label(r: pd.Series) -> str:
        return " ".join([str(r["norm"])] + [f"{c}={setting_text(r[c]) or 'null'}" for c in varying])

    return df.apply(label, axis=1)


def _wrap(label: str) -> str:
    """``label`` broken between settings into lines of at most LABEL_WIDTH characters (where it can be)."""
    return textwrap.fill(label, LABEL_WIDTH, break_long_words=False, break_on_hyphens=False)


def _histories(paths: list[Path]) -> list[pd.DataFrame]:
    out = []
    for p in paths:
        try:
            out.append(pd.DataFrame([e.as_dict() for e in RunRecord.read(p).history]))
        except (OSError, ValueError):
            out.append(pd.DataFrame())
    return out


def _curves(ax, df: pd.DataFrame, labels: pd.Series, metric: str) -> None:
    hist = _histories([Path(p) for p in df["path"]])
    for label in dict.fromkeys(labels):
        runs = [h for h, lab in zip(hist, labels) if lab == label and metric in h]
        if not runs:
            continue
        norm = label.split()[0]
        colour = NORM_COLOURS.get(norm) if labels.str.split().str[0].nunique() == labels.nunique() else None
        table = pd.concat([h.set_index("epoch")[metric] for h in runs], axis=1)
        mean = table.mean(axis=1)
        line = ax.plot(mean.index, mean.values, label=_wrap(f"{label} (n={len(runs)})" if len(runs) > 1 else label),
                       color=colour, marker="o", markersize=3)  # fmt: skip
        if len(runs) > 1:
            std = table.std(axis=1).fillna(0)
            ax.fill_between(mean.index, mean - std, mean + std, color=line[0].get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_curves(df: pd.DataFrame, out: Path) -> list[Path]:
    labels = run_label(df)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, df, labels, "train_loss")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per epoch")
    fig.tight_layout()
    _save(fig, out / "loss.png", 120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, metric, name in zip(axes, ["val_acc", "test_acc"], ["validation", "test"]):
        _curves(ax, df, labels, metric)
        ax.set_title(f"{name.capitalize()} accuracy per epoch")
        ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    _save(fig, out / "accuracy.png", 120)
    plt.close(fig)
    return [out / "loss.png", out / "accuracy.png"]


def mean_ci(grouped, confidence: float = 0.95) -> pd.DataFrame:
    """Per group of runs (``grouped``: a pandas SeriesGroupBy of one metric): mean, std, n and the
    half-width of the ``confidence`` interval of the mean, t(n-1) · std / sqrt(n) (0 for a single run)."""
    from scipy.stats import t

    stats = grouped.agg(["mean", "std", "count"])
    n = stats["count"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        half = t.ppf((1 + confidence) / 2, n - 1) * stats["std"].to_numpy() / np.sqrt(n)
    stats["ci"] = np.where(n > 1, half, 0.0)
    return stats


def _completed(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    return df[(df["status"] == "completed") & df[metric].notna()]


def bar_stats(df: pd.DataFrame, metric: str = "final_test_acc", confidence: float = 0.95) -> pd.DataFrame:
    """Per configuration (runs that differ only by seed): :func:`mean_ci`, lowest mean first."""
    done = _completed(df.assign(label=run_label(df)), metric)  # the same labels as the curves
    return mean_ci(done.groupby("label", sort=False)[metric], confidence).sort_values("mean", kind="stable")


def plot_test_accuracy_bars(df: pd.DataFrame, out: Path) -> Path:
    stats = bar_stats(df)
    labels = [_wrap(lab) for lab in stats.index]
    lines = sum(lab.count("\n") + 1 for lab in labels)
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(stats) + 0.2 * lines + 1.5))
    colours = [NORM_COLOURS.get(lab.split()[0], "tab:gray") for lab in stats.index]
    ax.barh(range(len(stats)), stats["mean"], xerr=stats["ci"], color=colours, capsize=4)
    ax.set_yticks(range(len(stats)), labels, fontsize=8)
    for y, (m, h, n) in enumerate(zip(stats["mean"], stats["ci"], stats["count"])):
        text = f"{m:.1f}% ± {h:.1f} (95% CI, n={n})" if n > 1 else f"{m:.1f}% (n=1, no interval)"
        ax.text(m + h + 0.3, y, text, va="center", fontsize=8)
    ax.axvline(70, color="k", linestyle="--", linewidth=0.8, label="70% target")
    ax.set_xlim(max(0, stats["mean"].min() - 15) if len(stats) else 0, 100)
    ax.set_xlabel("final test accuracy (%): mean over seeds, error bar 95% CI (t, n−1 dof)")
    ax.set_title("Final test accuracy per configuration")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, out / "test_accuracy.png", 120)
    plt.close(fig)
    return out / "test_accuracy.png"


def swept_numeric_settings(df: pd.DataFrame, metric: str = "final_test_acc") -> dict[str, str]:
    """{column: config key} of each numeric setting that takes two or more values among the completed
    runs of one norm: the columns of ``columns.SETTINGS`` by their config path, and any other swept key
    (its column is the key). Not the seed (the runs it tells apart are repeats), not true/false
    settings, and not one that only differs between norms (each norm's recipe: one point per line)."""
    done = _completed(df, metric)
    keys = {c: path for c, path in SETTINGS if path and c != "seed"} | {c: c for c in df.columns if "." in c}
    swept = {}
    for column, key in keys.items():
        if column not in done or pd.api.types.is_bool_dtype(done[column]) or done[column].map(type).eq(bool).any():
            continue
        numbers = pd.to_numeric(done[column], errors="coerce")
        if numbers.notna().all() and numbers.groupby(done["norm"]).nunique().max() > 1:
            swept[column] = key
    return swept


def sensitivity_lines(df: pd.DataFrame, column: str) -> pd.Series:
    """The line each run belongs to in the sensitivity plot of ``column``: its norm, plus the settings
    that vary among one norm's runs (other than ``column`` and the seed). Settings a norm's recipe
    fixes (its weight decay, Weight Standardization) do not split a norm's line."""
    others = [c for c, _ in SETTINGS if c not in ("norm", "seed", column)]
    others += [c for c in df.columns if "." in c and c != column]
    within = [c for c in others if c in df and df.groupby("norm")[c].agg(lambda s: s.astype(str).nunique()).max() > 1]

    def line(r: pd.Series) -> str:
        return " ".join([str(r["norm"])] + [f"{c}={setting_text(r[c]) or 'null'}" for c in within])

    return df.apply(line, axis=1)


def plot_sensitivity(df: pd.DataFrame, column: str, key: str, out: Path, metric: str = "final_test_acc") -> Path:
    """``sensitivity_<key>.png``: ``metric`` against the setting ``column`` (config key ``key``), one line
    per norm (:func:`sensitivity_lines`), each point the mean over seeds with its 95% interval (:func:`mean_ci`)."""
    done = _completed(df, metric)
    x, lines = pd.to_numeric(done[column]), sensitivity_lines(done, column)
    one_per_norm = lines.str.split().str[0].nunique() == lines.nunique()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    most_seeds = 1
    order = {norm: i for i, norm in enumerate(NORM_COLOURS)}  # the registry's order, as the colours
    for line in sorted(set(lines), key=lambda s: (order.get(s.split()[0], len(order)), s)):
        mine = lines == line
        stats = mean_ci(done.loc[mine, metric].groupby(x[mine])).sort_index()
        most_seeds = max(most_seeds, int(stats["count"].max()))
        ax.errorbar(stats.index, stats["mean"], yerr=stats["ci"], label=_wrap(line), marker="o", markersize=4,
                    capsize=3, color=NORM_COLOURS.get(line.split()[0]) if one_per_norm else None)  # fmt: skip
    values = np.sort(x.unique())
    if values[0] > 0 and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
    if len(values) <= 12:
        ax.set_xticks(values, [setting_text(float(v)) for v in values])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(key + (" (log scale)" if ax.get_xscale() == "log" else ""))
    spread = "mean over seeds, error bars 95% CI (t, n−1 dof)" if most_seeds > 1 else "one seed per point, no interval"
    name = metric.replace("_acc", " accuracy").replace("_", " ")  # final_test_acc: final test accuracy
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(f"{name.capitalize()} against {key}\n{spread}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"sensitivity_{key}.png"
    _save(fig, path, 120)
    plt.close(fig)
    return path


def mispredicted(job_dir: Path, k: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test-set index, true class, predicted class) of ``k`` test images the run got wrong.

    Read from the run's saved predictions (its trained model's), sampled across the whole test set.
    """
    p = np.load(job_dir / PREDICTIONS_FILE)
    wrong = np.flatnonzero(p["pred"] != p["target"])
    if len(wrong) > k:
        wrong = np.sort(np.random.default_rng(seed).choice(wrong, k, replace=False))
    return p["index"][wrong], p["target"][wrong], p["pred"][wrong]


def _test_images(result: RunRecord) -> tuple[np.ndarray, tuple[str, ...]]:
    d = result.config["data"]
    options = tuple((k, d.get(k)) for k in ("source", "labels", "extra", "image_size") if d.get(k) is not None)
    return _load_test_images(result.data_root or d["root"], d.get("format", "auto"), d.get("cache_dir"), options)


@functools.lru_cache(maxsize=2)
def _load_test_images(
    root: str, fmt: str, cache_dir: str | None, options: tuple = ()
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The test images of one dataset (``options``: the run's data.source and its own keys), loaded (and
    checksummed) once for all the runs of a sweep."""
    from normsweep.data import load_raw

    raw = load_raw(root, fmt, False, cache_dir, **dict(options))
    return raw.test_x.permute(0, 2, 3, 1).numpy(), raw.classes


def plot_mispredicted(job_dir: Path, out: Path, k: int = 25) -> Path:
    """``mispredicted.png``: up to ``k`` test images the run got wrong, 5 a row, each under its true and
    predicted class. One canvas in one axes (not an axes per image): four times faster to draw, and
    a sweep draws one per run."""
    result = RunRecord.read(job_dir)
    images, classes = _test_images(result)
    index, target, pred = mispredicted(job_dir, k)
    cols, pad, above = 5, 4, 10  # images a row; canvas pixels between images and above each (its caption)
    rows = max(1, int(np.ceil(len(index) / cols)))
    h, w = images.shape[1:3]
    cell_w, cell_h = w + pad, h + above
    canvas = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    inch = 1.9 / cell_w  # of a canvas pixel: 1.9 in per image column
    fig, ax = plt.subplots(figsize=(cols * 1.9, rows * cell_h * inch + 0.6))
    for n, (i, t, p) in enumerate(zip(index, target, pred)):
        y, x = divmod(n, cols)
        top, left = y * cell_h + above, x * cell_w + pad // 2
        canvas[top : top + h, left : left + w] = images[i]
        ax.text(left + w / 2, top - 0.5, f"true: {classes[t]}\npred: {classes[p]}", ha="center", va="bottom",
                fontsize=8, color="tab:red")  # fmt: skip
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(f"Mispredicted test images — {result.norm} norm, test acc {result.final_test_acc:.1f}%")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.5 / fig.get_figheight())
    _save(fig, out / "mispredicted.png", 110)
    plt.close(fig)
    return out / "mispredicted.png"


CONFUSION_LABELLED_CLASSES = 20  # above this many classes the matrix has no per-cell numbers and no class names


def plot_confusion(job_dir: Path, out: Path, classes: tuple[str, ...]) -> Path:
    """The test confusion matrix; each cell numbered up to :data:`CONFUSION_LABELLED_CLASSES` classes (100
    classes would be 10,000 text labels, a minute of drawing that nobody can read)."""
    p = np.load(job_dir / PREDICTIONS_FILE)
    n = len(classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (p["target"], p["pred"]), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="Blues")
    labelled = n <= CONFUSION_LABELLED_CLASSES
    if labelled:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(n if labelled else 0):
        for q in range(n):
            ax.text(q, t, matrix[t, q], ha="center", va="center", fontsize=7,
                    color="white" if matrix[t, q] > matrix.max() / 2 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"Test confusion matrix — {job_dir.name}", fontsize=9)
    fig.tight_layout()
    _save(fig, out / "confusion.png", 110)
    plt.close(fig)
    return out / "confusion.png"


def _up_to_date(outputs: list[Path], inputs: list[Path]) -> bool:
    """Whether every output exists and was written after every input last changed (strictly: a tie, within
    the filesystem's timestamp granularity, counts as changed)."""
    try:
        return min(o.stat().st_mtime_ns for o in outputs) > max(i.stat().st_mtime_ns for i in inputs)
    except FileNotFoundError:
        return False


def write_plots(df: pd.DataFrame, sweep_dirs: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = plot_curves(df, out)
    if (df["status"] == "completed").any():
        written.append(plot_test_accuracy_bars(df, out))
        written += [plot_sensitivity(df, column, key, out) for column, key in swept_numeric_settings(df).items()]
    for path in df.loc[df["status"] == "completed", "path"].map(Path):
        if not (path / PREDICTIONS_FILE).exists():
            continue
        run_out = out / path.name
        run_out.mkdir(exist_ok=True)
        drawn = [run_out / "mispredicted.png", run_out / "confusion.png"]
        if _up_to_date(drawn, [path / PREDICTIONS_FILE, path / RESULTS_FILE]):
            written += drawn  # a report run again over a grown or resumed sweep redraws only the runs that changed
            continue
        try:
            written.append(plot_mispredicted(path, run_out))
            classes = RunRecord.read(path).classes or CLASSES
            written.append(plot_confusion(path, run_out, tuple(classes)))
        except Exception as e:  # missing data for the images: the other plots still count
            log.warning("per-run plots for %s not written: %s: %s", path, type(e).__name__, e)
    return written
