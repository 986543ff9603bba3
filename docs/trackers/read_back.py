"""Read a real sweep back through each tracker's own reader and write the README's figure and tables.

    python docs/trackers/read_back.py --tensorboard SWEEP_DIR      # what `tensorboard --logdir SWEEP_DIR` shows
    python docs/trackers/read_back.py --mlflow sqlite:///mlruns.db --experiment NAME   # what `mlflow ui` shows
    python docs/trackers/read_back.py --dashboard STORAGE          # what `optuna-dashboard STORAGE` shows

Nothing here reads normsweep's own files: TensorBoard's EventMultiplexer, MLflow's MlflowClient and
optuna-dashboard's WSGI app (its JSON API) are the readers, as in tests/test_trackers.py.
Output goes beside this script (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import wsgiref.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent


def tensorboard(sweep: Path, out: Path) -> None:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(sweep))
    mux.Reload()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = []
    for run in sorted(mux.Runs()):
        tags = mux.GetAccumulator(run).Tags()["scalars"]
        if "test_acc" not in tags:
            continue
        name = Path(run).name
        for ax, tag in zip(axes, ("test_acc", "train_loss")):
            events = mux.Scalars(run, tag)
            ax.plot([e.step for e in events], [e.value for e in events], marker=".", label=name)
            ax.set(xlabel="epoch (step)", title=f"{tag} (TensorBoard scalars)")
        shown = ("final_test_acc", "final_test_acc_tta", "best_val_acc")  # of the HParams view's final metrics
        final = {m: mux.Scalars(run, f"final/{m}")[-1].value for m in shown if f"final/{m}" in tags}
        rows.append({"run": name, "epochs logged": len(mux.Scalars(run, "test_acc")),
                     "last test_acc": mux.Scalars(run, "test_acc")[-1].value, **final})  # fmt: skip
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{sweep.name}: read back with tensorboard's EventMultiplexer")
    fig.tight_layout()
    fig.savefig(out / "tensorboard_scalars.png", dpi=110)
    (out / "tensorboard_runs.md").write_text(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f") + "\n")


def mlflow(uri: str, experiment: str, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    rows = []
    for run in sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.run_name):
        history = client.get_metric_history(run.info.run_id, "test_acc")
        rows.append({
            "run": run.info.run_name, "status": run.info.status, "norm.kind": run.data.params.get("norm.kind"),
            "norm.ws": run.data.params.get("norm.ws"), "optimizer.weight_decay": run.data.params.get("optimizer.weight_decay"),
            "test_acc steps": ",".join(str(m.step) for m in sorted(history, key=lambda m: m.step)),
            "final_test_acc": f"{run.data.metrics.get('final_test_acc', float('nan')):.2f}",
            "final_test_acc_tta": f"{run.data.metrics.get('final_test_acc_tta', float('nan')):.2f}",
            "artifacts": ", ".join(sorted(a.path for a in client.list_artifacts(run.info.run_id))),
        })  # fmt: skip
    (out / "mlflow_runs.md").write_text(
        f"Experiment `{experiment}` in `{uri}`, read back with `MlflowClient`:\n\n"
        + pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
        + "\n"  # params as MLflow holds them
    )


def dashboard(storage: str, out: Path) -> None:
    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage)

    def get(path: str) -> dict:
        environ: dict = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING="")
        body = b"".join(app(environ, lambda status, headers, exc_info=None: None))
        return json.loads(body)

    rows = []
    for study in get("/api/studies")["study_summaries"]:
        trials = get(f"/api/studies/{study['study_id']}")["trials"]
        states = pd.Series([t["state"] for t in trials]).value_counts().to_dict()
        done = [t for t in trials if t["state"] == "Complete"]
        best = max(done, key=lambda t: t["values"][0]) if done else None
        rows.append({
            "study": study["study_name"], "trials": len(trials), **{s: states.get(s, 0) for s in ("Complete", "Pruned", "Fail", "Running")},
            "best value (val %)": best["values"][0] if best else None,
            "best params": ", ".join(f"{p['name']}={float(p['param_external_value']):.3g}" for p in best["params"]) if best else "",
            "epochs reported (best)": len(best["intermediate_values"]) if best else None,
        })  # fmt: skip
    (out / "optuna_dashboard.md").write_text(
        f"`optuna-dashboard {storage}`, read back through its WSGI app (`/api/studies`, `/api/studies/<id>`):\n\n"
        + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f")
        + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensorboard", type=Path, metavar="SWEEP_DIR")
    p.add_argument("--mlflow", metavar="TRACKING_URI")
    p.add_argument("--experiment", help="the MLflow experiment (normsweep names it after the sweep dir)")
    p.add_argument("--dashboard", metavar="STORAGE")
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tensorboard:
        tensorboard(args.tensorboard, args.out)
    if args.mlflow:
        mlflow(args.mlflow, args.experiment, args.out)
    if args.dashboard:
        dashboard(args.dashboard, args.out)


if __name__ == "__main__":
    main()
