"""Training throughput: the study's own pipeline against normsweep's, on this machine.

    python benchmarks/throughput.py [--data-root PATH] [--repeats 3] [--steps 12] [--time-to-target]
                                    [--norms batch ...] [--pipelines study normsweep ...]

Pipelines, each with batch 512 and SGD, for each of batch/group/layer norm:

  (a) study    - the study as it ran: per-sample torchvision transforms (ColorJitter(.1,.1,.1,.1),
                 RandomHorizontalFlip(0.3), RandomRotation(10), ToTensor, Normalize) on PIL
                 images in a DataLoader with 2 workers, its 37,098-parameter network, fp32;
  (b) normsweep- the same network, batch and augmentation through normsweep's path as its
                 defaults set it: data resident on the device as uint8, augmentation on whole
                 batches, channels_last, bf16 autocast where the hardware has native bf16
                 (trainer.bf16=null; the `bf16` column says whether it was on), its cheaper
                 dropout mask (models.Dropout) and malloc setting (runtime.keep_freed_memory);
                 the batches and the training step are normsweep's own (train.batches,
                 train.make_step: what train() runs, less the per-step learning-rate schedule);
  (c) default  - normsweep's default recipe (its own 47,600-parameter network, crop+flip), same
                 defaults;
  (b') normsweep_fp32 - (b) with bf16 off (trainer.bf16=false), for information.

Each measurement runs in a fresh subprocess (so peak memory is its own), after a warm-up, and
(a), (b), (c) alternate within every repeat so that machine noise hits all of them. Reported:
median images/s, seconds per 45,000-image epoch (training steps only), the ratios (b)/(a) and
(c)/(a), and peak memory (RSS of the process and its DataLoader workers on CPU, max allocated on
GPU). ``--time-to-target`` also trains the default recipe per norm until the test accuracy
reaches 70% and reports the wall time (training plus per-epoch evaluation).

Results go to benchmarks/results/throughput-<host>.csv and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

BATCH = 512
NORMS = ("batch", "group", "layer")  # the study's three; any of normsweep.norms.NORMS via --norms
PIPELINES = ("study", "normsweep", "default", "normsweep_fp32")
GROUPS = {"study": 2, "normsweep": 2, "default": 4, "normsweep_fp32": 2}
DEFAULT_DATA_ROOT = os.environ.get("NORMSWEEP_DATA", str(REPO.parent / "shared/data/cifar10-jpg"))


# ------------------------------------------------------------------ one measurement (a subprocess)


def _peak_memory_mb(device: torch.device) -> float:
    """A run's peak memory (normsweep.base.runtime.peak_memory_mb) plus its largest DataLoader worker on CPU."""
    from normsweep.base.runtime import peak_memory_mb

    if device.type == "cuda":
        return peak_memory_mb(device)
    return peak_memory_mb(device) + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _study_batches(raw, device):
    """The study's input pipeline, as it ran: PIL images, per-sample transforms, DataLoader(2 workers)."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from normsweep.data import MEAN, STD

    class CIFARLike(Dataset):  # what torchvision.datasets.CIFAR10 does per item
        def __init__(self, x, y, transform):
            self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.numpy(), transform

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(np.ascontiguousarray(self.x[i]))), int(self.y[i])

    transform = T.Compose([
        T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1),
        T.RandomHorizontalFlip(p=0.3),
        T.RandomRotation((-10.0, 10.0)),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])  # fmt: skip
    loader = DataLoader(CIFARLike(raw.train_x, raw.train_y, transform), batch_size=BATCH, shuffle=True,
                        num_workers=2, pin_memory=device.type == "cuda", persistent_workers=True)  # fmt: skip
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _normsweep_batches(raw, device, augment_cfg, channels_last: bool):
    """normsweep's input pipeline: the batches train() iterates (normsweep.run.train.batches), epoch after epoch."""
    from normsweep.run.train import batches

    x_all, y_all = raw.train_x.to(device), raw.train_y.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    while True:
        yield from batches(x_all, y_all, BATCH, augment_cfg, gen, fmt, info=raw.info)


def measure(
    pipeline: str, norm: str, steps: int, warmup: int, data_root: str, device_name: str, min_seconds: float = 0.0
) -> dict:
    """Images/s of ``steps`` training steps (after ``warmup``; repeated until ``min_seconds`` have passed) of one pipeline and norm."""
    from normsweep.base.runtime import keep_freed_memory, resolve_device, use_bf16
    from normsweep.config import AugmentConfig
    from normsweep.data import load_raw
    from normsweep.models import Dropout, build_model, count_params
    from normsweep.run.train import make_step

    device = resolve_device(device_name)
    if pipeline != "study" and device.type == "cpu":
        keep_freed_memory()  # as a normsweep job does
    from omegaconf import OmegaConf

    from normsweep.norms import NORMS

    raw = load_raw(data_root)
    norm_conf = OmegaConf.load(REPO / "conf" / "norm" / f"{norm}.yaml")
    options = {key: norm_conf[key] for key in NORMS[norm].options}  # a norm's own keys (FRN's eps, ...)
    torch.manual_seed(0)
    if pipeline == "default":
        model = build_model("resnet", norm, GROUPS[pipeline], 0.0, [16, 24, 36, 56], [1, 1, 0], norm_options=options)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        model = build_model("study", norm, GROUPS[pipeline], 0.02, norm_options=options)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if pipeline == "study":  # the study's network as it wrote it: torch's own dropout
        for m in model.modules():
            if isinstance(m, Dropout):
                m.forward = types.MethodType(torch.nn.Dropout.forward, m)
    channels_last = pipeline != "study"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if pipeline == "study":
        batches = _study_batches(raw, device)
    else:
        aug = (AugmentConfig(crop_padding=4, flip_p=0.5) if pipeline == "default" else
               AugmentConfig(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, flip_p=0.3, rotate_deg=10.0))  # fmt: skip
        batches = _normsweep_batches(raw, device, aug, channels_last)
    del raw
    smoothing = 0.1 if pipeline == "default" else 0.0

    bf16 = pipeline in ("normsweep", "default") and use_bf16(None, device)  # normsweep's default: auto
    if pipeline == "study":  # the study's own loop: plain fp32 step

        def train_step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:  # normsweep's own step, as train() takes it
        train_step = make_step(model, opt, bf16=bf16, label_smoothing=smoothing)

    def step() -> int:
        x, y = next(batches)
        train_step(x, y)
        return len(y)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = 0
    while True:  # chunks of `steps` until at least min_seconds have passed (a GPU does 30 steps in 0.2 s)
        images += sum(step() for _ in range(steps))  # normsweep's batches: an epoch's last one may be smaller
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if seconds >= min_seconds:
            break
    return {
        "pipeline": pipeline,
        "norm": norm,
        "params": count_params(model),
        "bf16": bf16,
        "images_per_s": images / seconds,
        "peak_mem_mb": _peak_memory_mb(device),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
    }


# ------------------------------------------------------------------ time to the target accuracy


def time_to_target(norm: str, target: float, data_root: str, device_name: str) -> dict:
    """Train the default recipe until test accuracy >= target; wall seconds including evaluation."""
    from hydra import compose, initialize_config_dir

    from normsweep.base.runtime import resolve_device
    from normsweep.config import register_configs, to_config
    from normsweep.data import load_raw, make_splits
    from normsweep.run.build import model_from_config
    from normsweep.run.train import train

    class Reached(Exception):
        pass

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_config(
            compose("train", overrides=[f"norm={norm}", f"trainer.device={device_name}", "trainer.progress=false"])
        )
    splits = make_splits(load_raw(data_root), cfg.data.val_size)
    torch.manual_seed(cfg.trainer.seed)
    model = model_from_config(cfg)
    seen: list = []

    def on_epoch(history):
        seen[:] = history
        if history[-1].test_acc >= target:
            raise Reached

    t0 = time.perf_counter()
    try:
        train(model, cfg, splits, resolve_device(device_name), on_epoch)
    except Reached:
        pass
    wall = time.perf_counter() - t0
    reached = bool(seen) and seen[-1].test_acc >= target
    return {"norm": norm, "target": target, "reached": reached, "epochs": len(seen),
            "test_acc": seen[-1].test_acc if seen else None, "seconds": wall if reached else None,
            "peak_rss_mb": _peak_memory_mb(torch.device("cpu"))}  # fmt: skip


def _from_sweep(sweep: Path, target: float, med) -> str:
    import pandas as pd

    from normsweep.base.results import RESULTS_FILE, RunRecord

    rows = []
    for f in sorted(sweep.glob(f"*/{RESULTS_FILE}")):
        res = RunRecord.read(f.parent)
        hist = res.history
        hit = next((i for i, h in enumerate(hist) if h.test_acc >= target), None)
        speed = med[(med["pipeline"] == "default") & (med["norm"] == res.norm)]["images_per_s"]
        n_train = 50000 - (res.config["data"]["val_size"] or 0)
        rows.append({
            "norm": res.norm, "final_test_acc": res.final_test_acc,
            "epochs_to_target": hit + 1 if hit is not None else None,
            "recorded_s": sum(h.seconds for h in hist[: hit + 1]) if hit is not None else None,
            "at_measured_speed_s": (hit + 1) * n_train / speed.iloc[0] if hit is not None and len(speed) else None,
        })  # fmt: skip
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f")


# ------------------------------------------------------------------ driver


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmark step {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="time batches of --steps until at least this long (a GPU needs it: 30 steps take 0.2 s)",
    )
    from normsweep.norms import NORMS as ALL_NORMS

    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(ALL_NORMS))
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES,
                   help="which of them to measure (default: all; vs_study needs study)")  # fmt: skip
    p.add_argument("--time-to-target", action="store_true", help="also train the default recipe to 70%% per norm")
    p.add_argument("--target", type=float, default=70.0)
    p.add_argument(
        "--from-sweep", metavar="DIR", help="also read epochs/seconds to the target from a sweep's results.json files"
    )
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--one", nargs=2, metavar=("PIPELINE", "NORM"), help=argparse.SUPPRESS)
    p.add_argument("--one-target", metavar="NORM", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print(
            json.dumps(
                measure(
                    args.one[0], args.one[1], args.steps, args.warmup, args.data_root, args.device, args.min_seconds
                )
            )
        )
        return
    if args.one_target:
        print(json.dumps(time_to_target(args.one_target, args.target, args.data_root, args.device)))
        return

    import pandas as pd

    common = [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--min-seconds",
        str(args.min_seconds),
        "--data-root",
        args.data_root,
        "--device",
        args.device,
    ]
    rows = []
    for r in range(args.repeats):
        for norm in args.norms:
            for pipeline in args.pipelines:  # alternating: a, b, c, a, b, c, ...
                m = _subprocess(["--one", pipeline, norm, *common])
                m["repeat"] = r
                rows.append(m)
                print(f"repeat {r} {norm:5s} {pipeline:9s} {m['images_per_s']:8.0f} img/s  "
                      f"peak {m['peak_mem_mb']:.0f} MB", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    med = df.groupby(["norm", "pipeline"]).agg(
        params=("params", "first"), bf16=("bf16", "first"), images_per_s=("images_per_s", "median"), peak_mem_mb=("peak_mem_mb", "max"),
        device=("device", "first"),
    ).reset_index()  # fmt: skip
    med["s_per_epoch"] = 45000 / med["images_per_s"]
    base = med[med["pipeline"] == "study"].set_index("norm")["images_per_s"]
    med["vs_study"] = med.apply(lambda row: row["images_per_s"] / base.get(row["norm"], float("nan")), axis=1)

    lines = [
        f"# Training throughput — {socket.gethostname()}, {platform.processor() or platform.machine()}, "
        f"{med['device'].iloc[0]}, torch {torch.__version__}",
        "",
        f"Median of {args.repeats} repeats x {args.steps} steps of batch {BATCH}"
        f"{f' (repeated to at least {args.min_seconds:g} s)' if args.min_seconds else ''}; s/epoch = 45,000 images / throughput "
        f"(training steps only). `vs_study` = throughput / pipeline (a)'s.",
        "",
        med.drop(columns="device").to_markdown(index=False, floatfmt=".2f"),
    ]
    if args.time_to_target:
        targets = [_subprocess(["--one-target", n, "--target", str(args.target), "--data-root", args.data_root,
                                "--device", args.device]) for n in args.norms]  # fmt: skip
        lines += ["", f"Default recipe, wall time until test accuracy >= {args.target}% (training + per-epoch evaluation):",
                  "", pd.DataFrame(targets).to_markdown(index=False, floatfmt=".1f")]  # fmt: skip
    if args.from_sweep:
        lines += ["", f"From the runs in `{args.from_sweep}`: first epoch whose test accuracy >= {args.target}%, the seconds "
                  f"those epochs took as recorded (training + evaluation), and that many epochs at (c)'s median speed "
                  f"measured above (training steps only):", "", _from_sweep(Path(args.from_sweep), args.target, med)]  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"throughput-{socket.gethostname()}"
    df.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
