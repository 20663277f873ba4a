"""`--help` of every entry point exits 0 and names the options the README uses."""

from __future__ import annotations

import importlib

import pytest

from spo_core.cli import DESCRIPTIONS, STAGES, main

TRAINERS = {"train-spo", "train-d3po", "train-ddpo", "train-grpo", "train-diffusion-dpo"}


def test_spo_help_lists_every_sub_command_with_its_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, text in DESCRIPTIONS.items():
        assert f"{name}  " in out and text in out


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_stage_sub_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    if command == "generate":
        assert all(opt in out for opt in ("--model", "--lora", "--prompt", "--out", "--seed"))
    else:
        assert "--config" in out and "--set KEY=VALUE" in out
        assert ("--resume" in out) == (command in TRAINERS)
        doc = importlib.import_module(f"spo_core.stages.{STAGES[command]}").__doc__.strip().splitlines()[0]
        assert doc[:40] in " ".join(out.split())


@pytest.mark.parametrize("command", ["params", "ablation"])
def test_helper_sub_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and "usage: spo " + command in capsys.readouterr().out
