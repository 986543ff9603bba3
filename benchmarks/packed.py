"""Seeds packed into one stacked model (normsweep.run.packed) against the same seeds trained one after another.

    python benchmarks/packed.py [--data-root PATH] [--device cuda] [--norms batch group layer] [--seeds 0 1 2]
                                [--epochs 20] [--out DIR] [KEY=VALUE ...]

For each norm at its recipe (KEY=VALUE overrides go to every run): K separate runs in this process, one after
another (``train`` with ``trainer.seed`` = each seed: the launch count of K runs, without K process starts),
then the K seeds packed (``train_packed``). Both train the same seeds on the same data already on the device,
so the ratio of their training times is what packing itself buys; the one-process-per-run sweep's time is the
GPU check's sweep stage. Reported per norm and mode: training seconds (every epoch with its evaluation),
images per second (K x images per epoch x epochs / seconds), each seed's final test accuracy and their mean.
Results go to OUT/packed-<host>.csv and .md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA_ROOT = os.environ.get("NORMSWEEP_DATA", str(REPO.parent / "shared/data/cifar10-jpg"))


def config(overrides: list[str]):
    """The validated Config ``python -m normsweep OVERRIDES`` would run."""
    from hydra import compose, initialize_config_module

    from normsweep.config import register_configs, to_config

    register_configs()
    with initialize_config_module("normsweep.conf", version_base="1.3"):
        return to_config(compose("train", overrides=overrides))


def measure(norm: str, seeds: list[int], a: argparse.Namespace) -> list[dict]:
    from normsweep.base.runtime import resolve_device
    from normsweep.data import Split, Splits
    from normsweep.run.build import model_from_config
    from normsweep.run.job import load_splits
    from normsweep.run.packed import train_packed
    from normsweep.run.train import images_per_epoch, train

    cfg = config([f"norm={norm}", f"trainer.epochs={a.epochs}", "trainer.progress=false", *a.overrides])
    device = resolve_device(a.device)
    splits = load_splits(cfg.data, str(Path(a.data_root).resolve()))  # every data.* key, as a run reads them
    images = (
        images_per_epoch(len(splits.train.y), cfg.trainer.batch_size, cfg.trainer.drop_last) * a.epochs * len(seeds)
    )

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    def separate(data: Splits, epochs: int):
        finals = []
        for seed in seeds:
            run_cfg = replace(cfg, trainer=replace(cfg.trainer, epochs=epochs, seed=seed))
            torch.manual_seed(seed)
            model = model_from_config(run_cfg, data.info.num_classes, data.info.image_size)
            finals.append(train(model, run_cfg, data, device)[-1].test_acc)
        return finals

    def packed(data: Splits, epochs: int):
        run_cfg = replace(cfg, trainer=replace(cfg.trainer, epochs=epochs))
        return [h[-1].test_acc for _, h in train_packed(run_cfg, seeds, data, device)]

    # Warm-up: each mode's first kernels (cuDNN's algorithm search, the allocator's first blocks) on two batches.
    few = 2 * cfg.trainer.batch_size
    small = Splits(*(Split(s.x[:few], s.y[:few], s.index[:few]) for s in (splits.train, splits.val, splits.test)),
                   splits.info)  # fmt: skip
    for fn in (separate, packed):
        fn(small, 1)
    rows = []
    for mode, fn in (("separate", separate), ("packed", packed)):
        finals, seconds = timed(lambda fn=fn: fn(splits, a.epochs))
        rows.append({"norm": norm, "mode": mode, "seeds": len(seeds), "epochs": a.epochs, "seconds": round(seconds, 2),
                     "images_per_s": round(images / seconds), "test_acc": [round(x, 2) for x in finals],
                     "mean_test_acc": round(sum(finals) / len(finals), 2), "device": str(device)})  # fmt: skip
        print(rows[-1], flush=True)
    rows[-1]["speedup"] = round(rows[0]["seconds"] / rows[-1]["seconds"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--device", default="auto")
    p.add_argument("--norms", nargs="+", default=["batch", "group", "layer"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    import pandas as pd

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"packed-{socket.gethostname()}"
    rows: list[dict] = []
    for norm in a.norms:  # the tables rewritten after each norm: a run stopped at a deadline keeps what it measured
        rows += measure(norm, a.seeds, a)
        df = pd.DataFrame(rows)
        df.to_csv(stem.with_suffix(".csv"), index=False)
        stem.with_suffix(".md").write_text(f"`{' '.join(sys.argv)}`\n\n" + df.to_markdown(index=False) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
