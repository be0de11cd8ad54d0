"""DPO that keeps the model: the NLL term on the chosen responses (dpo.sft_weight), the logged
log-probs, `evaluate` on a preference workdir, and configs/preference.py:tiny's starting point."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import data as data_lib, evaluate, loss as loss_lib, train
from gemma_jax.errors import UserError
from gemma_jax.eval import metrics as metrics_lib
from gemma_jax.train import __main__ as train_main, objectives
from test_dpo import PAIRS, _plain_sums, dpo_config, np_dpo, pair_rows, tiny
from test_train import init_checkpoint, one_device_mesh, read_metrics, rows_of, small_config, tokenizer  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def np_dpo_sft(pc, pr, rc, rr, nc, beta, w):
    """TRL's loss_type ["sigmoid", "sft"], loss_weights [1, w]: the mean DPO term plus w times the
    chosen tokens' mean NLL over the batch."""
    return np.mean(np_dpo(pc, pr, rc, rr, beta)) + w * np.sum(-pc) / np.sum(nc)


def _step_loss(obj, pc, pr, nc, nr, rc, rr):
    """The step loss from per-pair sums, reduced as pair_scores and step_loss reduce them."""
    t = objectives.pair_terms(obj, pc, pr, nc, nr, rc, rr)
    scores = dict(loss_sum=jnp.sum(t["loss"]), nll_sum=jnp.sum(t["nll"]))
    return objectives.step_loss(scores, jnp.float32(pc.shape[0]), jnp.sum(nc))


def test_sft_weight_adds_the_chosen_token_mean_nll_with_its_gradient():
    rng = np.random.default_rng(1)
    nc, nr = rng.integers(3, 30, 12).astype(np.float64), rng.integers(3, 30, 12).astype(np.float64)
    pc, pr = -rng.uniform(0.1, 3, 12) * nc, -rng.uniform(0.1, 3, 12) * nr
    rc, rr = pc + rng.normal(0, 3, 12), pr + rng.normal(0, 3, 12)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    for beta, w in ((0.1, 1.0), (0.5, 0.2), (0.1, 3.0)):
        obj = objectives.Objective("dpo", beta, sft_weight=w)
        loss = _step_loss(obj, *map(f32, (pc, pr, nc, nr, rc, rr)))
        np.testing.assert_allclose(loss, np_dpo_sft(pc, pr, rc, rr, nc, beta, w), rtol=1e-5)
        # d/d(chosen sum): the DPO term's -beta sigmoid(-beta h) / pairs, and -w / chosen tokens.
        g_c, g_r = jax.grad(lambda c, r: _step_loss(obj, c, r, *map(f32, (nc, nr, rc, rr))), argnums=(0, 1))(
            f32(pc), f32(pr))
        s = 1.0 / (1.0 + np.exp(beta * ((pc - rc) - (pr - rr))))
        np.testing.assert_allclose(g_c, -beta * s / 12 - w / nc.sum(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g_r, beta * s / 12, rtol=1e-4, atol=1e-7)

    # Through the model: the term is w times the chosen responses' NLL per token (from full
    # logits), and its gradient matches a finite difference along a random direction.
    config, params = tiny()
    rows = {k: jnp.asarray(v) for k, v in objectives.pair_rows(pair_rows(PAIRS[:4], seq_len=64)).items()}
    ref = _plain_sums(config, jax.tree.map(lambda x: x * 0.9, params), rows)

    def loss_of(p, w):
        s = objectives.pair_scores(p, rows, ref, obj=objectives.Objective("dpo", 0.3, sft_weight=w), config=config,
                                   chunk=48)
        return objectives.step_loss(s, s["pairs"], s["chosen_tokens"])

    counts = _counts(rows)
    c, _, nc_, _, valid = objectives.split_pairs(_plain_sums(config, params, rows), counts)
    nll_per_token = -jnp.sum(jnp.where(valid, c, 0)) / jnp.sum(jnp.where(valid, nc_, 0))
    np.testing.assert_allclose(loss_of(params, 2.0) - loss_of(params, 0.0), 2.0 * nll_per_token, rtol=1e-4)
    fn = jax.jit(lambda p: loss_of(p, 2.0))
    grads = jax.jit(jax.grad(fn))(params)
    d = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype), params)
    eps = 1e-3
    fd = (fn(jax.tree.map(lambda p, u: p + eps * u, params, d)) -
          fn(jax.tree.map(lambda p, u: p - eps * u, params, d))) / (2 * eps)
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
    np.testing.assert_allclose(fd, directional, rtol=2e-2)


def _counts(rows):
    return loss_lib.segment_sums(rows["loss_mask"], rows["segment_ids"])


def test_sft_weight_zero_is_plain_dpo_exactly():
    """dpo.sft_weight=0 adds exact zeros: the loss and gradient are the DPO term's alone, bit for bit."""
    config, params = tiny()
    rows = {k: jnp.asarray(v) for k, v in objectives.pair_rows(pair_rows(PAIRS[:4], seq_len=64)).items()}
    ref = _plain_sums(config, jax.tree.map(lambda x: x * 0.9, params), rows)
    cfg = dpo_config(1, 4, sft_weight=0.0)
    obj = objectives.from_config(cfg)
    assert obj.sft_weight == 0.0

    def scores(p):
        return objectives.pair_scores(p, rows, ref, obj=obj, config=config, chunk=48)

    step = jax.jit(jax.value_and_grad(lambda p: objectives.step_loss(scores(p), scores(p)["pairs"],
                                                                       scores(p)["chosen_tokens"])))
    dpo_only = jax.jit(jax.value_and_grad(lambda p: scores(p)["loss_sum"] / scores(p)["pairs"]))
    (v1, g1), (v2, g2) = step(params), dpo_only(params)
    assert float(jax.jit(scores)(params)["nll_sum"]) == 0.0
    assert float(v1) == float(v2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)
    # ... and that DPO term is the published formula on the full-logits sums.
    counts = _counts(rows)
    c, r, _, _, _ = objectives.split_pairs(_plain_sums(config, params, rows), counts)
    rc, rr, _, _, _ = objectives.split_pairs(ref, counts)
    want = np.mean(np_dpo(*(np.asarray(x, np.float64).sum(-1) for x in (c, r, rc, rr)), 0.1))
    np.testing.assert_allclose(v1, want, rtol=1e-5)


def test_sft_weight_is_checked():
    for bad in (-0.5, float("nan"), float("inf")):
        cfg = dpo_config(1, 4, sft_weight=bad)
        with pytest.raises(UserError, match=r"dpo\.sft_weight=.* must be >= 0"):
            objectives.from_config(cfg)
    cfg = small_config()
    cfg.train.objective = "dpo"
    assert objectives.from_config(cfg).sft_weight == 1.0  # the default: the NLL term on (0 is TRL's plain DPO)


def _logps(config, params, rows):
    """(chosen, rejected, chosen lengths, rejected lengths) of the real pairs of `rows`, from full logits."""
    flat = {k: jnp.asarray(v) for k, v in objectives.pair_rows(rows).items()}
    c, r, nc, nr, valid = objectives.split_pairs(_plain_sums(config, params, flat), _counts(flat))
    return [np.asarray(x, np.float64)[np.asarray(valid)] for x in (c, r, nc, nr)]


def _logged(c, r, nc, nr) -> dict:
    return {"logps/chosen": c.mean(), "logps/rejected": r.mean(),
            "logps/chosen_per_token": c.sum() / nc.sum(), "logps/rejected_per_token": r.sum() / nr.sum()}


def test_nll_term_keeps_the_chosen_likelihood_up_and_the_logps_are_logged():
    """From a model taught the chosen answers (briefly), plain DPO drives the chosen responses'
    likelihood down while it separates the pairs; with dpo.sft_weight it rises instead, and both
    reach reward accuracy 1. The step and eval metrics carry the chosen and rejected log-probs
    (mean sum per response, and per token) as the full logits give them."""
    tok = tokenizer()
    make = lambda i: {"prompt": f"Clause {i}: the tenant pays rent on day {i % 28 + 1}. Summarise.",  # noqa: E731
                      "chosen": f"The tenant pays rent on day {i % 28 + 1}.",
                      "rejected": "It is about the tenant and the rent."}
    pairs = [make(i) for i in range(8)]
    sft = small_config(steps=10, batch_size=8)
    sft.opt.lr, sft.opt.warmup_steps = 1e-2, 3
    config = train.model_config(sft, tok)
    trainer = train.Trainer.create(sft, config, one_device_mesh())
    state = trainer.init_state()
    examples = [data_lib.to_example({"prompt": p["prompt"], "completion": p["chosen"]}, "mem") for p in pairs]
    batch = trainer.put_batch(rows_of(examples, 64, packing=False))
    for _ in range(sft.train.steps):
        state, _ = trainer.step(state, batch)
    rows = pair_rows(pairs, seq_len=96)  # packed: several pairs per row
    start = _logps(config, state["params"], rows)
    assert len(start[0]) == 8
    for w in (0.0, 1.0):
        cfg = dpo_config(10, 4, lr=1e-2, beta=0.1, sft_weight=w)
        dpo = train.Trainer.create(cfg, config, one_device_mesh())
        dpo.set_reference(state["params"])
        s = dpo.init_state(state["params"])
        b = dpo.put_batch(rows)
        for i in range(cfg.train.steps):
            s, m = dpo.step(s, b)
            if i == 0:  # a step's metrics are those of the params it started from
                for k, v in _logged(*start).items():
                    np.testing.assert_allclose(float(m[k]), v, rtol=1e-4, err_msg=k)
        end = _logps(config, s["params"], rows)
        ref_margin = 0.1 * ((end[0] - start[0]) - (end[1] - start[1]))
        assert (ref_margin > 0).all() and end[1].mean() < start[1].mean(), w  # the pairs are separated
        if w == 0.0:
            assert end[0].mean() < start[0].mean() - 2.0, (start[0].mean(), end[0].mean())  # displaced
        else:
            assert end[0].mean() >= start[0].mean() + 2.0, (start[0].mean(), end[0].mean())  # kept up
            ev = dpo.evaluate(s["params"], [rows])
            assert ev["eval_rewards/accuracies"] == 1.0
            for k, v in _logged(*end).items():
                np.testing.assert_allclose(ev["eval_" + k], v, rtol=1e-4, err_msg=k)


# ----------------------------------------------------------------------------- evaluate on a preference workdir


@pytest.fixture(scope="module")
def dpo_workdir(tmp_path_factory, init_checkpoint):  # noqa: F811
    """A 2-step DPO run (train.run) from a saved model on pair files, held-out pairs in data.eval."""
    d = tmp_path_factory.mktemp("dpo_wd")
    (d / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:8]))
    (d / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS[8:]))
    cfg = dpo_config(2, 4, sft_weight=1.0)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.model.init_checkpoint = init_checkpoint
    cfg.data.train, cfg.data.eval = str(d / "train.jsonl"), str(d / "eval.jsonl")
    cfg.eval.task, cfg.eval.metric, cfg.eval.general = "summarization", "rouge_l", ""
    cfg.eval.max_new_tokens = 8
    train.run(cfg, str(d / "wd"))
    return d / "wd"


def test_preference_run_logs_logps_in_metrics_jsonl(dpo_workdir):
    records = read_metrics(dpo_workdir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert steps and evals
    for k in ("logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token"):
        assert all(np.isfinite(r[k]) and r[k] < 0 for r in steps), k
        assert np.isfinite(evals[-1]["eval_" + k]) and evals[-1]["eval_" + k] < 0, k


def test_evaluate_on_a_preference_workdir_scores_the_prompts_against_the_chosen_responses(dpo_workdir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main([f"--checkpoint={dpo_workdir}", f"--output={out}", "--max_examples=0"]) == 0
    report = json.loads((out / "report.json").read_text())
    held_out = PAIRS[8:]
    assert report["generated"] == len(held_out)
    assert [e["reference"] for e in report["examples"]] == [p["chosen"] for p in held_out]
    assert [e["rejected"] for e in report["examples"]] == [p["rejected"] for p in held_out]
    tuned = report["tuned"]
    # The loss is the chosen responses' NLL per token: what the run's final eval logged.
    final = [r for r in read_metrics(dpo_workdir) if "eval_logps/chosen_per_token" in r][-1]
    np.testing.assert_allclose(tuned["loss"], -final["eval_logps/chosen_per_token"], rtol=1e-4)
    answers = [e["tuned"] for e in report["examples"]]
    rouge_l = lambda a, b: metrics_lib.rouge([a], [b])["rouge_l"]  # noqa: E731
    want = np.mean([rouge_l(a, p["chosen"]) > rouge_l(a, p["rejected"]) for a, p in zip(answers, held_out)])
    assert tuned["chosen_rate"] == pytest.approx(want)
    assert tuned["rouge_l"] == pytest.approx(metrics_lib.rouge(answers, [p["chosen"] for p in held_out])["rouge_l"])


def test_evaluate_reads_held_out_pairs_of_data_eval_fraction(tmp_path):
    """No data.eval: the pairs preference training held out (data.eval_fraction with train.seed)."""
    from gemma_jax.data import preference
    from gemma_jax.eval import tasks

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    cfg = dpo_config(1, 4)
    cfg.data.train, cfg.data.eval, cfg.data.eval_fraction, cfg.train.seed = str(path), "", 0.25, 3
    examples = tasks.read_eval_data("", cfg.data, holdout_seed=3)
    pairs, _ = preference.read_pairs(str(path))
    _, held = data_lib.holdout(pairs, 0.25, seed=3)
    assert [e.turns[-1]["content"] for e in examples] == [p.chosen for p in held] and len(held) == 3
    assert tasks.is_pair_data(str(path)) and not tasks.is_pair_data(str(REPO / "data" / "legal" / "eval.jsonl"))


# ----------------------------------------------------------------------------- the tiny config's starting point


def test_preference_tiny_refuses_a_missing_init_checkpoint_with_one_error_line(capsys, tmp_path):
    wd = tmp_path / "dpo"
    with pytest.raises(SystemExit) as e:
        train_main.run([f"--config={REPO}/configs/preference.py:tiny", f"--workdir={wd}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "model.init_checkpoint" in lines[0] and "--config.model.init_checkpoint=" in lines[0]
    assert "configs/legal.py:tiny" in lines[0]  # how to make one: the Quickstart
    assert not wd.exists()  # refused before anything is written
    # The config file's docstring gives the command that sets it.
    doc = (REPO / "configs" / "preference.py").read_text().split('"""')[1]
    assert "--config=configs/preference.py:tiny" in doc and "--config.model.init_checkpoint=/tmp/legal_tiny" in doc
