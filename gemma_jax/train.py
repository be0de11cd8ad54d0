"""Fine-tuning: optimizer, chunked loss, the pure train step, the loop and the CLI.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal

The train state is a dict {step, params, opt_state, rng}. It is created directly in its
shardings (`jax.jit(..., out_shardings=...)`), so no device ever holds the unsharded model, and
`train_step(state, batch) -> (state, metrics)` is jitted once with donated state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as logging_std
import os
import re
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from gemma_jax import checkpoint, data as data_lib, lora as lora_lib, model as model_lib, sharding
from gemma_jax import paths, train_checkpoints, train_log
from gemma_jax.model import ModelConfig
from gemma_jax.tokenizer import Tokenizer

_DIMS = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
         "vocab_size", "sliding_window", "query_pre_attn_scalar", "attn_softcap", "final_softcap")


# ----------------------------------------------------------------------------- model and tokenizer


def find_tokenizer(cfg, workdir: str = "") -> Tokenizer:
    """data.tokenizer, else the copy a run keeps in its workdir, else one beside model.init_checkpoint."""
    kept = paths.join(workdir, "tokenizer.model") if workdir else ""
    path = (cfg.data.tokenizer or (kept if paths.exists(kept) else "")
            or (cfg.model.init_checkpoint and checkpoint.find_tokenizer(cfg.model.init_checkpoint)))
    if not path:
        raise FileNotFoundError(
            "no tokenizer: set data.tokenizer to a tokenizer.model (it ships with the Gemma 2 "
            "weights on Kaggle and Hugging Face), or put one beside model.init_checkpoint")
    return Tokenizer(paths.local_copy(path))  # SentencePiece reads local files only


def model_config(cfg, tokenizer: Tokenizer, loaded: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from the checkpoint's (if any) or the preset, then explicit dims and dtypes."""
    m = cfg.model
    if loaded is not None:
        base = loaded
    elif m.preset:
        base = ModelConfig.from_preset(m.preset)
    else:
        missing = [k for k in _DIMS if m[k] is None and k not in ("vocab_size",)]
        if missing:
            raise ValueError(f"model.preset is empty, so model.{', model.'.join(missing)} must be set")
        base = None
    dims = {k: m[k] for k in _DIMS if m[k] is not None}
    if loaded is not None:
        clash = {k: (v, getattr(loaded, k)) for k, v in dims.items() if v != getattr(loaded, k)}
        if clash:
            raise ValueError(f"model.* disagrees with {m.init_checkpoint}: "
                             + ", ".join(f"{k}={a} in the config vs {b} in the checkpoint"
                                         for k, (a, b) in clash.items()))
    elif "vocab_size" not in dims:
        # Round up so the vocab axis shards evenly (Gemma itself pads 256000 to 256128).
        dims["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    fields = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                  attention_impl=m.attention_impl, **dims)
    config = base.replace(**fields) if base is not None else ModelConfig(**fields)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model "
                         f"only {config.vocab_size} embedding rows")
    return config


def lora_enabled(cfg) -> bool:
    """Whether the run trains low-rank adapters (lora.rank > 0) instead of every weight."""
    return int(cfg.lora.rank) > 0


def lora_model_config(cfg, config: ModelConfig) -> ModelConfig:
    """The model of a LoRA run: adapter scale and dropout, base held in lora.base_dtype."""
    lo = cfg.lora
    if lo.quantize not in ("none", *lora_lib.QUANT_DTYPES):
        raise ValueError(f"lora.quantize={lo.quantize!r}; choose none, {', '.join(lora_lib.QUANT_DTYPES)}")
    if not 0 <= float(lo.dropout) < 1:
        raise ValueError(f"lora.dropout={lo.dropout} must be in [0, 1)")
    return config.replace(lora_scale=float(lo.alpha) / int(lo.rank), lora_dropout=float(lo.dropout),
                          param_dtype=lo.base_dtype)


# ----------------------------------------------------------------------------- optimizer


def lr_schedule(opt, steps: int) -> optax.Schedule:
    """Linear warmup, then cosine / linear decay to min_lr_ratio * lr, or constant."""
    warmup = min(int(opt.warmup_steps), max(steps - 1, 0))
    decay_steps = max(steps - warmup, 1)
    end = opt.lr * opt.min_lr_ratio
    if opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        after = optax.linear_schedule(opt.lr, end, decay_steps)
    elif opt.schedule == "constant":
        after = optax.constant_schedule(opt.lr)
    else:
        raise ValueError(f"opt.schedule={opt.schedule!r}; choose cosine, linear or constant")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), after], [warmup])


def decay_mask(opt, params):
    """True for weights that get weight decay: matrices, minus embeddings unless asked."""
    def wants_decay(path, _):
        name = jax.tree_util.keystr(path)
        if "input_embedding" in name:
            return bool(opt.decay_embeddings)
        if re.search(r"norm", name):
            return bool(opt.decay_norms)
        return True
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt, steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + schedule, decay mask and global-norm clipping."""
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
    parts.append(optax.adamw(lr_schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=functools.partial(decay_mask, opt)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- loss


def chunked_cross_entropy(config: ModelConfig, hidden_BTD, table_VD, targets_BT, mask_BT, chunk: int,
                          table_grad: bool = True):
    """Sums of masked token losses and correct predictions, computed `chunk` tokens at a time.

    The [tokens, vocab] float32 logits exist for one chunk at a time, so a 256k vocabulary
    never needs [batch, length, vocab]. The gradient is formed in the same pass (see
    `_fused_ce`), so unlike rematerialising each chunk the logits are computed only once.
    `table_grad=False` (a frozen embedding, as in LoRA) skips the [vocab, embed] float32
    gradient accumulator.
    """
    d = hidden_BTD.shape[-1]
    x_ND = hidden_BTD.reshape(-1, d)
    y_N, m_N = targets_BT.reshape(-1), mask_BT.reshape(-1).astype(jnp.float32)
    n = x_ND.shape[0]
    chunk = max(1, min(chunk, n))
    pad = -n % chunk
    if pad:
        x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
        y_N, m_N = jnp.pad(y_N, (0, pad)), jnp.pad(m_N, (0, pad))
    loss_sum, correct, _, _ = _fused_ce(config, chunk, table_grad, x_ND, table_VD, y_N, m_N)
    return loss_sum, correct


def _ce_chunks(config: ModelConfig, chunk: int, table_grad: bool, x_ND, table_VD, y_N, m_N):
    """Loss sum, correct count, d(loss)/d(hidden) and d(loss)/d(table), one chunk at a time.

    The loss is the last operation of the step, so its gradient can be formed while each
    chunk's logits are at hand: softmax minus one-hot, times the soft-cap's derivative.
    """
    d = x_ND.shape[-1]
    cap = config.final_softcap

    def one(carry, xs):
        loss, hits, dtable_VD = carry
        x_CD, y_C, m_C = xs
        logits_CV = model_lib.final_logits(config, x_CD[None], table_VD)[0]
        max_C = jnp.max(logits_CV, axis=-1)
        logz_C = max_C + jnp.log(jnp.sum(jnp.exp(logits_CV - max_C[:, None]), axis=-1))
        true_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        # A hit is a target logit equal to the row's maximum: the same as argmax == target but
        # for exact ties, and a plain max instead of XLA:CPU's slow (value, index) reduction.
        hits = hits + jnp.sum((true_C >= max_C) * m_C)
        dlogits_CV = jnp.exp(logits_CV - logz_C[:, None]) * m_C[:, None]
        dlogits_CV = dlogits_CV.at[jnp.arange(y_C.shape[0]), y_C].add(-m_C)
        if cap:  # d(cap * tanh(z / cap)) / dz = 1 - (capped / cap)^2
            dlogits_CV = dlogits_CV * (1.0 - jnp.square(logits_CV / cap))
        # Both gradient products run in the compute dtype, as the forward one does: bf16 under
        # mixed precision (what torch autocast does), accumulating in float32. Left in float32
        # they made a 2b step on an H200 378 ms instead of 334 (README, Fine-tuning).
        dlogits_CV = dlogits_CV.astype(x_CD.dtype)
        dx_CD = jnp.einsum("CV,VD->CD", dlogits_CV, table_VD.astype(x_CD.dtype), preferred_element_type=jnp.float32)
        if table_grad:
            dtable_VD = dtable_VD + jnp.einsum("CV,CD->VD", dlogits_CV, x_CD, preferred_element_type=jnp.float32)
        loss = loss + jnp.sum((logz_C - true_C) * m_C)
        return (loss, hits, dtable_VD), dx_CD.astype(x_CD.dtype)

    xs = (x_ND.reshape(-1, chunk, d), y_N.reshape(-1, chunk), m_N.reshape(-1, chunk))
    init = (jnp.float32(0), jnp.float32(0), jnp.zeros(table_VD.shape if table_grad else (), jnp.float32))
    (loss, hits, dtable_VD), dx = jax.lax.scan(one, init, xs)
    return loss, hits, dx.reshape(x_ND.shape), dtable_VD.astype(table_VD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_ce(config, chunk, table_grad, x_ND, table_VD, y_N, m_N):
    return _ce_chunks(config, chunk, table_grad, x_ND, table_VD, y_N, m_N)


def _fused_ce_fwd(config, chunk, table_grad, x_ND, table_VD, y_N, m_N):
    out = _ce_chunks(config, chunk, table_grad, x_ND, table_VD, y_N, m_N)
    return out, (out[2], out[3], y_N, m_N, table_VD.shape)


def _fused_ce_bwd(config, chunk, table_grad, residuals, cotangents):
    dx_ND, dtable_VD, y_N, m_N, table_shape = residuals
    g = cotangents[0]  # only the loss sum is differentiated; counts and the gradients are outputs
    dtable_VD = dtable_VD * g.astype(dtable_VD.dtype) if table_grad else jnp.zeros(table_shape, dtable_VD.dtype)
    return (dx_ND * g.astype(dx_ND.dtype), dtable_VD,
            np.zeros(y_N.shape, jax.dtypes.float0), jnp.zeros_like(m_N))


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def loss_fn(params, batch, frozen=None, *, config: ModelConfig, chunk: int, rng=None):
    """(sum of token losses, (target tokens, correct tokens)) of one batch.

    `params` are the trained weights: the whole model, or with `frozen` (a LoRA run: {"params":
    base, optionally "quant": scales}) the adapters alone. `rng` drives adapter dropout.
    """
    if frozen:
        variables = dict(frozen, lora=params)
        table_VD = frozen["params"]["embedder"]["input_embedding"]
    else:
        variables = {"params": params}
        table_VD = params["embedder"]["input_embedding"]
    rngs = {"dropout": rng} if rng is not None and config.lora_dropout else None
    hidden_BTD = model_lib.Transformer(config).apply(
        variables, batch["inputs"], batch["positions"], batch["segment_ids"], return_hidden=True, rngs=rngs)
    loss_sum, correct = chunked_cross_entropy(
        config, hidden_BTD, table_VD, batch["targets"], batch["loss_mask"], chunk, table_grad=not frozen)
    return loss_sum, (jnp.sum(batch["loss_mask"]), correct)


# ----------------------------------------------------------------------------- train step


def train_step(state, batch, frozen=None, *, config: ModelConfig, tx, chunk: int, accum: int, schedule):
    """One optimizer step over `accum` micro-batches, weighted by their target-token counts.

    Gradients of the summed token losses are added up and divided by the step's total target
    tokens, so k micro-batches of b rows give the same update as one batch of k*b rows. With
    `frozen` (LoRA) only state["params"], the adapters, are differentiated and updated.
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, config=config, chunk=chunk), has_aux=True)
    params = state["params"]
    # Only adapter dropout draws random numbers; without it the step carries no RNG work.
    step_rng = (jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
                if config.lora_dropout else None)

    def grads_of(mb, i):
        return grad_fn(params, mb, frozen, rng=None if step_rng is None else jax.random.fold_in(step_rng, i))

    def micro(carry, xs):
        (loss_sum, (tokens, correct)), grads = grads_of(*xs)
        g_acc, l_acc, t_acc, c_acc = carry
        return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss_sum, t_acc + tokens, c_acc + correct), None

    if accum == 1:  # no accumulator: zero-filling a float32 copy of the model costs a pass over it
        (loss_sum, (tokens, correct)), grads = grads_of(batch, 0)
    else:
        # Rows i, i+accum, ... form micro-batch i, so each stays spread over the batch shards.
        micro_batches = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        (grads, loss_sum, tokens, correct), _ = jax.lax.scan(micro, init, (micro_batches, jnp.arange(accum)))

    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    metrics = dict(loss=loss_sum / denom, accuracy=correct / denom, tokens=tokens,
                   grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
    return new_state, metrics


def eval_step(params, batch, frozen=None, *, config: ModelConfig, chunk: int):
    """Summed loss, target tokens and correct tokens of one eval batch."""
    loss_sum, (tokens, correct) = loss_fn(params, batch, frozen, config=config, chunk=chunk)
    return dict(loss_sum=loss_sum, tokens=tokens, correct=correct)


# ----------------------------------------------------------------------------- sharded state


def _lora_shardings(cfg, config: ModelConfig, mesh, rules, base_sh):
    """(adapter shapes, adapter shardings, frozen-base shardings) of a LoRA run."""
    lo = cfg.lora
    base_shapes = model_lib.param_shapes(config)
    shapes = lora_lib.shapes(base_shapes, int(lo.rank), lo.targets, jnp.dtype(cfg.model.param_dtype))
    param_sh = sharding.logical_to_shardings(lora_lib.axes(config, int(lo.rank), lo.targets), shapes, mesh, rules)
    frozen_sh = {"params": base_sh}
    if lo.quantize != "none":
        # A scale sits where its weight does, with the contracted axes (length 1) unsharded.
        _, scale_shapes = jax.eval_shape(lambda p: lora_lib.quantize(p, lo.quantize), base_shapes)
        axes = model_lib.param_axes(config)
        scale_axes = jax.tree_util.tree_map_with_path(
            lambda path, _: _at(axes, [getattr(k, "key", None) for k in path[:-1]] + ["w"]), scale_shapes)
        frozen_sh["quant"] = sharding.logical_to_shardings(scale_axes, scale_shapes, mesh, rules)
    return shapes, param_sh, frozen_sh


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _like_params(tree_shapes, param_sh, mesh):
    """Shardings for an optimizer-state tree: leaves that mirror a param get its sharding."""
    by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_sh)}

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        for pkey, s in by_path.items():
            if key.endswith(pkey) and len(s.spec) <= len(leaf.shape):
                return s
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree_shapes)


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs, built once from a config: model, mesh, optimizer, jitted steps.

    With LoRA (cfg.lora.rank > 0) the state's params are the adapters and the frozen base lives
    in `frozen` ({"params": base, "quant": scales when quantised}), set by `set_base`; it is an
    argument of every step but never differentiated, updated or saved with the state.
    """

    cfg: Any
    config: ModelConfig
    mesh: Any
    rules: Any
    tx: Any
    schedule: Any
    state_sharding: Any
    batch_sharding: Any
    step_fn: Any
    eval_fn: Any
    param_shapes: Any  # of the trained params (the model, or the adapters)
    frozen_sharding: Any = None
    frozen: Any = None

    @property
    def lora(self) -> bool:
        return self.frozen_sharding is not None

    @classmethod
    def create(cls, cfg, config: ModelConfig, mesh) -> "Trainer":
        """Builds the optimizer, shardings and the jitted train/eval steps."""
        rules = sharding.rules_from_config(cfg.mesh)
        steps = int(cfg.train.steps)
        tx = make_optimizer(cfg.opt, steps)
        schedule = lr_schedule(cfg.opt, steps)
        base_sh = sharding.param_shardings(config, mesh, rules)
        frozen_sh = None
        if lora_enabled(cfg):
            shapes, param_sh, frozen_sh = _lora_shardings(cfg, config, mesh, rules, base_sh)
        else:
            shapes, param_sh = model_lib.param_shapes(config), base_sh
        opt_shapes = jax.eval_shape(tx.init, shapes)
        rep = sharding.replicated(mesh)
        state_sh = dict(step=rep, params=param_sh, opt_state=_like_params(opt_shapes, param_sh, mesh), rng=rep)
        batch_sh = sharding.batch_sharding(mesh, rules)
        chunk, accum = int(cfg.train.loss_chunk), int(cfg.train.grad_accum)
        step = functools.partial(train_step, config=config, tx=tx, chunk=chunk, accum=accum, schedule=schedule)
        step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, rep),
                          donate_argnums=0)
        eval_fn = jax.jit(functools.partial(eval_step, config=config, chunk=chunk),
                          in_shardings=(param_sh, batch_sh, frozen_sh), out_shardings=rep)
        return cls(cfg, config, mesh, rules, tx, schedule, state_sh, batch_sh, step_fn, eval_fn, shapes, frozen_sh)

    def context(self):
        """Mesh and logical-axis rules active while tracing, so activation constraints apply."""
        stack = _Contexts(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))
        return stack

    def set_base(self, params=None) -> None:
        """LoRA: the frozen base from a loaded tree (already sharded) or random (train.seed),
        cast to lora.base_dtype or quantised per lora.quantize, in its shardings."""
        lo, sh = self.cfg.lora, self.frozen_sharding
        with self.context():
            if params is None:
                params = jax.jit(lambda: model_lib.init_params(self.config, jax.random.key(int(self.cfg.train.seed))),
                                 out_shardings=sh["params"])()
            if lo.quantize == "none":
                dtype = self.config.weight_dtype
                self.frozen = {"params": jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                                                 out_shardings=sh["params"], donate_argnums=0)(params)}
            else:
                qparams, scales = lora_lib.quantize(params, lo.quantize)
                self.frozen = {"params": jax.device_put(qparams, sh["params"]),
                               "quant": jax.device_put(scales, sh["quant"])}

    def init_state(self, params=None):
        """Fresh state, created sharded: params from the given tree (already sharded) or random.

        LoRA: `params` is the base (see set_base, called here if not yet); adapters start fresh.
        """
        seed = int(self.cfg.train.seed)
        sh = self.state_sharding
        if self.lora:
            if self.frozen is None:
                self.set_base(params)
            lo = self.cfg.lora
            dtype = jnp.dtype(self.cfg.model.param_dtype)
            params = None
            make = lambda: lora_lib.init(model_lib.param_shapes(self.config), int(lo.rank), lo.targets,  # noqa: E731
                                         jax.random.key(seed + 2), dtype)
        else:
            make = lambda: model_lib.init_params(self.config, jax.random.key(seed))  # noqa: E731

        def fresh(params):
            if params is None:
                params = make()
            return dict(step=jnp.int32(0), params=params, opt_state=self.tx.init(params),
                        rng=jax.random.key_data(jax.random.key(seed + 1)))

        with self.context():
            if params is None:
                return jax.jit(lambda: fresh(None), out_shardings=sh)()
            return jax.jit(fresh, in_shardings=(sh["params"],), out_shardings=sh)(params)

    def put_batch(self, local_batch: dict[str, np.ndarray]):
        """Process-local numpy rows -> global arrays sharded along the batch."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local_batch.items()}

    def step(self, state, batch):
        """One jitted train step."""
        with self.context():
            return self.step_fn(state, batch, self.frozen)

    def evaluate(self, params, batches, limit: int = 0) -> dict[str, float]:
        """Loss, perplexity and token accuracy over eval batches (process-local lists)."""
        totals = dict(loss_sum=0.0, tokens=0.0, correct=0.0)
        with self.context():
            for i, b in enumerate(batches):
                if limit and i >= limit:
                    break
                out = jax.device_get(self.eval_fn(params, self.put_batch(b), self.frozen))
                for k in totals:
                    totals[k] += float(out[k])
        tokens = max(totals["tokens"], 1.0)
        loss = totals["loss_sum"] / tokens
        return dict(eval_loss=loss, eval_perplexity=float(np.exp(min(loss, 50.0))),
                    eval_accuracy=totals["correct"] / tokens, eval_tokens=totals["tokens"])


class _Contexts:
    """Enters several context managers as one."""

    def __init__(self, *cms):
        self.cms = cms

    def __enter__(self):
        for cm in self.cms:
            cm.__enter__()
        return self

    def __exit__(self, *exc):
        for cm in reversed(self.cms):
            cm.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """Turns SIGTERM (TPU preemption, `kill`) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() > 1:
            # jax.distributed's preemption notifier owns SIGTERM, and manager.reached_preemption(step)
            # stops every process at the same step; a per-process flag would let one process stop
            # while the others wait for it in the next step's collectives.
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners)
            pass

    def restore(self):
        """Puts back the SIGTERM handler run() found, so SIGTERM stops the process again."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True


def _task_eval(cfg, trainer: Trainer, state, tokenizer: Tokenizer, workdir: str, step: int) -> dict[str, float]:
    """eval.task's generation metrics on the eval split (gemma_jax.evaluate), with
    WORKDIR/eval/step_N/report.{json,md}; returned as eval_<metric> values for the log."""
    from gemma_jax import evaluate

    params = state["params"]
    if trainer.lora:  # generation wants one plain tree: merge the adapters (dequantised base)
        base = trainer.frozen["params"]
        if "quant" in trainer.frozen:
            base = lora_lib.dequantize(base, trainer.frozen["quant"])
        with trainer.context():
            params = jax.jit(lora_lib.merge, static_argnums=0)(trainer.config, base, params)
    report = evaluate.run_eval(trainer.config, params, tokenizer, cfg.eval, "", data_cfg=cfg.data,
                               holdout_seed=int(cfg.train.seed), mesh=trainer.mesh, rules=trainer.rules)
    if jax.process_index() == 0:
        with paths.staged_dir(paths.join(workdir, "eval", f"step_{step}")) as out:
            evaluate.write_report(report, out)
    # loss / perplexity / accuracy are trainer.evaluate's already; keep the task and general-text scores.
    return {f"eval_{k}": float(v) for k, v in report["tuned"].items()
            if isinstance(v, (int, float)) and k not in ("loss", "perplexity", "accuracy")}


def _write_run_files(cfg, workdir, config: ModelConfig, tokenizer: Tokenizer):
    if jax.process_index() != 0:
        return
    paths.Path(workdir).mkdir(parents=True, exist_ok=True)
    paths.Path(paths.join(workdir, "config.json")).write_text(cfg.to_json_best_effort(indent=2))
    checkpoint.write_model_json(workdir, config, "workdir")
    dst = paths.join(workdir, "tokenizer.model")
    if paths.absolute(tokenizer.path) != paths.absolute(dst):
        paths.copy_file(tokenizer.path, dst)


def run(cfg: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains per `cfg` in `workdir`, resuming from its latest checkpoint. Returns final metrics.

    `stop_after` ends this invocation after that many steps (as a kill would, but after a
    checkpoint), without changing the schedule: the next run resumes where this one stopped.
    """
    resuming = train_checkpoints.has_train_checkpoint(workdir)
    # Before the tokenizer lookup: a missing checkpoint also means no tokenizer beside it, and
    # "weights not downloaded" is the error the user needs to see.
    if cfg.model.init_checkpoint and not resuming and not paths.exists(cfg.model.init_checkpoint):
        raise FileNotFoundError(
            f"model.init_checkpoint={cfg.model.init_checkpoint!r} does not exist. Download Gemma 2 "
            "weights first: Kaggle google/gemma-2/flax (official) or Hugging Face google/gemma-2-2b "
            "(safetensors; accept the license, then `huggingface-cli download google/gemma-2-2b`).")
    tokenizer = find_tokenizer(cfg, workdir)
    mesh = sharding.mesh_from_config(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    use_lora = lora_enabled(cfg)
    loaded_params = None
    if cfg.model.init_checkpoint and (not resuming or use_lora):  # LoRA needs the frozen base again
        loaded, loaded_params = checkpoint.load(
            cfg.model.init_checkpoint, dtype=cfg.lora.base_dtype if use_lora else cfg.model.param_dtype,
            mesh=mesh, rules=rules)
        config = model_config(cfg, tokenizer, loaded)
    elif cfg.model.init_checkpoint:
        config = model_config(cfg, tokenizer, checkpoint.read_model_json(workdir))
    else:
        config = model_config(cfg, tokenizer)
    if use_lora:
        config = lora_model_config(cfg, config)

    batch_size, accum = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (accum * shards):
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.grad_accum={accum} "
                         f"times the batch shards (mesh data*fsdp = {shards})")
    data = data_lib.build(cfg.data, tokenizer, global_batch_size=batch_size, seed=int(cfg.train.seed),
                          process_index=jax.process_index(), process_count=jax.process_count())
    trainer = Trainer.create(cfg, config, mesh)
    _write_run_files(cfg, workdir, config, tokenizer)
    logging.info("%s; %s; %.1fM params", sharding.describe(mesh), config, config.num_params() / 1e6)
    if use_lora:
        trainer.set_base(loaded_params)
        if not cfg.model.init_checkpoint and not paths.exists(paths.join(workdir, "base")):
            # A random base is kept so the adapters can be merged into it later (gemma_jax.load).
            checkpoint.save(os.path.join(workdir, "base"), config, trainer.frozen["params"], format="gemma_jax")
        if jax.process_index() == 0:
            lora_lib.write_json(workdir, cfg.lora, cfg.model.init_checkpoint or "base")
        trained = sum(x.size for x in jax.tree.leaves(trainer.param_shapes))
        logging.info("LoRA rank %d on %s: %.2fM trained params (%.3f%% of the model), base %s",
                     int(cfg.lora.rank), cfg.lora.targets, trained / 1e6, 100 * trained / config.num_params(),
                     cfg.lora.quantize if cfg.lora.quantize != "none" else cfg.lora.base_dtype)

    manager = train_checkpoints.TrainCheckpoints(workdir, every_steps=int(cfg.checkpoint.every_steps),
                                          keep=int(cfg.checkpoint.keep), async_save=bool(cfg.checkpoint.async_save))
    state = manager.restore(trainer, data.train) if manager.latest_step() is not None else None
    if state is None:
        state = trainer.init_state(loaded_params)
    del loaded_params
    start = int(jax.device_get(state["step"]))
    steps = int(cfg.train.steps)
    end = steps if stop_after is None else min(steps, start + stop_after)
    if start >= steps:
        logging.warning("%s is already at step %d of train.steps=%d: nothing to train "
                        "(raise train.steps to continue)", workdir, start, steps)

    logger = train_log.Logger(workdir, config=config, seq_len=int(cfg.data.seq_len), batch_size=batch_size,
                              total_steps=steps,
                              start_step=start, progress=bool(cfg.train.progress), stats=data.stats)
    preempt = _Preemption()
    eval_every, log_every = int(cfg.train.eval_every), max(int(cfg.train.log_every), 1)
    metrics: dict[str, Any] = {}
    step = start
    try:
        while step < end:
            batch = trainer.put_batch(next(data.train))
            state, step_metrics = trainer.step(state, batch)
            step += 1
            logger.step(step, step_metrics, log=(step % log_every == 0 or step == end))
            if eval_every and step % eval_every == 0 and data.eval and step < steps:
                logger.eval(step, trainer.evaluate(state["params"], data.eval, int(cfg.train.eval_batches)))
                if cfg.eval.in_training:
                    logger.eval(step, _task_eval(cfg, trainer, state, tokenizer, workdir, step))
            stopping = preempt.requested or manager.reached_preemption(step)
            manager.maybe_save(step, state, data.train, force=stopping or step == end)
            if stopping:
                break
    finally:
        preempt.restore()
    if step == steps and step > start and data.eval:  # not again when re-run after finishing
        metrics.update(trainer.evaluate(state["params"], data.eval, int(cfg.train.eval_batches)))
        if cfg.eval.in_training:
            metrics.update(_task_eval(cfg, trainer, state, tokenizer, workdir, step))
        logger.eval(step, metrics)
    manager.close()
    metrics.update(logger.close())
    if step == steps and step > start and cfg.train.export_format:
        if use_lora:  # merged into the base as read from disk (not the quantised copy)
            trainer.frozen, state = None, None
            export_config, params = checkpoint.load(workdir, mesh=mesh, rules=rules)
        else:
            export_config, params = config, state["params"]
        path = checkpoint.save(os.path.join(workdir, "export"), export_config, params,
                               format=cfg.train.export_format, tokenizer=tokenizer.path, overwrite=True)
        logging.info("exported %s weights to %s", cfg.train.export_format, path)
    metrics["step"] = step
    return metrics


# ----------------------------------------------------------------------------- CLI


def _maybe_init_distributed(flags_values) -> None:
    """jax.distributed.initialize() on multi-process launches (flags, env, TPU pods, SLURM)."""
    if flags_values.coordinator_address or flags_values.num_processes:
        jax.distributed.initialize(coordinator_address=flags_values.coordinator_address or None,
                                   num_processes=flags_values.num_processes or None,
                                   process_id=flags_values.process_id if flags_values.num_processes else None)
        return
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multi:
        jax.distributed.initialize()


class _QuietLibraries(logging_std.Filter):
    """Keeps library INFO chatter (Orbax logs every save step by step) off the console."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or not any(
            f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "jax", "grain", "etils"))


def main(argv) -> None:
    """Entry point of `python -m gemma_jax.train`."""
    del argv
    from absl import flags

    logging.get_absl_handler().addFilter(_QuietLibraries())

    flags_values = flags.FLAGS
    _maybe_init_distributed(flags_values)
    cfg = flags_values.config
    metrics = run(cfg, flags_values.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/legal.py:tiny.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events, plots.")
    flags.DEFINE_string("coordinator_address", os.environ.get("GEMMA_JAX_COORDINATOR", ""),
                        "host:port of process 0, for clusters JAX does not detect.")
    flags.DEFINE_integer("num_processes", int(os.environ.get("GEMMA_JAX_NUM_PROCESSES", "0")), "Processes in the job.")
    flags.DEFINE_integer("process_id", int(os.environ.get("GEMMA_JAX_PROCESS_ID", "0")), "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
