"""The README's commands: every `python -m gemma_jax.*`, `python launch/*.py` and
`python benchmarks/*.py` line in its bash blocks names a real command, real flags and real
config keys; the cheap ones (`--show_config`, the memory planner's estimate) run.

A README that drifts from the code is the first thing a new user hits; this keeps them in step
without running the long jobs (those are the Quickstart test in test_train and the CI run).
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from absl import flags

from gemma_jax import cli, config as config_lib

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_lines() -> list[str]:
    """Every command of the README's ```bash blocks, continuation lines joined, comments cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _split(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    return words


COMMANDS = [line for line in _bash_lines() if line.startswith("python ")]
MODULE_COMMANDS = [c for c in COMMANDS if c.startswith("python -m gemma_jax.")]


def _flag_values(module_name: str) -> flags.FlagValues:
    module = importlib.import_module("gemma_jax.train.__main__" if module_name == "gemma_jax.train" else module_name)
    fv = flags.FlagValues()
    module.define_flags(fv)
    cli.define_common(fv)
    return fv


def test_readme_has_commands_to_check():
    assert len(MODULE_COMMANDS) >= 15, MODULE_COMMANDS


@pytest.mark.parametrize("line", MODULE_COMMANDS)
def test_every_flag_and_config_key_in_a_readme_command_exists(line):
    words = _split(line)
    module_name, args = words[2], words[3:]
    fv = _flag_values(module_name)
    config_spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    cfg = None
    if config_spec and config_spec.startswith("configs/"):
        cfg = config_lib.load(str(REPO / config_spec))
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg[2:].split("=", 1)[0]
        if name.startswith("config."):
            key = name[len("config."):]
            keys = config_lib.flat_keys(cfg if cfg is not None else config_lib.base_config())
            assert key in keys, f"{line}: no config key {key}"
            continue
        base = name[2:] if name.startswith("no") and name[2:] in fv else name
        assert base in fv, f"{line}: {module_name} has no flag --{name}"


@pytest.mark.parametrize("line", [c for c in COMMANDS if c.startswith("python benchmarks/")
                                  or c.startswith("python launch/")])
def test_readme_scripts_exist_and_take_their_flags(line):
    words = _split(line)
    script = REPO / words[1]
    assert script.exists(), f"{line}: no {words[1]}"
    if words[1] == "launch/tpu_vm.py":
        import sys
        sys.path.insert(0, str(REPO / "launch"))
        import tpu_vm
        verb, rest = words[2], [w for w in words[3:] if w != "--"]
        known = {a for action in tpu_vm.parser()._subparsers._group_actions[0].choices[verb]._actions
                 for a in action.option_strings}
        for arg in rest:
            if arg.startswith("--") and "config." not in arg:
                assert arg.split("=", 1)[0] in known, f"{line}: tpu_vm.py {verb} has no {arg}"
    else:
        text = script.read_text()
        for arg in words[2:]:
            if arg.startswith("--"):
                name = arg[2:].split("=", 1)[0]
                assert f'"--{name}"' in text or f"'{name}'" in text or f'"{name}"' in text, \
                    f"{line}: {words[1]} takes no --{name}"


def test_show_config_commands_run(capsys):
    from gemma_jax.train import __main__ as train_main

    lines = [c for c in MODULE_COMMANDS if "--show_config" in c]
    assert lines
    for line in lines:
        assert train_main.run(_split(line)[3:]) == 0, line
        out = capsys.readouterr().out
        assert "opt.lr" in out and "data.train" in out


def test_memory_planner_estimates_quoted_in_the_readme_come_from_the_planner():
    """The LoRA table's `estimate` column for configs/legal.py:2b_lora equals the planner's figure."""
    from gemma_jax import memory

    match = re.search(r"configs/legal.py:2b_lora\n\|.*?\n\|.*?\n((?:\|.*\n)+)", README)
    assert match, "the planner table for configs/legal.py:2b_lora is gone from the README"
    rows = {r.split("|")[1].strip(): r.split("|") for r in match.group(1).strip().splitlines()}
    quoted = float(rows["lora"][7])
    got = memory.variant_estimate_gib("configs/legal.py:2b_lora")
    assert abs(got - quoted) <= 0.06, f"README quotes {quoted} GiB for 2b_lora/lora, the planner says {got:.2f}"
