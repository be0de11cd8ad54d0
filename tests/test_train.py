"""Trainer: overfitting, loss mask, packing, accumulation, sharding, resume, preemption, the CLI.

Models here are far smaller than gemma2_tiny (2 layers, width 64) so the whole file runs in a few
minutes on two cores; the two end-to-end command-line tests (marked slow) run the real tiny config.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gemma_jax
from gemma_jax import data as data_lib, loss as loss_lib, model as model_lib, sharding, train
from gemma_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizer.model"
LEGAL_TRAIN = REPO / "data" / "legal" / "train.jsonl"


# ----------------------------------------------------------------------------- helpers


def load_config(name: str = "legal", variant: str = "tiny"):
    """configs/<name>.py:get_config(variant) (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_config_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def small_config(*, steps: int = 10, batch_size: int = 8, seq_len: int = 128):
    """The legal tiny config shrunk to a 2-layer, width-64 model on absolute paths, no eval/export."""
    cfg = load_config()
    m = cfg.model
    m.num_layers, m.embed_dim, m.hidden_dim = 2, 64, 128
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 16
    m.query_pre_attn_scalar, m.sliding_window = 16.0, 32
    m.dtype = m.param_dtype = "float32"
    cfg.data.tokenizer = str(TOKENIZER)
    cfg.data.train, cfg.data.eval = str(LEGAL_TRAIN), ""
    cfg.data.seq_len = seq_len
    cfg.train.steps, cfg.train.batch_size = steps, batch_size
    cfg.train.log_every, cfg.train.eval_every = 1, 0
    cfg.train.progress, cfg.train.export_format = False, ""
    cfg.checkpoint.async_save, cfg.checkpoint.every_steps = False, 1000
    cfg.opt.warmup_steps, cfg.opt.weight_decay = 2, 0.0
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    return cfg


@functools.cache
def tokenizer() -> Tokenizer:
    return Tokenizer(str(TOKENIZER))


@functools.cache
def legal_examples():
    return data_lib.read_examples(str(LEGAL_TRAIN))[0]


def rows_of(examples, seq_len: int, *, packing: bool, seed: int = 0):
    """Examples -> numpy rows through the real pipeline (encode + pack)."""
    tok = tokenizer()
    rows, _ = data_lib.pack(data_lib.encode(examples, tok), seq_len, pad_id=tok.pad_id, packing=packing, seed=seed)
    return rows


def one_device_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(a, b, *, rtol, atol, what=""):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].shape == lb[k].shape, (what, k)
        np.testing.assert_allclose(la[k], lb[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_records(workdir) -> list[dict]:
    return [r for r in read_metrics(workdir) if "loss" in r]


def greedy_generate(config, params, prompts: list[list[int]], *, end_id: int, length: int = 128) -> list[list[int]]:
    """Greedy continuations, one fixed-shape forward per token (causal: padding after a row's end is unseen)."""
    tokens = np.zeros((len(prompts), length), np.int32)
    cur = np.array([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    while not done.all():
        logits = np.asarray(model_lib.logits(config, params, tokens))
        nxt = logits[np.arange(len(prompts)), cur - 1].argmax(-1)
        for i in np.flatnonzero(~done):
            if nxt[i] == end_id or cur[i] >= length:
                done[i] = True
                continue
            out[i].append(int(nxt[i]))
            tokens[i, cur[i]] = nxt[i]
            cur[i] += 1
    return out


def _jit_loss(config, chunk: int = 64):
    """jit(value_and_grad) of the token-normalised loss."""
    def mean_loss(params, batch):
        loss_sum, (tokens, correct) = loss_lib.batch_loss(params, batch, config=config, chunk=chunk)
        return loss_sum / tokens, (loss_sum, tokens, correct)
    return jax.jit(jax.value_and_grad(mean_loss, has_aux=True))


@functools.cache
def small_model():
    """(ModelConfig, random float32 params) of the small config; window 16 so local layers are windowed."""
    cfg = small_config()
    cfg.model.sliding_window = 16
    config = train.model_config(cfg, tokenizer())
    return config, random_params(config, seed=1)


def random_params(config, *, seed: int, scale: float = 1.0):
    """Random float32 params from numpy (model.init_params takes seconds to compile); at scale 1 larger
    than the init's std 0.02 so logits and gradients are far from uniform."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        std = 1.0 if "input_embedding" in jax.tree_util.keystr(path) else 0.2 if len(s.shape) > 1 else 0.1
        return rng.normal(0.0, std * scale, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, model_lib.param_shapes(config))


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A gemma_jax checkpoint of the small config, for model.init_checkpoint (skips the init compile)."""
    config = train.model_config(small_config(), tokenizer())
    path = tmp_path_factory.mktemp("init") / "small"
    gemma_jax.save(str(path), config, random_params(config, seed=2, scale=0.2), format="gemma_jax")
    return str(path)


# ----------------------------------------------------------------------------- 1. overfit and generate


def test_overfit_then_generate():
    """A tiny model memorises 6 examples (loss near zero), then greedy decoding reproduces each response."""
    examples = legal_examples()[:6]
    cfg = small_config(steps=80, batch_size=6)
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.schedule = 1e-2, 10, "cosine"
    tok = tokenizer()
    config = train.model_config(cfg, tok)
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    state = trainer.init_state()
    rows = rows_of(examples, 128, packing=False)
    assert rows["inputs"].shape[0] == 6
    batch = trainer.put_batch(rows)
    losses = []
    for _ in range(cfg.train.steps):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0, losses[0]
    assert losses[-1] < 0.1, losses[-10:]
    assert float(metrics["accuracy"]) == 1.0

    params = jax.device_get(state["params"])
    prompts = [list(tok.encode_chat(ex.turns[:1], add_generation_prompt=True)[0]) for ex in examples]
    generated = greedy_generate(config, params, prompts, end_id=tok.end_of_turn_id)
    for ex, ids in zip(examples, generated):
        assert tok.decode(ids) == ex.turns[1]["content"]


# ----------------------------------------------------------------------------- 2. loss mask


def test_loss_mask_covers_model_turns_only():
    """Targets outside model turns (system, user, headers) never enter the loss; response targets do."""
    tok = tokenizer()
    chat = data_lib.to_example({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a lease?"},
        {"role": "assistant", "content": "A rental contract."},
        {"role": "user", "content": "And a deed?"},
        {"role": "assistant", "content": "A document that transfers property."}]}, "test")
    examples = [chat] + legal_examples()[:3]
    rows = rows_of(examples, 128, packing=True)
    mask = rows["loss_mask"] > 0
    # The pipeline's mask selects exactly the model turns and the <end_of_turn> that closes each.
    chat_seg = [(r, s) for r in range(len(mask)) for s in set(rows["segment_ids"][r]) - {0}
                if tok.decode(rows["inputs"][r][rows["segment_ids"][r] == s]).find("What is a lease?") >= 0]
    assert len(chat_seg) == 1
    r, s = chat_seg[0]
    in_seg = rows["segment_ids"][r] == s
    assert tok.decode(rows["targets"][r][in_seg & mask[r]]) == (
        "A rental contract.<end_of_turn>A document that transfers property.<end_of_turn>")
    unmasked = tok.decode(rows["targets"][r][in_seg & ~mask[r]])
    assert "What is a lease?" in unmasked and "Be brief." in unmasked and "And a deed?" in unmasked
    assert not np.any(mask[rows["segment_ids"] == 0]), "padding is in the loss"

    config, params = small_model()
    loss = jax.jit(functools.partial(loss_lib.batch_loss, config=config, chunk=64))

    def value(targets):
        loss_sum, (tokens, _) = loss(params, dict(rows, targets=targets))
        return float(loss_sum), float(tokens)

    base, tokens = value(rows["targets"])
    assert tokens == mask.sum()
    rng = np.random.default_rng(0)
    scrambled = np.where(mask, rows["targets"], rng.integers(3, tok.vocab_size, mask.shape)).astype(np.int32)
    assert value(scrambled)[0] == base  # prompt-side targets do not matter at all
    changed = rows["targets"].copy()
    r, t = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    changed[r, t] = (changed[r, t] + 7) % tok.vocab_size
    assert abs(value(changed)[0] - base) > 1e-3  # response targets do


def test_train_on_prompt_puts_prompt_in_the_loss():
    """data.train_on_prompt=True: every target but the BOS is in the mask."""
    tok = tokenizer()
    examples = legal_examples()[:2]
    ids, mask = data_lib.encode(examples, tok, train_on_prompt=True)[0]
    assert not mask[0] and mask[1:].all()
    ids, mask = data_lib.encode(examples, tok, train_on_prompt=False)[0]
    assert 0 < mask.sum() < len(mask) // 2


# ----------------------------------------------------------------------------- 3. packed vs unpacked


def test_packed_and_unpacked_give_same_loss_and_gradients():
    """The same examples packed several per row or one per padded row: same loss, same gradients."""
    config, params = small_model()
    examples = legal_examples()[:7]
    packed = rows_of(examples, 256, packing=True)
    unpacked = rows_of(examples, 128, packing=False)
    assert packed["inputs"].shape[0] < len(examples) <= unpacked["inputs"].shape[0]
    assert packed["segment_ids"].max() >= 2
    assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
    # Longer than the sliding window, so windowing and positions in packed rows are exercised.
    assert (unpacked["segment_ids"] > 0).sum(1).max() > config.sliding_window

    fn = _jit_loss(config)
    (loss_p, (_, tok_p, _)), grads_p = fn(params, packed)
    (loss_u, (_, tok_u, _)), grads_u = fn(params, unpacked)
    assert float(tok_p) == float(tok_u)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    assert_trees_close(grads_p, grads_u, rtol=1e-4, atol=1e-6, what="grad")

    # Sensitivity: letting packed examples attend to each other would change the loss.
    leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    (loss_leaky, _), _ = fn(params, leaky)
    assert abs(float(loss_leaky) - float(loss_u)) > 1e-3


# ----------------------------------------------------------------------------- 4. gradient accumulation


def _accum_batch():
    """6 unpacked rows with very different target-token counts."""
    rows = rows_of(legal_examples()[:6], 128, packing=False)
    counts = rows["loss_mask"].sum(1)
    assert counts.max() > 3 * counts.min(), counts
    return rows


def test_grad_accum_equals_one_big_batch_sgd():
    """train_step with 3 micro-batches == one batch of all rows: same loss, same gradient (SGD update).

    (The Trainer's AdamW path with train.grad_accum is covered by the sharded test.)
    """
    accum = 3
    config, params = small_model()
    rows = _accum_batch()
    tx = optax.sgd(1.0)
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jnp.zeros(2, jnp.uint32))
    step = lambda k: jax.jit(functools.partial(  # noqa: E731
        train.train_step, config=config, tx=tx, chunk=64, accum=k, schedule=optax.constant_schedule(1.0)))
    one, m1 = step(1)(state, rows)
    many, mk = step(accum)(state, rows)
    for k in ("loss", "tokens", "accuracy", "grad_norm"):
        np.testing.assert_allclose(float(mk[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    # With SGD at lr 1 the update is the gradient itself.
    delta = lambda new: jax.tree.map(lambda a, b: a - b, new["params"], params)  # noqa: E731
    assert_trees_close(delta(many), delta(one), rtol=1e-4, atol=1e-6, what="update")

    # Sensitivity: averaging per-micro-batch mean losses (ignoring token counts) differs.
    loss = jax.jit(functools.partial(loss_lib.batch_loss, config=config, chunk=64))
    means = []
    for i in range(accum):
        mb = {k: v[i::accum] for k, v in rows.items()}
        s, (t, _) = loss(params, mb)
        means.append(float(s) / float(t))
    assert abs(np.mean(means) - float(m1["loss"])) > 1e-3 * float(m1["loss"])


# ----------------------------------------------------------------------------- 5. sharded vs one device


def test_sharded_training_matches_one_device():
    """5 steps on a data=2, fsdp=2, tensor=2 mesh of 8 CPU devices track the 1-device run.

    The sharded run also accumulates 2 micro-batches per step (each spread over the batch shards),
    which must not change the curve either.
    """
    cfg = small_config(steps=5, batch_size=8, seq_len=128)
    cfg.opt.lr = 3e-3
    tok = tokenizer()
    config = train.model_config(cfg, tok)
    data = data_lib.build(cfg.data, tok, global_batch_size=8, seed=0)
    batches = [next(data.train) for _ in range(5)]
    meshes = {"1": one_device_mesh(), "8": sharding.make_mesh(2, 2, 2, devices=jax.devices())}
    assert meshes["8"].devices.size == 8
    curves, finals, inits = {}, {}, {}
    for name, mesh in meshes.items():
        cfg.train.grad_accum = 2 if name == "8" else 1
        trainer = train.Trainer.create(cfg, config, mesh)
        state = trainer.init_state()
        inits[name] = jax.device_get(state["params"])
        if name == "8":
            spec = state["params"]["layers"]["local"]["attn"]["q_einsum"]["w"].sharding.spec
            assert "tensor" in jax.tree.leaves(tuple(spec)) and "fsdp" in jax.tree.leaves(tuple(spec)), spec
        curve = []
        for b in batches:
            state, m = trainer.step(state, trainer.put_batch(b))
            curve.append(float(m["loss"]))
        curves[name], finals[name] = curve, jax.device_get(state["params"])
    # Same seed -> same initial weights whatever the mesh.
    assert_trees_close(inits["8"], inits["1"], rtol=0, atol=0, what="init")
    np.testing.assert_allclose(curves["8"], curves["1"], rtol=1e-5)
    assert curves["1"][-1] < curves["1"][0]
    assert_trees_close(finals["8"], finals["1"], rtol=1e-3, atol=1e-5, what="params")


# ----------------------------------------------------------------------------- 6. kill and resume


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, init_checkpoint):
    """run(stop_after=3) + run() reaches the same step-6 params and loss curve as one 6-step run.

    Both start from model.init_checkpoint, so the resumed run also checks that the workdir's
    checkpoint, not the initial weights, is what gets loaded.
    """
    cfg = small_config(steps=6, batch_size=8, seq_len=128)
    cfg.model.init_checkpoint = init_checkpoint
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.opt.lr, cfg.opt.warmup_steps = 3e-3, 2
    cfg.checkpoint.every_steps = 2  # a periodic save at 2, the stop_after save at 3
    cfg.checkpoint.async_save = True  # the default: the next run must see the finished save

    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    first = train.run(cfg, str(interrupted), stop_after=3)
    assert first["step"] == 3
    assert sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    second = train.run(cfg, str(interrupted))
    assert second["step"] == 6
    whole = train.run(cfg, str(straight))
    assert whole["step"] == 6

    resumed, uninterrupted = loss_records(interrupted), loss_records(straight)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted):
        for k in ("loss", "learning_rate", "grad_norm", "target_tokens"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=f"step {a['step']} {k}")

    config_a, params_a = gemma_jax.load(str(interrupted))
    config_b, params_b = gemma_jax.load(str(straight))
    assert config_a == config_b
    assert_trees_close(params_a, params_b, rtol=1e-6, atol=1e-8, what="step-6 params")


def test_rerunning_a_finished_run_with_export_is_harmless(tmp_path, init_checkpoint):
    """The same command again after the run finished (a scheduler restart): no error, no retraining."""
    cfg = small_config(steps=1, batch_size=8)
    cfg.model.init_checkpoint = init_checkpoint
    cfg.mesh.fsdp = -1
    cfg.train.export_format = "gemma_jax"
    assert train.run(cfg, str(tmp_path))["step"] == 1
    exported = leaves(gemma_jax.load(str(tmp_path / "export"))[1])
    assert train.run(cfg, str(tmp_path))["step"] == 1  # fails if the export dir blocks a second save
    assert [r["step"] for r in loss_records(tmp_path)] == [1]
    again = leaves(gemma_jax.load(str(tmp_path / "export"))[1])
    for k in exported:
        np.testing.assert_array_equal(again[k], exported[k], err_msg=k)


def test_run_restores_the_sigterm_handler(tmp_path, init_checkpoint):
    """run() turns SIGTERM into a checkpoint only while it runs; afterwards SIGTERM behaves as before."""
    cfg = small_config(steps=5, batch_size=8)
    cfg.model.init_checkpoint = init_checkpoint
    cfg.mesh.fsdp = -1
    before = signal.getsignal(signal.SIGTERM)
    assert train.run(cfg, str(tmp_path), stop_after=0)["step"] == 0
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------- 7, 8. command line


def _cli_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cli(workdir, *overrides):
    return [sys.executable, "-m", "gemma_jax.train", "--config=configs/legal.py:tiny", f"--workdir={workdir}",
            *overrides]


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
    """SIGTERM mid-run: exit 0 with a checkpoint at the reached step; the same command then finishes.
    (Ctrl-C takes the same path: test_reliability::test_ctrl_c_saves_at_the_step_boundary_...)"""
    total = 60  # the signal comes at the first logged step; the resume then runs to 60
    cmd = _cli(tmp_path / "wd", f"--config.train.steps={total}", "--config.train.log_every=1",
               "--config.train.progress=False", "--config.train.batch_size=4", "--config.data.seq_len=128",
               "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.hidden_dim=128",
               "--config.data.eval=", "--config.train.export_format=", "--config.checkpoint.every_steps=1000")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_cli_env(), stdout=log, stderr=subprocess.STDOUT)
    metrics = tmp_path / "wd" / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and loss_records(tmp_path / "wd"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert loss_records(tmp_path / "wd"), "no step logged in time"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, (tmp_path / "first.log").read_text()[-3000:]
    reached = loss_records(tmp_path / "wd")[-1]["step"]
    assert 1 <= reached < total
    saved = [int(p.name) for p in (tmp_path / "wd" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [reached]

    res = subprocess.run(cmd, cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps = [r["step"] for r in loss_records(tmp_path / "wd")]
    assert steps == list(range(1, total + 1)), "resumed run did not continue from the saved step"
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == total


@pytest.mark.slow
def test_cli_end_to_end_tiny(tmp_path):
    """`python -m gemma_jax.train --config=configs/legal.py:tiny` with fewer steps: every artifact, HF export."""
    import helpers

    wd = tmp_path / "wd"
    steps = 20
    res = subprocess.run(_cli(wd, f"--config.train.steps={steps}", "--config.train.log_every=5"),
                         cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["step"] == steps

    records = loss_records(wd)
    assert [r["step"] for r in records] == list(range(5, steps + 1, 5))
    for r in records:
        for k in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second",
                  "perplexity", "accuracy", "step_time", "mfu", "memory_bytes"):
            assert k in r and np.isfinite(r[k]), (k, r)
        assert r["tokens_per_second"] > 0
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert any("eval_loss" in r for r in read_metrics(wd))
    assert json.loads((wd / "config.json").read_text())["train"]["steps"] == steps
    assert (wd / "model.json").is_file() and (wd / "tokenizer.model").is_file()
    assert (wd / "plots" / "loss.png").stat().st_size > 0
    assert glob.glob(str(wd / "tensorboard" / "events.out.tfevents.*"))

    config, params = gemma_jax.load(str(wd))
    tokens = np.array([tokenizer().encode_chat(legal_examples()[0].turns)[0][:64]])
    ours = np.asarray(gemma_jax.logits(config, params, tokens))
    theirs = helpers.hf_logits(str(wd / "export"), tokens)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- 9. chunked loss


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 1000])
def test_chunked_cross_entropy_matches_full_logits(chunk):
    """Chunked loss and hit count equal a plain full-logits soft-capped cross-entropy, values and gradients."""
    config = model_lib.ModelConfig(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=2, num_kv_heads=1,
                                   head_dim=16, vocab_size=300, final_softcap=30.0)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 16, 32)), jnp.float32)  # 48 tokens: 7 does not divide
    table = jnp.asarray(rng.normal(size=(300, 32)) * 3, jnp.float32)  # logits well past the cap
    targets = jnp.asarray(rng.integers(0, 300, (3, 16)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 16)) < 0.6, jnp.float32)

    def reference(h, t):
        logits = 30.0 * jnp.tanh(jnp.einsum("BTD,VD->BTV", h, t) / 30.0)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        return jnp.sum(nll * mask), jnp.sum(hits * mask)

    def chunked(h, t):
        return loss_lib.chunked_cross_entropy(config, h, t, targets, mask, chunk)

    assert float(jnp.abs(jnp.einsum("BTD,VD->BTV", hidden, table)).max()) > 60.0  # the cap bites
    (want, want_hits), want_g = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(hidden, table)
    (got, got_hits), got_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(hidden, table)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(got_hits) == float(want_hits)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("table_grad", [True, False])
def test_chunked_cross_entropy_skips_chunks_without_targets(table_grad):
    """On one device the loss gathers the loss-masked tokens to the front and skips the chunks past
    them: values and gradients equal the plain full-logits loss and the sharded (8-device mesh)
    path, for sparse targets spread over many chunks and for a batch with no target at all."""
    config = model_lib.ModelConfig(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=2, num_kv_heads=1,
                                   head_dim=16, vocab_size=300, final_softcap=30.0)
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(4, 80, 32)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(300, 32)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (4, 80)), jnp.int32)
    sparse = np.zeros((4, 80), np.float32)
    sparse[0, 3], sparse[1, 70:75], sparse[3, 41] = 1.0, 1.0, 0.5  # 7 targets in 320 tokens
    fns = {}
    for name, mesh in (("one device", None), ("mesh", sharding.make_mesh(1, 8, 1))):
        fns[name] = (mesh, jax.jit(jax.value_and_grad(
            lambda h, t, m: loss_lib.chunked_cross_entropy(config, h, t, targets, m, 16, table_grad=table_grad),
            argnums=(0, 1), has_aux=True)))

    def reference(h, t, m):
        logits = 30.0 * jnp.tanh(jnp.einsum("BTD,VD->BTV", h, t) / 30.0)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * m), jnp.sum((jnp.argmax(logits, -1) == targets) * m)

    for mask in (jnp.asarray(sparse), jnp.zeros((4, 80), jnp.float32)):
        (want, want_hits), want_g = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(hidden, table, mask)
        if not table_grad:
            want_g = (want_g[0], jnp.zeros_like(table))
        for name, (mesh, fn) in fns.items():
            with sharding.mesh_context(mesh):
                (got, got_hits), got_g = fn(hidden, table, mask)
            np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=name)
            assert float(got_hits) == float(want_hits), name
            for g, w in zip(got_g, want_g):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)
    hlo = fns["one device"][1].lower(hidden, table, jnp.asarray(sparse)).as_text()
    assert "stablehlo.case" in hlo or "stablehlo.if" in hlo  # the skip is in the program


def test_chunked_cross_entropy_in_bfloat16_follows_float32():
    """Mixed precision: bf16 hidden states give bf16 products against the float32 table, and
    the gradients stay within bf16 rounding of the float32 computation on the same inputs."""
    config = model_lib.ModelConfig(num_layers=2, embed_dim=32, hidden_dim=64, num_heads=2, num_kv_heads=1,
                                   head_dim=16, vocab_size=300, final_softcap=30.0)
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 24, 32)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(300, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (2, 24)), jnp.int32)
    mask = jnp.ones((2, 24), jnp.float32)

    def loss(h, t):
        return loss_lib.chunked_cross_entropy(config, h, t, targets, mask, 16)[0]

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    got, got_g = grad_fn(hidden, table)
    want, want_g = grad_fn(hidden.astype(jnp.float32), table)
    assert got_g[0].dtype == jnp.bfloat16 and got_g[1].dtype == jnp.float32
    # Both gradient products (hidden and table) take the [chunk, vocab] gradient in bf16.
    hlo = grad_fn.lower(hidden, table).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert sum("tensor<16x300xbf16>" in line for line in dots) == 2, dots
    np.testing.assert_allclose(float(got), float(want), rtol=1e-2)
    for g, w in zip(got_g, want_g):
        g, w = np.asarray(g, np.float32), np.asarray(w)
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < 2e-2


# ----------------------------------------------------------------------------- 10. clear errors


def test_missing_init_checkpoint_says_where_to_get_weights(tmp_path):
    cfg = small_config()
    cfg.mesh.fsdp = -1
    cfg.model.init_checkpoint = str(tmp_path / "weights" / "gemma2-2b-it")
    with pytest.raises(FileNotFoundError) as e:
        train.run(cfg, str(tmp_path / "wd"))
    msg = str(e.value)
    assert cfg.model.init_checkpoint in msg
    assert "Kaggle" in msg and "Hugging Face" in msg


def test_full_size_config_without_weights_names_the_checkpoint(tmp_path, monkeypatch):
    """configs/legal.py:2b before downloading weights: the error names the missing checkpoint and how to get it."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("legal", "2b")
    with pytest.raises(FileNotFoundError) as e:
        train.run(cfg, str(tmp_path / "wd"))
    msg = str(e.value)
    assert "weights/gemma2-2b-it" in msg, msg
    assert "download" in msg.lower() and "Kaggle" in msg and "Hugging Face" in msg, msg


def test_batch_size_must_divide_by_accum_and_batch_shards(tmp_path):
    cfg = small_config(batch_size=8)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.train.grad_accum = 4  # 8 % (4 * 4) != 0
    with pytest.raises(ValueError, match=r"train\.batch_size=8.*train\.grad_accum=4.*data\*fsdp = 4"):
        train.run(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_unknown_schedule_and_misspelled_key():
    cfg = small_config()
    cfg.opt.schedule = "exponential"
    with pytest.raises(ValueError, match=r"opt\.schedule='exponential'"):
        train.make_optimizer(cfg.opt, 10)
    with pytest.raises(AttributeError):
        cfg.train.stepz = 5  # configs are locked


# ----------------------------------------------------------------------------- 11. schedule and decay mask


def test_lr_schedule_warmup_then_decay():
    cfg = small_config()
    opt = cfg.opt
    opt.lr, opt.warmup_steps, opt.min_lr_ratio = 1e-3, 10, 0.1
    s = train.lr_schedule(opt, 100)
    values = np.array([float(s(i)) for i in range(101)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 1e-3, 11), rtol=1e-5, atol=1e-12)
    assert np.all(np.diff(values[10:]) <= 1e-12)
    np.testing.assert_allclose(values[100], 1e-4, rtol=1e-5)
    np.testing.assert_allclose(values[55], 1e-4 + 0.9e-3 * 0.5, rtol=1e-4)  # cosine midpoint

    opt.schedule = "linear"
    s = train.lr_schedule(opt, 100)
    np.testing.assert_allclose([float(s(10)), float(s(55)), float(s(100))], [1e-3, 5.5e-4, 1e-4], rtol=1e-5)
    opt.schedule = "constant"
    s = train.lr_schedule(opt, 100)
    np.testing.assert_allclose([float(s(10)), float(s(100))], [1e-3, 1e-3], rtol=1e-6)
    # Warmup longer than the run is clipped so the run still reaches the peak.
    opt.schedule, opt.warmup_steps = "cosine", 500
    s = train.lr_schedule(opt, 20)
    np.testing.assert_allclose(float(s(19)), 1e-3, rtol=1e-5)


def test_decay_mask_excludes_norms_and_embeddings():
    cfg = small_config()
    config = train.model_config(cfg, tokenizer())
    shapes = model_lib.param_shapes(config)
    mask = leaves(train.decay_mask(cfg.opt, shapes))
    assert not mask["['embedder']['input_embedding']"]
    assert not mask["['final_norm']['scale']"]
    assert not any(v for k, v in mask.items() if "norm" in k)
    assert mask["['layers']['local']['attn']['q_einsum']['w']"] and mask["['layers']['global']['mlp']['linear']['w']"]
    cfg.opt.decay_embeddings = True
    assert leaves(train.decay_mask(cfg.opt, shapes))["['embedder']['input_embedding']"]
    cfg.opt.decay_embeddings, cfg.opt.decay_norms = False, True
    assert leaves(train.decay_mask(cfg.opt, shapes))["['final_norm']['scale']"]

    # Wired into the optimizer: with zero gradients only decayed weights shrink.
    cfg.opt.decay_norms = False
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.schedule, cfg.opt.weight_decay = 0.1, 0, "constant", 0.5
    params = jax.tree.map(lambda x: x + 1.0, random_params(config, seed=0))
    tx = train.make_optimizer(cfg.opt, 10)

    @jax.jit
    def one_step(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = leaves(one_step(params))
    old = leaves(params)
    for k in new:
        if "norm" in k or "input_embedding" in k:
            np.testing.assert_array_equal(new[k], old[k], err_msg=k)
        else:
            np.testing.assert_allclose(new[k], old[k] * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=k)


def test_mfu_counts_the_output_projection_for_scored_tokens_and_lora_without_frozen_gradients(tmp_path):
    """A chat SFT step scores a fraction of its positions: the 262k-row output projection counts for
    those only, so a Gemma 3 270M step is not credited with work the loss never needs; LoRA's frozen
    weights get no gradients (2/3 of full training's FLOPs); a record's MFU uses its own steps' tokens."""
    from gemma_jax.model import ModelConfig
    from gemma_jax.train import log

    config = ModelConfig.from_preset("gemma3_270m")
    kw = dict(config=config, seq_len=256, batch_size=4, total_steps=4, start_step=0, progress=False)
    full, lora = log.Logger(str(tmp_path / "full"), **kw), log.Logger(str(tmp_path / "lora"), lora=True, **kw)
    positions, per_token = 4 * 256, config.flops_per_token(256)
    head = 2 * 640 * 262144 * 3
    assert full.step_flops() == pytest.approx(per_token * positions)
    assert full.step_flops(300) == pytest.approx((per_token - head) * positions + head * 300)
    assert full.step_flops(0) < 0.45 * full.step_flops()  # the projection is most of a 270M's FLOPs
    assert lora.step_flops(300) == pytest.approx(full.step_flops(300) * 2 / 3)
    full.peak = lora.peak = 1e12
    metrics = dict(loss=1.0, accuracy=0.5, learning_rate=1e-3, grad_norm=1.0, tokens=300.0)
    for step in (1, 2):
        full.step(step, {k: jnp.float32(v) for k, v in metrics.items()}, log=False)
    full.step(3, {k: jnp.float32(v) for k, v in metrics.items()}, log=True)
    assert full.last["mfu"] == pytest.approx(full.step_flops(300) / full.last["step_time"] / 1e12, rel=1e-6)
    for lg in (full, lora):
        lg.close()
