"""The CLI reads its choices from the registries, and click's own usage errors are one line."""

from __future__ import annotations

import importlib

import click
import pytest
from click.testing import CliRunner

from pfld_export.cli import RegistryChoice, main


def _choice_params() -> list[tuple[str, click.Parameter]]:
    return [(f"{name} {p.opts[-1]}", p) for name, cmd in main.commands.items() for p in cmd.params
            if isinstance(p.type, click.Choice)]


def test_every_registry_choice_lists_its_registry_names() -> None:
    seen = {}
    for where, p in _choice_params():
        if isinstance(p.type, RegistryChoice):
            module, attr = p.type.where.split(":")
            assert tuple(p.type.choices) == tuple(getattr(importlib.import_module(module), attr)), where
            seen[where] = attr
    # the options whose names a registry owns all read it (none spelled again in the CLI)
    for opt, attr in (("train --activation", "ACTIVATIONS"), ("train --loss", "LOSSES"), ("train --schedule", "SCHEDULES"),
                      ("train --conv2", "CONV2_KINDS"), ("predict --detector", "DETECTORS"), ("distil --detector", "DETECTORS"),
                      ("distil --loss", "LOSSES"), ("convert --activation", "ACTIVATIONS")):
        assert seen.get(opt) == attr, (opt, sorted(seen))


def test_device_choices_are_the_device_registry() -> None:
    from pfld_export.device import DEVICES

    devices = [p for where, p in _choice_params() if where.endswith(" --device")]
    assert len(devices) >= 3 and all(tuple(p.type.choices) == tuple(DEVICES) for p in devices)


def test_importing_the_cli_loads_no_registry_module() -> None:
    import subprocess
    import sys

    code = "import sys, pfld_export.cli; print(sorted(m for m in ('torch', 'cv2', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("args, words", [
    (["train", "--loss", "l1"], "'l1' is not one of 'pfld', 'l2', 'wing'"),
    (["train", "--activation", "gelu"], "'gelu' is not one of 'relu', 'relu6'"),
    (["predict", "m.pth", "x.png", "--detector", "nope"], "'nope' is not one of 'yunet'"),
    (["convert"], "Missing argument 'MODEL'"),
    (["convert", "m.pth", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_click_usage_errors_are_one_line_naming_the_help(args: list[str], words: str) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0] and "--help)" in lines[0], r.output
