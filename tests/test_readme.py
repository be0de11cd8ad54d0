"""The README and docs/ run as written.

Every code block of README.md and docs/*.md (not docs/incoming/, not the generated report):
- bash: each `python -m gemma_jax.*` line names a real command, real flags and real config keys;
  each script line (`python benchmarks/...`, `bash ...`, `sbatch launch/...`) a real script and
  its flags; nothing else but `pip install` and the pytest command appears. The cheap commands run
  for real (`--show_config`, `--help`, the memory planner's `--no_compile`, `prepare --preview`),
  and so does every command of the README's "After the Quickstart" except the training runs
  (the Quickstart itself is the shared workdir below; the DPO run is flag-checked only).
- python: every block is executed, in order, on one short Quickstart run (the README's own
  Quickstart command with train.steps=4): `/tmp/...` paths become paths in a temporary
  directory, so `/tmp/legal_tiny` is that run. A block that needs what a CPU test cannot have
  (network, real weights, a TPU) says so in an HTML comment on the line before it,
  `<!-- not run: REASON -->`; it is then only compiled. Few are allowed.
- yaml: the harness task shown is the shipped one; json: every line parses.
The README itself stays a guide: contents that resolve, the Quickstart's test command exactly as
.ci/run runs it, every command line of gemma_jax in the command table, links that resolve.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from absl import flags

from gemma_jax import cli, config as config_lib

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "report.md")
README = (REPO / "README.md").read_text()
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
MAX_NOT_RUN = 3  # blocks that cannot run on a CPU test machine; keep this small
QUICKSTART_STEPS = 4  # the shared workdir: the Quickstart command, this many steps


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    section: str  # the nearest "## " heading above
    not_run: str | None  # the reason of a `<!-- not run: ... -->` just before the fence

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with their language, section and not-run marker."""
    lines = page.read_text().splitlines()
    out, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^(`{3,})(\S*)\s*$", line)
        if fence:
            ticks, lang, start = fence.group(1), fence.group(2), i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != ticks:
                body.append(lines[i])
                i += 1
            marker = NOT_RUN.search(lines[start - 1]) if start > 0 else None
            out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", section,
                             marker.group(1) if marker else None))
        i += 1
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page)]


@dataclass(frozen=True)
class Command:
    block: Block
    text: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    def __str__(self) -> str:
        return f"{self.block.where}: {self.text}"


def _commands(blocks) -> list[Command]:
    """Every command of the bash blocks, continuation lines joined, comments cut."""
    out = []
    for b in blocks:
        if b.lang != "bash":
            continue
        for line in re.sub(r"\\\n\s*", " ", b.text).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(Command(b, line))
    return out


COMMANDS = _commands(BLOCKS)
MODULE_COMMANDS = [c for c in COMMANDS if c.words[:2] == ["python", "-m"] and c.words[2].startswith("gemma_jax.")]
SCRIPT_COMMANDS = [c for c in COMMANDS if (c.words[0] == "python" and c.words[1].endswith(".py"))
                   or c.words[0] in ("bash", "sbatch")]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]


def _ids(items) -> list[str]:
    return [i.where if isinstance(i, Block) else f"{i.block.where}:{i.words[2] if len(i.words) > 2 else ''}"
            for i in items]


def _module(name: str):
    return importlib.import_module("gemma_jax.train.__main__" if name == "gemma_jax.train" else name)


def _flag_values(module_name: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    _module(module_name).define_flags(fv)
    cli.define_common(fv)
    return fv


# ----------------------------------------------------------------------------- what the pages hold


def test_the_pages_have_commands_and_snippets_to_check():
    assert len(MODULE_COMMANDS) >= 40, [str(c) for c in MODULE_COMMANDS]
    assert len(PYTHON_BLOCKS) >= 8
    assert {p.name for p in PAGES} >= {"README.md", "fine-tuning.md", "weights.md", "data.md", "evaluation.md",
                                        "preference.md", "scaling.md", "attention.md", "benchmarks.md",
                                        "reliability.md"}


def test_every_bash_line_is_a_command_the_checks_know():
    """No fragments (a bare `--config.X=...`) and nothing the flag checks would skip silently."""
    known = set(map(str, MODULE_COMMANDS + SCRIPT_COMMANDS))
    for c in COMMANDS:
        if str(c) in known or c.words[:2] == ["pip", "install"] or c.words[:3] == ["python", "-m", "pytest"]:
            continue
        pytest.fail(f"{c}: not a gemma_jax command, a script, pip install or the test command")


@pytest.mark.parametrize("command", MODULE_COMMANDS, ids=_ids(MODULE_COMMANDS))
def test_every_flag_and_config_key_in_a_command_exists(command):
    module_name, args = command.words[2], command.words[3:]
    fv = _flag_values(module_name)
    config_spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    cfg = None
    if config_spec and config_spec.startswith("configs/"):
        cfg = config_lib.load(str(REPO / config_spec))
    keys = config_lib.flat_keys(cfg if cfg is not None else config_lib.base_config())
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg[2:].split("=", 1)[0]
        if name.startswith("config."):
            assert name[len("config."):] in keys, f"{command}: no config key {name[len('config.'):]}"
            continue
        if name in ("help", "helpfull"):
            continue
        base = name[2:] if name.startswith("no") and name[2:] in fv else name
        assert base in fv, f"{command}: {module_name} has no flag --{name}"


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=_ids(SCRIPT_COMMANDS))
def test_scripts_exist_and_take_their_flags(command):
    words = command.words
    script_at = 1 if words[0] in ("python", "bash") else next(i for i, w in enumerate(words) if w.startswith("launch/"))
    script = REPO / words[script_at]
    assert script.is_file(), f"{command}: no {words[script_at]}"
    rest = words[script_at + 1:]
    if words[script_at] == "launch/tpu_vm.py":
        sys.path.insert(0, str(REPO / "launch"))
        import tpu_vm

        verb, rest = rest[0], rest[1:rest.index("--")] if "--" in rest else rest[1:]
        known = {a for action in tpu_vm.parser()._subparsers._group_actions[0].choices[verb]._actions
                 for a in action.option_strings}
        for arg in rest:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in known, f"{command}: tpu_vm.py {verb} has no {arg}"
        return
    text = script.read_text()
    for arg in rest:
        if arg.startswith("--") and not arg.startswith("--config"):
            name = arg[2:].split("=", 1)[0]
            assert f'"--{name}"' in text or f"'{name}'" in text or f'"{name}"' in text or f"--{name}" in text, \
                f"{command}: {words[script_at]} takes no --{name}"
        elif not arg.startswith("-") and script.suffix == ".py" and rest.index(arg) == 0 and "choices=" in text:
            assert f'"{arg}"' in text, f"{command}: {words[script_at]} has no subcommand {arg}"


def test_not_run_markers_are_few_and_say_why():
    marked = [b for b in BLOCKS if b.not_run]
    assert len(marked) <= MAX_NOT_RUN, [f"{b.where}: {b.not_run}" for b in marked]
    for b in marked:
        assert b.lang in ("python", "bash") and len(b.not_run) >= 10, f"{b.where}: say why it cannot run"
    for page in PAGES:  # a marker that is not right before a fence marks nothing
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.search(line):
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{page.name}:{i + 1}: stray marker"


def test_python_blocks_compile():
    for b in PYTHON_BLOCKS:
        compile(b.text, b.where, "exec")


def test_the_yaml_task_shown_is_the_shipped_one():
    shown = [b for b in BLOCKS if b.lang == "yaml" and b.text.startswith("task: legal_mc")]
    assert shown, "docs show no legal_mc task"
    shipped = (REPO / "tasks" / "legal_mc" / "legal_mc.yaml").read_text()
    for b in shown:
        assert b.text == shipped, f"{b.where}: differs from tasks/legal_mc/legal_mc.yaml"


def test_json_blocks_parse():
    for b in BLOCKS:
        if b.lang == "json":
            for line in b.text.splitlines():
                if line.strip():
                    json.loads(line)


# ----------------------------------------------------------------------------- the README is a guide


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def test_readme_is_a_short_guide_with_contents():
    lines = README.splitlines()
    assert len(lines) <= 420, f"README.md has {len(lines)} lines; move reference material to docs/"
    headings = [line[3:] for line in lines if line.startswith("## ")]
    assert headings[:3] == ["Contents", "Quickstart", "After the Quickstart"], headings
    contents = README.split("## Contents", 1)[1].split("\n## ", 1)[0]
    linked = set(re.findall(r"\]\(#([^)]+)\)", contents))
    anchors = _anchors(REPO / "README.md")
    assert linked <= anchors, linked - anchors
    missing = {_slug(h) for h in headings if h != "Contents"} - linked
    assert not missing, f"sections missing from the contents: {missing}"


def test_quickstart_runs_the_test_suite_as_ci_does():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("python -m pytest")]
    assert len(ci) == 1
    quickstart = next(b for b in BLOCKS if b.page.name == "README.md" and b.section == "Quickstart" and b.lang == "bash")
    assert ci[0] in quickstart.text.splitlines()[2], (ci[0], quickstart.text)
    assert 'pip install -e ".[test]"' in quickstart.text


def test_command_table_names_every_command_line():
    clis = sorted({f"gemma_jax.{p.stem}" for p in (REPO / "gemma_jax").glob("*.py")
                   if 'if __name__ == "__main__":' in p.read_text()}
                  | {f"gemma_jax.{p.parent.name}" for p in (REPO / "gemma_jax").glob("*/__main__.py")})
    table = README.split("## Command lines", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `python -m ")]
    named = {re.match(r"\| `python -m (\S+)", r).group(1) for r in rows}
    assert set(clis) <= named, f"commands missing from the README's table: {set(clis) - named}"
    assert {"gemma_jax.convert", "gemma_jax.prepare"} <= named


def test_every_relative_link_resolves():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_every_docs_page_is_linked_from_the_readme():
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in README, f"README.md does not link docs/{page.name}"


def test_memory_planner_estimates_quoted_come_from_the_planner():
    """The planner table's `estimate` for configs/legal.py:2b_lora equals the planner's figure."""
    from gemma_jax import memory

    text = (REPO / "docs" / "fine-tuning.md").read_text()
    match = re.search(r"configs/legal.py:2b_lora\n\n\|.*?\n\|.*?\n((?:\|.*\n)+)", text)
    assert match, "the planner table for configs/legal.py:2b_lora is gone from docs/fine-tuning.md"
    header = text[match.start():].splitlines()[2].split("|")
    col = [h.strip() for h in header].index("estimate")
    rows = {r.split("|")[1].strip(): r.split("|") for r in match.group(1).strip().splitlines()}
    quoted = float(rows["lora"][col])
    got = memory.variant_estimate_gib("configs/legal.py:2b_lora")
    assert abs(got - quoted) <= 0.06, f"docs quote {quoted} GiB for 2b_lora/lora, the planner says {got:.2f}"


def test_published_figures_name_the_script_that_makes_them():
    evaluation = (REPO / "docs" / "evaluation.md").read_text()
    block = evaluation.split("<!-- make_figures report: begin -->", 1)[1].split("<!-- make_figures report: end -->")[0]
    assert "| **rouge_l** |" in block and "legal_mc" in block, "run python docs/make_figures.py report"
    assert "python docs/make_figures.py report" in evaluation
    report_rows = [line for line in (REPO / "docs" / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert report_rows and all(row in block for row in report_rows), "docs/evaluation.md quotes another report"
    for image in ("metrics.png", "attention_heatmap.png"):
        assert (REPO / "docs" / image).stat().st_size > 1000
    fine_tuning = (REPO / "docs" / "fine-tuning.md").read_text()
    assert "python docs/make_figures.py memory" in fine_tuning and "<!-- make_figures memory: begin -->" in fine_tuning
    for table in re.findall(r"\n\n(\| benchmark \|.*?)\n\n", (REPO / "docs" / "benchmarks.md").read_text(), flags=re.S):
        assert "| command" in table.splitlines()[0], f"a benchmark table without its command:\n{table[:200]}"


# ----------------------------------------------------------------------------- running them


def _in_tmp(text: str, root: Path) -> str:
    """The pages' /tmp/ paths, moved into this test's directory."""
    return text.replace("/tmp/", f"{root}/")


def _run(command: Command, root: Path, stdin: str | None = None) -> tuple[int, str]:
    """Runs a gemma_jax command in-process from the repository root; (exit status, stdout)."""
    words = shlex.split(_in_tmp(command.text, root), comments=True)
    module = _module(words[2])
    entry = getattr(module, "run", None) if words[2] in ("gemma_jax.train", "gemma_jax.prepare") else module.main
    out = io.StringIO()
    old_stdin = sys.stdin
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(out):
            try:
                rc = entry(words[3:])
            except SystemExit as e:
                rc = e.code
    finally:
        sys.stdin = old_stdin
        os.chdir(cwd)
    return int(rc or 0), out.getvalue()


def _is_training(command: Command) -> bool:
    return command.words[2] == "gemma_jax.train" and "--show_config" not in command.words


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The README's Quickstart command, QUICKSTART_STEPS steps, in a temporary /tmp/legal_tiny."""
    root = tmp_path_factory.mktemp("readme")
    qs = next(b for b in BLOCKS if b.page.name == "README.md" and b.section == "Quickstart" and b.lang == "bash")
    train = next(c for c in _commands([qs]) if _is_training(c))
    assert "--workdir=/tmp/legal_tiny" in train.text
    run = Command(train.block, train.text + f" --config.train.steps={QUICKSTART_STEPS}")
    rc, out = _run(run, root)
    assert rc == 0, out[-2000:]
    assert (root / "legal_tiny" / "export" / "config.json").is_file()
    return root


@pytest.fixture(scope="module")
def after_quickstart(quickstart):
    """Every command of the README's "After the Quickstart" but training runs, in order."""
    root = quickstart
    section = [c for c in MODULE_COMMANDS if c.block.page.name == "README.md" and c.block.section == "After the Quickstart"]
    ran = []
    for command in section:
        if command.block.not_run or (_is_training(command) and "--config.train.steps=0" not in command.words):
            continue  # the DPO run: flag-checked above; training is the Quickstart fixture's
        interactive = "--chat" in command.words and not any(w.startswith("--prompt") for w in command.words)
        rc, out = _run(command, root, stdin="Which law governs the Agreement?\n/exit\n" if interactive else None)
        assert rc == 0, f"{command}\n{out[-2000:]}"
        ran.append((command, out))
    return root, ran


def test_after_the_quickstart_runs_as_written(after_quickstart):
    root, ran = after_quickstart
    modules = [c.words[2] for c, _ in ran]
    for name in ("gemma_jax.sample", "gemma_jax.train", "gemma_jax.evaluate", "gemma_jax.attention",
                 "gemma_jax.convert", "gemma_jax.harness"):
        assert name in modules, f"After the Quickstart no longer runs {name}"
    sample_out = next(out for c, out in ran if c.words[2] == "gemma_jax.sample")
    assert sample_out.strip(), "sample printed nothing"
    assert (root / "legal_init" / "export" / "model.safetensors").is_file()
    report = json.loads((root / "legal_tiny" / "eval" / "report.json").read_text())
    assert {"baseline", "tuned", "delta"} <= set(report)
    assert (root / "legal_tiny" / "attention" / "attention_heatmap.png").is_file()
    assert (root / "legal_tiny_hf" / "config.json").is_file()
    harness = (root / "legal_tiny" / "harness" / "results.md").read_text()
    assert "legal_mc" in harness and "acc" in harness


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_runs(block, after_quickstart, capsys):
    if block.not_run:
        compile(block.text, block.where, "exec")
        return
    root, _ = after_quickstart
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        exec(compile(_in_tmp(block.text, root), block.where, "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.strip(), f"{block.where} printed nothing: a snippet should show its result"


def test_cheap_commands_run_for_real(tmp_path):
    """--show_config, the planner's estimates and prepare --preview, wherever the pages show them."""
    cheap = [c for c in MODULE_COMMANDS if "--show_config" in c.words or "--no_compile" in c.words
             or any(w.startswith("--preview") for w in c.words)]
    assert {c.words[2] for c in cheap} >= {"gemma_jax.train", "gemma_jax.memory", "gemma_jax.prepare"}
    for command in cheap:
        rc, out = _run(command, tmp_path)
        assert rc == 0, f"{command}\n{out[-2000:]}"
        if "--show_config" in command.words:
            assert "opt.lr" in out and "data.train" in out
        elif command.words[2] == "gemma_jax.memory":
            assert "| lora |" in out and "estimate" in out
        else:
            assert "[[" in out and "]]" in out, out[-1000:]


def test_help_commands_print_every_flag():
    helps = [c for c in MODULE_COMMANDS if "--help" in c.words or "--helpfull" in c.words]
    assert helps, "show one --help line"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for command in helps:
        res = subprocess.run([sys.executable, *command.words[1:]], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode in (0, 1), res.stderr[-2000:]  # absl's --help exits 1 after the usage
        fv = flags.FlagValues()
        _module(command.words[2]).define_flags(fv)
        for name in fv:
            if name not in ("help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok"):
                assert f"--{name}" in res.stdout or f"--[no]{name}" in res.stdout, f"{command}: --{name} not shown"
