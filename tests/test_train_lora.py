"""LoRA / QLoRA training: only adapters train, they overfit, save small, resume, merge and export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax import model as model_lib, train
from test_train import (LEGAL_TRAIN, assert_trees_close, init_checkpoint, leaves, loss_records, one_device_mesh,  # noqa: F401
                        random_params, rows_of, legal_examples, small_config, tokenizer)


LEGAL_EVAL = LEGAL_TRAIN.parent / "eval.jsonl"


def lora_config(steps: int, *, rank: int = 8, quantize: str = "none", batch_size: int = 6):
    cfg = small_config(steps=steps, batch_size=batch_size)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.quantize = rank, 2.0 * rank, quantize
    cfg.lora.base_dtype = "float32"
    return cfg


def test_lora_overfits_and_trains_only_adapters():
    """Six examples memorised by rank-8 adapters on a frozen random base; nothing else moves.

    The base has embeddings of std 0.3: the frozen output projection must be able to form
    confident logits (the init's std 0.02 table could not, whatever the adapters do).
    """
    cfg = lora_config(60)
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay = 2e-2, 5, 0.01
    config = train.lora_model_config(cfg, train.model_config(cfg, tokenizer()))
    trainer = train.Trainer.create(cfg, config, one_device_mesh())
    state = trainer.init_state(jax.device_put(random_params(config, seed=3, scale=0.3)))
    base_before = leaves(trainer.frozen)
    adapters_before = leaves(state["params"])

    # The optimizer state holds adapter-shaped moments only.
    base_shapes = {x.shape for x in jax.tree.leaves(model_lib.param_shapes(config))}
    adapter_shapes = [x.shape for x in jax.tree.leaves(state["params"])]
    moments = [x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sorted(moments) == sorted(adapter_shapes * 2)  # Adam mu and nu
    assert not base_shapes & set(moments)

    batch = trainer.put_batch(rows_of(legal_examples()[:6], 128, packing=False))
    losses = []
    for _ in range(cfg.train.steps):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0 and losses[-1] < 0.2, (losses[0], losses[-5:])

    after = leaves(trainer.frozen)
    for k, v in base_before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=f"frozen base changed: {k}")
    changed = {k for k, v in leaves(state["params"]).items() if not np.array_equal(v, adapters_before[k])}
    assert changed == set(adapters_before)  # every A and B moved


def test_qlora_run_saves_adapters_resumes_merges_and_exports(tmp_path, init_checkpoint):
    """int8 base: stop after 2 steps and resume == 4 straight steps; the workdir loads merged."""
    cfg = lora_config(4, rank=4, quantize="int8", batch_size=8)
    cfg.model.init_checkpoint = init_checkpoint
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    cfg.opt.lr, cfg.lora.dropout = 1e-2, 0.1
    cfg.train.export_format = "hf"
    cfg.checkpoint.every_steps = 2
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.run(cfg, str(a), stop_after=2)["step"] == 2
    assert train.run(cfg, str(a))["step"] == 4
    # The straight run also evaluates its task at the end (merged, dequantised params; generation).
    cfg_b = cfg.copy_and_resolve_references()
    cfg_b.data.eval = str(LEGAL_EVAL)
    cfg_b.eval.in_training, cfg_b.eval.max_examples, cfg_b.eval.max_new_tokens = True, 2, 8
    cfg_b.eval.general = ""
    final = train.run(cfg_b, str(b))
    assert final["step"] == 4 and 0.0 <= final["eval_rouge_l"] <= 100.0 and final["eval_loss"] > 0
    report = json.loads((b / "eval" / "step_4" / "report.json").read_text())
    assert report["task"] == "summarization" and report["generated"] == 2
    assert report["tuned"]["rouge_l"] == final["eval_rouge_l"]
    ra, rb = loss_records(a), loss_records(b)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-6, err_msg=f"step {x['step']}")

    config0, base = gemma_jax.load(init_checkpoint)
    step_dir = a / "checkpoints" / "4" / "params"

    # load(workdir) = base (as stored, unquantised) + adapters.
    config, merged = gemma_jax.load(str(a))
    assert config.lora_scale == model_lib.ModelConfig.lora_scale
    import orbax.checkpoint as ocp
    adapters = jax.device_get(ocp.StandardCheckpointer().restore(step_dir))
    # The checkpoint holds adapters only (every leaf an A or a B), a small fraction of the model.
    assert all(k.endswith(("['a']", "['b']")) for k in leaves(adapters))
    assert sum(x.size for x in jax.tree.leaves(adapters)) < config0.num_params() / 10
    assert float(max(jnp.abs(x).max() for k, x in leaves(adapters).items() if k.endswith("['b']"))) > 0
    tokens = jnp.asarray(rows_of(legal_examples()[:2], 128, packing=False)["inputs"])
    assert tokens.shape == (2, 128)
    lora_config_ = config0.replace(lora_scale=cfg.lora.alpha / cfg.lora.rank)
    with_adapters = model_lib.Transformer(lora_config_).apply({"params": base, "lora": adapters}, tokens)
    np.testing.assert_allclose(model_lib.logits(config, merged, tokens), with_adapters, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(with_adapters - model_lib.logits(config0, base, tokens)).max()) > 1e-3

    # The export at the end of the run is the merged model.
    _, exported = gemma_jax.load(str(a / "export"))
    assert_trees_close(exported, merged, rtol=1e-6, atol=1e-6, what="export")


def test_quantised_base_loss_within_tolerance(init_checkpoint):
    """Step-0 loss on real data with an int8 / int4 base vs the float base (B = 0: the base model)."""
    losses = {}
    rows = rows_of(legal_examples()[:8], 128, packing=True)
    for bits in ("none", "int8", "int4"):
        cfg = lora_config(1, quantize=bits, batch_size=rows["inputs"].shape[0])
        config, params = gemma_jax.load(init_checkpoint)
        params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, params)  # away from uniform
        config = train.lora_model_config(cfg, config)
        trainer = train.Trainer.create(cfg, config, one_device_mesh())
        state = trainer.init_state(params)
        losses[bits] = trainer.evaluate(state["params"], [rows])["eval_loss"]
    assert losses["none"] > 1.0
    assert abs(losses["int8"] - losses["none"]) < 0.01 * losses["none"], losses
    assert abs(losses["int4"] - losses["none"]) < 0.10 * losses["none"], losses
    assert losses["int8"] != losses["none"]


def test_bad_lora_settings_are_named():
    cfg = lora_config(1, quantize="int3")
    with pytest.raises(ValueError, match="lora.quantize='int3'"):
        train.lora_model_config(cfg, train.model_config(cfg, tokenizer()))
    cfg = lora_config(1)
    cfg.lora.targets = "no_such_weight"
    config = train.lora_model_config(cfg, train.model_config(cfg, tokenizer()))
    with pytest.raises(ValueError, match="lora.targets='no_such_weight' matches no weight"):
        train.Trainer.create(cfg, config, one_device_mesh())
