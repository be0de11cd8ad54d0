"""The Trainer: shardings of the train state, its creation on devices, the jitted train and eval steps.

The train state is a dict {step, params, opt_state, rng}. It is created directly in its
shardings (`jax.jit(..., out_shardings=...)`), so no device ever holds the unsharded model, and
the train step is jitted once with donated state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import loss, sharding
from gemma_jax.model import layers as model_lib, lora as lora_lib
from gemma_jax.model.config import ModelConfig
from gemma_jax.train import grpo, model_setup, objectives, optimizer, step as step_lib


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
    objective: Any = None  # objectives.Objective of a preference run (None: SFT)
    reference_sharding: Any = None  # DPO with full fine-tuning: the frozen initial weights' shardings
    reference: Any = None  # ... and those weights (set_reference)
    logps_fn: Any = None  # GRPO: the jitted rollout log-probs (grpo.rollout_logps)

    @property
    def lora(self) -> bool:
        return self.frozen_sharding is not None

    @classmethod
    def create(cls, cfg, config: ModelConfig, mesh) -> "Trainer":
        """Builds the optimizer, shardings and the jitted train/eval steps."""
        rules = sharding.rules_from_config(cfg.mesh)
        steps = int(cfg.train.steps)
        tx = optimizer.make_optimizer(cfg.opt, steps)
        schedule = optimizer.lr_schedule(cfg.opt, steps)
        base_sh = sharding.param_shardings(config, mesh, rules)
        frozen_sh = None
        if model_setup.lora_enabled(cfg):
            shapes, param_sh, frozen_sh = _lora_shardings(cfg, config, mesh, rules, base_sh)
        else:
            shapes, param_sh = model_lib.param_shapes(config), base_sh
        opt_shapes = jax.eval_shape(tx.init, shapes)
        rep = sharding.replicated(mesh)
        state_sh = dict(step=rep, params=param_sh, opt_state=_like_params(opt_shapes, param_sh, mesh), rng=rep)
        batch_sh = sharding.batch_sharding(mesh, rules)
        chunk, accum = int(cfg.train.loss_chunk), int(cfg.train.grad_accum)
        objective = objectives.from_config(cfg)
        if isinstance(objective, grpo.GRPO):
            # Rows of completions; with a KL term and full fine-tuning the initial weights stay as the reference.
            ref_sh = param_sh if objective.uses_reference and frozen_sh is None else None
            step = functools.partial(grpo.grpo_step, config=config, tx=tx, chunk=chunk, accum=accum,
                                     schedule=schedule, objective=objective, update=step_lib.apply_if_finite)
            step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh, ref_sh),
                              out_shardings=(state_sh, rep), donate_argnums=0)
            logps_fn = jax.jit(functools.partial(grpo.rollout_logps, config=config, chunk=chunk, obj=objective),
                               in_shardings=(param_sh, batch_sh, frozen_sh, ref_sh), out_shardings=batch_sh)
            return cls(cfg, config, mesh, rules, tx, schedule, state_sh, batch_sh, step_fn, None, shapes, frozen_sh,
                       objective=objective, reference_sharding=ref_sh, logps_fn=logps_fn)
        if objective is not None:
            # Full fine-tuning DPO keeps the initial weights, sharded like the policy, as its reference.
            ref_sh = param_sh if objective.live_reference and frozen_sh is None else None
            step = functools.partial(step_lib.preference_step, config=config, tx=tx, chunk=chunk, accum=accum,
                                     schedule=schedule, objective=objective)
            step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh, ref_sh),
                              out_shardings=(state_sh, rep), donate_argnums=0)
            eval_fn = jax.jit(functools.partial(_score_pairs, config=config, chunk=chunk, obj=objective),
                              in_shardings=(param_sh, batch_sh, frozen_sh, ref_sh), out_shardings=rep)
            return cls(cfg, config, mesh, rules, tx, schedule, state_sh, batch_sh, step_fn, eval_fn, shapes,
                       frozen_sh, objective=objective, reference_sharding=ref_sh)
        step = functools.partial(step_lib.train_step, config=config, tx=tx, chunk=chunk, accum=accum, schedule=schedule)
        step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, rep),
                          donate_argnums=0)
        eval_fn = jax.jit(functools.partial(loss.score_batch, config=config, chunk=chunk),
                          in_shardings=(param_sh, batch_sh, frozen_sh), out_shardings=rep)
        return cls(cfg, config, mesh, rules, tx, schedule, state_sh, batch_sh, step_fn, eval_fn, shapes, frozen_sh)

    def context(self):
        """Mesh and logical-axis rules active while tracing, so activation constraints apply."""
        return sharding.mesh_context(self.mesh, self.rules)

    def set_base(self, params=None) -> None:
        """LoRA: the frozen base from a loaded tree (already sharded) or random (train.seed),
        cast to lora.base_dtype or quantised per lora.quantize, in its shardings."""
        lo, sh = self.cfg.lora, self.frozen_sharding
        with self.context():
            if params is None:
                params = jax.jit(lambda: model_lib.init_params(self.config, jax.random.key(int(self.cfg.train.seed))),
                                 out_shardings=sh["params"])()
            else:
                # A tree placed otherwise (one device, another mesh) moves to the base's shardings
                # first (a no-op when it is there already): the cast below donates its input, and
                # XLA can only alias a buffer whose shard shape the output keeps.
                params = jax.device_put(params, sh["params"])
            if lo.quantize == "none":
                dtype = self.config.weight_dtype
                self.frozen = {"params": jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                                                 out_shardings=sh["params"], donate_argnums=0)(params)}
            else:
                qparams, scales = lora_lib.quantize(params, lo.quantize)
                self.frozen = {"params": jax.device_put(qparams, sh["params"]),
                               "quant": jax.device_put(scales, sh["quant"])}

    def set_reference(self, params=None) -> None:
        """DPO with full fine-tuning: the frozen reference, the initial weights (a loaded tree,
        already sharded, kept as is; or the same random init as init_state's)."""
        if self.reference_sharding is None:
            return
        with self.context():
            if params is None:
                seed = int(self.cfg.train.seed)
                params = jax.jit(lambda: model_lib.init_params(self.config, jax.random.key(seed)),
                                 out_shardings=self.reference_sharding)()
        self.reference = params

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
            if self.objective is not None:
                return self.step_fn(state, batch, self.frozen, self.reference)
            return self.step_fn(state, batch, self.frozen)

    def lower_step(self, state, batch, frozen):
        """The train step lowered for abstract arguments (the memory planner's compile)."""
        if self.objective is None:
            return self.step_fn.lower(state, batch, frozen)
        ref = None
        if self.reference_sharding is not None:
            ref = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                               self.param_shapes, self.reference_sharding)
        return self.step_fn.lower(state, batch, frozen, ref)

    def batch_shape(self, rows: int, seq_len: int) -> tuple[int, ...]:
        """Shape of one batch array: [rows, T], or [pairs, 2, T] for a preference objective."""
        pairs = self.objective is not None and not isinstance(self.objective, grpo.GRPO)
        return (rows, 2, seq_len) if pairs else (rows, seq_len)

    def evaluate(self, params, batches, limit: int = 0) -> dict[str, float]:
        """Loss, perplexity and token accuracy over eval batches (process-local lists); for a
        preference objective its loss and pair metrics (eval_rewards/accuracies, ...)."""
        if self.objective is not None:
            return self._evaluate_pairs(params, batches, limit)
        totals = dict(loss_sum=0.0, tokens=0.0, correct=0.0)
        with self.context():
            for i, b in enumerate(batches):
                if limit and i >= limit:
                    break
                out = jax.device_get(self.eval_fn(params, self.put_batch(b), self.frozen))
                for k in totals:
                    totals[k] += float(out[k])
        tokens = max(totals["tokens"], 1.0)
        mean = totals["loss_sum"] / tokens
        return dict(eval_loss=mean, eval_perplexity=float(np.exp(min(mean, 50.0))),
                    eval_accuracy=totals["correct"] / tokens, eval_tokens=totals["tokens"])

    def _evaluate_pairs(self, params, batches, limit: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        with self.context():
            for i, b in enumerate(batches):
                if limit and i >= limit:
                    break
                out = jax.device_get(self.eval_fn(params, self.put_batch(b), self.frozen, self.reference))
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
        if not totals:
            return {}
        metrics = objectives.scores_to_metrics({k: np.float64(v) for k, v in totals.items()}, self.objective, "eval_")
        metrics["eval_pairs"] = totals["pairs"]
        return {k: float(v) for k, v in metrics.items()}


def _score_pairs(params, batch, frozen=None, reference=None, *, config: ModelConfig, chunk: int, obj):
    """Summed pair scores of one eval batch of pairs (objectives.pair_scores)."""
    rows = objectives.pair_rows(batch)
    ref = objectives.step_reference(rows, frozen, reference, obj, config=config, chunk=chunk)
    return objectives.pair_scores(params, rows, ref, frozen, obj=obj, config=config, chunk=chunk)
