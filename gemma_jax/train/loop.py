"""The training run: set up, restore, loop, finish.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal

`run` reads top to bottom; each stage is a function below it. A run takes the workdir's lock,
checks the workdir's manifest before it writes anything (train/workdir.py), resumes from the
latest intact checkpoint, saves every `checkpoint.every_steps` and when asked to stop (signals),
skips and counts non-finite steps (train/divergence.py), and after the last step runs the
finishing stages (final eval, export), each recorded once done so a re-run completes what a
kill interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from gemma_jax import config as config_lib, data as data_lib, paths, sharding, weights
from gemma_jax.data import preference
from gemma_jax.errors import UserError, WorkdirError
from gemma_jax.eval import report as report_lib, tasks
from gemma_jax.model import lora as lora_lib
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train import (checkpoints, divergence, log, model_setup, objectives, reference, rewards, rollout,
                             workdir as workdir_lib)
from gemma_jax.train.signals import StopRequests
from gemma_jax.train.state import Trainer
from gemma_jax.weights import native


def run(cfg: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
    """Trains per `cfg` in `workdir`, resuming from its latest checkpoint. Returns final metrics.

    `stop_after` ends this invocation after that many steps (as a kill would, but after a
    checkpoint), without changing the schedule: the next run resumes where this one stopped.
    """
    workdir = workdir_lib.resolve(workdir)
    workdir_lib.resolve_config_paths(cfg)
    check_config(cfg, workdir)
    main = jax.process_index() == 0
    created = workdir_lib.create(workdir) if main else None  # a file, an unwritable dir: one error line
    started = []
    try:
        with workdir_lib.WorkdirLock(workdir) if main else contextlib.nullcontext():
            return _run(cfg, workdir, stop_after, started)
    except BaseException:
        if main and not started:  # a start that failed leaves no directory or lone .lock of its own behind
            workdir_lib.clean_failed_start(workdir, created)
        raise


def check_config(cfg, workdir: str) -> None:
    """What can be checked before anything runs: every value against its rule, the workdir."""
    config_lib.validate(cfg)
    objectives.check_start(cfg)
    if cfg.train.objective == "grpo":  # a bad reward file fails now, before any weights load
        if jax.process_count() > 1:
            raise UserError(f"train.objective=grpo runs on one host: its sampler and reward functions read the "
                            f"rollouts on the host, and this run has {jax.process_count()} processes; use one host "
                            "(any mesh of its devices) for GRPO")
        rewards.parse_weights(cfg.grpo.reward_weights, len(rewards.load(cfg.grpo.rewards, cfg.grpo)))
    init = cfg.model.init_checkpoint
    if init and paths.absolute(init).rstrip("/") == workdir.rstrip("/"):
        raise WorkdirError(f"--workdir and model.init_checkpoint are the same directory ({workdir}): the run "
                           "would write its files over the weights it starts from; use another --workdir")


def _run(cfg, workdir: str, stop_after: int | None, started: list) -> dict[str, Any]:
    r = setup(cfg, workdir)
    manager = checkpoints.TrainCheckpoints(workdir, every_steps=int(cfg.checkpoint.every_steps),
                                           keep=int(cfg.checkpoint.keep), async_save=bool(cfg.checkpoint.async_save))
    status, state, step, watch = "failed", None, 0, None
    try:
        state = restore_or_init(r, manager)
        started.append(True)  # from here on the workdir holds a run worth keeping, even if it fails
        start = step = int(jax.device_get(state["step"]))
        last = final_step(r)
        end = last if stop_after is None else min(last, start + stop_after)
        if last == 0:  # a baseline: the starting weights, evaluated and exported as they are
            logging.info("train.steps=0: no training; the starting weights are evaluated and exported")
        elif start >= last:
            logging.warning("%s is already at step %d of %d: nothing to train (raise train.steps, with "
                            "train.allow_changes=True, to continue)", workdir, start, last)
        logger = log.Logger(workdir, config=r.config, seq_len=int(cfg.data.seq_len),
                            batch_size=int(cfg.train.batch_size), total_steps=last, start_step=start,
                            progress=bool(cfg.train.progress), stats=r.data.stats, objective=r.trainer.objective,
                            lora=bool(int(cfg.lora.rank)))
        watch = divergence.Watch(int(cfg.train.max_nonfinite_steps), r.config.vocab_size,
                                 warn=getattr(logger, "warn", logging.warning))
        eval_every, log_every = int(cfg.train.eval_every), max(int(cfg.train.log_every), 1)
        if r.rollouts is not None and start == 0 and eval_every and start < last:  # grpo: the reward to beat
            logger.eval(0, evaluate(r, state, 0))
        save_due = False
        with StopRequests() as stop:
            while step < end:
                try:
                    if r.rollouts is not None:  # grpo: sample with the current policy, score, update
                        state, step_metrics = r.rollouts.step(state)
                    else:
                        batch = next(r.data.train)
                except StopIteration:  # a data.num_epochs the planned step count did not foresee
                    logging.warning("the training data ran out at step %d (data.num_epochs=%s): finishing here",
                                    step, cfg.data.num_epochs)
                    last = end = step
                    break
                if r.rollouts is None:
                    state, step_metrics = r.trainer.step(state, r.trainer.put_batch(batch))
                step += 1
                watch.observe(step, step_metrics)
                manager.check()
                logger.step(step, step_metrics, log=(step % log_every == 0 or step == end))
                stopping = stop.requested or manager.reached_preemption(step)
                if eval_every and step % eval_every == 0 and step < last and not stopping and r.data.eval:
                    watch.settle()
                    logger.eval(step, evaluate(r, state, step))
                save_due = save_due or stopping or step == end or step % manager.every_steps == 0
                if save_due:
                    watch.settle()
                    if watch.healthy:  # after a skipped step the save waits for the next finite one
                        manager.maybe_save(step, state, r.data.train, force=True)
                        save_due = False
                if stopping:
                    break
            watch.settle()
            logger.flush()  # a stop between log steps: the last step is logged with its own values
        if not watch.healthy:
            raise divergence.DivergedError(
                f"the last {watch.in_row} steps up to step {step} were not finite: the state was not saved or exported")
        manager.close()
        final = finish(r, state, step, logger, trained=step > start) if step == last else None
        metrics = logger.close()
        metrics.update(final or {})
        status = "stopped" if final is None else "finished"
        metrics["step"] = step
        return metrics
    except data_lib.CacheDamaged as e:  # a cache file damaged after the run opened it: keep the steps trained
        raise _saved_first(e, r, manager, watch, state, step) from None
    finally:
        _record_end(r, status)
        if status == "failed":
            with contextlib.suppress(Exception):  # the error being raised is the one to show
                manager.close()


def _saved_first(e, r: "Run", manager, watch, state, step: int):
    """Saves the last good state (the step boundary reached) before a damaged data cache ends the
    run, so the re-run, which rebuilds the cache, resumes there; returns the error, saying so."""
    note = ""
    # One process's read failed: a save is collective, and the other processes are not saving.
    if state is not None and watch is not None and jax.process_count() == 1:
        try:
            watch.settle()
            if watch.healthy:
                manager.maybe_save(step, state, r.data.train, force=True)
                manager.close()
                note = f"; step {step} was saved first"
        except Exception as err:  # noqa: BLE001 (the damaged cache stays the error to show)
            note = f"; saving step {step} failed too ({err})"
    return type(e)(e.path, e.problem + note, e.hint)


def final_step(r: "Run") -> int:
    """train.steps, or fewer when data.num_epochs runs out of batches first (said in the log)."""
    steps = int(r.cfg.train.steps)
    available = r.data.num_batches
    if available is not None and available < steps:
        logging.warning("data.num_epochs=%s gives %d batches of %d: the run ends at step %d of train.steps=%d "
                        "(the lr schedule still spans train.steps)", r.cfg.data.num_epochs, available,
                        r.data.global_batch_size, available, steps)
        return available
    return steps


def finish(r: "Run", state, step: int, logger, *, trained: bool = True) -> dict[str, Any]:
    """The stages after the last step: final eval, then export. Each is recorded in the manifest
    once done, with the size and sha256 of every file it wrote, so a re-run of a finished
    workdir does only what is missing or damaged: a kill during the export, a failed eval, an
    export file deleted or changed since (rebuilt from the final checkpoint, said in one line).
    Otherwise it returns the recorded eval metrics and rewrites nothing. Steps trained in this
    invocation (say, again after a damaged checkpoint) make a new final state: all stages rerun."""
    stages = r.manifest.setdefault("stages", {})
    if trained:
        stages.pop(str(step), None)
    done = stages.setdefault(str(step), {})
    report_dir = paths.join(r.workdir, "eval", f"step_{step}")
    if "eval" in done and not _outputs_intact(r, done, "eval_files", report_dir, f"evaluating step {step} again"):
        del done["eval"]
    if "eval" not in done:
        metrics = evaluate(r, state, step)
        if metrics:
            logger.eval(step, metrics)
        done["eval"] = metrics
        done.pop("eval_files", None)
        if jax.process_index() == 0 and paths.exists(report_dir):  # eval.in_training's report files
            done["eval_files"] = workdir_lib.record_files(report_dir)
        _write_manifest(r)
    fmt = r.cfg.train.export_format
    if (fmt and done.get("export") == fmt
            and not _outputs_intact(r, done, "export_files", _export_dir(r), f"rebuilding from step {step}")):
        done["export"] = None
    if fmt and done.get("export") != fmt:
        done["export"] = None
        path = export(r, state)
        done["export"] = fmt
        done["export_path"] = path
        if jax.process_index() == 0:
            done["export_files"] = workdir_lib.record_files(path)
        _write_manifest(r)
    return dict(done["eval"])


def _outputs_intact(r: "Run", done: dict, key: str, directory: str, action: str) -> bool:
    """Whether the files a finished stage recorded under done[key] are still as written (sizes
    first, then full checksums; process 0 reads, every process gets its answer). A damaged
    one is named in one warning line; a record from before files were recorded is taken now."""
    intact = True
    if jax.process_index() == 0:
        record = done.get(key)
        if record is None:
            if paths.exists(directory):
                done[key] = workdir_lib.record_files(directory)
        else:
            problems = workdir_lib.changed_files(directory, record)
            if problems:
                intact = False
                path, what = problems[0]
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                logging.warning("%s: %s %s%s; %s", key.split("_")[0], path, what, more, action)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        intact = bool(multihost_utils.broadcast_one_to_all(np.int32(intact)))
    return intact


def _write_manifest(r: "Run") -> None:
    if jax.process_index() == 0:
        workdir_lib.write_manifest(r.workdir, r.manifest)


def _record_end(r: "Run", status: str) -> None:
    if r.manifest and r.manifest.get("runs"):
        r.manifest["runs"][-1].update(ended=workdir_lib.now(), status=status)
        with contextlib.suppress(Exception):
            _write_manifest(r)


@dataclasses.dataclass
class Run:
    """What `setup` builds once: the config, tokenizer, model, mesh, data, trainer, starting weights."""

    cfg: Any
    workdir: str
    tokenizer: Tokenizer
    config: ModelConfig
    mesh: Any
    rules: Any
    data: data_lib.Data
    trainer: Trainer
    init_params: Any = None  # weights of model.init_checkpoint for a fresh run (None: random)
    manifest: dict = dataclasses.field(default_factory=dict)  # WORKDIR/manifest.json (train/workdir.py)
    rollouts: Any = None  # grpo: the rollout.Rollouts that samples and trains each step (also data.train)


def setup(cfg, workdir: str) -> Run:
    """Tokenizer, model config, mesh, data and trainer of a run; writes the workdir's run files."""
    resuming = checkpoints.has_train_checkpoint(workdir)
    # What the config alone says about the model (preset, starting checkpoint, dims, objective):
    # a change is refused here, before any weights are read or data downloaded.
    workdir_lib.check_identity(workdir, workdir_lib.config_identity(cfg), resuming=resuming)
    # Before the tokenizer lookup: a missing checkpoint also means no tokenizer beside it, and
    # "weights not downloaded" is the error the user needs to see.
    if cfg.model.init_checkpoint and not resuming and not paths.exists(cfg.model.init_checkpoint):
        raise FileNotFoundError(f"model.init_checkpoint={cfg.model.init_checkpoint!r} does not exist. "
                                + model_setup.where_to_get(cfg.model.init_checkpoint, cfg.model.preset))
    tokenizer = model_setup.find_tokenizer(cfg, workdir)
    mesh, rules = sharding.mesh_from_config(cfg.mesh), sharding.rules_from_config(cfg.mesh)
    use_lora = model_setup.lora_enabled(cfg)
    init_params = None
    # LoRA needs the frozen base again, full fine-tuning DPO (and GRPO with a KL term) its reference.
    keeps_reference = cfg.train.objective == "dpo" or (cfg.train.objective == "grpo" and float(cfg.grpo.beta) != 0)
    if cfg.model.init_checkpoint and (not resuming or use_lora or keeps_reference):
        loaded, init_params = weights.load(
            cfg.model.init_checkpoint, dtype=cfg.lora.base_dtype if use_lora else cfg.model.param_dtype,
            mesh=mesh, rules=rules)
        config = model_setup.model_config(cfg, tokenizer, loaded)
    elif cfg.model.init_checkpoint:
        config = model_setup.model_config(cfg, tokenizer, native.read_model_json(workdir))
    else:
        config = model_setup.model_config(cfg, tokenizer)
    if use_lora:
        config = model_setup.lora_model_config(cfg, config)
    objective = objectives.from_config(cfg)
    ident = workdir_lib.identity(cfg, config, tokenizer.path, lora=use_lora,
                                 uses_reference=objective is not None and objective.uses_reference and not use_lora)
    manifest = workdir_lib.check(workdir, cfg, ident, resuming=resuming)  # raises before anything is written

    batch_size, accum = int(cfg.train.batch_size), int(cfg.train.grad_accum)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (accum * shards):
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.grad_accum={accum} "
                         f"times the batch shards (mesh data*fsdp = {shards})")
    trainer = Trainer.create(cfg, config, mesh)
    build_data, extra = data_lib.build, {}
    if objective is not None and cfg.train.objective != "grpo":  # pairs for dpo/orpo/simpo
        build_data = preference.build
        if objective.precomputed:  # one reference pass now (or its stored result), none in the steps
            if use_lora:
                trainer.set_base(init_params)
            extra["extra_fields"] = functools.partial(reference.fields, cfg=cfg, trainer=trainer, workdir=workdir,
                                                      init_params=init_params)
    if cfg.train.objective == "grpo":  # prompts and rewards; batches are sampled by the policy
        data = rollout.build(cfg, tokenizer, trainer, workdir)
    else:
        data = build_data(cfg.data, tokenizer, global_batch_size=batch_size, seed=int(cfg.train.seed),
                          process_index=jax.process_index(), process_count=jax.process_count(), **extra)
    r = Run(cfg, workdir, tokenizer, config, mesh, rules, data, trainer, init_params, manifest,
            rollouts=data.train if cfg.train.objective == "grpo" else None)
    write_run_files(r)
    logging.info("%s; %s; %.1fM params", sharding.describe(mesh), config, config.num_params() / 1e6)
    if use_lora:
        set_lora_base(r)
    trainer.set_reference(init_params)  # DPO with full fine-tuning: the initial weights, frozen
    return r


def set_lora_base(r: Run) -> None:
    """Puts the frozen base on the trainer; a random base is saved to WORKDIR/base so the adapters
    can be merged into it later (gemma_jax.load)."""
    cfg, trainer = r.cfg, r.trainer
    if trainer.frozen is None:  # (already set for dpo.precompute_reference's pass)
        trainer.set_base(r.init_params)
    if not cfg.model.init_checkpoint and not paths.exists(paths.join(r.workdir, "base")):
        weights.save(os.path.join(r.workdir, "base"), r.config, trainer.frozen["params"], format="gemma_jax")
    if jax.process_index() == 0:
        native.write_lora_json(r.workdir, cfg.lora, cfg.model.init_checkpoint or "base")
    trained = sum(x.size for x in jax.tree.leaves(trainer.param_shapes))
    logging.info("LoRA rank %d on %s: %.2fM trained params (%.3f%% of the model), base %s",
                 int(cfg.lora.rank), cfg.lora.targets, trained / 1e6, 100 * trained / r.config.num_params(),
                 cfg.lora.quantize if cfg.lora.quantize != "none" else cfg.lora.base_dtype)


def write_run_files(r: Run) -> None:
    """manifest.json, config.json (this run's), model.json and a copy of the tokenizer (process 0)."""
    if jax.process_index() != 0:
        return
    paths.Path(r.workdir).mkdir(parents=True, exist_ok=True)
    _write_manifest(r)
    paths.write_text_atomic(paths.join(r.workdir, "config.json"), r.cfg.to_json_best_effort(indent=2))
    native.write_model_json(r.workdir, r.config, "workdir")
    dst = paths.join(r.workdir, "tokenizer.model")
    if paths.absolute(r.tokenizer.path) != paths.absolute(dst):
        paths.copy_file(r.tokenizer.path, dst)


def restore_or_init(r: Run, manager: checkpoints.TrainCheckpoints):
    """The latest checkpoint's state (the data iterator moved to where it was), else a fresh one."""
    state = manager.restore(r.trainer, r.data.train)  # None when there is no checkpoint
    if state is None:
        state = r.trainer.init_state(r.init_params)
    r.init_params = None  # the state holds them now (or a copy in its shardings)
    return state


def evaluate(r: Run, state, step: int) -> dict[str, float]:
    """Eval-split loss, perplexity and accuracy; with eval.in_training also the task metrics."""
    if not r.data.eval:
        return {}
    if r.rollouts is not None:  # grpo: greedy completions of the eval prompts, scored by the rewards
        return r.rollouts.evaluate(state, int(r.cfg.eval.max_examples))
    metrics = r.trainer.evaluate(state["params"], r.data.eval, int(r.cfg.train.eval_batches))
    if r.cfg.eval.in_training:
        metrics.update(task_eval(r, state, step))
    return metrics


def task_eval(r: Run, state, step: int) -> dict[str, float]:
    """eval.task's generation metrics on the eval split (gemma_jax.evaluate), with
    WORKDIR/eval/step_N/report.{json,md}; returned as eval_<metric> values for the log."""
    trainer, params = r.trainer, state["params"]
    if trainer.lora:  # generation wants one plain tree: merge the adapters (dequantised base)
        base = trainer.frozen["params"]
        if "quant" in trainer.frozen:
            base = lora_lib.dequantize(base, trainer.frozen["quant"])
        with trainer.context():
            params = jax.jit(lora_lib.merge, static_argnums=0)(trainer.config, base, params)
    report = tasks.run_eval(trainer.config, params, r.tokenizer, r.cfg.eval, "", data_cfg=r.cfg.data,
                            holdout_seed=int(r.cfg.train.seed), mesh=trainer.mesh, rules=trainer.rules)
    if jax.process_index() == 0:
        with paths.staged_dir(paths.join(r.workdir, "eval", f"step_{step}")) as out:
            report_lib.write_report(report, out)
    # loss / perplexity / accuracy are trainer.evaluate's already; keep the task and general-text scores.
    return {f"eval_{k}": float(v) for k, v in report["tuned"].items()
            if isinstance(v, (int, float)) and k not in ("loss", "perplexity", "accuracy")}


def _export_dir(r: "Run") -> str:
    """WORKDIR/export (found there again when the workdir was moved or copied)."""
    return os.path.join(r.workdir, "export")


def export(r: Run, state) -> str:
    """WORKDIR/export in train.export_format: the trained model (LoRA: merged into its base)."""
    if r.trainer.lora:  # merged into the base as read from disk (not the quantised copy)
        r.trainer.frozen = None
        export_config, params = weights.load(r.workdir, mesh=r.mesh, rules=r.rules)
    else:
        export_config, params = r.config, state["params"]
    path = weights.save(_export_dir(r), export_config, params,
                        format=r.cfg.train.export_format, tokenizer=r.tokenizer.path, overwrite=True)
    logging.info("exported %s weights to %s", r.cfg.train.export_format, path)
    return path
