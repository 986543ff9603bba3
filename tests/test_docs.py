"""The docs stay true: every relative link and #anchor resolves, every `python -m normsweep` command composes.

A renamed key, option or page breaks this test, not the reader. Commands are taken from fenced code
blocks (continuation lines joined) and inline code spans of README.md, docs/*.md and docs/*/README.md; each is
parsed as Hydra parses it and composed through the compose API. Placeholders in capitals
(``norm=N``, ``hydra.sweep.dir=SWEEP``) only need their key to exist; a sweep
(``norm=batch,group,layer``) is composed once per value; a search dimension (``interval(...)``,
``tag(...)``) needs its key to exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import OmegaConf, open_dict

from normsweep.config import to_config

from .conftest import REPO, compose_config

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs").glob("*/README.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
STOP = {"#", "&&", "||", "|", ";", ">", "2>&1"}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links() -> list[tuple[Path, str]]:
    found = []
    for page in DOCS:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                found.append((page, target))
    return found


@pytest.mark.parametrize("page,target", links(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_relative_link_and_anchor_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(REPO)} links to {target}: {dest} does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{page.relative_to(REPO)}: #anchor into a non-markdown file {target}"
        assert anchor in anchors(dest), f"{page.relative_to(REPO)} links to {target}: no such heading in {dest.name}"


def commands() -> list[tuple[str, str]]:
    """(where, command line) for every `python -m normsweep ...` in the docs (not .report)."""
    found = []
    for page in DOCS:
        text = page.read_text()
        blocks = [b.replace("\\\n", " ") for b in FENCE.findall(text)]
        spans = re.findall(r"`([^`]+)`", FENCE.sub("", text))
        for chunk in blocks + spans:
            for line in chunk.splitlines() if chunk in blocks else [chunk.replace("\n", " ")]:
                for m in re.finditer(r"python -m normsweep(?=\s|$)(.*)", line):
                    found.append((str(page.relative_to(REPO)), "python -m normsweep" + m.group(1)))
    return found


def overrides_of(command: str) -> list[str]:
    words = shlex.split(command.split(" #", 1)[0])[3:]  # after `python -m normsweep`
    out, skip = [], False
    for w in words:
        if w in STOP or w.startswith("#"):
            break
        if skip:
            skip = False
        elif w in ("--cfg", "-c", "--config-dir", "-cd", "--config-name", "-cn", "--package", "-p"):
            skip = True
        elif "=" in w and not w.startswith("-"):
            out.append(w)
    return out


def compositions(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """(override lists to compose, keys that need only exist)."""
    parser = OverridesParser.create()
    fixed, sweeps, keys = [], [], []
    for text in overrides:
        key, _, value = text.partition("=")
        if PLACEHOLDER.match(value):
            keys.append(key.lstrip("+~"))
            continue
        o = parser.parse_override(text)
        if o.is_sweep_override() and (isinstance(o.value(), IntervalSweep) or o.value().tags):
            keys.append(o.get_key_element().lstrip("+~"))
        elif o.is_sweep_override():
            sweeps.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(text)
    runs = [fixed + [s[0] for s in sweeps]]
    for i, sweep in enumerate(sweeps):  # every value of each sweep, the others at their first value
        for value in sweep[1:]:
            runs.append(fixed + [s[0] for s in sweeps[:i]] + [value] + [s[0] for s in sweeps[i + 1 :]])
    return runs, keys


ALL_COMMANDS = commands()


def test_the_docs_hold_commands_to_check() -> None:
    assert len(ALL_COMMANDS) >= 20 and any("search=optuna" in c for _, c in ALL_COMMANDS)


@pytest.mark.parametrize("where,command", ALL_COMMANDS, ids=[f"{w}:{c[20:70]}" for w, c in ALL_COMMANDS])
def test_every_documented_command_composes(where: str, command: str) -> None:
    runs, keys = compositions(overrides_of(command))
    for overrides in runs:
        try:
            cfg = compose_config(overrides, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - the message names the override
            pytest.fail(f"{where}: `{command}` does not compose with {overrides}: {e}")
        for key in keys:
            assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{where}: `{command}`: no key {key}"
        with open_dict(cfg):
            del cfg["hydra"]
        to_config(cfg)  # the schema's checks: types and impossible values
