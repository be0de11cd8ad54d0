"""lm-evaluation-harness backend: parity with lm_eval's own hf backend on an HF export, offline.

Small local tasks (YAML over JSONL written here): multiple choice (loglikelihood), perplexity
(loglikelihood_rolling, in windows shorter than the documents) and generation with stop strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lm_eval  # noqa: E402  (the harness extra; in the test extra too)

import gemma_jax  # noqa: E402
from gemma_jax.model import ModelConfig  # noqa: E402
from gemma_jax.tokenizer import Tokenizer  # noqa: E402
from test_train import init_checkpoint  # noqa: E402,F401  (a fixture: the small model's base checkpoint)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizer.model"
CFG = ModelConfig(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
                  query_pre_attn_scalar=16, vocab_size=2048, sliding_window=16, max_seq_len=256)
MAX_LENGTH = 48  # shorter than the perplexity documents, so rolling windows are exercised

QUESTIONS = [("The lessee shall pay", ["rent monthly.", "the moon.", "nothing at all."], 0),
             ("A contract is", ["an agreement.", "a fish.", "blue."], 0),
             ("The court held that", ["the claim failed.", "cats fly.", "seven."], 1),
             ("Under this clause the tenant", ["must repair.", "may sing.", "is green."], 2),
             ("Translate: good morning ->", [" bonjour", " merci", " adieu"], 0)]
DOCS = ["The parties agree that the lessee shall pay rent on the first day of each month, and that late "
        "payment incurs interest at the statutory rate until the full amount is paid.",
        "Termination. Either party may end this agreement with thirty days written notice.",
        "Ünïcödé text, digits 12345 and  two  spaces\n\nwith a blank line."]
PROMPTS = ["Summarise: The tenant shall pay rent monthly.", "Q: What is a contract?", "Once upon a time",
           "The court", "List three fruits:"]


def _write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    with open(tasks / "mc.jsonl", "w") as f:
        for q, choices, gold in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}) + "\n")
    with open(tasks / "ppl.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    with open(tasks / "gen.jsonl", "w") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p, "answer": "rent"}) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (tasks / "mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    train: {tasks / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (tasks / "ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    train: {tasks / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    train: {tasks / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jax

    root = tmp_path_factory.mktemp("harness")
    rng = np.random.default_rng(0)

    def one(path, s):
        std = 1.0 if "input_embedding" in jax.tree_util.keystr(path) else 0.3 if len(s.shape) > 1 else 0.1
        return rng.normal(0.0, std, s.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(one, gemma_jax.model.param_shapes(CFG))
    hf = root / "hf"
    gemma_jax.save(str(hf), CFG, params, format="hf", tokenizer=str(TOKENIZER))
    tok = Tokenizer(str(TOKENIZER))  # the export carries tokenizer_config.json and generation_config.json
    return dict(root=root, hf=hf, tasks=_write_tasks(root), params=params, tok=tok)


def _evaluate(model, tasks, include_path):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(include_path)),
                                   log_samples=True, bootstrap_iters=0)


def _responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_matches_lm_eval_hf_backend(setup):
    from lm_eval.models.huggingface import HFLM

    from gemma_jax.eval.harness import GemmaJaxLM

    tasks = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    hf_lm = HFLM(pretrained=str(setup["hf"]), device="cpu", dtype="float32", max_length=MAX_LENGTH, batch_size=1)
    ours = GemmaJaxLM(str(setup["hf"]), mesh="1,4,2", max_length=MAX_LENGTH, batch_size=8)
    ref, got = _evaluate(hf_lm, tasks, setup["tasks"]), _evaluate(ours, tasks, setup["tasks"])

    ref_mc, got_mc = _responses(ref, "tiny_mc"), _responses(got, "tiny_mc")
    assert len(got_mc) == len(QUESTIONS)
    for a, b in zip(ref_mc, got_mc):
        for (la, ga), (lb, gb) in zip([r[0] for r in a], [r[0] for r in b]):
            assert abs(la - lb) < 1e-4 and ga == gb
    assert got["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    ref_ppl, got_ppl = _responses(ref, "tiny_ppl"), _responses(got, "tiny_ppl")
    for a, b in zip(ref_ppl, got_ppl):
        assert abs(a[0][0] - b[0][0]) < 1e-4 * max(1.0, abs(a[0][0]))  # a sum over ~40 float32 terms
    for key in ("word_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(got["results"]["tiny_ppl"][key], ref["results"]["tiny_ppl"][key], rtol=1e-5)
    ref_gen, got_gen = _responses(ref, "tiny_gen"), _responses(got, "tiny_gen")
    assert [r[0] for r in got_gen] == [r[0] for r in ref_gen]
    assert any(r[0][0] for r in got_gen)  # not all empty


@pytest.mark.slow
def test_cli_writes_lm_eval_results_json(setup, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f"--checkpoint={setup['hf']}", f"--include_path={setup['tasks']}", "--mesh=none",
             f"--max_length={MAX_LENGTH}"]
    base = [sys.executable, "-m", "gemma_jax.harness", *flags]
    done = subprocess.run(base + ["--tasks=tiny_mc", f"--output={out}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [path] = list(out.glob("*/results_*.json"))
    data = json.loads(path.read_text())
    assert set(data["results"]) == {"tiny_mc"} and 0.0 <= data["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert data["n-samples"]["tiny_mc"]["effective"] == len(QUESTIONS)
    assert "tiny_mc" in (out / "results.md").read_text()
    # A misspelled task: one error line, exit 2 (in-process, the same main as the command line).
    from gemma_jax import harness as harness_cli
    with pytest.raises(SystemExit) as exit_info:
        harness_cli.main(flags + ["--tasks=no_such_task"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no_such_task" in err.splitlines()[-2], err[-2000:]


def _hf_scores(hf_lm, pairs):
    """lm_eval's hf backend on token requests (its own batching, truncation and greedy check)."""
    return hf_lm._loglikelihood_tokens([(("", ""), list(c), list(x)) for c, x in pairs], disable_tqdm=True)


def _greedy(hf_lm, ctx, n):
    """The torch model's own greedy continuation of ctx (n tokens)."""
    import torch

    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


@pytest.mark.slow
def test_shared_context_trees_and_long_requests_match_hf_with_greedy_flags(setup, monkeypatch):
    """Token-level requests: several continuations of one context (scored as one tree), the
    model's own greedy continuation (greedy True) beside others (False), and requests over
    PACK_LIMIT (lowered here) that are scored one per row: log-probs within 1e-4, same flags."""
    from lm_eval.models.huggingface import HFLM

    from gemma_jax.eval import harness as harness_lib

    tok = setup["tok"]
    hf_lm = HFLM(pretrained=str(setup["hf"]), device="cpu", dtype="float32", batch_size=1)
    ctx = [tok.bos_id] + tok.encode("The lessee shall pay the rent", add_bos=False)
    greedy = _greedy(hf_lm, ctx, 5)
    rng = np.random.default_rng(5)
    other = [int(t) for t in rng.integers(3, 2000, 6)]
    long_ctx = [tok.bos_id] + [int(t) for t in rng.integers(3, 2000, 40)]
    pairs = [(ctx, greedy), (ctx, greedy[:2]), (ctx, other), (ctx, greedy[:3] + other[:2]),
             (long_ctx, _greedy(hf_lm, long_ctx, 3)), (long_ctx, other[:4]), ([tok.bos_id], other[:3])]
    monkeypatch.setattr(harness_lib, "PACK_LIMIT", 30)  # the long_ctx requests go one per row
    got = harness_lib.GemmaJaxLM(str(setup["hf"]), mesh="none", batch_size=4).score_tokens(pairs)
    ref = _hf_scores(hf_lm, pairs)
    for (lg, gg), (lr, gr) in zip(got, ref):
        assert abs(lg - lr) < 1e-4 and gg == gr
    flags = [g for _, g in got]
    assert flags[0] and flags[1] and flags[4] and not flags[2] and not flags[5]


@pytest.mark.slow
def test_lora_workdir_is_scored_merged(setup, tmp_path, init_checkpoint):
    """A LoRA training workdir scores as its merged weights: equal to lm_eval's hf backend on the
    merged HF export, and different from the base (the adapters count)."""
    from lm_eval.models.huggingface import HFLM

    from gemma_jax import train
    from gemma_jax.eval.harness import GemmaJaxLM
    from test_train_lora import lora_config

    cfg = lora_config(2, rank=4, batch_size=8)
    cfg.model.init_checkpoint = init_checkpoint
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.opt.lr, cfg.opt.warmup_steps = 5e-2, 0
    workdir = tmp_path / "lora_run"
    assert train.run(cfg, str(workdir))["step"] == 2
    config, merged = gemma_jax.load(str(workdir))
    gemma_jax.save(str(tmp_path / "merged_hf"), config, merged, format="hf", tokenizer=str(TOKENIZER))
    tok = setup["tok"]
    pairs = [([tok.bos_id] + tok.encode(q, add_bos=False), tok.encode(" " + c, add_bos=False))
             for q, choices, _ in QUESTIONS for c in choices]
    ours = GemmaJaxLM(str(workdir), mesh="none").score_tokens(pairs)
    ref = _hf_scores(HFLM(pretrained=str(tmp_path / "merged_hf"), device="cpu", dtype="float32", batch_size=1), pairs)
    base = GemmaJaxLM(init_checkpoint, mesh="none", tokenizer=str(TOKENIZER)).score_tokens(pairs)
    for (lo, go), (lr, gr) in zip(ours, ref):
        assert abs(lo - lr) < 1e-4 and go == gr
    assert max(abs(lo - lb) for (lo, _), (lb, _) in zip(ours, base)) > 1e-3


# ----------------------------------------------------------------------------- inputs checked up front


def _harness_error(monkeypatch, capsys, flags):
    """Runs the harness command in-process; the model must not load. Returns its one error line."""
    from gemma_jax import harness as harness_cli
    from gemma_jax.eval import harness as backend

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(backend, "GemmaJaxLM", no_model)
    with pytest.raises(SystemExit) as exit_info:
        harness_cli.main(["--checkpoint=/nonexistent/checkpoint", "--mesh=none", *flags])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def _task(tasks: Path, name: str, data_file: str, split: str = "train") -> None:
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ntest_split: {split}\ndataset_kwargs:\n  data_files:\n"
        f"    train: {data_file}\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{{{text}}}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")


def test_malformed_task_yaml_is_reported_with_its_parse_error_file_and_line(tmp_path, monkeypatch, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken_task\ndataset_path: json\n  test_split: train\n")
    (tasks / "unclosed.yaml").write_text("task: unclosed_task\ndoc_to_text: '{{question}}\nmetric_list: []\n")
    line = _harness_error(monkeypatch, capsys, [f"--include_path={tasks}", "--tasks=broken_task"])
    assert f"{tasks / 'broken.yaml'}:3:" in line and "malformed YAML" in line and "mapping values" in line, line
    assert "unknown" not in line
    line = _harness_error(monkeypatch, capsys, [f"--include_path={tasks}", "--tasks=unclosed_task"])
    assert f"{tasks / 'unclosed.yaml'}:" in line and "malformed YAML" in line and "quoted scalar" in line, line


@pytest.mark.parametrize("limit", ["0", "-3", "-0.5", "nan"])
def test_limit_zero_or_negative_is_an_error_before_the_model_loads(tmp_path, monkeypatch, capsys, limit):
    line = _harness_error(monkeypatch, capsys, ["--tasks=arc_easy", f"--limit={limit}"])
    assert line.startswith(f"error: --limit={limit.lstrip('+')}: must be a number > 0"), line


def test_missing_or_empty_task_dataset_is_an_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    empty, blank, array = tasks / "empty.jsonl", tasks / "blank.jsonl", tasks / "array.json"
    empty.write_text("")
    blank.write_text("\n  \n")
    array.write_text("[]")
    for name, f in (("t_missing", tasks / "missing.jsonl"), ("t_empty", empty), ("t_blank", blank),
                    ("t_array", array)):
        _task(tasks, name, str(f))
        line = _harness_error(monkeypatch, capsys, [f"--include_path={tasks}", f"--tasks={name}"])
        what = "does not exist" if name == "t_missing" else "is empty"
        assert f"task {name}" in line and f"dataset file {f} {what}" in line, line
    # A group reaches its tasks' files; a split the data files do not have is named too.
    (tasks / "grp.yaml").write_text("group: grp\ntask:\n  - t_empty\n")
    line = _harness_error(monkeypatch, capsys, [f"--include_path={tasks}", "--tasks=grp"])
    assert f"dataset file {empty} is empty" in line, line
    _task(tasks, "t_split", str(tasks / "ppl.jsonl"), split="test")
    (tasks / "ppl.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    line = _harness_error(monkeypatch, capsys, [f"--include_path={tasks}", "--tasks=t_split"])
    assert "split(s) ['test'] not among its data_files ['train']" in line, line
