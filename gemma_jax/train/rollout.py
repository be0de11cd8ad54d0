"""GRPO's outer loop: prompts -> sampled groups of completions -> rewards -> advantages -> update.

Each step of a GRPO run (train.objective=grpo) goes through `Rollouts.step`: every
grpo.num_iterations steps it takes the next batch_size / group_size prompts, samples group_size
completions of each with the KV-cache sampler (gemma_jax.sample) on the training mesh with the
current policy (LoRA: adapters merged into the base), stopping at <end_of_turn> or EOS, decodes
them, scores them with the reward functions (gemma_jax.train.rewards), turns the rewards into
advantages (gemma_jax.train.grpo) and builds one row per completion; with num_iterations > 1 or a
KL term, one forward pass adds the sampling policy's and the reference's log-probs. Then the
jitted GRPO step runs on those rows.

Resume is exact: the prompt order's position and, in the middle of a batch of rollouts reused
by num_iterations > 1, that batch itself are the checkpoint's data state (get_state/set_state);
the sampling seed is a function of train.seed and the step that sampled. Every
grpo.log_rollouts_every steps some rollouts (prompt, completion, rewards, advantage) go to
WORKDIR/rollouts.jsonl.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from gemma_jax import paths, sample
from gemma_jax.data import pipeline, prompts as prompts_lib
from gemma_jax.data.schema import DataError
from gemma_jax.model import lora as lora_lib
from gemma_jax.train import grpo, rewards as rewards_lib

ROLLOUTS_FILE = "rollouts.jsonl"
_WARNED_NAN = 5  # NaN-reward warnings logged (each skipped group is counted in the metrics)


def _seed(seed: int, step: int) -> int:
    """The sampling seed of the rollouts taken at `step` (resume-stable: no state to keep)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0] & 0x7FFFFFFF)


def _local(n: int) -> slice:
    per = n // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


class Rollouts:
    """Samples, scores and trains one GRPO step at a time; the checkpoint's data iterator."""

    def __init__(self, cfg, trainer, tokenizer, workdir: str, train_prompts, train_ids, eval_prompts, eval_ids,
                 rewards, weights, order: prompts_lib.PromptOrder):
        self.cfg, self.trainer, self.tokenizer, self.workdir = cfg, trainer, tokenizer, workdir
        self.obj: grpo.GRPO = trainer.objective
        self.prompts, self.ids = train_prompts, train_ids
        self.eval_prompts, self.eval_ids = eval_prompts, eval_ids
        self.rewards, self.weights = rewards, np.asarray(weights, np.float64)
        self.order = order
        self.seq_len = int(cfg.data.seq_len)
        self.buffer: dict | None = None  # {"start": step, "rows": host rows, "metrics": rollout metrics}
        self.nan_warnings = 0
        self._merge = None

    # ----------------------------------------------------------------------------- checkpoint state

    def get_state(self) -> dict:
        """The prompt order's position and, mid-way through reused rollouts, those rollouts."""
        state: dict[str, Any] = {"prompts": self.order.get_state()}
        if self.buffer is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **self.buffer["rows"])
            state["buffer"] = dict(start=self.buffer["start"], metrics=self.buffer["metrics"],
                                   rows=base64.b64encode(buf.getvalue()).decode("ascii"))
        return state

    def set_state(self, state: dict) -> None:
        """Moves to a state from get_state."""
        self.order.set_state(state["prompts"])
        self.buffer = None
        if state.get("buffer"):
            b = state["buffer"]
            with np.load(io.BytesIO(base64.b64decode(b["rows"]))) as z:
                rows = {k: z[k] for k in z.files}
            self.buffer = dict(start=int(b["start"]), rows=rows, metrics=dict(b["metrics"]))

    def __next__(self):
        raise TypeError("GRPO batches depend on the policy: use Rollouts.step(state)")

    # ----------------------------------------------------------------------------- one step

    def step(self, state):
        """Samples new rollouts when due, then one GRPO update. Returns (state, metrics)."""
        step = int(jax.device_get(state["step"]))
        if self.buffer is None or step - self.buffer["start"] >= self.obj.num_iterations:
            self.buffer = self.sample(state, step)
        rows, metrics = self.buffer["rows"], dict(self.buffer["metrics"])
        if step != self.buffer["start"]:  # a reused batch: no sampling in this step
            metrics.pop("sample_tokens_per_second", None)
        local = {k: v[_local(len(v))] for k, v in rows.items()}
        t0 = time.perf_counter()
        state, step_metrics = self.trainer.step(state, self.trainer.put_batch(local))
        jax.block_until_ready(step_metrics["loss"])
        seconds = time.perf_counter() - t0
        step_metrics = dict(step_metrics, **metrics)
        step_metrics["train_tokens_per_second"] = float(rows["loss_mask"].sum()) / max(seconds, 1e-9)
        if step + 1 - self.buffer["start"] >= self.obj.num_iterations:
            self.buffer = None  # used up: the checkpoint need not carry it
        return state, step_metrics

    def policy_params(self, state):
        """The policy as one plain parameter tree for sampling (LoRA: adapters merged into the base)."""
        t = self.trainer
        if not t.lora:
            return state["params"]
        if self._merge is None:
            def merged(frozen, adapters):
                base = frozen["params"]
                if "quant" in frozen:
                    base = lora_lib.dequantize(base, frozen["quant"])
                return lora_lib.merge(t.config, base, adapters)

            self._merge = jax.jit(merged)
        with t.context():
            return self._merge(t.frozen, state["params"])

    def generate(self, params, ids: list, *, seed: int, greedy: bool = False) -> tuple[list[list[int]], float]:
        """Completion ids per prompt (stop token included) and the seconds sampling took."""
        t = self.trainer
        t0 = time.perf_counter()
        out = sample.generate_ids(
            t.config, params, [list(map(int, p)) for p in ids], max_new_tokens=self.obj.max_new_tokens,
            temperature=0.0 if greedy else self.obj.temperature, top_p=1.0 if greedy else self.obj.top_p,
            seed=seed, stop_ids=(self.tokenizer.eos_id, self.tokenizer.end_of_turn_id),
            pad_id=self.tokenizer.pad_id, vocab_limit=self.tokenizer.vocab_size, mesh=t.mesh, rules=t.rules)
        return out.tokens, time.perf_counter() - t0

    def texts(self, completion_ids) -> list[str]:
        """Decoded completions, without their stop token."""
        stops = {self.tokenizer.eos_id, self.tokenizer.end_of_turn_id}
        return [self.tokenizer.decode(c[:-1] if c and c[-1] in stops else c) for c in completion_ids]

    def score(self, prompts: list, texts: list[str], completion_ids) -> tuple[np.ndarray, np.ndarray]:
        """(values [n, F], NaN where not applicable or NaN; nan_by [n, F]) of completions of `prompts`."""
        completions = [[{"role": "assistant", "content": t}] if p.conversational else t for p, t in zip(prompts, texts)]
        args = {"prompts": [p.raw for p in prompts], "completions": completions,
                "completion_ids": [list(c) for c in completion_ids]}
        for name in prompts_lib.columns_of(prompts):
            args[name] = [p.columns[name] for p in prompts]

        def where(i):
            return f"example {prompts[i].source} (completion {texts[i][:80]!r})"

        return rewards_lib.score(self.rewards, args, len(texts), where)

    def sample(self, state, step: int) -> dict:
        """New rollouts at `step`: host rows with advantages (and log-probs), and their metrics."""
        obj, g = self.obj, self.obj.group_size
        index = next(self.order)
        prompts = [self.prompts[i] for i in index for _ in range(g)]
        prompt_ids = [self.ids[i] for i in index for _ in range(g)]
        seed = _seed(self.cfg.train.seed, step)
        completion_ids, seconds = self.generate(self.policy_params(state), prompt_ids, seed=seed)
        texts = self.texts(completion_ids)
        values, nan_by = self.score(prompts, texts, completion_ids)
        groups = len(index)
        skipped = nan_by.reshape(groups, g, -1).any(axis=(1, 2))
        self._warn_nan(nan_by, prompts, texts)
        total = rewards_lib.total(values, self.weights)
        adv, std_group = grpo.advantages(total, g, obj.scale_rewards, skipped)
        rows = grpo.host_rows(prompt_ids, completion_ids, self.seq_len, self.tokenizer.pad_id)
        rows["loss_mask"][np.repeat(skipped, g)] = 0.0
        rows[grpo.ADVANTAGES] = np.repeat(adv.astype(np.float32)[:, None], self.seq_len, axis=1)
        if self.trainer.logps_fn is not None and (obj.num_iterations > 1 or obj.uses_reference):
            t = self.trainer
            with t.context():
                extra = t.logps_fn(state["params"], t.put_batch({k: v[_local(len(v))] for k, v in rows.items()}),
                                   t.frozen, t.reference)
            extra = jax.device_get(extra)
            rows.update({k: np.asarray(v, np.float32) for k, v in extra.items()})
        kept = ~np.repeat(skipped, g)
        lengths = np.array([len(c) for c in completion_ids])
        stops = (self.tokenizer.eos_id, self.tokenizer.end_of_turn_id)
        truncated = np.array([not c or c[-1] not in stops for c in completion_ids])
        zero_spread = np.isclose(std_group[~skipped], 0.0)  # (NaN std: a group no function applied to)
        metrics = {"reward": _nan(np.nanmean, total[kept]), "reward_std": _nan(grpo.nanstd, total[kept]),
                   "frac_reward_zero_std": float(zero_spread.mean()) if zero_spread.size else 0.0,
                   "skipped_groups": float(skipped.sum()),
                   "completions/mean_length": float(lengths.mean()),
                   "completions/clipped_ratio": float(truncated.mean()),
                   "sample_tokens_per_second": float(lengths.sum()) / max(seconds, 1e-9)}
        for j, r in enumerate(self.rewards):
            metrics[f"rewards/{r.name}/mean"] = _nan(np.nanmean, values[kept, j])
            metrics[f"rewards/{r.name}/std"] = _nan(grpo.nanstd, values[kept, j])
        self._log_rollouts(step, prompts, texts, values, total, adv)
        return dict(start=step, rows=rows, metrics=metrics)

    def _warn_nan(self, nan_by, prompts, texts):
        """One warning per batch with a NaN reward (the first few batches), naming function and example."""
        if not nan_by.any() or self.nan_warnings >= _WARNED_NAN:
            return
        self.nan_warnings += 1
        i, j = (int(x[0]) for x in np.nonzero(nan_by))
        groups = int(nan_by.reshape(-1, self.obj.group_size, nan_by.shape[1]).any(axis=(1, 2)).sum())
        logging.warning("grpo: reward %s returned NaN for example %s (completion %r): %d group(s) of this batch "
                        "skipped (counted in skipped_groups)%s", self.rewards[j].entry, prompts[i].source,
                        texts[i][:80], groups,
                        "; further NaN warnings are not shown" if self.nan_warnings == _WARNED_NAN else "")

    def _log_rollouts(self, step, prompts, texts, values, total, adv):
        every = int(self.cfg.grpo.log_rollouts_every)
        steps = range(step + 1, step + 1 + self.obj.num_iterations)
        if not every or not any(s % every == 0 for s in steps) or jax.process_index() != 0:
            return
        writer = paths.JsonlWriter(paths.join(self.workdir, ROLLOUTS_FILE))
        for i in range(min(int(self.cfg.grpo.log_rollouts), len(texts))):
            rec = {"step": step + 1, "source": prompts[i].source, "prompt": prompts[i].raw, "completion": texts[i],
                   "rewards": {r.name: (None if np.isnan(values[i, j]) else float(values[i, j]))
                               for j, r in enumerate(self.rewards)},
                   "reward": None if np.isnan(total[i]) else float(total[i]), "advantage": float(adv[i])}
            writer.write(json.dumps(rec, default=str) + "\n")
        writer.flush(force=True)
        writer.close()

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self, state, limit: int = 0) -> dict[str, float]:
        """Greedy completions of the eval prompts, scored: eval_reward and eval_rewards/<name>/mean."""
        if not self.eval_prompts:
            return {}
        n = len(self.eval_prompts) if not limit else min(limit, len(self.eval_prompts))
        params = self.policy_params(state)
        chunk = max(int(self.cfg.train.batch_size), 1)
        values = []
        for start in range(0, n, chunk):
            prompts, ids = self.eval_prompts[start:start + chunk], self.eval_ids[start:min(start + chunk, n)]
            prompts = prompts[:len(ids)]
            completion_ids, _ = self.generate(params, ids, seed=0, greedy=True)
            v, nan_by = self.score(prompts, self.texts(completion_ids), completion_ids)
            values.append(np.where(nan_by, np.nan, v))
        v = np.concatenate(values)
        out = {"eval_reward": _nan(np.nanmean, rewards_lib.total(v, self.weights)), "eval_prompts": float(n)}
        for j, r in enumerate(self.rewards):
            out[f"eval_rewards/{r.name}/mean"] = _nan(np.nanmean, v[:, j])
        return out


def _nan(fn, x) -> float:
    """fn(x) as a float; 0.0 for an empty or all-NaN x (nothing to average)."""
    x = np.asarray(x, np.float64)
    if not np.any(~np.isnan(x)):
        return 0.0
    v = float(fn(x))
    return 0.0 if np.isnan(v) else v


def build(cfg, tokenizer, trainer, workdir: str) -> pipeline.Data:
    """The prompt data of a GRPO run and its Rollouts, as a pipeline.Data (train: the Rollouts, eval:
    the eval prompts); the reward functions are loaded and checked against the data here."""
    d, obj = cfg.data, trainer.objective
    if d.train_on_prompt:
        raise DataError("data.train_on_prompt does not apply to GRPO: the loss is on the sampled completions only; "
                        "set it to False")
    read = lambda spec: prompts_lib.read_prompts(  # noqa: E731
        spec, field_map=d.field_map, skip_invalid=bool(d.skip_invalid), text_split=d.text_split,
        tfds_data_dir=d.tfds_data_dir)
    if d.eval and float(d.eval_fraction):
        raise DataError("data.eval and data.eval_fraction are both set; use one")
    train, skipped = read(d.train)
    evals = []
    if d.eval:
        evals, _ = read(d.eval)
    elif float(d.eval_fraction):
        train, evals = pipeline.holdout(train, float(d.eval_fraction), seed=int(cfg.train.seed))
    max_len = int(d.seq_len) - obj.max_new_tokens
    train, train_ids, train_stats = prompts_lib.encode_prompts(train, tokenizer, max_len=max_len,
                                                               overlong=d.overlong, split="train")
    train_stats["skipped"] = dict(skipped)
    stats = {"train": train_stats}
    eval_ids = []
    if evals:
        evals, eval_ids, stats["eval"] = prompts_lib.encode_prompts(evals, tokenizer, max_len=max_len,
                                                                    overlong=d.overlong, split="eval")
    rewards = rewards_lib.load(cfg.grpo.rewards, cfg.grpo)
    weights = rewards_lib.parse_weights(cfg.grpo.reward_weights, len(rewards))
    rewards_lib.check_columns(rewards, prompts_lib.columns_of(train), d.train)
    if evals:
        rewards_lib.check_columns(rewards, prompts_lib.columns_of(evals), d.eval or d.train)
    per_step = int(cfg.train.batch_size) // obj.group_size
    order = prompts_lib.PromptOrder(len(train), per_step, seed=int(cfg.train.seed), num_epochs=int(d.num_epochs))
    for split, s in stats.items():
        logging.info("RL prompts %s: %s", split, ", ".join(f"{k}={v}" for k, v in s.items()))
    ro = Rollouts(cfg, trainer, tokenizer, workdir, train, train_ids, evals, eval_ids, rewards, weights, order)
    batches = order.num_batches
    return pipeline.Data(train=ro, eval=evals, stats=stats, rows_per_epoch=len(train), global_batch_size=per_step,
                         num_batches=None if batches is None else batches * obj.num_iterations)
