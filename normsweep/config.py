"""The config schema: one dataclass per config group, validated when a run starts.

The YAML files in ``conf/`` fill these in. Hydra merges them into the typed schema registered
here, so a misspelled key or a wrong type fails at start with the key's full name, and
:meth:`__post_init__` checks (run by :func:`to_config`) reject impossible values.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from normsweep.base.credentials import URL_KEYS
from normsweep.base.errors import ConfigError, NormsweepError  # noqa: F401 - the config's errors, imported from here too
from normsweep.base.registry import choice
from normsweep.data import DATASETS
from normsweep.models import MODELS
from normsweep.models.swap import GROUP_RULES
from normsweep.norms import NORMS
from normsweep.run.compiling import COMPILE_MODES, TORCH_MODE_NAMES
from normsweep.run.optim import OPTIMIZERS, SCHEDULERS
from normsweep.search.pruners import PRUNERS

NormKind = NORMS.enum("NormKind")  # norms.NORMS: one registry


Arch = MODELS.enum("Arch")  # models.MODELS: the model families


OptimizerName = OPTIMIZERS.enum("OptimizerName")  # run.optim.OPTIMIZERS


class LrScaling(str, Enum):
    linear = "linear"  # train.peak_lr: optimizer.lr x trainer.batch_size / optimizer.base_batch_size


SchedulerName = SCHEDULERS.enum("SchedulerName")  # run.optim.SCHEDULERS


class DataFormat(str, Enum):
    auto = "auto"
    pickle = "pickle"  # ROOT/cifar-10-batches-py (torchvision's download)
    folder = "folder"  # ROOT/train/<class>/*.jpg|png, ROOT/test/<class>/...


DataSource = DATASETS.enum("DataSource")  # data.DATASETS: the data sources


def _fail(key: str, value, expected: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


@dataclass
class NormConfig:
    kind: NormKind = NormKind.batch
    groups: int = 4  # GroupNorm and EvoNorm-S0; must divide every layer's channels
    ws: bool = False  # Weight Standardization of the convs that feed a norm (models.WSConv2d)
    # A norm's own keys (norms.NORMS[kind].options): conf/norm/<kind>.yaml sets them, null for every other norm.
    eps: Optional[float] = None  # frn: the starting value of FRN's learned epsilon (used as |eps|)
    r_max: Optional[float] = None  # batch_renorm: r is clipped to [1/r_max, r_max] once warmed up
    d_max: Optional[float] = None  # batch_renorm: d is clipped to [-d_max, d_max] once warmed up
    warmup_steps: Optional[int] = None  # batch_renorm: training steps as plain BatchNorm (r = 1, d = 0)
    r_max_steps: Optional[int] = None  # batch_renorm: the step at which r's bound has grown linearly to r_max
    d_max_steps: Optional[int] = None  # batch_renorm: the step at which d's bound has grown linearly to d_max

    def __post_init__(self) -> None:
        if self.groups < 1:
            _fail("norm.groups", self.groups, "an integer >= 1")
        kind = choice(self.kind)
        for key in sorted({k for norm in NORMS.values() for k in norm.options}):
            value, users = getattr(self, key), [k for k, norm in NORMS.items() if key in norm.options]
            if value is None and kind in users:
                _fail(f"norm.{key}", value, f"a value: norm={kind} needs it (conf/norm/{kind}.yaml sets it)")
            if value is not None and kind not in users:
                _fail(f"norm.{key}", value, f"null (a setting of norm={' or '.join(users)} only, not of norm={kind})")
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            _fail("norm.eps", self.eps, "an epsilon > 0 (FRN's learned epsilon starts there; the paper's is 1e-6)")
        if self.r_max is not None and not 1.0 <= self.r_max < math.inf:
            _fail("norm.r_max", self.r_max, "a bound >= 1 (r is clipped to [1/r_max, r_max]; 1 is plain BatchNorm)")
        if self.d_max is not None and not 0.0 <= self.d_max < math.inf:
            _fail("norm.d_max", self.d_max, "a bound >= 0 (d is clipped to [-d_max, d_max]; 0 is plain BatchNorm)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            _fail("norm.warmup_steps", self.warmup_steps, "steps >= 0")
        for key in ("r_max_steps", "d_max_steps"):
            steps = getattr(self, key)
            if steps is not None and self.warmup_steps is not None and steps < self.warmup_steps:
                _fail(f"norm.{key}", steps, f"a step >= norm.warmup_steps={self.warmup_steps}")


@dataclass
class ModelConfig:
    arch: Arch = Arch.resnet
    dropout: float = 0.0
    widths: list[int] = field(default_factory=lambda: [16, 24, 36, 56])  # resnet: stem, stages
    depths: list[int] = field(default_factory=lambda: [1, 1, 0])  # resnet: residual convs per stage
    # A family's own keys (models.MODELS[arch].keys): conf/model/<arch>.yaml sets them, unset for every other family.
    name: Optional[str] = None  # torchvision: a classifier of torchvision.models (resnet18, mobilenet_v3_small, ...)
    target: Optional[str] = None  # custom: your nn.Module class as a dotted path, my_pkg.nets.MyNet
    kwargs: dict[str, Any] = field(default_factory=dict)  # torchvision, custom: the constructor's other arguments
    small_input_stem: Optional[bool] = None  # torchvision: the family's small-image stem; null = where images <= 64 px
    group_rule: Optional[str] = (
        None  # torchvision, custom: divisor (the default: GroupNorm groups fit each layer) | exact
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            _fail("model.dropout", self.dropout, "a probability in [0, 1)")
        if any(w < 1 for w in self.widths):
            _fail("model.widths", self.widths, "positive channel counts")
        if any(d < 0 for d in self.depths):
            _fail("model.depths", self.depths, "non-negative depths")
        arch, family = choice(self.arch), MODELS.entry(self.arch)
        if self.group_rule is not None and self.group_rule not in GROUP_RULES:
            _fail("model.group_rule", self.group_rule, "divisor (the largest divisor of a layer's channels up to "
                  "norm.groups) or exact (norm.groups must divide every layer's channels)")  # fmt: skip
        for key, unset in (("name", None), ("target", None), ("kwargs", {}), ("small_input_stem", None),
                           ("group_rule", None)):  # fmt: skip
            if getattr(self, key) != unset and key not in family.keys:
                users = " or ".join(n for n, f in MODELS.items() if key in f.keys)
                unset_text = "null" if unset is None else "empty"
                _fail(
                    f"model.{key}",
                    getattr(self, key),
                    f"{unset_text} (a setting of model={users} only, not of model={arch})",
                )
        if family.check is not None:
            family.check(self)


@dataclass
class AugmentConfig:
    """Batched, on-device augmentation; every transform is off at its default value."""

    flip_p: float = 0.0  # horizontal flip probability
    crop_padding: int = 0  # random crop after padding each side by this many pixels
    rotate_deg: float = 0.0  # uniform rotation in [-deg, deg]
    brightness: float = 0.0  # ColorJitter factors, as torchvision defines them
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_p <= 1.0:
            _fail("augment.flip_p", self.flip_p, "a probability in [0, 1]")
        if self.crop_padding < 0:
            _fail("augment.crop_padding", self.crop_padding, "pixels >= 0")
        if not 0.0 <= self.rotate_deg <= 180.0:
            _fail("augment.rotate_deg", self.rotate_deg, "degrees in [0, 180]")
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, key) < 1.0:
                _fail(f"augment.{key}", getattr(self, key), "a jitter in [0, 1)")
        if not 0.0 <= self.hue <= 0.5:
            _fail("augment.hue", self.hue, "a hue jitter in [0, 0.5]")


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.01  # peak learning rate when a scheduler is used
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    lr_scaling: Optional[LrScaling] = None  # linear: lr follows trainer.batch_size (train.peak_lr); null: lr as given
    base_batch_size: Optional[int] = None  # the batch lr is set for; null: the shared recipe's (TrainerConfig's)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            _fail("optimizer.lr", self.lr, "a learning rate > 0")
        if self.base_batch_size is not None and self.base_batch_size < 1:
            _fail("optimizer.base_batch_size", self.base_batch_size, "a batch size >= 1, or null (the shared recipe's)")
        if not 0.0 <= self.momentum < 1.0:
            _fail("optimizer.momentum", self.momentum, "a momentum in [0, 1)")
        if self.weight_decay < 0:
            _fail("optimizer.weight_decay", self.weight_decay, "a weight decay >= 0")
        if self.nesterov and (self.name != OptimizerName.sgd or self.momentum == 0):
            _fail("optimizer.nesterov", self.nesterov, "false unless optimizer=sgd with momentum > 0")


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.none
    warmup_frac: float = 0.25  # onecycle: fraction of steps spent rising to the peak lr
    final_lr_frac: float = 0.0  # cosine/onecycle: final lr as a fraction of the peak lr

    def __post_init__(self) -> None:
        if not 0.0 < self.warmup_frac < 1.0:
            _fail("scheduler.warmup_frac", self.warmup_frac, "a fraction in (0, 1)")
        if not 0.0 <= self.final_lr_frac <= 1.0:
            _fail("scheduler.final_lr_frac", self.final_lr_frac, "a fraction in [0, 1]")


@dataclass
class DataConfig:
    source: DataSource = (
        DataSource.cifar10
    )  # data.DATASETS: cifar10 | cifar100 | svhn | folder (conf/data/<source>.yaml)
    root: str = "data"  # relative paths are taken from where you launch, not the job dir
    format: DataFormat = DataFormat.auto  # cifar10 only: its two layouts
    download: bool = True  # torchvision download (checksum-verified) where the source has one and root lacks it
    cache_dir: Optional[str] = None  # decoded uint8 tensors; default ~/.cache/normsweep
    val_size: int = 5000  # carved from the training set, deterministic (split_seed); not used with a folder's val/
    train_size: Optional[int] = None  # use only this many training images (quick runs)
    test_size: Optional[int] = None  # use only this many test images (smoke tests)
    split_seed: int = 0
    max_memory_gb: Optional[float] = (
        None  # decoded images larger than this stop at start; null = half the machine's RAM
    )
    # A source's own keys (data.DATASETS[source].options): conf/data/<source>.yaml sets them, null for every other source.
    labels: Optional[str] = None  # cifar100: fine (100 classes) | coarse (20 superclasses)
    extra: Optional[bool] = None  # svhn: add extra_32x32.mat's 531,131 images to the training set
    image_size: Optional[int] = None  # folder: shorter side resized to it, centre square kept; null = as they are

    def __post_init__(self) -> None:
        source = choice(self.source)
        for key in sorted({k for src in DATASETS.values() for k in src.options}):
            value, users = getattr(self, key), [n for n, src in DATASETS.items() if key in src.options]
            if value is None and DATASETS[source].options.get(key):
                _fail(f"data.{key}", value, f"a value: data={source} needs it (conf/data/{source}.yaml sets it)")
            if value is not None and source not in users:
                _fail(f"data.{key}", value, f"null (a setting of data={' or '.join(users)} only, not of data={source})")
        if choice(self.format) not in DATASETS[source].formats:
            _fail("data.format", choice(self.format), f"auto (data.format chooses between CIFAR-10's layouts; "
                  f"data={source} has one)")  # fmt: skip
        if self.labels is not None and self.labels not in ("fine", "coarse"):
            _fail("data.labels", self.labels, "fine (CIFAR-100's 100 classes) or coarse (its 20 superclasses)")
        if self.image_size is not None and self.image_size < 8:
            _fail("data.image_size", self.image_size, "pixels >= 8, or null to use the images as they are")
        if self.max_memory_gb is not None and not (self.max_memory_gb > 0 and math.isfinite(self.max_memory_gb)):
            _fail("data.max_memory_gb", self.max_memory_gb, "gigabytes > 0, or null for half the machine's RAM")
        if self.val_size < 1:
            _fail("data.val_size", self.val_size, "a count >= 1 (sweeps optimize validation accuracy)")
        if self.train_size is not None and self.train_size < 1:
            _fail("data.train_size", self.train_size, "a count >= 1, or null for all")
        if self.test_size is not None and self.test_size < 1:
            _fail("data.test_size", self.test_size, "a count >= 1, or null for all")


@dataclass
class TrainerConfig:
    epochs: int = 20
    batch_size: int = 512
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    label_smoothing: float = 0.1  # conf/trainer/default.yaml is the source of truth; test_one_place checks they agree
    channels_last: bool = True  # faster convs on CPU and GPU; same numbers
    bf16: Optional[bool] = None  # bf16 autocast; null = on where the hardware has native bf16 (runtime.use_bf16)
    compile: Optional[str] = (
        None  # compile the training step: kernels | graphs | autotune | autotune_graphs (run/compiling.py); null = eager
    )
    drop_last: bool = (
        False  # leave out each epoch's last, partial batch: every step one shape (trainer.compile=graphs needs it)
    )
    threads: Optional[int] = (
        None  # torch threads; null = torch default, or the job's share under a parallel launcher (runtime.job_threads)
    )
    progress: bool = True  # a tqdm bar per epoch (only when attached to a terminal)
    reuse_memory: bool = True  # CPU: keep freed memory for reuse (runtime.keep_freed_memory); false = lower peak RSS
    ema_decay: Optional[float] = None  # evaluate an EMA of the weights (per step, e.g. 0.99); null = off
    tta_flip: bool = True  # also report final accuracy of the mean of each image's and its mirror's logits

    def __post_init__(self) -> None:
        if self.epochs < 1:
            _fail("trainer.epochs", self.epochs, "an integer >= 1")
        if self.batch_size < 1:
            _fail("trainer.batch_size", self.batch_size, "an integer >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            _fail("trainer.label_smoothing", self.label_smoothing, "a value in [0, 1)")
        if self.threads is not None and self.threads < 1:
            _fail("trainer.threads", self.threads, "an integer >= 1, or null")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            renamed = TORCH_MODE_NAMES.get(self.compile)
            _fail("trainer.compile", self.compile, (f"{renamed} (torch's mode {self.compile!r} is named for what it does "
                  "now)" if renamed else "null (eager) or one of " + ", ".join(f"{n} ({m.what})" for n, m in COMPILE_MODES.items())))  # fmt: skip
        if self.compile is not None and COMPILE_MODES[self.compile].graphs and not self.drop_last:
            _fail("trainer.drop_last", self.drop_last, f"true with trainer.compile={self.compile}: CUDA graphs replay "
                  "one batch shape, so each epoch's last, partial batch must be left out (the same for every run)")  # fmt: skip
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            _fail("trainer.ema_decay", self.ema_decay, "a decay per step in (0, 1), or null for no EMA")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail("trainer.device", self.device, "auto, cpu, cuda or cuda:N")


@dataclass
class BudgetConfig:
    """The study's limits; a run over them stops before training unless enforce=false."""

    max_params: int = 50000
    max_epochs: int = 20
    enforce: bool = True


class LoggerKind(str, Enum):
    """``logger.kind``: the names of ``normsweep.run.trackers.TRACKERS`` (written here because the trackers read the
    config; tests/test_one_place.py checks the two agree)."""

    none = "none"
    tensorboard = "tensorboard"
    mlflow = "mlflow"


@dataclass
class LoggerConfig:
    """An experiment tracker that sees every run live (normsweep/run/trackers.py); the files are written either way."""

    kind: LoggerKind = LoggerKind.none
    dir: Optional[str] = None  # tensorboard: root for the run directories; null = each job's own directory
    tracking_uri: Optional[str] = None  # mlflow: null = $MLFLOW_TRACKING_URI or sqlite:///<launch dir>/mlruns.db
    experiment: Optional[str] = None  # mlflow: experiment name; null = the sweep directory (a single run: normsweep)

    def __post_init__(self) -> None:
        if self.dir is not None and self.kind != LoggerKind.tensorboard:
            _fail("logger.dir", self.dir, "null unless logger=tensorboard")
        for key in ("tracking_uri", "experiment"):
            if getattr(self, key) is not None and self.kind != LoggerKind.mlflow:
                _fail(f"logger.{key}", getattr(self, key), "null unless logger=mlflow")


@dataclass
class SearchConfig:
    n_trials: int = 20  # total finished trials per study (a resumed search runs only the missing ones)
    seed: int = 0  # TPE sampler seed
    storage: Optional[str] = None  # SQLAlchemy URL or journal:PATH; default sqlite:///optuna/normsweep.db
    study_name: Optional[str] = None  # default: derived from the fixed overrides, one per grid point
    pruner: str = (
        "median"  # a name of search.pruners.PRUNERS: median | none | threshold | hyperband | successive_halving
    )
    prune_below: float = 0.0  # threshold pruner: prune when validation accuracy is below this
    pruner_startup_trials: int = 3  # median pruner: trials that are never pruned
    min_resource: int = 1  # median/hyperband/successive_halving: epochs every trial runs before it can be pruned
    enqueue_current: bool = True  # trial 0 of a new study is the current settings (the norm's recipe)
    reduction_factor: int = 3  # hyperband/successive_halving: keep the best 1/reduction_factor at each rung
    max_failure_rate: float = 0.5
    heartbeat_interval: Optional[float] = 30.0  # seconds between a running trial's heartbeats; null = off
    grace_period: float = 120.0  # a RUNNING trial without a heartbeat for this long is FAIL, its slot reused
    workers: int = 1  # worker jobs the sweeper starts through the launcher; together they serve every study
    params: dict[str, str] = field(
        default_factory=lambda: {"model.dropout": "interval(0.0, 0.2)", "optimizer.lr": "tag(log, interval(1e-3, 1.0))"}
    )

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            _fail("search.n_trials", self.n_trials, "an integer >= 1")
        if self.pruner not in PRUNERS:
            _fail("search.pruner", self.pruner, " | ".join(PRUNERS))
        if self.min_resource < 1:
            _fail("search.min_resource", self.min_resource, "epochs >= 1")
        if self.reduction_factor < 2:
            _fail("search.reduction_factor", self.reduction_factor, "an integer >= 2")
        if self.heartbeat_interval is not None and not 0 < self.heartbeat_interval < self.grace_period:
            _fail(
                "search.heartbeat_interval",
                self.heartbeat_interval,
                f"seconds in (0, search.grace_period={self.grace_period}), or null",
            )
        if not 0.0 <= self.max_failure_rate <= 1.0:
            _fail("search.max_failure_rate", self.max_failure_rate, "a fraction in [0, 1]")
        if self.workers < 1:
            _fail("search.workers", self.workers, "an integer >= 1 (worker jobs started through the launcher)")


@dataclass
class Config:
    norm: NormConfig = field(default_factory=NormConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=tensorboard | mlflow
    search: Optional[SearchConfig] = None  # set by search=optuna; read by the sweeper


# Keys that say where or how a run executes, not what it computes. Declared once, here: a resume
# may change them (resume.config_differences), a search study does not depend on them
# (search.study_name_for), the comparison table does not show them as settings (report) and job
# directories are not named after them (conf/train.yaml, through the resolver registered below).
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "data.root", "data.cache_dir", "data.download", "data.max_memory_gb",
    "trainer.device", "trainer.threads", "trainer.progress", "trainer.compile", "trainer.reuse_memory",
    *(f"budget.{f.name}" for f in fields(BudgetConfig)),
    "logger", *(f"logger.{f.name}" for f in fields(LoggerConfig)),  # where a run is also logged
)  # fmt: skip
# And every key under these: a search's own settings say how trials are chosen and scheduled, not what a
# trial's run computes (a trial retried in a later round, with other search settings, resumes its checkpoint).
RESULT_NEUTRAL_PREFIXES: tuple[str, ...] = ("search.",)


def dotted(d: dict, prefix: str = "") -> dict:
    """``{"norm": {"kind": "batch"}}`` -> ``{"norm.kind": "batch"}``: a config as its keys (an empty dict is a value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@functools.cache
def schema_defaults() -> dict:
    """Every key of the schema with its default, dotted (``{"data.source": "cifar10", ...}``): what a config
    written before a key existed meant by leaving it out."""
    schema = OmegaConf.structured(Config)
    return dotted(OmegaConf.to_container(schema, resolve=False, enum_to_str=True, throw_on_missing=False))


def is_result_neutral(key: str) -> bool:
    """Whether ``key`` (e.g. ``trainer.threads``, or an override ``+trainer.threads=2``) is in :data:`RESULT_NEUTRAL_KEYS`."""
    key = key.split("=", 1)[0].lstrip("+~")
    return key in RESULT_NEUTRAL_KEYS or key.startswith(RESULT_NEUTRAL_PREFIXES)


def register_configs() -> None:
    """Register the schema; ``conf/train.yaml`` lists ``normsweep_schema`` first in its defaults."""
    ConfigStore.instance().store(name="normsweep_schema", node=Config)
    if not OmegaConf.has_resolver("normsweep_dirname_exclude_keys"):  # hydra.job.config.override_dirname
        OmegaConf.register_new_resolver("normsweep_dirname_exclude_keys", lambda: [*RESULT_NEUTRAL_KEYS, *URL_KEYS])
    # conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml are presets that take the
    # launcher plugins' own names, so Hydra checks them against the plugins' schemas (a mistyped key
    # fails at start). Hydra 1.3 warns that this matching is deprecated; it is what we want here.
    warnings.filterwarnings("ignore", message=r"\n?'hydra/launcher/\w+' is validated against ConfigStore schema")


def to_config(cfg: DictConfig) -> Config:
    """Typed, validated :class:`Config` from a composed Hydra config (runs every ``__post_init__``)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
