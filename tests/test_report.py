"""The comparison table and plots, on sweep directories built here from known results.json files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normsweep.report.runs import ReportError, collect
from normsweep.report.tables import main, write_report

from .conftest import batch_size_sweep, record_config, write_run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    s = tmp_path / "sweep"
    write_run(s / "0_norm=batch,trainer.seed=0", "batch", 0, test=80.0, val=81.0)
    write_run(s / "1_norm=batch,trainer.seed=1", "batch", 1, test=82.0, val=83.0)
    write_run(s / "2_norm=layer,trainer.seed=0", "layer", 0, test=75.0, val=76.0)
    write_run(s / "3_norm=layer,trainer.seed=1", "layer", 1, test=78.0, val=77.0)
    write_run(s / "4_norm=group,trainer.seed=0", "group", 0, test=0, val=20.0, status="failed",
              error="NonFiniteLossError: training loss is nan in epoch 1\nTraceback ...")  # fmt: skip
    unfinished = s / "5_norm=group,trainer.seed=1" / ".hydra"  # killed before its first results.json
    unfinished.mkdir(parents=True)
    (unfinished / "overrides.yaml").write_text("- norm=group\n- trainer.seed=1\n")
    (unfinished / "config.yaml").write_text(json.dumps(record_config("group", 1)))
    return s


def test_table_has_a_row_per_run_sorted_by_test_accuracy_with_failures_listed(sweep: Path) -> None:
    df = collect([sweep])
    assert len(df) == 6
    assert df["final_test_acc"].tolist()[:4] == [82.0, 80.0, 78.0, 75.0]
    assert df["norm"].tolist() == ["batch", "batch", "layer", "layer", "group", "group"]
    assert df["seed"].tolist()[:4] == [1, 0, 1, 0]
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["error"] == "NonFiniteLossError: training loss is nan in epoch 1"
    unfinished = df[df["status"] == "unfinished"].iloc[0]
    assert unfinished["norm"] == "group" and unfinished["seed"] == 1
    assert {"augment", "optimizer", "lr", "dropout", "batch_size", "params", "final_train_loss"} <= set(df.columns)


def test_csv_and_markdown_are_written_with_exact_values(sweep: Path) -> None:
    write_report([sweep], plots=False)
    csv = pd.read_csv(sweep / "results.csv")
    assert csv["final_test_acc"].tolist()[:4] == [82.0, 80.0, 78.0, 75.0]
    assert csv["status"].tolist() == ["completed"] * 4 + ["failed", "unfinished"]
    md = (sweep / "results.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header, rows = cells(lines[0]), [cells(line) for line in lines[2:]]  # after header and rule
    assert len(rows) == 6
    assert header[:2] == ["run", "norm"] and "job" not in header and "path" not in header
    assert rows[0][:2] == ["1", "batch"] and "82.00" in rows[0]  # the job number, not its directory's name
    assert "failed" in rows[4] and "NonFiniteLossError" in rows[4][-1]
    assert "lr=0.2" in md  # settings shared by every run are stated once above the table
    assert "trainer.seed=" not in md  # no job directory names
    assert csv["run"].tolist()[:2] == [1, 0] and csv["job"][0] == "1_norm=batch,trainer.seed=1"  # the CSV has both


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_run_ids_are_short_and_unique_across_merged_sweeps(tmp_path: Path) -> None:
    for sweep, seed in (("seed0", 0), ("seed1", 1)):  # two sweeps, each with its jobs 0 and 1
        for i, norm in enumerate(("batch", "group")):
            job = tmp_path / sweep / f"{i}_data.val_size=2000,experiment=batch_size,norm={norm},trainer.seed={seed}"
            write_run(job, norm, seed, test=80.0 - i + seed, val=80.0)
            res = json.loads((job / "results.json").read_text())
            res["overrides"] += ["data.val_size=2000", "experiment=batch_size"]
            (job / "results.json").write_text(json.dumps(res))
    write_report([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "merged", plots=False)
    csv = pd.read_csv(tmp_path / "merged" / "results.csv")
    assert csv["run"].tolist() == ["seed1/0", "seed0/0", "seed1/1", "seed0/1"]  # best test accuracy first
    assert csv["job"][0].startswith("0_data.val_size=2000,experiment=batch_size")
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "experiment=batch_size" in md.splitlines()[2] and "data.val_size=2000" in md.splitlines()[2]
    header = cells(next(line for line in md.splitlines() if line.startswith("|")))
    assert header[:3] == ["run", "norm", "seed"] and "experiment" not in header  # the same in every run: above
    write_report([tmp_path / "seed0"], plots=False)  # one sweep: the job number alone
    assert pd.read_csv(tmp_path / "seed0" / "results.csv")["run"].tolist() == [0, 1]


def test_runs_differing_only_by_seed_are_grouped_with_mean_std_and_n(sweep: Path) -> None:
    write_report([sweep], plots=False)
    g = pd.read_csv(sweep / "results_by_config.csv")
    assert g["norm"].tolist() == ["batch", "layer"]  # failed/unfinished runs are not averaged
    batch, layer = g.iloc[0], g.iloc[1]
    assert (batch["final_test_acc_mean"], layer["final_test_acc_mean"]) == (81.0, 76.5)
    assert batch["final_test_acc_std"] == pytest.approx(np.std([80.0, 82.0], ddof=1))
    assert layer["best_val_acc_std"] == pytest.approx(np.std([76.0, 77.0], ddof=1))
    assert batch["n"] == 2 and layer["n"] == 2
    md = (sweep / "results_by_config.md").read_text()
    assert "81.00 ± 1.41" in md and "76.50 ± 2.12" in md
    assert cells(next(line for line in md.splitlines() if line.startswith("|")))[:2] == ["norm", "n"]  # n, if equal


def test_no_grouped_table_without_repeated_seeds(tmp_path: Path) -> None:
    write_run(tmp_path / "s" / "0", "batch", 0, 80.0, 81.0)
    write_run(tmp_path / "s" / "1", "layer", 0, 70.0, 71.0)
    write_report([tmp_path / "s"], plots=False)
    assert (tmp_path / "s" / "results.csv").exists() and not (tmp_path / "s" / "results_by_config.csv").exists()
    assert not (tmp_path / "s" / "comparisons.csv").exists() and not (tmp_path / "s" / "comparisons.md").exists()


def test_several_sweep_directories_merge_into_one_table(tmp_path: Path) -> None:
    write_run(tmp_path / "a" / "0", "batch", 0, 80.0, 81.0)
    write_run(tmp_path / "b" / "0", "group", 0, 79.0, 80.0)
    df = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", plots=False)
    assert df["norm"].tolist() == ["batch", "group"]
    assert (tmp_path / "merged" / "results.md").exists()


def test_empty_directory_gives_a_clear_message(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no runs under .*empty"):
        collect([tmp_path / "empty"])
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_curves_and_bars_are_drawn(sweep: Path) -> None:
    write_report([sweep])
    for name in ("loss.png", "accuracy.png", "test_accuracy.png"):
        path = sweep / "plots" / name
        assert path.stat().st_size > 10_000, name
    assert (sweep / "results.csv").exists()  # per-run image plots need the data: skipped, tables kept


def test_a_report_run_again_redraws_only_the_runs_whose_files_changed(sweep: Path, monkeypatch) -> None:
    from normsweep.report import plots

    monkeypatch.setattr(
        plots, "_load_test_images", lambda *a: (np.zeros((20, 32, 32, 3), np.uint8), tuple("abcdefghij"))
    )
    drawn: list[str] = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: (drawn.append(path.relative_to(sweep / "plots").as_posix()),
                                                                save(fig, path, dpi)))  # fmt: skip
    per_run = lambda: sorted(d for d in drawn if "/" in d)  # noqa: E731
    for f in sweep.glob("*/*"):  # runs that finished a while ago
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 10**9))
    write_report([sweep])
    completed = sorted(
        p.parent.name for p in sweep.glob("*/results.json") if json.loads(p.read_text())["status"] == "completed"
    )
    assert per_run() == sorted(f"{j}/{f}" for j in completed for f in ("confusion.png", "mispredicted.png"))

    drawn.clear()
    write_report([sweep])  # nothing changed: only the sweep's own figures are drawn again
    assert per_run() == [] and "test_accuracy.png" in drawn
    assert (sweep / "plots" / completed[0] / "mispredicted.png").stat().st_size > 10_000

    drawn.clear()
    changed = sweep / completed[1] / "results.json"  # a run resumed or re-run since
    changed.write_text(changed.read_text().replace('"final_test_acc": 82.0', '"final_test_acc": 84.0'))
    later = (sweep / "plots" / completed[1] / "confusion.png").stat().st_mtime_ns + 10**9
    os.utime(changed, ns=(later, later))
    write_report([sweep])
    assert per_run() == [f"{completed[1]}/confusion.png", f"{completed[1]}/mispredicted.png"]


def test_a_running_record_is_running_while_its_process_lives_and_stopped_after(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    s = tmp_path / "sweep"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, host, pid in [("live", socket.gethostname(), os.getpid()), ("dead", socket.gethostname(), int(dead.stdout)),
                            ("elsewhere", "another-host", 1)]:  # fmt: skip
        write_run(s / name, "batch", 0, test=0, val=10.0, status="running")
        res = json.loads((s / name / "results.json").read_text())
        (s / name / "results.json").write_text(json.dumps({**res, "host": host, "pid": pid}))
    df = collect([s]).set_index("job")
    assert df.loc["live", "status"] == "running" and df.loc["elsewhere", "status"] == "running"
    assert df.loc["dead", "status"] == "stopped" and "ended before the run finished" in df.loc["dead", "error"]


def test_settings_keep_their_precision_and_metrics_get_two_decimals(tmp_path: Path) -> None:
    s = tmp_path / "sweep"
    for i, wd in enumerate((5e-4, 1e-3)):
        write_run(s / f"{i}_wd", "layer", 0, test=81.2345, val=80.0)
        res = json.loads((s / f"{i}_wd" / "results.json").read_text())
        res["config"]["optimizer"]["weight_decay"] = wd
        (s / f"{i}_wd" / "results.json").write_text(json.dumps(res))
    write_report([s], plots=False)
    rows = [cells(line) for line in (s / "results.md").read_text().splitlines() if line.startswith("|")][2:]
    assert sorted(c[2] for c in rows) == ["0.0005", "0.001"]  # not 0.00 for both
    assert all("81.23" in c for c in rows)


def _drawn_labels(monkeypatch) -> dict[str, list[str]]:
    """Per figure written: its bars' tick labels and its legends' entries, read from the figure as saved."""
    import normsweep.report.plots as plots

    drawn: dict[str, list[str]] = {}
    save = plots._save

    def record(fig, path: Path, dpi: int) -> None:
        texts = [t.get_text() for ax in fig.axes if ax.get_title().startswith("Final") for t in ax.get_yticklabels()]
        texts += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        drawn[path.name] = texts
        save(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", record)
    return drawn


def test_an_unreadable_record_leaves_the_labels_to_the_settings_the_readable_runs_differ_by(
    tmp_path: Path, monkeypatch, recwarn
) -> None:
    s = tmp_path / "sweep"
    write_run(s / "0", "batch", 0, test=80.0, val=81.0)
    write_run(s / "1", "batch", 1, test=82.0, val=83.0)
    write_run(s / "2", "layer", 0, test=75.0, val=76.0, lr=0.1)
    write_run(s / "3", "group", 0, test=79.0, val=80.0)
    (s / "3" / "results.json").write_text('{"status": "compl')  # damaged: no settings can be read from it
    drawn = _drawn_labels(monkeypatch)
    df = write_report([s])
    assert df.set_index("job").loc["3", "status"] == "unreadable"
    assert drawn["test_accuracy.png"][:2] == ["layer lr=0.1", "batch lr=0.2"]  # lowest mean first
    assert set(drawn["accuracy.png"]) == {"batch lr=0.2 (n=2)", "layer lr=0.1"}
    assert not [w for w in recwarn if "layout" in str(w.message)], [str(w.message) for w in recwarn]
    for name in ("loss.png", "accuracy.png", "test_accuracy.png"):
        assert (s / "plots" / name).stat().st_size > 10_000, name


def test_long_labels_wrap_and_the_figures_still_fit(tmp_path: Path, monkeypatch, recwarn) -> None:
    from normsweep.report.plots import LABEL_WIDTH

    s = tmp_path / "sweep"
    for i, (norm, lr, wd, batch, dropout) in enumerate(
        [("batch", 0.2, 5e-4, 512, 0.0), ("layer", 0.1, 1e-3, 256, 0.1), ("group", 0.05, 1e-3, 128, 0.2)]
    ):
        write_run(s / str(i), norm, 0, test=70.0 + i, val=71.0 + i, lr=lr)
        res = json.loads((s / str(i) / "results.json").read_text())
        res["config"]["optimizer"]["weight_decay"], res["config"]["model"]["dropout"] = wd, dropout
        res["config"]["trainer"]["batch_size"] = batch
        (s / str(i) / "results.json").write_text(json.dumps(res))
    drawn = _drawn_labels(monkeypatch)
    write_report([s])
    bars = drawn["test_accuracy.png"][:3]
    assert bars[0].split() == "batch lr=0.2 weight_decay=0.0005 dropout=0 batch_size=512".split()
    assert all("\n" in label for label in bars)
    assert max(len(line) for label in bars + drawn["loss.png"] for line in label.splitlines()) <= LABEL_WIDTH
    assert not [w for w in recwarn if "layout" in str(w.message)], [str(w.message) for w in recwarn]
    assert (s / "plots" / "test_accuracy.png").stat().st_size > 10_000


# ------------------------------------------------------------------ sensitivity plots


def _drawn_lines(monkeypatch) -> dict[str, dict]:
    """Per figure written: its x scale and label, and per error-bar line its points (x, mean, interval half-width)."""
    import normsweep.report.plots as plots

    drawn: dict[str, dict] = {}
    save = plots._save

    def record(fig, path: Path, dpi: int) -> None:
        save(fig, path, dpi)
        if not path.name.startswith("sensitivity_"):
            return
        ax = fig.axes[0]
        lines = {}
        for c in ax.containers:
            x, y = c.lines[0].get_xdata(), c.lines[0].get_ydata()
            bars = c.lines[2][0].get_segments() if c.lines[2] else [[(0, 0), (0, 0)]] * len(x)
            half = [(bar[1][1] - bar[0][1]) / 2 for bar in bars]
            lines[c.get_label()] = [(float(a), float(b), round(float(h), 6)) for a, b, h in zip(x, y, half)]
        drawn[path.name] = {"xscale": ax.get_xscale(), "xlabel": ax.get_xlabel(), "lines": lines}

    monkeypatch.setattr(plots, "_save", record)
    return drawn


def test_a_swept_batch_size_gets_a_sensitivity_plot_one_line_per_norm_with_95_percent_intervals(
    tmp_path: Path, monkeypatch, recwarn
) -> None:
    from scipy.stats import t

    def accuracy(norm: str, batch: int, seed: int) -> float:  # BN collapses at small batches, the others hold
        drop = {"batch": {2: 30.0, 8: 8.0}, "group": {2: 1.0}, "frn": {}}[norm].get(batch, 0.0)
        return 80.0 - drop + (1.0 if seed else -1.0) * (2.0 if batch == 2 else 0.5)

    s = tmp_path / "sweep"
    batch_size_sweep(s, accuracy)
    drawn = _drawn_lines(monkeypatch)
    write_report([s])
    figure = drawn["sensitivity_trainer.batch_size.png"]
    assert figure["xscale"] == "log" and figure["xlabel"].startswith("trainer.batch_size")  # 2..256: a ratio of 128
    assert set(figure["lines"]) == {"batch", "group", "frn"}  # not split by group's WS and weight decay
    half_2, half_big = (t.ppf(0.975, 1) * np.std(d, ddof=1) / np.sqrt(2) for d in ([-2.0, 2.0], [-0.5, 0.5]))
    expected = [(2.0, 50.0, half_2), (8.0, 72.0, half_big), (64.0, 80.0, half_big), (256.0, 80.0, half_big)]
    assert figure["lines"]["batch"] == [(x, y, round(h, 6)) for x, y, h in expected]
    assert [y for _, y, _ in figure["lines"]["group"]] == [79.0, 80.0, 80.0, 80.0]
    assert (s / "plots" / "sensitivity_trainer.batch_size.png").stat().st_size > 10_000
    # no plot for the seed, for WS (true/false), for the lr (one value) or for the weight decay (it differs
    # between norms only, by their recipes: one point per line)
    assert [p.name for p in (s / "plots").glob("sensitivity_*.png")] == ["sensitivity_trainer.batch_size.png"]
    assert not [w for w in recwarn if "layout" in str(w.message)], [str(w.message) for w in recwarn]


def test_any_swept_numeric_key_gets_its_plot_linear_x_for_a_narrow_range_and_lines_split_by_other_swept_settings(
    tmp_path: Path, monkeypatch
) -> None:
    from normsweep.report.plots import swept_numeric_settings

    s = tmp_path / "sweep"
    for i, (norm, momentum, lr) in enumerate((n, m, lr) for n in ("batch", "layer") for m in (0.8, 0.9)
                                            for lr in (0.1, 0.2)):  # fmt: skip
        write_run(s / str(i), norm, 0, test=70.0 + 10 * momentum + lr, val=70.0, lr=lr)
        res = json.loads((s / str(i) / "results.json").read_text())
        res["overrides"] += [f"optimizer.momentum={momentum}"]  # a key the table has no column for
        (s / str(i) / "results.json").write_text(json.dumps(res))
    drawn = _drawn_lines(monkeypatch)
    df = write_report([s])
    assert swept_numeric_settings(df) == {"lr": "optimizer.lr", "optimizer.momentum": "optimizer.momentum"}
    momentum = drawn["sensitivity_optimizer.momentum.png"]
    assert momentum["xscale"] == "linear"  # 0.8..0.9
    assert set(momentum["lines"]) == {"batch lr=0.1", "batch lr=0.2", "layer lr=0.1", "layer lr=0.2"}
    assert momentum["lines"]["layer lr=0.2"] == [(0.8, 78.2, 0.0), (0.9, 79.2, 0.0)]  # one seed: no interval
    lr_lines = {f"{n} optimizer.momentum={m}" for n in ("batch", "layer") for m in ("0.8", "0.9")}
    assert set(drawn["sensitivity_optimizer.lr.png"]["lines"]) == lr_lines


def test_the_data_each_run_read_is_a_column_where_the_runs_differ_in_it(tmp_path: Path) -> None:
    s = tmp_path / "sweep"
    facts = {"cifar10": (10, 32), "cifar100": (100, 32), "folder": (12, 64)}
    for i, (name, (classes, size)) in enumerate(facts.items()):
        write_run(s / f"{i}_data={name}", "batch", 0, test=70.0 + i, val=70.0, dataset=name, num_classes=classes,
                  image_size=size)  # fmt: skip
    df = collect([s]).set_index("dataset")
    assert {name: (df.loc[name, "num_classes"], df.loc[name, "image_size"]) for name in facts} == facts
    write_report([s], plots=False)
    header = next(line for line in (s / "results.md").read_text().splitlines() if line.startswith("|   run"))
    assert "dataset" in header and "num_classes" in header and "image_size" in header
    same = tmp_path / "same"
    for seed in (0, 1):
        write_run(same / f"{seed}_seed={seed}", "batch", seed, test=70.0, val=70.0, dataset="cifar10", num_classes=10,
                  image_size=32)  # fmt: skip
    write_report([same], plots=False)
    page = (same / "results.md").read_text()
    header = next(line for line in page.splitlines() if line.startswith("|   run"))
    assert "dataset" not in header and "dataset=cifar10" in page  # the same in every run: said once, above
