"""Preference tuning: DPO/IPO/cDPO/ORPO/SimPO losses, summed log-probs, the reference, pair data, training."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import loss as loss_lib, model as model_lib, sharding, train
from gemma_jax.data import DataError, preference
from gemma_jax.train import objectives
from test_train import (assert_trees_close, init_checkpoint, leaves, one_device_mesh, random_params,  # noqa: F401
                        small_config, tokenizer)

# ----------------------------------------------------------------------------- the published formulas, in numpy


def _logsig(z):
    return -np.logaddexp(0.0, -z)


def np_dpo(pc, pr, rc, rr, beta, eps=0.0):
    h = (pc - rc) - (pr - rr)
    return -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)


def np_ipo(pc, pr, rc, rr, nc, nr, beta):
    h = (pc - rc) / nc - (pr - rr) / nr
    return (h - 1 / (2 * beta)) ** 2


def np_orpo(pc, pr, nc, nr, lam):
    ac, ar = pc / nc, pr / nr
    odds = lambda a: np.log(np.exp(a) / (1 - np.exp(a)))  # noqa: E731
    return np.sum(-pc) / np.sum(nc) - lam * np.mean(_logsig(odds(ac) - odds(ar)))


def np_simpo(pc, pr, nc, nr, beta, gamma):
    return np.mean(-_logsig(beta * pc / nc - beta * pr / nr - gamma))


def test_losses_equal_the_published_formulas():
    rng = np.random.default_rng(0)
    nc, nr = rng.integers(3, 40, 16).astype(np.float64), rng.integers(3, 40, 16).astype(np.float64)
    pc, pr = -rng.uniform(0.1, 3, 16) * nc, -rng.uniform(0.1, 3, 16) * nr
    rc, rr = pc + rng.normal(0, 2, 16), pr + rng.normal(0, 2, 16)
    args = [jnp.asarray(x, jnp.float32) for x in (pc, pr, nc, nr, rc, rr)]

    def ours(obj):
        t = objectives.pair_terms(obj, *args)
        return np.asarray(t["loss"]), np.asarray(t["nll"]), t

    for beta, eps in ((0.1, 0.0), (0.5, 0.2)):  # DPO, conservative DPO
        got, _, t = ours(objectives.Objective("dpo", beta, "sigmoid", eps))
        np.testing.assert_allclose(got, np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5)
        np.testing.assert_allclose(t["rewards/chosen"], beta * (pc - rc), rtol=1e-5, atol=1e-5)
    got, _, _ = ours(objectives.Objective("dpo", 0.1, "ipo"))
    np.testing.assert_allclose(got, np_ipo(pc, pr, rc, rr, nc, nr, 0.1), rtol=1e-5)
    got, nll, t = ours(objectives.Objective("orpo", 0.1))
    np.testing.assert_allclose(nll.sum() / nc.sum() + got.mean(), np_orpo(pc, pr, nc, nr, 0.1), rtol=1e-5)
    np.testing.assert_allclose(t["rewards/rejected"], 0.1 * pr / nr, rtol=1e-5)
    got, _, _ = ours(objectives.Objective("simpo", 2.0, gamma=0.5))
    np.testing.assert_allclose(got.mean(), np_simpo(pc, pr, nc, nr, 2.0, 0.5), rtol=1e-5)


# ----------------------------------------------------------------------------- summed log-probs and their gradients


@functools.cache
def tiny():
    cfg = small_config()
    cfg.model.num_layers = 1
    config = train.model_config(cfg, tokenizer())
    return config, jax.tree.map(jnp.asarray, random_params(config, seed=4, scale=0.5))


PAIRS = [{"prompt": f"Summarise clause {i} of the lease.", "chosen": f"Clause {i}: the tenant pays rent monthly.",
          "rejected": f"It is about {'rent' if i % 2 else 'things'}."} for i in range(12)]


def pair_rows(records, seq_len=128, packing=True):
    tok = tokenizer()
    pairs = [preference.to_pair(r, f"mem:{i}") for i, r in enumerate(records)]
    rows, _ = preference.pack_pairs(preference.encode_pairs(pairs, tok), seq_len, pad_id=tok.pad_id, packing=packing)
    return rows


def _plain_sums(config, params, rows):
    """Summed target log-probs per segment from the full [B, T, V] logits (no chunking, plain autodiff)."""
    logits = model_lib.Transformer(config).apply({"params": params}, rows["inputs"], rows["positions"],
                                                 rows["segment_ids"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), rows["targets"][..., None], -1)[..., 0]
    return loss_lib.segment_sums(logp * rows["loss_mask"], rows["segment_ids"])


@pytest.mark.parametrize("table_grad", [True, False])
def test_summed_logps_and_gradients_match_full_logits(table_grad):
    """Chunked per-sequence log-probs equal the full-logits ones; gradients agree with plain autodiff and
    with a finite difference along a random direction."""
    config, params = tiny()
    rows = {k: jnp.asarray(v) for k, v in objectives.pair_rows(pair_rows(PAIRS[:3], seq_len=64)).items()}
    obj = objectives.Objective("dpo", 0.5)
    ref = _plain_sums(config, jax.tree.map(lambda x: x * 0.9, params), rows)

    def ours(p):
        if table_grad:
            s = objectives.pair_scores(p, rows, ref, obj=obj, config=config, chunk=48)
        else:  # the embedding frozen, as in LoRA: the fused path
            s = _frozen_table_scores(p, rows, ref, obj, config)
        return objectives.step_loss(s, s["pairs"], s["chosen_tokens"])

    def plain(p):
        sums = _plain_sums(config, p if table_grad else dict(p, embedder=jax.lax.stop_gradient(p["embedder"])), rows)
        c, r, _, _, valid = objectives.split_pairs(sums, loss_lib.segment_sums(rows["loss_mask"], rows["segment_ids"]))
        rc, rr, _, _, _ = objectives.split_pairs(ref, loss_lib.segment_sums(rows["loss_mask"], rows["segment_ids"]))
        losses = objectives.pair_terms(obj, c, r, 1.0, 1.0, rc, rr)["loss"]
        return jnp.sum(jnp.where(valid, losses, 0)) / jnp.sum(valid)

    ours, plain = jax.jit(ours), jax.jit(plain)
    sums, _ = loss_lib.sequence_logps(params, rows, config=config, chunk=48)
    np.testing.assert_allclose(sums, _plain_sums(config, params, rows), rtol=1e-5, atol=1e-4)
    v1, g1 = jax.jit(jax.value_and_grad(ours))(params)
    g_ours = g1
    v2, g2 = jax.jit(jax.value_and_grad(plain))(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    if not table_grad:  # the input embedding's gradient differs by design (plain() stops all of it)
        g1, g2 = dict(g1, embedder=None), dict(g2, embedder=None)
    assert_trees_close(g1, g2, rtol=2e-3, atol=2e-5, what="grad")
    # Finite difference along a random direction, in float32: a central difference of step 1e-3.
    d = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype), params)
    if not table_grad:
        d["embedder"] = jax.tree.map(jnp.zeros_like, d["embedder"])
    eps = 1e-3
    fd = (ours(jax.tree.map(lambda p, u: p + eps * u, params, d)) -
          ours(jax.tree.map(lambda p, u: p - eps * u, params, d))) / (2 * eps)
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(d)))
    np.testing.assert_allclose(fd, directional, rtol=2e-2)


def _frozen_table_scores(p, rows, ref, obj, config):
    """pair_scores with the output table frozen (table_grad=False) but the rest of `p` trained."""
    hidden = model_lib.Transformer(config).apply({"params": p}, rows["inputs"], rows["positions"], rows["segment_ids"],
                                                 return_hidden=True)
    table = jax.lax.stop_gradient(p["embedder"]["input_embedding"])
    logp = loss_lib.token_logps(config, hidden, table, rows["targets"], 48, table_grad=False)
    sums = loss_lib.segment_sums(logp * rows["loss_mask"], rows["segment_ids"])
    counts = loss_lib.segment_sums(rows["loss_mask"], rows["segment_ids"])
    c, r, nc, nr, valid = objectives.split_pairs(sums, counts)
    rc, rr, _, _, _ = objectives.split_pairs(ref, counts)
    t = objectives.pair_terms(obj, c, r, nc, nr, rc, rr)
    return dict(loss_sum=jnp.sum(jnp.where(valid, t["loss"], 0)), nll_sum=0.0, pairs=jnp.sum(valid),
                chosen_tokens=jnp.sum(jnp.where(valid, nc, 0)))


# ----------------------------------------------------------------------------- the trainer


def dpo_config(steps, batch_size, **kw):
    """Plain DPO (no NLL term) unless dpo.sft_weight is given."""
    cfg = small_config(steps=steps, batch_size=batch_size)
    cfg.train.objective = "dpo"
    cfg.opt.lr, cfg.opt.warmup_steps = kw.pop("lr", 3e-3), 1
    kw.setdefault("sft_weight", 0.0)
    for k, v in kw.items():
        cfg.dpo[k] = v
    return cfg


def test_step0_is_log2_and_the_reference_gets_no_update():
    rows = pair_rows(PAIRS[:8], packing=False)
    cfg = dpo_config(3, 8)
    config = train.model_config(cfg, tokenizer())
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    init = jax.device_put(random_params(config, seed=1, scale=0.3))
    trainer.set_reference(init)
    before = leaves(trainer.reference)
    state = trainer.init_state(init)
    batch = trainer.put_batch(rows)
    state, m = trainer.step(state, batch)
    np.testing.assert_allclose(float(m["loss"]), np.log(2), rtol=1e-6)
    # Zero up to float32 rounding: the differentiated pass forms the log-probs beside their gradient.
    assert abs(float(m["rewards/chosen"])) < 1e-5 and abs(float(m["rewards/rejected"])) < 1e-5
    for _ in range(2):
        state, m = trainer.step(state, batch)
    assert float(m["loss"]) < np.log(2) - 0.05
    for k, v in leaves(trainer.reference).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # Reference log-probs with the policy moved: the initial weights' (the trained params differ).
    assert any(not np.array_equal(v, before[k]) for k, v in leaves(state["params"]).items())


@pytest.mark.slow
def test_lora_reference_is_the_base_with_adapters_off():
    rows = pair_rows(PAIRS[:4], packing=False)
    cfg = dpo_config(4, 4, lr=2e-2)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = 4, 8.0, "float32"
    config = train.lora_model_config(cfg, train.model_config(cfg, tokenizer()))
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    base = random_params(config, seed=3, scale=0.3)
    state = trainer.init_state(jax.device_put(base))
    batch = trainer.put_batch(rows)
    for _ in range(4):
        state, _ = trainer.step(state, batch)
    flat = {k: jnp.asarray(v) for k, v in objectives.pair_rows(rows).items()}
    ref = objectives.reference_logps(flat, trainer.frozen, None, config=config, chunk=64)
    # The base model's own logits (gemma_jax.logits, no adapters anywhere) scored in numpy.
    logits = np.asarray(model_lib.logits(config.replace(lora_scale=0.0), base, flat["inputs"],
                                         segment_ids=flat["segment_ids"], positions=flat["positions"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    tok_lp = np.take_along_axis(logp, np.asarray(flat["targets"])[..., None], -1)[..., 0] * np.asarray(flat["loss_mask"])
    want = np.stack([[tok_lp[r][np.asarray(flat["segment_ids"][r]) == s].sum() for s in range(129)] for r in range(8)])
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-4)
    adapted, _ = loss_lib.sequence_logps(state["params"], flat, trainer.frozen, config=config, chunk=64)
    assert np.abs(np.asarray(adapted) - np.asarray(ref)).max() > 1e-2  # the adapters did move the policy


def test_packed_pairs_give_the_same_loss_and_update_as_one_pair_per_row():
    packed, unpacked = pair_rows(PAIRS[:8], packing=True), pair_rows(PAIRS[:8], packing=False)
    assert packed["inputs"].shape[0] < unpacked["inputs"].shape[0] == 8
    out = {}
    for name, rows in (("packed", packed), ("unpacked", unpacked)):
        cfg = dpo_config(1, rows["inputs"].shape[0])
        config = train.model_config(cfg, tokenizer())
        trainer = train.Trainer.create(cfg, config, one_device_mesh())
        init = jax.device_put(random_params(config, seed=1, scale=0.3))
        trainer.set_reference(jax.tree.map(lambda x: x * 0.95, init))
        state, m = trainer.step(trainer.init_state(init), trainer.put_batch(rows))
        out[name] = (m, jax.device_get(state["params"]))
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose(float(out["packed"][0][k]), float(out["unpacked"][0][k]), rtol=1e-4, err_msg=k)
    assert_trees_close(out["packed"][1], out["unpacked"][1], rtol=1e-4, atol=1e-6, what="params")


@pytest.mark.slow
def test_sharded_and_accumulated_match_one_device():
    rows = pair_rows(PAIRS[:8], packing=False)
    out = {}
    for name, mesh, accum in (("1", one_device_mesh(), 1), ("8", sharding.make_mesh(2, 2, 2, devices=jax.devices()), 2)):
        cfg = dpo_config(2, 8)
        cfg.train.grad_accum = accum
        config = train.model_config(cfg, tokenizer())
        trainer = train.Trainer.create(cfg, config, mesh)
        trainer.set_reference(None)  # the random init, in the policy's shardings
        state = trainer.init_state()
        batch = trainer.put_batch(rows)
        curve = []
        for _ in range(2):
            state, m = trainer.step(state, batch)
            curve.append(float(m["loss"]))
        out[name] = curve, jax.device_get(state["params"])
    np.testing.assert_allclose(out["8"][0], out["1"][0], rtol=1e-5)
    assert_trees_close(out["8"][1], out["1"][1], rtol=1e-3, atol=1e-5, what="params")


# ----------------------------------------------------------------------------- pair data


def test_bad_pairs_name_file_line_and_field(tmp_path):
    good = {"prompt": "Summarise.", "chosen": "Precise.", "rejected": "Vague."}
    cases = [
        (dict(good, chosen=" "), '"chosen": empty response'),
        (dict(good, rejected="Precise."), '"rejected": identical to "chosen"'),
        ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
          "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
         '"rejected[0]": differs from "chosen[0]"'),
        ({"prompt": "p", "chosen": "x"}, "missing ['rejected']"),
    ]
    for i, (rec, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(DataError) as e:
            preference.read_pairs(str(path))
        assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
    path = tmp_path / "skip.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(cases[1][0]) + "\n")
    pairs, skipped = preference.read_pairs(str(path), skip_invalid=True)
    assert len(pairs) == 1 and skipped == {"identical": 1}


def test_conversational_forms_give_the_same_pair(tmp_path):
    msgs = lambda *m: [{"role": r, "content": c} for r, c in m]  # noqa: E731
    forms = [
        {"prompt": "Summarise.", "chosen": "Precise.", "rejected": "Vague."},
        {"prompt": msgs(("user", "Summarise.")), "chosen": msgs(("assistant", "Precise.")),
         "rejected": msgs(("assistant", "Vague."))},
        {"chosen": msgs(("user", "Summarise."), ("assistant", "Precise.")),
         "rejected": msgs(("user", "Summarise."), ("assistant", "Vague."))},
    ]
    path = tmp_path / "forms.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in forms))
    csv = tmp_path / "forms.csv"
    csv.write_text("question,good,bad\nSummarise.,Precise.,Vague.\n")
    pairs, _ = preference.read_pairs(str(path))
    pairs += preference.read_pairs(str(csv), field_map="prompt=question,chosen=good,rejected=bad")[0]
    assert len(pairs) == 4
    for p in pairs:
        assert (p.prompt, p.chosen, p.rejected) == ([{"role": "user", "content": "Summarise."}], "Precise.", "Vague.")
    (c_ids, c_mask), (r_ids, r_mask) = preference.encode_pairs(pairs[:1], tokenizer())[0]
    tok = tokenizer()
    assert tok.decode(c_ids[c_mask]) == "Precise.<end_of_turn>" and tok.decode(r_ids[r_mask]) == "Vague.<end_of_turn>"


@pytest.mark.slow
def test_dpo_switches_a_model_from_the_rejected_to_the_chosen_pattern():
    """A model first taught the vague answer (SFT) prefers the precise one after DPO: reward accuracy 1.0
    on held-out pairs, and its greedy answer to held-out prompts becomes the chosen pattern."""
    from gemma_jax import data as data_lib
    from test_train import greedy_generate, rows_of

    make = lambda i: {"prompt": f"Clause {i}: the tenant pays rent on day {i % 28 + 1}. Summarise.",  # noqa: E731
                      "chosen": "Rent is due monthly.", "rejected": "It is about money."}
    train_pairs, held_out = [make(i) for i in range(8)], [make(i) for i in range(100, 108)]
    tok = tokenizer()
    sft = small_config(steps=60, batch_size=16)
    sft.opt.lr, sft.opt.warmup_steps = 1e-2, 5
    config = train.model_config(sft, tok)
    trainer = train.Trainer.create(sft, config, one_device_mesh())
    state = trainer.init_state()
    # SFT: the vague answer to "Summarise."; the precise one only after "Explain.", so the model can
    # write both, and DPO has to move which one follows "Summarise.".
    examples = [data_lib.to_example({"prompt": p["prompt"], "completion": p["rejected"]}, "mem") for p in train_pairs]
    examples += [data_lib.to_example({"prompt": p["prompt"].replace("Summarise", "Explain"), "completion": p["chosen"]},
                                     "mem") for p in train_pairs]
    batch = trainer.put_batch(rows_of(examples, 128, packing=False))
    for _ in range(sft.train.steps):
        state, _ = trainer.step(state, batch)
    prompts = [list(tok.encode_chat([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)[0])
               for p in held_out]
    before = [tok.decode(ids) for ids in greedy_generate(config, jax.device_get(state["params"]), prompts,
                                                         end_id=tok.end_of_turn_id, length=96)]
    assert before == ["It is about money."] * 8

    cfg = dpo_config(15, 8, lr=5e-4, beta=0.5)
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    trainer.set_reference(state["params"])
    state = trainer.init_state(state["params"])
    batch = trainer.put_batch(pair_rows(train_pairs, packing=False))
    for _ in range(cfg.train.steps):
        state, m = trainer.step(state, batch)
    metrics = trainer.evaluate(state["params"], [pair_rows(held_out, packing=False)])
    assert metrics["eval_rewards/accuracies"] == 1.0 and metrics["eval_rewards/margins"] > 1.0, metrics
    after = [tok.decode(ids) for ids in greedy_generate(config, jax.device_get(state["params"]), prompts,
                                                        end_id=tok.end_of_turn_id, length=96)]
    # The precise answer's pattern on every held-out prompt (DPO may still stutter a word on a tiny model).
    assert all(a.startswith("Rent is") and a.endswith("due monthly.") for a in after), after
    assert after.count("Rent is due monthly.") >= 6, after


@pytest.mark.slow
def test_interrupted_dpo_run_resumes_like_an_uninterrupted_one(tmp_path, init_checkpoint):
    """train.run on pair files (LoRA DPO, 2x2x2 mesh): stop after 2 steps + resume == 4 straight steps,
    metrics.jsonl carries the pair metrics for train and eval."""
    from test_train import loss_records, read_metrics

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    cfg = dpo_config(4, 8)
    cfg.model.init_checkpoint = init_checkpoint  # DPO tunes a model it is given (train.run refuses none)
    cfg.data.train, cfg.data.eval_fraction = str(path), 0.25
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = 4, 8.0, "float32"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.checkpoint.every_steps = 2
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.run(cfg, str(a), stop_after=2)["step"] == 2
    assert train.run(cfg, str(a))["step"] == 4
    assert train.run(cfg, str(b))["step"] == 4
    ra, rb = loss_records(a), loss_records(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(x[k], y[k], rtol=1e-6, err_msg=f"step {x['step']} {k}")
    evals = [r for r in read_metrics(b) if "eval_rewards/accuracies" in r]
    assert evals and evals[-1]["eval_pairs"] == 3


# ----------------------------------------------------------------------------- dpo.precompute_reference


def test_precomputed_reference_equals_a_direct_reference_pass():
    """reference.compute over packed rows (6 rows in global batches of 4: the last one padded)
    puts each sequence's reference sum at its segment's first token; summed per segment it gives
    reference_logps of the same rows back, and a precompute trainer holds no reference copy."""
    from gemma_jax.train import reference

    rows = pair_rows(PAIRS, packing=True, seq_len=96)
    assert rows["inputs"].shape[0] == 6 and rows["segment_ids"].max() > 1
    cfg = dpo_config(1, 4, precompute_reference=True)
    config = train.model_config(cfg, tokenizer())
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    assert trainer.reference_sharding is None and trainer.objective.precomputed
    params = jax.device_put(random_params(config, seed=1, scale=0.3))
    field = reference.compute(trainer, rows, params)
    flat = {k: jnp.asarray(v) for k, v in objectives.pair_rows(rows).items()}
    want = np.asarray(objectives.reference_logps(flat, None, params, config=config, chunk=96))
    got = np.asarray(loss_lib.segment_sums(jnp.asarray(field.reshape(12, 96)), flat["segment_ids"]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.count_nonzero(field) == 24  # one value per sequence: 12 pairs x 2 sides


def test_damaged_stored_reference_is_computed_again(tmp_path, caplog):
    """A stored reference file that is garbage, truncated or of other rows is not used: a warning
    names it, the pass runs again from the initial weights and the file is replaced."""
    from gemma_jax.train import reference

    rows = pair_rows(PAIRS, packing=True, seq_len=96)
    cfg = dpo_config(1, 4, precompute_reference=True)
    config = train.model_config(cfg, tokenizer())
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    params = jax.device_put(random_params(config, seed=1, scale=0.3))
    fields = lambda: reference.fields(rows, None, cfg=cfg, trainer=trainer, workdir=str(tmp_path),  # noqa: E731
                                      init_params=params)[objectives.REF_FIELD][0]
    want = fields()
    [path] = list((tmp_path / reference.DIRNAME).glob("*.npz"))
    good = path.read_bytes()
    buf = __import__("io").BytesIO()
    np.savez_compressed(buf, train=want[:2])
    for damage in (b"not a zip file", good[:len(good) // 2], buf.getvalue()):
        path.write_bytes(damage)
        caplog.clear()
        with caplog.at_level("WARNING"):
            np.testing.assert_array_equal(fields(), want)
        assert any(str(path) in r.getMessage() and "computing them again" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert path.read_bytes() == good  # replaced by a whole file again
    caplog.clear()
    np.testing.assert_array_equal(fields(), want)  # now read back, no warning
    assert not any("computing them again" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_precompute_reference_trains_like_the_live_reference_and_resumes_from_the_stored_values(
        tmp_path, monkeypatch, init_checkpoint):
    """Full fine-tuning DPO: precompute_reference (stopped after 2 steps, resumed) gives the same
    losses, rewards and eval metrics as the live frozen copy; the resume reads the stored values
    (no second pass) and the memory planner counts no reference copy."""
    from gemma_jax import memory
    from gemma_jax.train import reference
    from test_train import read_metrics

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    runs = {}
    for pre in (False, True):
        cfg = dpo_config(4, 4, precompute_reference=pre)
        cfg.model.init_checkpoint = init_checkpoint
        cfg.data.train, cfg.data.eval_fraction, cfg.train.eval_every = str(path), 0.25, 2
        cfg.checkpoint.every_steps = 2
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
        wd = tmp_path / f"pre_{pre}"
        if pre:
            assert train.run(cfg, str(wd), stop_after=2)["step"] == 2
            [stored] = list((wd / reference.DIRNAME).glob("*.npz"))
            monkeypatch.setattr(reference, "compute", lambda *a: pytest.fail("the reference pass ran again"))
        assert train.run(cfg, str(wd))["step"] == 4
        runs[pre] = read_metrics(wd)
    def by_step(records, key):  # the last record of each step that has `key` (a resume logs again)
        return {r["step"]: r for r in records if key in r}

    for key in ("rewards/margins", "eval_rewards/margins"):
        live, pre = by_step(runs[False], key), by_step(runs[True], key)
        assert sorted(live) == sorted(pre) and len(live) >= 2
        for step, x in live.items():
            for k in x:
                if k.startswith(("loss", "rewards", "logps", "grad_norm", "eval_")) and isinstance(x[k], float):
                    np.testing.assert_allclose(pre[step][k], x[k], rtol=2e-5, atol=2e-6, err_msg=f"step {step} {k}")
    assert stored.exists()
    cfg = dpo_config(4, 4)
    config = train.model_config(cfg, tokenizer())
    with_copy = memory.plan(cfg, config, one_device_mesh(), mode="full", compile=False)
    cfg.dpo.precompute_reference = True
    without = memory.plan(cfg, config, one_device_mesh(), mode="full", compile=False)
    assert with_copy.frozen - without.frozen == with_copy.params > 0


def test_preference_log_has_no_perplexity_and_counts_both_sides_and_the_reference(tmp_path):
    from gemma_jax.train import log

    cfg = dpo_config(2, 4)
    config = train.model_config(cfg, tokenizer())
    kw = dict(config=config, seq_len=128, batch_size=4, total_steps=2, start_step=0, progress=False)
    sft = log.Logger(str(tmp_path / "sft"), **kw)
    live = log.Logger(str(tmp_path / "live"), objective=objectives.from_config(cfg), **kw)
    cfg.dpo.precompute_reference = True
    pre = log.Logger(str(tmp_path / "pre"), objective=objectives.from_config(cfg), **kw)
    train_flops, forward = config.flops_per_token(128), config.flops_per_token(128, training=False)
    assert sft.flops_per_token * sft.positions_per_step == train_flops * 4 * 128
    assert live.flops_per_token * live.positions_per_step == (train_flops + forward) * 2 * 4 * 128
    assert pre.flops_per_token * pre.positions_per_step == train_flops * 2 * 4 * 128
    metrics = {k: jnp.float32(v) for k, v in dict(loss=0.6, accuracy=0.5, learning_rate=1e-3, grad_norm=1.0,
                                                  tokens=100.0, **{"rewards/margins": 0.1}).items()}
    sft.step(1, metrics, log=True)
    live.step(1, metrics, log=True)
    assert "perplexity" in sft.last and "perplexity" not in live.last and live.last["rewards/margins"] > 0
    for lg in (sft, live, pre):
        lg.close()
