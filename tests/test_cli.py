"""The command lines: one absl flag style, --helpfull with defaults, --show_config, --config as an
experiment or a workdir with overrides, one-line user errors, quiet progress output."""

from __future__ import annotations

import io
import json
import logging as logging_std
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import flags

import gemma_jax
from gemma_jax import attention, cli, config as config_lib, evaluate, harness, memory, sample, tokenizer as tok_cli
from gemma_jax.data import pipeline
from gemma_jax.eval import tasks
from gemma_jax.model import ModelConfig
from gemma_jax.train import __main__ as train_main, log as log_lib

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "data" / "tokenizer.model")
LEGAL = str(REPO / "configs" / "legal.py")
CLIS = {"sample": sample, "evaluate": evaluate, "attention": attention, "memory": memory, "harness": harness,
        "tokenizer": tok_cli, "train": train_main}


def _flag_values(define) -> flags.FlagValues:
    fv = flags.FlagValues()
    define(fv)
    cli.define_common(fv)
    return fv


# ----------------------------------------------------------------------------- help and flags


@pytest.mark.parametrize("name", sorted(CLIS))
def test_helpfull_lists_every_flag_with_its_default(name):
    """Each command defines absl flags (no argparse), every one shown with its default, --debug included."""
    module = CLIS[name]
    text = cli.help_text(module.define_flags)
    fv = flags.FlagValues()
    module.define_flags(fv)
    names = sorted(fv)
    assert len(names) >= 3 and "--[no]debug:" in text
    blocks = dict(re.findall(r"\n  --(?:\[no\])?(\w+): (.*?)(?=\n  --|\n\n|$)", text, re.S))
    for flag in names:
        assert flag in blocks, (name, flag)
        # Every flag says its default, or that it is required.
        block = " ".join(blocks[flag].split())
        assert "default" in block or "(required)" in block, (name, flag, block)


def test_helpfull_of_the_real_command_line():
    """`python -m gemma_jax.sample --helpfull` prints the module's flags with defaults (absl's help)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "gemma_jax.sample", "--helpfull"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "--checkpoint:" in res.stdout and "--mesh: auto, none" in res.stdout, res.stdout[-2000:]
    assert "(default: 'auto')" in res.stdout and "--[no]debug" in res.stdout and "--verbosity" in res.stdout


def test_show_config_lists_every_key_with_value_and_comment(capsys):
    rc = train_main.run([f"--config={LEGAL}:tiny", "--show_config"])
    assert rc == 0
    out = capsys.readouterr().out
    cfg = config_lib.load(f"{LEGAL}:tiny")
    keys = config_lib.flat_keys(cfg)
    shown = [line.split(" = ")[0] for line in out.splitlines() if " = " in line]
    assert sorted(shown) == sorted(keys)
    lines = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["data.train"].startswith("data.train = 'data/legal/train.jsonl'")
    assert "# files / globs, comma separated" in lines["data.train"]
    assert "# peak learning rate" in lines["opt.lr"] and "opt.lr = 0.003" in lines["opt.lr"]
    # A group comment above several keys reaches each of them.
    assert "Explicit dims" in lines["model.num_layers"]
    comments = config_lib.key_comments()
    assert all(comments.get(k) for k in keys), [k for k in keys if not comments.get(k)]


def test_show_config_applies_overrides_and_the_data_train_rule(capsys):
    rc = train_main.run([f"--config={LEGAL}:tiny", "--show_config", "--config.data.train=data/recipes.csv",
                         "--config.opt.lr=0.5"])
    assert rc == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines() if " = " in line}
    assert lines["opt.lr"].startswith("opt.lr = 0.5")
    # The legal eval file is not the recipes' eval set: a hold-out of the new training data instead.
    assert lines["data.eval"].startswith("data.eval = ''")
    assert lines["data.eval_fraction"].startswith(f"data.eval_fraction = {config_lib.OVERRIDE_EVAL_FRACTION}")


def test_adjust_eval_for_train_override():
    cfg = config_lib.load(f"{LEGAL}:tiny")
    assert config_lib.adjust_eval_for_train_override(cfg, ["opt.lr"]) is None
    assert cfg.data.eval == "data/legal/eval.jsonl"
    note = config_lib.adjust_eval_for_train_override(cfg, ["data.train"])
    assert "data/legal/eval.jsonl" in note and "eval_fraction" in note
    assert cfg.data.eval == "" and cfg.data.eval_fraction == config_lib.OVERRIDE_EVAL_FRACTION
    # An eval set given with the new training data is kept; a given fraction too.
    cfg = config_lib.load(f"{LEGAL}:tiny")
    assert config_lib.adjust_eval_for_train_override(cfg, ["data.train", "data.eval"]) is None
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.data.eval_fraction = 0.3
    config_lib.adjust_eval_for_train_override(cfg, ["data.train", "data.eval_fraction"])
    assert cfg.data.eval == "" and cfg.data.eval_fraction == 0.3


# ----------------------------------------------------------------------------- user errors


def _user_error(capsys, main, argv, expect: str):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors_ = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors_) == 1 and expect in errors_[0], err
    assert "Traceback" not in err
    return errors_[0]


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    line = _user_error(capsys, sample.main, ["--checkpoint=/no/such/dir", "--prompt=x"], "no such checkpoint")
    assert "tokenizer" not in line  # the real cause, not "no tokenizer.model beside ..."
    _user_error(capsys, sample.main, ["--prompt=x"], "--checkpoint")  # a required flag
    _user_error(capsys, sample.main, ["--checkpoint=x", "--top_k=many"], "top_k")  # a flag's type
    _user_error(capsys, evaluate.main, ["--checkpoint=/no/such", f"--output={tmp_path}"], "no such checkpoint")
    _user_error(capsys, attention.main, ["--base=a", "--tuned=b", f"--output={tmp_path}", "--max_prompts=0"],
                "--max_prompts")
    _user_error(capsys, memory.main, [f"--config={LEGAL}:tiny", "--device=v9"], "unknown device 'v9'")
    _user_error(capsys, memory.main, [f"--config={LEGAL}:tiny", "--device_memory_gib=-1"], "device_memory_gib")
    _user_error(capsys, harness.main, ["--tasks=a"], "--checkpoint")
    _user_error(capsys, tok_cli.main, ["train", f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/t.model"],
                "no files match")
    _user_error(capsys, train_main.run, [f"--config={LEGAL}:tiny", "--config.data.trian=x"], "did you mean data.train")
    _user_error(capsys, train_main.run, [f"--config={LEGAL}:tiny"], "--workdir is required")
    _user_error(capsys, train_main.run, ["--config=configs/nope.py:tiny", "--show_config"], "no such file")
    _user_error(capsys, evaluate.main, [f"--checkpoint={tmp_path}", f"--output={tmp_path}",
                                        f"--config={tmp_path}"], "no config.json")


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        sample.main(["--checkpoint=/no/such/dir", "--prompt=x", "--debug"])


# ----------------------------------------------------------------------------- --config WORKDIR


def _workdir(tmp_path) -> tuple[str, object]:
    """A workdir's config.json as gemma_jax.train writes it: legal tiny, hold-out of data.train."""
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.data.train = str(REPO / "data/legal/train.jsonl")
    cfg.data.eval, cfg.data.eval_fraction, cfg.train.seed = "", 0.25, 7
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    return str(wd), cfg


def _parse(module, argv, monkeypatch) -> flags.FlagValues:
    fv = _flag_values(module.define_flags)
    monkeypatch.setattr(sys, "argv", ["prog", *argv])  # config overrides are read from sys.argv
    fv(["prog", *argv])
    return fv


def _texts(examples):
    return [json.dumps(e.turns if hasattr(e, "turns") else str(e), default=str) for e in examples]


def test_workdir_config_reproduces_the_runs_holdout(tmp_path, monkeypatch):
    wd, cfg = _workdir(tmp_path)
    all_train = tasks.read_eval_data(cfg.data.train, cfg.data)
    expected = pipeline.holdout(all_train, 0.25, seed=7)[1]
    for argv in ([f"--checkpoint={wd}", "--output=o"],  # the checkpoint's own workdir config
                 [f"--checkpoint=x", "--output=o", f"--config={wd}"],
                 [f"--checkpoint=x", "--output=o", f"--config={wd}/config.json"]):
        fv = _parse(evaluate, argv, monkeypatch)
        run_cfg, _, data_cfg = evaluate._eval_settings(fv)
        assert run_cfg.data.eval_fraction == 0.25 and int(run_cfg.train.seed) == 7
        got = tasks.read_eval_data("", data_cfg, holdout_seed=int(run_cfg.train.seed))
        assert _texts(got) == _texts(expected) and len(got) == round(0.25 * len(all_train))
    # --config.KEY overrides work on a workdir config too (typed from the recorded value).
    fv = _parse(evaluate, ["--checkpoint=x", "--output=o", f"--config={wd}", "--config.train.seed=8",
                           "--config.data.eval_fraction=0.5"], monkeypatch)
    assert int(fv.config.train.seed) == 8 and fv.config.data.eval_fraction == 0.5
    assert fv.config.mesh.rules == config_lib.base_config().mesh.rules  # JSON lists back to tuples
    # attention reads the same split by default.
    fv = _parse(attention, [f"--base=b", f"--tuned={wd}", "--output=o"], monkeypatch)
    got = attention.read_examples(fv, attention._run_config(fv))
    assert _texts(got) == _texts(expected)


def test_data_train_override_holds_out_instead_of_the_experiments_eval_file(tmp_path, monkeypatch):
    train = str(REPO / "data/translation/train.csv")
    fv = _parse(evaluate, ["--checkpoint=x", "--output=o", f"--config={LEGAL}:tiny",
                           f"--config.data.train={train}"], monkeypatch)
    cfg, _, data_cfg = evaluate._eval_settings(fv)
    assert data_cfg.eval == "" and data_cfg.eval_fraction == config_lib.OVERRIDE_EVAL_FRACTION
    got = tasks.read_eval_data("", data_cfg, holdout_seed=int(cfg.train.seed))
    legal_eval = tasks.read_eval_data(str(REPO / "data/legal/eval.jsonl"), data_cfg)
    assert got and not set(_texts(got)) & set(_texts(legal_eval))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from test_evaluate import random_params

    config = ModelConfig(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=2, num_kv_heads=1, head_dim=16,
                         query_pre_attn_scalar=16, vocab_size=2048, sliding_window=16, max_seq_len=256)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return gemma_jax.save(str(path), config, random_params(config, seed=0, scale=0.2), format="gemma_jax",
                          tokenizer=TOKENIZER)


def _mc_task(tmp_path) -> Path:
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    rows = [("The lessee shall pay", ["rent.", "the moon."], 0), ("A contract is", ["an agreement.", "blue."], 0)]
    with open(tasks_dir / "mc.jsonl", "w") as f:
        for q, choices, gold in rows:
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}) + "\n")
    (tasks_dir / "mc.yaml").write_text(
        f"task: cli_mc\ndataset_path: json\ntest_split: train\ndataset_kwargs:\n  data_files:\n"
        f"    train: {tasks_dir / 'mc.jsonl'}\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    return tasks_dir


def _evaluate(tmp_path, ckpt, wd, *extra) -> dict:
    out = tmp_path / "eval"
    rc = evaluate.main([f"--checkpoint={ckpt}", f"--baseline={ckpt}", f"--config={wd}", f"--output={out}",
                        "--general=", "--task=lm", "--seq_len=64", "--mesh=none", *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_evaluate_scores_the_workdir_holdout_and_adds_harness_scores(tmp_path, tiny_checkpoint, monkeypatch):
    """evaluate --config=WORKDIR scores the run's hold-out; --harness_tasks puts harness scores of
    baseline and tuned into report.json and report.md (lm_eval stubbed here; the real one below)."""
    from gemma_jax.eval import harness as harness_lib

    wd, _ = _workdir(tmp_path)
    calls = []
    monkeypatch.setattr(harness_lib, "task_manager", lambda t, p=None: (list(t), None))

    def scores(config, params, tokenizer, tasks_, **kw):
        calls.append((list(tasks_), kw["include_path"], kw["limit"]))
        return {"cli_mc": {"acc": 0.5 + 0.25 * len(calls)}}

    monkeypatch.setattr(harness_lib, "harness_scores", scores)
    report, md = _evaluate(tmp_path, tiny_checkpoint, wd, "--harness_tasks=cli_mc", "--harness_include_path=T",
                           "--harness_limit=3")
    assert report["data"].endswith("train.jsonl (held-out 0.25)")
    assert calls == [(["cli_mc"], "T", 3)] * 2
    h = report["harness"]
    assert h["tuned"] == {"cli_mc": {"acc": 0.75}} and h["baseline"] == {"cli_mc": {"acc": 1.0}}
    assert h["delta"]["cli_mc"]["acc"] == pytest.approx(-0.25)
    assert "| cli_mc | acc | 1.0000 | 0.7500 | -0.2500 |" in md


@pytest.mark.slow
def test_evaluate_with_real_harness_tasks(tmp_path, tiny_checkpoint):
    pytest.importorskip("lm_eval")
    wd, _ = _workdir(tmp_path)
    tasks_dir = _mc_task(tmp_path)
    report, md = _evaluate(tmp_path, tiny_checkpoint, wd, "--harness_tasks=cli_mc",
                           f"--harness_include_path={tasks_dir}")
    h = report["harness"]
    assert set(h["tuned"]) == {"cli_mc"} and 0.0 <= h["tuned"]["cli_mc"]["acc"] <= 1.0
    assert h["baseline"] == h["tuned"] and h["delta"]["cli_mc"]["acc"] == 0.0
    assert "| cli_mc | acc |" in md


# ----------------------------------------------------------------------------- progress output

METRIC_KEYS = ("loss", "accuracy", "learning_rate", "grad_norm", "tokens")


def _metrics(step):
    return {k: jnp.float32(1.0 / step if k == "loss" else 4.0 if k == "tokens" else 0.5) for k in METRIC_KEYS}


def _logger(tmp_path, *, start, total, stream=None):
    config = ModelConfig.from_preset("gemma2_tiny")
    kwargs = {} if stream is None else {"stream": stream}
    return log_lib.Logger(str(tmp_path), config=config, seq_len=8, batch_size=2, total_steps=total, start_step=start,
                          progress=True, stats={"examples": 3}, **kwargs)


def test_progress_without_a_terminal_is_plain_lines(tmp_path, capsys):
    """stdout captured (not a terminal): log lines only, no carriage returns or bar redraws."""
    logger = _logger(tmp_path, start=0, total=6)
    for step in range(1, 7):
        logger.step(step, _metrics(step), log=step % 2 == 0)
    logger.eval(6, {"eval_loss": 0.25})
    assert logger.close()["step"] == 6 and logger.last["loss"] == pytest.approx(1 / 6)
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert [line.split(" loss")[0] for line in lines if line.startswith("step ")] == ["step 2/6", "step 4/6",
                                                                                       "step 6/6"]
    assert "eval step 6: eval_loss 0.2500" in lines
    assert (tmp_path / "plots" / "loss.png").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_advances_every_step_with_lines_above(tmp_path):
    term = _Terminal()
    logger = _logger(tmp_path, start=0, total=4, stream=term)
    assert logger.bar is not None
    counts = []
    for step in range(1, 5):
        logger.step(step, _metrics(step), log=step == 4)
        counts.append(logger.bar.n)
    # Each step moves the bar to the last finished step (one in flight), the log step to itself.
    assert counts == [0, 1, 2, 4]
    logger.close()
    out = term.getvalue()
    assert "\r" in out  # a bar was drawn
    assert re.search(r"(^|\n|\r)step 4/4 loss 0\.2500", out)  # the line starts a line of its own


def test_warn_logs_a_warning(tmp_path, caplog, capsys):
    logger = _logger(tmp_path, start=0, total=2)
    with caplog.at_level(logging_std.WARNING):
        logger.warn("step 1: loss nan, skipped")
    assert any("loss nan" in r.getMessage() and r.levelno == logging_std.WARNING for r in caplog.records)
    logger.close()


def test_a_finished_rerun_draws_nothing_and_keeps_metrics_jsonl(tmp_path, capsys):
    logger = _logger(tmp_path, start=0, total=2)
    for step in (1, 2):
        logger.step(step, _metrics(step), log=True)
    logger.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    again = _logger(tmp_path, start=2, total=2, stream=_Terminal())
    assert again.bar is None
    assert again.close() == {}
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert capsys.readouterr().out == ""


def test_a_partial_last_metrics_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 2.0, "learning_rate": 1e-3}, {"step": 2, "loss": 1.5, "learning_rate": 1e-3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "lo')  # killed mid-write
    assert log_lib.read_metrics(str(path)) == good
    assert log_lib.plot_metrics(str(path), str(tmp_path / "plots")) == [str(tmp_path / "plots" / "loss.png")]


# ----------------------------------------------------------------------------- memory planner


def test_memory_table_labels_cpu_figures_and_takes_any_device_memory():
    plan = memory.Plan("lora", params=1, frozen=2 * 1024 ** 3, opt_state=3, grads=4, activations=5,
                       compiled=dict(peak=20 * 1024 ** 3, backend="cpu"))
    text = memory.table([plan], None, 1, device_memory_gib=24)
    assert "XLA:CPU peak (upper bound)" in text and "not a device figure" in text
    assert "fits device (24 GiB)" in text and "| yes |" in text  # the estimate decides, not the CPU figure
    assert memory.fits(plan, None, 1.5) == "no"
    tpu = memory.Plan("full", 1, 0, 1, 1, 1, compiled=dict(peak=5, backend="tpu"))
    assert "compiled peak (tpu)" in memory.table([tpu], "tpu-v5e", 8) and "upper bound" not in memory.table(
        [tpu], "tpu-v5e", 8)
    no_compile = memory.table([memory.Plan("full", 1, 0, 1, 1, 1)], "tpu-v5e", 8)
    assert "compiled" not in no_compile and "XLA:CPU" not in no_compile
    assert memory.param_count(1_250_000) == "1.25M" and memory.param_count(2_614_000_000) == "2.61B"


def test_memory_cli_with_device_memory(capsys):
    rc = memory.main([f"--config={LEGAL}:tiny", "--no_compile", "--device_memory_gib=0.5", "--modes=full,lora"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "M params" in out and "0.00B" not in out
    assert "fits device (0.5 GiB)" in out and "fits: total <= 90% of 0.5 GiB" in out


def test_config_docstring_figures_come_from_the_planner():
    """The GiB per chip quoted in each configs/*.py docstring is what the planner estimates now
    (regenerate: memory.variant_estimate_gib, or the command the docstring names)."""
    figures = {}
    for path in sorted((REPO / "configs").glob("*.py")):
        doc = path.read_text().split('"""')[1]
        if "GiB per chip" not in doc:
            continue
        quoted = dict(re.findall(r"((?:gemma3_)?\d+b(?:_q?lora)?) (\d+\.\d)", doc))
        quoted.update(re.findall(r"`:(\d+b)` \(?(\d+\.\d)", doc))
        assert set(quoted) == {"2b_lora", "9b_lora", "27b_lora", "27b_qlora", "2b", "9b", "27b", "gemma3_1b_lora",
                               "gemma3_4b_lora"}, (path, quoted)
        for variant, text in quoted.items():
            cfg = config_lib.load(f"{path}:{variant}")
            # What the plan depends on (train.steps, data files and the eval settings do not count).
            key = json.dumps([cfg.model.to_dict(), cfg.lora.to_dict(), cfg.mesh.to_dict(), cfg.data.seq_len,
                              cfg.train.batch_size, cfg.train.grad_accum, cfg.train.loss_chunk,
                              cfg.train.objective], default=str)
            if key not in figures:
                figures[key] = memory.variant_estimate_gib(f"{path}:{variant}", "tpu-v5e")
            assert f"{figures[key]:.1f}" == text, (path.name, variant, figures[key], text)


# ----------------------------------------------------------------------------- quiet logs


def _record(path: str, level: int, msg: str = "m") -> logging_std.LogRecord:
    return logging_std.LogRecord("absl", level, path, 1, msg, None, None)


def test_quiet_filter_hides_library_chatter_and_marks_our_warnings():
    from gemma_jax import logs

    quiet = logs.QuietLibraries()
    orbax = "/site-packages/orbax/checkpoint/_src/checkpointer.py"
    ours = str(REPO / "gemma_jax" / "train" / "loop.py")
    assert not quiet.filter(_record(orbax, logging_std.INFO))
    assert not quiet.filter(_record(orbax, logging_std.WARNING))
    assert quiet.filter(_record(orbax, logging_std.ERROR))
    assert quiet.filter(_record(ours, logging_std.INFO)) and quiet.filter(_record(ours, logging_std.WARNING))
    fmt = logs.OwnWarnings(logging_std.Formatter("%(levelname)s:%(message)s"), stream=_Terminal())
    assert fmt.format(_record(ours, logging_std.WARNING, "forgetting +21%")) == \
        "\033[33mWARNING gemma_jax: forgetting +21%\033[0m"
    plain = logs.OwnWarnings(None, stream=io.StringIO())
    assert plain.format(_record(ours, logging_std.WARNING, "x")) == "WARNING gemma_jax: x"
    assert plain.format(_record(ours, logging_std.INFO, "x")) == "INFO absl: x"  # INFO keeps its format


# ----------------------------------------------------------------------------- messages that tell the truth


def test_malformed_json_line_names_file_line_column_the_whole_reason_and_the_text(tmp_path):
    from gemma_jax.data import readers
    from gemma_jax.data.schema import DataError

    good = json.dumps({"instruction": "Summarise", "input": "", "output": "fine"})
    broken = '{"instruction": "Summarise", "input": "", "output": "the court held that the party was not notified'
    path = tmp_path / "train.jsonl"
    path.write_text(good + "\n" + broken + "\n" + good + "\n")
    column = broken.index('"the court') + 1
    with pytest.raises(DataError) as e:
        readers.read_examples(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}:2:{column}: ")
    # Python's own message, whole: the string that never ends starts at that column.
    assert f"Unterminated string starting at: line 1 column {column} (char {column - 1})" in message
    assert '"output": >>>"the court held' in message and "\n" not in message


def test_prepare_prints_rounded_figures(capsys):
    from gemma_jax import prepare

    assert prepare.run([f"--config={LEGAL}:tiny"]) == 0
    out = capsys.readouterr().out
    floats = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", out)]
    assert floats, out
    assert all(float(f"{x:.6g}") == x for x in floats), out
    assert not re.search(r"\.\d*(0000|9999)\d", out), out


def test_rounded_cuts_floats_everywhere_and_keeps_the_rest():
    value = {"a": 147.10000000000002, "b": [127.44999999999997, 3], "c": "x", "d": (0.1 + 0.2,), "e": float("nan")}
    out = cli.rounded(value)
    assert out["a"] == 147.1 and out["b"] == [127.45, 3] and out["c"] == "x" and out["d"] == (0.3,)
    assert out["e"] != out["e"]

