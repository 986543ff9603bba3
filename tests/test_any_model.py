"""model=torchvision and model=custom: any torchvision classifier, and the user's own class, with every norm swapped in.

Building all of torchvision's ~80 classifiers for real takes minutes and gigabytes (regnet_y_128gf has 644M
parameters), so every one is built with its tensors on the meta device (no memory, no initialization cost): the
layers replaced are counted against the original and the class count read from a forward pass of shapes only.
The smallest member of each family is built for real and trains a step (forward and backward at 32x32) with
every norm of the registry.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.overrides import TorchFunctionMode

from normsweep.base.errors import ConfigError
from normsweep.models import MODELS, NormChoice, count_params
from normsweep.models import torchvision as tvm
from normsweep.models.custom import import_target
from normsweep.models.swap import _swappable
from normsweep.norms import NORMS
from normsweep.run.build import BudgetError, check_budget, model_from_config

from .conftest import REPO, assert_resume_matches_uninterrupted, make_cfg, normsweep_run

tv = pytest.importorskip("torchvision.models")

NAMES = tv.list_models(module=tv)
NO_NORM = {"alexnet", "squeezenet1_0", "squeezenet1_1", "vgg11", "vgg13", "vgg16", "vgg19"}  # nothing to swap
TOKEN_NORMS = {n for n in NAMES if n.startswith(("vit_", "swin_"))}  # nn.LayerNorm over tokens only: left, so refused
IMAGE_SIZE = {"inception_v3": 299, "maxvit_t": 224}  # at least 75 px; MaxViT's window partition needs 224's multiples
# The smallest member of each family, trained for a step with every norm. FRN + TLU and EvoNorm (norms that are also
# the activation) need an activation module after every norm in an nn.Sequential: of torchvision's, only VGG has it.
SMALLEST = ["resnet18", "mobilenet_v3_small", "vgg11_bn", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5",
            "densenet121", "mnasnet0_5", "convnext_tiny", "googlenet"]  # fmt: skip
QUICK = {"resnet18", "mobilenet_v3_small", "vgg11_bn"}  # the rest: slow
ACTIVATING_NORMS_FIT = {"vgg11_bn"}


def options(kind: str) -> dict:
    written = OmegaConf.load(REPO / "conf" / "norm" / f"{kind}.yaml")
    return {key: written[key] for key in NORMS[kind].options}


def choice(kind: str, groups: int = 32, ws: bool = False) -> NormChoice:
    return NormChoice(kind, groups, ws, options(kind))


def settings(name: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(name=name, kwargs=kw.pop("kwargs", {}), small_input_stem=kw.pop("small_input_stem", None),
                           group_rule=kw.pop("group_rule", None), dropout=0.0, **kw)  # fmt: skip


class MetaTensors(TorchFunctionMode):
    """Parameters and buffers made on the meta device (shapes only); the index arithmetic of a builder (RegNet's
    widths from ``torch.arange``) stays real, which ``with torch.device("meta")`` would not."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def norms_in(model: nn.Module) -> int:
    return sum(isinstance(m, _swappable()) for m in model.modules())


# ------------------------------------------------------------------ every classifier of torchvision


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_torchvision_classifier_with_a_norm_gets_every_norm_replaced(name: str) -> None:
    size = IMAGE_SIZE.get(name, 32)
    with MetaTensors():
        plain, _ = tvm.build_plain(name, 7, size)
        if name in NO_NORM | TOKEN_NORMS:
            with pytest.raises(ConfigError, match=rf"model.name={name} has no feature-map norm layer to swap"):
                tvm.build(settings(name), choice("group"), 7, size)
            return
        model = tvm.build(settings(name), choice("group"), 7, size)
        out = model(torch.empty(2, 3, size, size, device="meta"))
    before = norms_in(plain)
    assert before > 0 and norms_in(model) == sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == before
    assert out.shape == (2, 7)


def test_the_classifiers_are_torchvisions_top_level_ones() -> None:
    assert {"resnet18", "mobilenet_v3_small", "convnext_tiny", "vgg11_bn", "regnet_y_400mf"} <= set(NAMES)
    assert not {"fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18", "raft_small"} & set(NAMES)
    assert tvm.classifiers() == NAMES


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in SMALLEST])
def test_the_smallest_of_each_family_trains_a_step_with_every_norm(name: str) -> None:
    torch.manual_seed(0)
    plain, stem = tvm.build_plain(name, 7, 32)
    assert bool(stem) == (name != "vgg11_bn")  # each has a strided or pooling stem, made small for 32x32; VGG none
    if name == "vgg11_bn":  # its 120M-parameter 4096-wide head is not what is tested: one Linear keeps the step fast
        plain.classifier = nn.Linear(512 * 7 * 7, 7)
    before = norms_in(plain)
    x = torch.randn(2, 3, 32, 32)
    for kind, norm in NORMS.items():
        model = copy.deepcopy(plain)
        if norm.activates and name not in ACTIVATING_NORMS_FIT:
            with pytest.raises(ConfigError, match="is not followed by an activation module in an nn.Sequential"):
                tvm.swap(model, choice(kind, groups=4), name)
            continue
        old = {id(m) for m in model.modules() if isinstance(m, _swappable())}
        report = tvm.swap(model, choice(kind, groups=4), name)
        assert sum(report.replaced.values()) == len(old) == before, kind
        assert not old & {id(m) for m in model.modules()}, kind  # every one replaced
        if norm.activates:
            assert len(report.activations) == before  # each norm's activation became nn.Identity
        model(x).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), kind
        model.eval()
        with torch.no_grad():
            y = model(x)
            assert y.shape == (2, 7) and torch.equal(y, model(x)), kind  # eval: deterministic


def test_resnet18_gets_the_small_input_stem_for_small_images_only_and_on_request() -> None:
    small, stem = tvm.build_plain("resnet18", 10, 32)
    assert stem == "conv1 -> 3x3 stride 1, maxpool removed"
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    for kept in (tvm.build_plain("resnet18", 10, 32, small_input_stem=False), tvm.build_plain("resnet18", 10, 96)):
        model, stem = kept
        assert stem == "" and model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    model, stem = tvm.build_plain("resnet18", 10, 96, small_input_stem=True)
    assert model.conv1.stride == (1, 1)
    with pytest.raises(ConfigError, match=r"model.small_input_stem=true, but vgg11_bn \(VGG\) has no small-input stem"):
        tvm.build_plain("vgg11_bn", 10, 32, small_input_stem=True)


def test_inception_v3_refuses_images_below_75_pixels_and_builders_refuse_bad_kwargs() -> None:
    with pytest.raises(ConfigError, match=r"inception_v3 needs images of at least 75x75 pixels; the data's are 32x32"):
        tvm.build_plain("inception_v3", 10, 32)
    with pytest.raises(ConfigError, match=r"torchvision's resnet18\(\*\*model.kwargs=\{'depth': 3\}\) failed"):
        tvm.build_plain("resnet18", 10, 32, {"depth": 3})
    with pytest.raises(ConfigError, match=r"model.kwargs.num_classes is set by normsweep"):
        tvm.build_plain("resnet18", 10, 32, {"num_classes": 3})
    model, _ = tvm.build_plain("mobilenet_v3_small", 10, 32, {"width_mult": 0.5})
    assert count_params(model) < count_params(tvm.build_plain("mobilenet_v3_small", 10, 32)[0])


def test_weight_standardization_reaches_torchvisions_convs() -> None:
    from normsweep.models import WSConv2d

    model = tvm.build(settings("resnet18"), choice("group", ws=True), 10, 32)
    ws = [n for n, m in model.named_modules() if isinstance(m, WSConv2d)]
    assert "conv1" in ws and "layer1.0.conv1" in ws and "layer2.0.downsample.0" in ws and len(ws) == 20


# ------------------------------------------------------------------ the config


def test_the_config_builds_torchvision_models_with_the_datas_classes() -> None:
    cfg = make_cfg("model=torchvision", "model.name=shufflenet_v2_x0_5", "norm=layer", "budget=none")
    assert cfg.model.name == "shufflenet_v2_x0_5" and cfg.model.kwargs == {} and cfg.model.small_input_stem is None
    model = model_from_config(cfg, num_classes=100, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in model.modules()) == 56
    cfg = make_cfg("model=torchvision", "model.name=mobilenet_v3_small", "+model.kwargs.width_mult=0.5", "budget=none")
    assert cfg.model.kwargs == {"width_mult": 0.5}
    assert count_params(model_from_config(cfg)) < 1_000_000


@pytest.mark.parametrize("overrides,match", [
    (["model=torchvision", "model.name=resnet19"], r"model.name='resnet19' is not a classification model of "
                                                   r"torchvision; did you mean resnet18"),
    (["model=torchvision", "model.name=null"], r"model=torchvision needs model.name"),
    (["model.name=resnet18"], r"model.name='resnet18' is invalid: expected null \(a setting of model=torchvision only, "
                              r"not of model=resnet\)"),
    (["model=torchvision", "model.target=a.B"], r"model.target='a.B' is invalid: expected null \(a setting of "
                                                r"model=custom only"),
    (["model=custom", "model.small_input_stem=true"], r"model.small_input_stem=True is invalid: expected null"),
    (["+model.kwargs.depth=2"], r"model.kwargs=\{'depth': 2\} is invalid: expected empty"),
    (["model=torchvision", "model.dropout=0.1"], r"model.dropout=0.1 is invalid: expected 0 with model=torchvision"),
    (["model=custom", "model.target=nodots"], r"model.target='nodots' is invalid: expected the dotted path"),
])  # fmt: skip
def test_model_keys_that_do_not_fit_the_family_are_refused_naming_the_key(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_cfg(*overrides)


def test_the_study_budget_stops_a_torchvision_model_naming_budget_none() -> None:
    cfg = make_cfg("model=torchvision", "model.name=shufflenet_v2_x0_5")
    params = count_params(model_from_config(cfg))
    assert params > 300_000
    with pytest.raises(BudgetError, match=r"over budget.max_params=50,000.*budget=none"):
        check_budget(cfg, params)
    check_budget(make_cfg("model=torchvision", "model.name=shufflenet_v2_x0_5", "budget=none"), params)


def test_the_families_keys_are_the_schemas() -> None:
    from dataclasses import fields

    from normsweep.config import ModelConfig

    schema = {f.name for f in fields(ModelConfig)} - {"arch", "dropout"}
    assert schema == {key for family in MODELS.values() for key in family.keys}
    for arch, family in MODELS.items():
        written = set(OmegaConf.load(REPO / "conf" / "model" / f"{arch}.yaml")) - {"arch", "dropout"}
        assert written == set(family.keys), arch  # conf/model/<arch>.yaml sets exactly its family's own keys


# ------------------------------------------------------------------ the user's own class

NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> BN -> ReLU twice, in nn.Sequential, and a head: every norm fits, FRN and EvoNorm too."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class SizedNet(nn.Module):
    """A head sized from the image size: it needs the data's, not 32."""

    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * image_size * image_size, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class NoClasses(nn.Module):
    def __init__(self):
        super().__init__()


NOT_A_MODULE = 3
'''


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch) -> Path:
    """``my_nets/nets.py`` in a fresh directory, launched from there: ``model.target=my_nets.nets.TinyNet``."""
    (tmp_path / "my_nets").mkdir()
    (tmp_path / "my_nets" / "__init__.py").write_text("")
    (tmp_path / "my_nets" / "nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the launch directory is added for this test only
    yield tmp_path
    for name in [m for m in sys.modules if m == "my_nets" or m.startswith("my_nets.")]:
        del sys.modules[name]


@pytest.mark.parametrize("kind", list(NORMS))
def test_a_users_class_is_built_with_the_datas_classes_and_every_norm(user_package: Path, kind: str) -> None:
    cfg = make_cfg("model=custom", "model.target=my_nets.nets.TinyNet", "+model.kwargs.width=4", f"norm={kind}",
                   "norm.groups=4", "budget=none")  # fmt: skip
    model = model_from_config(cfg, num_classes=5)
    assert (
        type(model).__name__ == "TinyNet" and model.head[-1].out_features == 5 and model.features[0].out_channels == 4
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) or kind == "batch"
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == (0 if NORMS[kind].activates else 2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_model_group_rule_exact_stops_where_the_groups_do_not_divide_and_divisor_fits_them(user_package: Path) -> None:
    """TinyNet(width=6): 6 and 12 channels; norm.groups=4 divides neither."""
    args = ("model=custom", "model.target=my_nets.nets.TinyNet", "+model.kwargs.width=6", "norm=group", "norm.groups=4",
            "budget=none")  # fmt: skip
    with pytest.raises(ConfigError, match="norm.groups"):
        model_from_config(make_cfg(*args, "model.group_rule=exact"))
    for rule in ("divisor", "null"):
        model = model_from_config(make_cfg(*args, f"model.group_rule={rule}"))
        assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [3, 4]
    with pytest.raises(ConfigError, match="model.group_rule='nearest' is invalid"):
        make_cfg(*args, "model.group_rule=nearest")
    with pytest.raises(ConfigError, match=r"model.group_rule.*a setting of model=torchvision or custom only"):
        make_cfg("model.group_rule=exact")


@pytest.mark.slow  # compiling: tens of seconds
@pytest.mark.parametrize("kind", ["group", "frn"])
def test_a_swapped_model_compiles_to_the_eager_models_loss_and_gradients(user_package: Path, kind: str) -> None:
    """trainer.compile on a model the swap changed (a norm module replaced, FRN's activation made Identity)."""
    torch.manual_seed(0)
    model = model_from_config(make_cfg("model=custom", "model.target=my_nets.nets.TinyNet", f"norm={kind}",
                                       "budget=none"))  # fmt: skip
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses, grads = [], []
    for net in (model, torch.compile(model, mode="default")):
        model.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_a_users_class_that_takes_image_size_gets_the_datas_unless_model_kwargs_sets_it(user_package: Path) -> None:
    cfg = make_cfg("model=custom", "model.target=my_nets.nets.SizedNet", "norm=group", "budget=none")
    model = model_from_config(cfg, num_classes=3, image_size=24)
    assert model.head.in_features == 4 * 24 * 24 and isinstance(model.features[1], nn.GroupNorm)
    model(torch.randn(2, 3, 24, 24)).sum().backward()
    pinned = make_cfg(
        "model=custom", "model.target=my_nets.nets.SizedNet", "+model.kwargs.image_size=16", "budget=none"
    )
    assert model_from_config(pinned, num_classes=3, image_size=24).head.in_features == 4 * 16 * 16
    tiny = model_from_config(make_cfg("model=custom", "model.target=my_nets.nets.TinyNet", "budget=none"), 3, 24)
    assert type(tiny).__name__ == "TinyNet"  # a class without the parameter is built as before


@pytest.mark.parametrize("target,match", [
    ("my_nets.nets.Missing", r"model.target=my_nets.nets.Missing: 'my_nets.nets' has no 'Missing'"),
    ("my_nets.typo.TinyNet", r"model.target=my_nets.typo.TinyNet: cannot import 'my_nets.typo' \(No module named"),
    ("nowhere.nets.TinyNet", r"model.target=nowhere.nets.TinyNet: cannot import 'nowhere' \(ModuleNotFoundError: No "
                             r"module named 'nowhere'\); the module must be importable from the directory you launch"),
    ("my_nets.nets.NOT_A_MODULE", r"model.target=my_nets.nets.NOT_A_MODULE is 3, not an nn.Module subclass"),
    ("my_nets.nets.NoClasses", r"NoClasses\(num_classes=10, \*\*model.kwargs=\{\}\) does not match its constructor "
                               r"\(\).*it must take num_classes"),
])  # fmt: skip
def test_a_bad_target_names_model_target_and_why(user_package: Path, target: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        model_from_config(make_cfg("model=custom", f"model.target={target}", "budget=none"))


def test_model_custom_without_a_target_says_what_to_pass() -> None:
    with pytest.raises(ConfigError, match=r"model=custom needs model.target.*model.target=my_pkg.nets.MyNet"):
        model_from_config(make_cfg("model=custom", "budget=none"))


def test_import_target_finds_a_nested_class_and_an_installed_one() -> None:
    assert import_target("torch.nn.Conv2d") is nn.Conv2d
    assert import_target("torchvision.models.resnet.ResNet").__name__ == "ResNet"


# ------------------------------------------------------------------ through the command line


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> list[str]:
    from .conftest import small_data_args

    return small_data_args(tmp_path_factory, n_train=30, n_test=10)  # 300 training images, 100 of them validation


def normsweep(*args: str, cwd: Path) -> object:
    return normsweep_run(*args, cwd=cwd)


@pytest.mark.slow
def test_a_users_class_from_a_module_file_trains_through_the_cli(tmp_path: Path, tiny_data) -> None:
    launch = tmp_path / "project"
    (launch / "my_nets").mkdir(parents=True)
    (launch / "my_nets" / "__init__.py").write_text("")
    (launch / "my_nets" / "nets.py").write_text(textwrap.dedent(NETS))
    out = tmp_path / "run"
    proc = normsweep("model=custom", "model.target=my_nets.nets.TinyNet", "+model.kwargs.width=6", "norm=group",
                     "budget=none", "trainer.epochs=1", *tiny_data, f"hydra.run.dir={out}", cwd=launch)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["arch"] == "custom"
    assert res["params"] == 6 * 27 + 2 * 6 + 12 * 6 * 9 + 2 * 12 + 12 * 10 + 10  # convs, GroupNorms, head
    log = (out / "normsweep.log").read_text()
    assert (
        "my_nets.nets.TinyNet; norm=group: replaced 2 BatchNorm2d; groups features.1 4->3; "
        "2 convs weight-standardized; params 976 -> 976"
    ) in log  # 4 groups do not divide 6 channels: 3
    assert "model custom my_nets.nets.TinyNet with group norm" in log
    proc = normsweep("model=custom", "model.target=my_nets.nets.Nope", "budget=none", *tiny_data,
                     f"hydra.run.dir={tmp_path / 'bad'}", cwd=launch)  # fmt: skip
    assert (
        proc.returncode == 2
        and "model.target=my_nets.nets.Nope: 'my_nets.nets' has no 'Nope'" in proc.stdout + proc.stderr
    )


@pytest.mark.slow
def test_a_sweep_over_two_torchvision_models_and_three_norms_is_tabled_with_params(tmp_path: Path, tiny_data) -> None:
    import pandas as pd

    sweep = tmp_path / "multirun"
    proc = normsweep("-m", "model=torchvision", "model.name=resnet18,mobilenet_v3_small", "norm=batch,group,layer",
                     "model.small_input_stem=false", "budget=none", "trainer.epochs=1", *tiny_data,
                     "data.train_size=100", "data.test_size=50", f"hydra.sweep.dir={sweep}", cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(sweep / "results.csv")
    assert len(table) == 6 and (table["status"] == "completed").all()
    params = dict(zip(zip(table["model.name"], table["norm"]), table["params"]))
    assert params[("resnet18", "batch")] == params[("resnet18", "group")] == 11_181_642  # torchvision's own stem
    assert params[("mobilenet_v3_small", "batch")] == params[("mobilenet_v3_small", "layer")] == 1_528_106
    md = (sweep / "results.md").read_text()
    assert "11,181,642" in md or "11181642" in md


# ------------------------------------------------------------------ resume


@pytest.mark.slow
@pytest.mark.parametrize("name,stem", [("resnet18", "false"), ("mobilenet_v3_small", "null")])
def test_a_torchvision_model_resumes_exactly_like_an_uninterrupted_run(name, stem, folder_data, cache_dir, tmp_path):
    from normsweep.data import load_raw, make_splits

    splits = make_splits(load_raw(folder_data, cache_dir=cache_dir), val_size=20)
    cfg = make_cfg("model=torchvision", f"model.name={name}", f"model.small_input_stem={stem}", "norm=group",
                   "budget=none", "trainer.epochs=2", "trainer.batch_size=25", "trainer.device=cpu",
                   "trainer.progress=false")  # fmt: skip
    assert_resume_matches_uninterrupted(cfg, splits, tmp_path)
