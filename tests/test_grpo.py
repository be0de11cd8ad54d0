"""GRPO: the loss types and advantages against their formulas, gradients, the reference, prompt data,
the reward contract, NaN groups, and whole runs (sharded, resumed) through train.run."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import re
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import model as model_lib, sharding, train
from gemma_jax.data import DataError, prompts as prompts_lib
from gemma_jax.errors import UserError, WorkdirError
from gemma_jax.train import grpo, loop, rewards, rollout
from test_train import assert_trees_close, leaves, one_device_mesh, random_params, read_metrics, small_config, tokenizer

# ----------------------------------------------------------------------------- TRL's definitions, in numpy


def np_token_loss(logp, old, ref, adv, eps_lo, eps_hi, beta):
    ratio = np.exp(logp - old)
    loss = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * adv)
    if beta:  # k3 times the ratio (use_bias_correction_kl, TRL's default)
        loss = loss + beta * ratio * (np.exp(ref - logp) - (ref - logp) - 1)
    return loss


def np_loss(loss, mask, loss_type, max_new_tokens, accum=1):
    if loss_type == "grpo":  # each completion's token mean, averaged over the completions
        return np.mean([(loss[r] * mask[r]).sum() / mask[r].sum() for r in range(len(mask))])
    if loss_type == "bnpo":  # token mean per micro-batch (rows k, k + accum, ...), averaged over micro-batches
        return np.mean([(loss[k::accum] * mask[k::accum]).sum() / mask[k::accum].sum() for k in range(accum)])
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (len(mask) * max_new_tokens)
    return (loss * mask).sum() / mask.sum()  # dapo


def np_advantages(rewards_, g, scale):
    r = rewards_.reshape(-1, g)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=1, keepdims=True) if scale == "group" else np.full_like(mean, rewards_.std(ddof=1))
    adv = r - mean
    return (adv / (std + 1e-4) if scale != "none" else adv).reshape(-1)


def fixed_terms(seed=0, rows=8, t=12):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, t + 1, rows)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    logp = -rng.uniform(0.05, 4.0, (rows, t))
    old = logp + rng.normal(0, 0.3, (rows, t))  # ratios both inside and outside the clip range
    ref = logp + rng.normal(0, 0.5, (rows, t))
    adv = np.repeat(rng.normal(0, 1, (rows, 1)), t, axis=1)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_each_loss_type_equals_its_formula(loss_type):
    logp, old, ref, adv, mask = fixed_terms()
    for beta, eps_hi, accum in ((0.0, 0.2, 1), (0.04, 0.28, 2)):
        obj = grpo.GRPO(max_new_tokens=12, beta=beta, epsilon=0.2, epsilon_high=eps_hi, num_iterations=2,
                        loss_type=loss_type)
        loss_t, kl_t, low, high = (np.asarray(x) for x in grpo.token_terms(*map(jnp.asarray, (logp, old, ref, adv)), obj))
        want_t = np_token_loss(logp, old, ref, adv, 0.2, eps_hi, beta)
        np.testing.assert_allclose(loss_t, want_t, rtol=1e-5, atol=1e-6)
        got = float(grpo.reduce_loss(jnp.asarray(loss_t), jnp.asarray(mask), obj, accum))
        np.testing.assert_allclose(got, np_loss(want_t, mask, loss_type, 12, accum), rtol=1e-5)
        ratio = np.exp(logp - old)
        np.testing.assert_array_equal(low, (ratio < 0.8) & (adv < 0))
        np.testing.assert_array_equal(high, (ratio > 1 + eps_hi) & (adv > 0))
        if beta:
            np.testing.assert_allclose(kl_t, ratio * (np.exp(ref - logp) - (ref - logp) - 1), rtol=1e-5, atol=1e-6)
    assert low.any() and high.any() and (~(low | high)).any()  # the fixture exercises every branch


def test_advantages_equal_the_formula_and_skip_groups():
    rng = np.random.default_rng(1)
    r = rng.integers(0, 3, 24).astype(np.float64)
    r[8:12] = 1.0  # a group without reward spread
    for scale in grpo.SCALE_REWARDS:
        adv, std = grpo.advantages(r, 4, scale)
        np.testing.assert_allclose(adv, np_advantages(r, 4, scale), rtol=1e-12)
        np.testing.assert_allclose(std, r.reshape(-1, 4).std(axis=1, ddof=1), rtol=1e-12)
    assert np.all(grpo.advantages(r, 4, "group")[0][8:12] == 0)
    # A completion no function applies to (NaN) is left out of its group's statistics and gets 0;
    # a skipped group gets 0 and is left out of the batch's std.
    r2 = r.copy()
    r2[1] = np.nan
    adv, _ = grpo.advantages(r2, 4, "group")
    g = r2[:4][~np.isnan(r2[:4])]
    np.testing.assert_allclose(adv[[0, 2, 3]], (g - g.mean()) / (g.std(ddof=1) + 1e-4))
    assert adv[1] == 0.0
    skipped = np.zeros(6, bool)
    skipped[2] = True
    adv, _ = grpo.advantages(r, 4, "batch", skipped)
    kept = np.r_[r[:8], r[12:]]
    np.testing.assert_allclose(np.r_[adv[:8], adv[12:]], np_advantages(kept, 4, "batch"), rtol=1e-12)
    assert np.all(adv[8:12] == 0)


# ----------------------------------------------------------------------------- the step on a tiny model


@functools.cache
def tiny():
    cfg = small_config()
    cfg.model.num_layers = 1
    config = train.model_config(cfg, tokenizer())
    return config, jax.tree.map(jnp.asarray, random_params(config, seed=4, scale=0.5))


def rollout_rows(seed=0, n=8, t=24, g=4):
    """Rows of random prompts + completions with advantages of groups of g, old and ref log-probs."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(5, 500, rng.integers(3, 8)).tolist() for _ in range(n)]
    comps = [rng.integers(5, 500, rng.integers(1, 10)).tolist() for _ in range(n)]
    rows = grpo.host_rows(prompts, comps, t, pad_id=0)
    adv, _ = grpo.advantages(rng.normal(size=n), g, "group")
    rows[grpo.ADVANTAGES] = np.repeat(adv[:, None], t, axis=1).astype(np.float32)
    return rows


def step_grads(params, rows, obj, accum=1, frozen=None):
    """(grads, metrics) of one grpo_step: the update is replaced by one that hands the gradients back."""
    config, _ = tiny()

    def update(state, grads, loss, tx):
        return dict(state, grads=grads), jnp.float32(0), jnp.float32(0)

    state = dict(step=jnp.int32(0), params=params, opt_state=None, rng=jax.random.key_data(jax.random.key(0)))
    new, m = grpo.grpo_step(state, {k: jnp.asarray(v) for k, v in rows.items()}, frozen, config=config, tx=None,
                            chunk=16, accum=accum, schedule=lambda s: 0.0, objective=obj, update=update)
    return new["grads"], m


def plain_objective(params, rows, obj, config):
    """The loss from full [B, T, V] logits (no chunking, plain autodiff), with rows' old/ref log-probs."""
    logits = model_lib.Transformer(config).apply({"params": params}, rows["inputs"], rows["positions"],
                                                 rows["segment_ids"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits / obj.temperature, -1), rows["targets"][..., None], -1)[..., 0]
    loss_t, _, _, _ = grpo.token_terms(logp, rows[grpo.OLD_LOGPS], rows.get(grpo.REF_LOGPS), rows[grpo.ADVANTAGES], obj)
    return grpo.reduce_loss(loss_t, rows["loss_mask"], obj)


@pytest.mark.parametrize("table_grad", [True, False])
def test_tempered_token_logps_and_gradients_match_full_logits(table_grad):
    """loss.token_logps at temperature 0.7 (soft-capped logits / T, chunked, fused backward) equals the
    log-softmax of the full logits / T, and so do its gradients (trained table, or frozen as in LoRA)."""
    from gemma_jax import loss as loss_lib
    from gemma_jax.model.layers import final_logits

    config, params = tiny()
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(0, 1, (3, 10, config.embed_dim)), jnp.float32)
    table = params["embedder"]["input_embedding"]
    targets = jnp.asarray(rng.integers(0, 500, (3, 10)), jnp.int32)
    w = jnp.asarray(rng.normal(0, 1, (3, 10)), jnp.float32)

    def ours(h, tab):
        return jnp.sum(w * loss_lib.token_logps(config, h, tab, targets, 7, table_grad=table_grad, temperature=0.7))

    def plain(h, tab):
        logits = final_logits(config, h, tab if table_grad else jax.lax.stop_gradient(tab))
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7, -1), targets[..., None], -1)[..., 0]
        return jnp.sum(w * lp)

    (v1, (gh1, gt1)), (v2, (gh2, gt2)) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, table) for f in (ours, plain))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(gh1, gh2, rtol=1e-4, atol=1e-6)
    if table_grad:
        np.testing.assert_allclose(gt1, gt2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_step_gradients_match_autodiff_and_finite_differences(loss_type):
    """grpo_step's gradient (chunked log-probs, fused backward) equals plain autodiff of the loss from
    full logits and a central finite difference along a random direction; micro-batches add up to it."""
    config, params = tiny()
    rows = rollout_rows()
    obj = grpo.GRPO(max_new_tokens=9, temperature=0.7, beta=0.1, epsilon_high=0.28, num_iterations=2,
                    loss_type=loss_type)
    # Old and reference log-probs near the policy's so some ratios clip and some do not.
    base = jax.tree.map(lambda x: x * 0.97, params)
    old = np.asarray(grpo.token_logps(base, {k: jnp.asarray(v) for k, v in rows.items()}, config=config, chunk=16,
                                      temperature=0.7))
    rows[grpo.OLD_LOGPS] = old + np.random.default_rng(2).normal(0, 0.1, old.shape).astype(np.float32)
    rows[grpo.REF_LOGPS] = old.astype(np.float32)
    grads, m = step_grads(params, rows, obj)
    jrows = {k: jnp.asarray(v) for k, v in rows.items()}
    f = jax.jit(lambda p: plain_objective(p, jrows, obj, config))
    v, g_plain = jax.value_and_grad(f)(params)
    np.testing.assert_allclose(float(m["loss"]), float(v), rtol=1e-5)
    assert_trees_close(grads, g_plain, rtol=2e-3, atol=2e-5, what="grad")
    # A central finite difference along a random direction, where no ratio sits near a clip bound (a
    # kink the difference would straddle): wide clip range, same log-probs.
    smooth = dataclasses.replace(obj, epsilon=0.9, epsilon_high=10.0)
    g_smooth, _ = step_grads(params, rows, smooth)
    f = jax.jit(lambda p: plain_objective(p, jrows, smooth, config))
    d = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype), params)
    eps = 1e-3
    fd = (f(jax.tree.map(lambda p, u: p + eps * u, params, d)) - f(jax.tree.map(lambda p, u: p - eps * u, params, d))) / (2 * eps)
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_smooth), jax.tree.leaves(d)))
    np.testing.assert_allclose(float(fd), float(directional), rtol=2e-2)
    accumulated, m2 = step_grads(params, rows, obj, accum=2)
    np.testing.assert_allclose(float(m2["loss"]), float(m["loss"]), rtol=1e-5)
    assert_trees_close(accumulated, grads, rtol=1e-4, atol=1e-6, what="accumulated grad")
    assert float(m["clip_ratio/region_mean"]) > 0 and float(m["kl"]) > 0


def test_one_iteration_has_ratio_one_and_the_policy_gradient():
    """num_iterations=1: the ratio is exactly 1 (nothing clips, whatever epsilon) and the gradient is the
    policy gradient -sum(w A grad log p); the loss value does not depend on the params."""
    config, params = tiny()
    rows = rollout_rows(seed=3)
    obj = grpo.GRPO(max_new_tokens=9, epsilon=1e-6, epsilon_high=1e-6, num_iterations=1, loss_type="grpo")
    jrows = {k: jnp.asarray(v) for k, v in rows.items()}
    logp = grpo.token_logps(params, jrows, config=config, chunk=16)
    ratio = np.asarray(jnp.exp(logp - jax.lax.stop_gradient(logp)))
    assert np.all(ratio == 1.0)
    grads, m = step_grads(params, rows, obj)
    assert float(m["clip_ratio/region_mean"]) == 0.0
    w = grpo.row_weights(jrows["loss_mask"], obj, 1)

    def surrogate(p):
        lp = grpo.token_logps(p, jrows, config=config, chunk=16)
        return -jnp.sum(w[:, None] * jrows["loss_mask"] * jrows[grpo.ADVANTAGES] * lp)

    assert_trees_close(grads, jax.grad(surrogate)(params), rtol=1e-4, atol=1e-7, what="policy gradient")
    _, m2 = step_grads(jax.tree.map(lambda x: x * 1.1, params), rows, obj)
    assert float(m2["loss"]) == float(m["loss"])


def test_reference_gets_no_gradient_and_no_update():
    """Full fine-tuning with beta > 0: the reference weights (the initial ones) stay as they were after
    steps that moved the policy, and the reference log-probs carry no gradient back to them."""
    config, params = tiny()
    cfg = grpo_config(beta=0.2)
    cfg.model.num_layers = 1
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    assert trainer.reference_sharding is not None
    init = jax.device_put(params)
    trainer.set_reference(jax.tree.map(jnp.array, init))
    before = leaves(trainer.reference)
    state = trainer.init_state(init)
    rows = rollout_rows(n=8, t=cfg.data.seq_len)
    extra = jax.device_get(trainer.logps_fn(state["params"], trainer.put_batch(rows), None, trainer.reference))
    assert set(extra) == {grpo.REF_LOGPS}
    rows.update({k: np.asarray(v) for k, v in extra.items()})
    for _ in range(3):  # (the first has lr 0: warmup)
        state, m = trainer.step(state, trainer.put_batch(rows))
    assert float(m["kl"]) > 0
    for k, v in leaves(trainer.reference).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert any(not np.array_equal(v, before[k]) for k, v in leaves(state["params"]).items())
    jrows = {k: jnp.asarray(v) for k, v in rows.items()}
    g = jax.grad(lambda ref: jnp.sum(grpo.rollout_logps(params, jrows, None, ref, config=config, chunk=16,
                                                         obj=trainer.objective)[grpo.REF_LOGPS]))(params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))


def test_lora_samples_with_merged_adapters_and_refers_to_the_base():
    """LoRA with beta > 0: rollouts are sampled from base + adapters merged, the reference log-probs are
    the base's with adapters off, and the frozen base stays as it was while the adapters train."""
    config, params = tiny()
    cfg = grpo_config(beta=0.1)
    cfg.model.num_layers = 1
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = 4, 8.0, "float32"
    lconfig = train.lora_model_config(cfg, config)
    trainer = train.Trainer.create(cfg, lconfig, one_device_mesh())
    assert trainer.reference_sharding is None  # no copy: the base is the reference
    state = trainer.init_state(jax.tree.map(jnp.array, params))  # a copy: set_base donates it
    base_before = leaves(trainer.frozen)
    rows = rollout_rows(n=8, t=cfg.data.seq_len)
    for _ in range(3):
        extra = jax.device_get(trainer.logps_fn(state["params"], trainer.put_batch(rows), trainer.frozen, None))
        state, m = trainer.step(state, trainer.put_batch(dict(rows, **extra)))
    jrows = {k: jnp.asarray(v) for k, v in rows.items()}
    np.testing.assert_allclose(extra[grpo.REF_LOGPS], grpo.token_logps(params, jrows, config=config, chunk=16),
                               rtol=1e-5, atol=1e-5)
    for k, v in leaves(trainer.frozen).items():
        np.testing.assert_array_equal(v, base_before[k], err_msg=k)
    ro = rollout.Rollouts(cfg, trainer, tokenizer(), "", [], [], [], [], [], [], None)
    merged = ro.policy_params(state)
    adapted = grpo.token_logps(state["params"], jrows, trainer.frozen, config=lconfig, chunk=16)
    np.testing.assert_allclose(grpo.token_logps(merged, jrows, config=config, chunk=16), adapted, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(adapted) - extra[grpo.REF_LOGPS]).max() > 1e-3  # the adapters moved the policy


def test_grpo_keys_outside_their_range_are_named():
    """The grpo keys' ranges are declared in gemma_jax/config.py and checked by its one validate()."""
    from gemma_jax import config as config_lib

    for key, value, message in (("group_size", 1, "grpo.group_size=1: must be an integer >= 2"),
                                ("loss_type", "ppo", "one of grpo, bnpo, dr_grpo, dapo"),
                                ("scale_rewards", "std", "one of group, batch, none"),
                                ("epsilon", 1.5, "in (0, 1)"), ("top_p", 0.0, "in (0, 1]"),
                                ("num_iterations", 0, ">= 1"), ("max_new_tokens", 40, "leaves no room"),
                                ("group_size", 3, "multiple of grpo.group_size")):
        cfg = grpo_config(**{key: value})
        with pytest.raises(UserError, match=re.escape(message)):
            config_lib.validate(cfg)


# ----------------------------------------------------------------------------- prompt data and rewards


def test_prompt_schemas_and_errors(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    path = tmp_path / "p.jsonl"
    recs = [{"prompt": "Be brief.\n\nWhat is 2 + 3?", "answer": "5"}, {"messages": msgs, "answer": "5", "id": 7},
            {"prompt": msgs, "answer": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got, _ = prompts_lib.read_prompts(str(path))
    assert [p.turns for p in got] == [[{"role": "user", "content": "Be brief.\n\nWhat is 2 + 3?"}]] * 3
    assert [p.conversational for p in got] == [False, True, True] and got[1].columns == {"answer": "5", "id": 7}
    assert prompts_lib.columns_of(got) == {"answer"}
    csv = tmp_path / "p.csv"
    csv.write_text("question,answer\nWhat is 2 + 3?,5\n")
    [p] = prompts_lib.read_prompts(str(csv), field_map="prompt=question")[0]
    assert p.raw == "What is 2 + 3?" and p.columns == {"answer": "5"}
    bad = [({"prompt": " "}, '"prompt": empty prompt'),
           ({"messages": msgs + [{"role": "assistant", "content": "5"}]}, '"messages": must end with a user message'),
           ({"question": "x"}, 'expected a field "prompt"'),
           ({"prompt": 3}, '"prompt": expected a string or a list of messages')]
    for i, (rec, message) in enumerate(bad):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(json.dumps(recs[0]) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(DataError) as e:
            prompts_lib.read_prompts(str(f))
        assert str(e.value).startswith(f"{f}:2: ") and message in str(e.value), str(e.value)


def test_prompt_order_is_seeded_per_epoch_and_resumable():
    a = prompts_lib.PromptOrder(10, 4, seed=3)
    first = [next(a) for _ in range(5)]  # two epochs
    assert sorted(np.concatenate(first[:2]).tolist() + first[2][:2].tolist()) == list(range(10))
    b = prompts_lib.PromptOrder(10, 4, seed=3)
    next(b)
    state = b.get_state()
    c = prompts_lib.PromptOrder(10, 4, seed=3)
    c.set_state(state)
    assert [next(c).tolist() for _ in range(4)] == [x.tolist() for x in first[1:]]
    with pytest.raises(StopIteration):
        d = prompts_lib.PromptOrder(10, 4, seed=3, num_epochs=1)
        for _ in range(3):
            next(d)


REWARD_FILE = '''
import math

def right(prompts, completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def length(prompts, completions, **kwargs):
    return [(len(c) % 5) / 4 for c in completions]  # random text is long: a spread, not a cap

def only_short(prompts, completions):
    return [None if len(c) > 10 else 1.0 for c in completions]

def boom(prompts, completions, answer, **kwargs):
    return [1.0 / (int(a) - 7) for a in answer]

def nan_on_bad(prompts, completions, bad=None, **kwargs):
    return [math.nan if b else 0.5 for b in bad]

def two_args(x, y):
    return [0.0]

def wrong_length(prompts, completions, **kw):
    return [1.0]

def text_out(prompts, completions, **kw):
    return ["good" for _ in completions]

NOT_A_FUNCTION = 3
'''


def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return str(path)


def test_reward_contract_errors_name_the_entry(tmp_path):
    f = reward_file(tmp_path)
    cfg = small_config().grpo
    cases = [(f"{tmp_path}/nope.py:right", "no such file"), (f"{f}:missing", "defines no 'missing'"),
             (f"{f}:two_args", "two_args(x, y)"), (f"{f}:NOT_A_FUNCTION", "is a int, not a function"),
             ("exact", "not a built-in reward"), ("no_such_pkg.mod:fn", "no module named 'no_such_pkg.mod'"),
             ("regex", "needs grpo.format_regex"), (f"{f}:right,{f}:right", "appears twice"), ("", "needs grpo.rewards")]
    for spec, message in cases:
        with pytest.raises(UserError) as e:
            rewards.load(spec, cfg)
        assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    loaded = rewards.load(f"{f}:right,{f}:length,exact_match", cfg)
    with pytest.raises(UserError, match=r"requires 'answer'.*fields: id"):
        rewards.check_columns(loaded, {"id"}, "p.jsonl")
    with pytest.raises(UserError, match="gives 1 weights for 3"):
        rewards.parse_weights("1.0", 3)
    where = lambda i: f"example data.jsonl:{i + 1}"  # noqa: E731
    args = dict(prompts=["p"] * 3, completions=["5", "7", "x"], answer=["5", "7", "9"])
    for spec, message in ((f"{f}:boom", "boom raised ZeroDivisionError: float division by zero on example data.jsonl:2"),
                          (f"{f}:wrong_length", "returned 1 rewards for 3 completions"),
                          (f"{f}:text_out", "returned 'good' (str) for example data.jsonl:1")):
        with pytest.raises(UserError) as e:
            rewards.score(rewards.load(spec, cfg), args, 3, where)
        assert message in str(e.value), str(e.value)


def test_rewards_are_called_with_trl_arguments_and_built_ins_score(tmp_path):
    f = reward_file(tmp_path)
    cfg = small_config().grpo
    cfg.format_regex = r"\d+"
    loaded = rewards.load(f"{f}:right,{f}:only_short,exact_match,regex,code_tests", cfg)
    args = dict(prompts=["p"] * 3, completions=["5", " 7 ", "some longer text"], answer=["5", "8", "9"],
                completion_ids=[[1], [2], [3]], id=[1, 2, 3],
                tests=[["assert 1 == 1"], "assert 1 == 2", ["assert f() == 3"]])
    args["completions"][2] = "```python\ndef f():\n    return 3\n```"
    values, nan_by = rewards.score(loaded, args, 3, str)
    np.testing.assert_array_equal(values[:, 0], [1, 0, 0])  # right
    np.testing.assert_array_equal(values[:, 1], [1, 1, np.nan])  # None: not applicable
    np.testing.assert_array_equal(values[:, 2], [1, 0, 0])  # exact_match against "answer"
    np.testing.assert_array_equal(values[:, 3], [1, 1, 0])  # regex \d+
    np.testing.assert_array_equal(values[:, 4], [1, 0, 1])  # code_tests in the sandbox
    assert not nan_by.any()
    conv = dict(args, completions=[[{"role": "assistant", "content": c}] for c in ("5", "8", "x")])
    np.testing.assert_array_equal(rewards.score(loaded[2:3], conv, 3, str)[0][:, 0], [1, 1, 0])


# ----------------------------------------------------------------------------- whole runs


PROMPTS = [{"prompt": f"Say a word about number {i}.", "answer": str(i), "bad": False} for i in range(12)]


def grpo_config(steps=4, batch_size=8, **grpo_kw):
    cfg = small_config(steps=steps, batch_size=batch_size, seq_len=40)
    cfg.train.objective = "grpo"
    cfg.opt.lr, cfg.opt.warmup_steps = 1e-2, 1
    g = cfg.grpo
    g.group_size, g.max_new_tokens, g.log_rollouts_every = 4, 6, 1
    for k, v in grpo_kw.items():
        g[k] = v
    return cfg


def run_config(tmp_path, records=PROMPTS, **kw):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = grpo_config(**kw)
    cfg.data.train, cfg.data.eval_fraction = str(path), 0.25
    cfg.grpo.rewards = f"{reward_file(tmp_path)}:length"
    return cfg


def test_nan_reward_skips_the_group_and_is_counted(tmp_path, caplog):
    records = [dict(r, bad=i in (0, 1, 2, 3, 4, 5, 6)) for i, r in enumerate(PROMPTS)]
    cfg = run_config(tmp_path, records)
    cfg.grpo.rewards = f"{reward_file(tmp_path)}:nan_on_bad,{reward_file(tmp_path)}:length"
    cfg.data.eval_fraction = 0.0
    cfg.grpo.log_rollouts_every = 0
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2  # (the sharded test's sampler programs: cached)
    r = loop.setup(cfg, str(tmp_path / "wd"))
    state = r.trainer.init_state()
    bad = np.array([r.rollouts.prompts[i].columns["bad"] for i in next(copy.deepcopy(r.rollouts.order))])
    assert bad.any() and not bad.all(), "the first batch must hold one NaN prompt and one other for this test"
    with caplog.at_level(logging.WARNING):
        out = r.rollouts.sample(state, 0)
    rows, m = out["rows"], out["metrics"]
    assert m["skipped_groups"] == bad.sum()
    per_row_bad = np.repeat(bad, 4)
    assert np.all(rows["loss_mask"][per_row_bad] == 0) and np.all(rows[grpo.ADVANTAGES][per_row_bad] == 0)
    assert rows["loss_mask"][~per_row_bad].sum() > 0
    assert any("nan_on_bad returned NaN for example" in rec.getMessage() and "prompts.jsonl:" in rec.getMessage()
               for rec in caplog.records), [rec.getMessage() for rec in caplog.records]


def test_bad_reward_fails_before_anything_is_written(tmp_path, capsys):
    from gemma_jax.train import __main__ as train_main

    cfg = run_config(tmp_path)
    cfg.grpo.rewards = f"{reward_file(tmp_path)}:two_args"
    with pytest.raises(UserError, match="two_args"):
        train.run(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
    with pytest.raises(SystemExit) as e:
        train_main.run([f"--config={pathlib.Path(__file__).parent.parent / 'configs' / 'rl.py'}:tiny", f"--workdir={tmp_path}/cli",
                        f"--config.grpo.rewards={tmp_path}/missing.py:fn"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: grpo.rewards: no such file '{tmp_path}/missing.py' (entry '{tmp_path}/missing.py:fn'; paths are "
        "relative to the directory the command runs in)"], err


def test_multi_host_grpo_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The sampler and rewards read rollouts on the host: a multi-process run stops in one line first."""
    cfg = run_config(tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match="train.objective=grpo runs on one host.*2 processes"):
        train.run(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_sharded_rollouts_and_steps_equal_one_device(tmp_path):
    """Sampling on the 2x2x2 mesh, rewards, advantages, the reference pass and three GRPO steps (with
    micro-batches) give what one device gives."""
    out = {}
    for name, mesh, accum in (("1", one_device_mesh(), 1), ("8", sharding.make_mesh(2, 2, 2, devices=jax.devices()), 2)):
        cfg = run_config(tmp_path, beta=0.1)
        cfg.train.grad_accum = accum
        config = train.model_config(cfg, tokenizer())
        trainer = train.Trainer.create(cfg, config, mesh)
        trainer.set_reference(None)  # the random init, as init_state's
        ro = rollout.build(cfg, tokenizer(), trainer, str(tmp_path / name)).train
        state = trainer.init_state()
        metrics = []
        for _ in range(3):
            state, m = ro.step(state)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items() if not k.endswith("per_second")})
        out[name] = metrics, jax.device_get(state["params"])
    for a, b in zip(out["8"][0], out["1"][0]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert out["1"][0][-1]["kl"] > 0 and out["1"][0][0]["reward_std"] > 0
    assert_trees_close(out["8"][1], out["1"][1], rtol=1e-3, atol=1e-5, what="params")


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """train.run of GRPO with num_iterations=2 and a KL term (full fine-tuning, 2x2x2 mesh), stopped after
    steps 1 and 3 (each in the middle of a batch of rollouts) and resumed == uninterrupted; rollouts.jsonl,
    eval rewards and plots/reward.png are written; the reward spec is part of the workdir's identity."""
    runs = {}
    for name, stops in (("resumed", ((1, 1), (2, 3))), ("straight", ())):
        cfg = run_config(tmp_path, num_iterations=2, beta=0.1)
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
        cfg.checkpoint.every_steps, cfg.train.eval_every = 1, 2
        wd = tmp_path / name
        for stop_after, reached in stops:
            assert train.run(cfg, str(wd), stop_after=stop_after)["step"] == reached
        assert train.run(cfg, str(wd))["step"] == 4
        runs[name] = {r["step"]: r for r in read_metrics(wd) if "loss" in r}
    keys = ("loss", "reward", "reward_std", "grad_norm", "kl", "clip_ratio/region_mean", "completions/mean_length")
    assert sorted(runs["resumed"]) == sorted(runs["straight"]) == [1, 2, 3, 4]
    for step, rec in runs["straight"].items():
        for k in keys:
            np.testing.assert_allclose(runs["resumed"][step][k], rec[k], rtol=1e-6, atol=1e-7, err_msg=f"{step} {k}")
    assert runs["straight"][4]["kl"] > 0 and any(r["reward_std"] > 0 for r in runs["straight"].values())
    wd = tmp_path / "straight"
    logged = [json.loads(line) for line in (wd / rollout.ROLLOUTS_FILE).read_text().splitlines()]
    assert {r["step"] for r in logged} == {1, 3} and set(logged[0]["rewards"]) == {"length"}
    assert any("eval_reward" in r for r in read_metrics(wd)) and (wd / "plots" / "reward.png").exists()
    cfg = run_config(tmp_path, num_iterations=2, beta=0.1, steps=6)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.grpo.rewards = f"{reward_file(tmp_path)}:right"
    with pytest.raises(WorkdirError, match="grpo.rewards"):
        train.run(cfg, str(wd))
