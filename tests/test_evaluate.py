"""Evaluation: a model against itself changes nothing; a briefly fine-tuned model beats its init."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

import gemma_jax
from gemma_jax import config as config_lib, data as data_lib, evaluate, model as model_lib, sharding, train
from gemma_jax.eval import report as report_lib, tasks
from gemma_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "data" / "tokenizer.model")
GENERAL = str(REPO / "data" / "general" / "eval.txt")


def random_params(config, *, seed: int, scale: float = 1.0):
    """Random float32 params from numpy (model.init_params takes seconds to compile)."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        std = 1.0 if "input_embedding" in jax.tree_util.keystr(path) else 0.2 if len(s.shape) > 1 else 0.1
        return rng.normal(0.0, std * scale, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, model_lib.param_shapes(config))


def eval_settings(task: str, **changes):
    """The eval and data sections of a config, at the sizes of the end-to-end test below."""
    cfg = config_lib.base_config()
    cfg.eval.task, cfg.eval.metric = task, changes.pop("metric", "loss")
    cfg.eval.general, cfg.eval.max_examples, cfg.eval.max_new_tokens = GENERAL, 8, 24
    cfg.data.seq_len = 128
    for k, v in changes.items():
        cfg.eval[k] = v
    return cfg.eval, cfg.data


def small_model_config():
    """The ModelConfig the end-to-end test trains, so every test here shares its compiled programs."""
    return train.model_config(small_translation_config(steps=1), Tokenizer(TOKENIZER))


def on_device(params):
    """Params committed to device 0, as gemma_jax.load places them (same compiled programs)."""
    return jax.device_put(params, jax.devices()[0])


def test_model_against_itself_reports_zero_change():
    config = small_model_config()
    params = on_device(random_params(config, seed=0))
    eval_cfg, data_cfg = eval_settings("translation", metric="chrf")
    report = tasks.run_eval(config, params, Tokenizer(TOKENIZER), eval_cfg,
                               str(REPO / "data/translation/eval.csv"), baseline_params=params, data_cfg=data_cfg)
    expected = {"chrf", "bleu", "loss", "perplexity", "token_accuracy", "general_loss", "general_perplexity"}
    assert set(report["tuned"]) == set(report["baseline"]) == expected
    assert next(iter(report["tuned"])) == "chrf"  # the headline leads
    assert all(d == 0 for d in report["delta"].values()), report["delta"]
    assert report["tuned"]["loss"] > 1.0  # a random model is far from the data
    f = report["forgetting"]
    assert f["relative_change"] == 0 and not f["exceeded"] and f["loss_tuned"] == report["tuned"]["general_loss"]
    assert len(report["examples"]) == 8
    assert all(ex["tuned"] == ex["baseline"] for ex in report["examples"])
    assert report["examples"][0]["reference"] == "Tu regardes ce chien."


def test_loss_on_a_mesh_matches_one_device():
    """Sharded params and batches (fsdp over 8 devices, as in training) give the same loss."""
    config = small_model_config()
    params = on_device(random_params(config, seed=1))
    tok = Tokenizer(TOKENIZER)
    rows = tasks.pack_rows(tasks.read_eval_data(str(REPO / "data/legal/eval.jsonl")), tok, seq_len=128)
    mesh = sharding.make_mesh(1, -1, 1)
    sharded = jax.device_put(params, sharding.param_shardings(config, mesh))
    one = tasks.token_loss(config, params, rows, batch_size=8, pad_id=tok.pad_id)
    # batch_size 6 is rounded up to 8 so every fsdp shard gets a whole row.
    many = tasks.token_loss(config, sharded, rows, batch_size=6, pad_id=tok.pad_id, mesh=mesh)
    assert one["tokens"] == many["tokens"] == rows["loss_mask"].sum()
    for k in ("loss", "token_accuracy"):
        assert many[k] == pytest.approx(one[k], rel=1e-5), k


def test_held_out_fraction_is_the_split_training_held_out():
    """No eval file, data.eval_fraction set: the same rows as the trainer's eval set for that seed."""
    cfg = config_lib.base_config()
    cfg.data.train, cfg.data.eval_fraction, cfg.data.seq_len = str(REPO / "data/legal/train.jsonl"), 0.1, 128
    tok = Tokenizer(TOKENIZER)
    built = data_lib.build(cfg.data, tok, global_batch_size=8, seed=3)
    mine = tasks.pack_rows(tasks.read_eval_data("", cfg.data, holdout_seed=3), tok, seq_len=128)
    n = len(mine["inputs"])
    for k in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(np.concatenate([b[k] for b in built.eval])[:n], mine[k], err_msg=k)
    other = tasks.pack_rows(tasks.read_eval_data("", cfg.data, holdout_seed=4), tok, seq_len=128)
    assert other["inputs"].shape != mine["inputs"].shape or (other["inputs"] != mine["inputs"]).any()


def test_forgetting_threshold_warns(caplog):
    base, tuned = {"general_loss": 2.0}, {"general_loss": 2.5}
    with caplog.at_level(logging.WARNING):
        f = tasks.forgetting_check(base, tuned, 0.10, "general.txt")
    assert f["relative_change"] == pytest.approx(0.25) and f["exceeded"]
    assert "catastrophic forgetting" in caplog.text and "25.0%" in caplog.text
    assert not tasks.forgetting_check(base, {"general_loss": 2.1}, 0.10, "general.txt")["exceeded"]
    md = report_lib.markdown(dict(task="lm", metric="loss", data="x", generated=0, tuned=tuned, baseline=base,
                                forgetting=f, settings=dict(max_new_tokens=1, temperature=0.0, seq_len=8)))
    assert "WARNING: past the threshold" in md and "| general_loss | 2.0000 | 2.5000 | +0.5000 | worse |" in md


def test_code_items_carry_their_tests(tmp_path):
    """Every code example keeps its asserts; the reference programs pass them, an empty answer does not."""
    spec = str(REPO / "data/code/eval.json")
    items = tasks.generation_items(tasks.read_eval_data(spec), task="code", spec=spec, limit=4)
    assert len(items) == 4 and all(it.tests and it.tests[0].startswith("assert") for it in items)
    scores, results = tasks.score_answers("code", [it.reference for it in items], items, code_timeout=5)
    assert scores == {"pass_rate": 100.0} and results == ["passed"] * 4
    assert tasks.score_answers("code", ["pass"] * 4, items, code_timeout=5)[0] == {"pass_rate": 0.0}

    bad = tmp_path / "no_tests.jsonl"
    bad.write_text(json.dumps({"instruction": "Write f.", "output": "def f(): pass"}) + "\n")
    with pytest.raises(ValueError, match=r"no_tests.jsonl:1: task 'code' needs a field \"tests\""):
        tasks.generation_items(tasks.read_eval_data(str(bad)), task="code", spec=str(bad))


def small_translation_config(steps: int):
    """configs/translation.py:tiny shrunk to a 2-layer, width-64 model: about a second per 10 steps."""
    cfg = config_lib.load(str(REPO / "configs/translation.py") + ":tiny")
    m = cfg.model
    m.num_layers, m.embed_dim, m.hidden_dim = 2, 64, 128
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 16
    m.query_pre_attn_scalar, m.sliding_window = 16.0, 32
    m.dtype = m.param_dtype = "float32"
    cfg.data.tokenizer = TOKENIZER
    cfg.data.train, cfg.data.eval = str(REPO / "data/translation/train.csv"), ""
    cfg.data.seq_len = 128
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.eval_every = steps, 8, 20, 0
    cfg.train.progress, cfg.train.export_format = False, ""
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay = 3e-3, 5, 0.0
    cfg.checkpoint.async_save, cfg.checkpoint.every_steps = False, 1000
    # Data parallel over the 8 CPU devices: on 2 cores a third faster per step than fsdp for this size.
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
    return cfg


@pytest.mark.slow
def test_fine_tuned_model_beats_its_init_end_to_end(tmp_path):
    """Train 60 steps from a saved random init, then `python -m gemma_jax.evaluate` tuned vs that init."""
    cfg = small_translation_config(steps=60)
    config = train.model_config(cfg, Tokenizer(TOKENIZER))
    init = gemma_jax.save(str(tmp_path / "init"), config, random_params(config, seed=2, scale=0.2),
                          format="gemma_jax", tokenizer=TOKENIZER)
    cfg.model.init_checkpoint = init
    assert train.run(cfg, str(tmp_path / "work"))["step"] == 60

    out = tmp_path / "eval"
    rc = evaluate.main([f"--checkpoint={tmp_path / 'work'}", f"--baseline={init}", f"--output={out}",
                        f"--config={REPO / 'configs/translation.py'}:tiny",
                        f"--data={REPO / 'data/translation/eval.csv'}", f"--general={GENERAL}",
                        "--max_examples=8", "--max_new_tokens=24", "--seq_len=128", "--mesh=none"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "translation" and report["metric"] == "chrf"  # from the config's eval section
    base, tuned = report["baseline"], report["tuned"]
    assert tuned["loss"] < base["loss"] - 3, (base["loss"], tuned["loss"])
    assert tuned["token_accuracy"] > base["token_accuracy"] + 0.3
    assert tuned["chrf"] > base["chrf"] + 15, (base["chrf"], tuned["chrf"])
    assert report["delta"]["chrf"] == pytest.approx(tuned["chrf"] - base["chrf"])
    assert set(report["forgetting"]) >= {"loss_baseline", "loss_tuned", "relative_change", "exceeded"}
    assert len(report["examples"]) == 8 and report["examples"][0]["reference"] == "Tu regardes ce chien."
    md = (out / "report.md").read_text()
    assert "| **chrf** |" in md and "better" in md and "Tu regardes ce chien." in md
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
