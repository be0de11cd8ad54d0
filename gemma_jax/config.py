"""Base experiment config: every key and its default, in one place.

Experiment files under `configs/` start from `base_config()` and change what they need. The
config is locked, so a misspelled key on the command line or in a file is an error.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from gemma_jax import errors, paths, sharding


# Attention q/kv/output and the MLP of every layer.
DEFAULT_LORA_TARGETS = r"attn/(q_einsum|kv_einsum|attn_vec_einsum)|mlp/(gating_einsum|linear)"


def base_config() -> ml_collections.ConfigDict:
    """All keys with their defaults."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        preset="gemma2_tiny",  # a ModelConfig preset, or "" to give every dim explicitly
        init_checkpoint="",  # any format gemma_jax.load reads; "" trains from scratch
        dtype="bfloat16",  # compute
        param_dtype="float32",  # master weights
        remat="none",  # none | full | dots | dots_no_batch
        scan_layers=True,  # one scanned layer stack (fast compiles); False unrolls the layers
        attention_impl="auto",  # auto | xla | splash (TPU kernel) | flash_gpu (GPU kernel); auto picks the kernel of the backend when shapes allow
        # Explicit dims: None takes the preset's (or the checkpoint's) value.
        num_layers=config_dict.placeholder(int),
        embed_dim=config_dict.placeholder(int),
        hidden_dim=config_dict.placeholder(int),
        num_heads=config_dict.placeholder(int),
        num_kv_heads=config_dict.placeholder(int),
        head_dim=config_dict.placeholder(int),
        vocab_size=config_dict.placeholder(int),  # None: from the tokenizer (rounded up to 128)
        sliding_window=config_dict.placeholder(int),
        query_pre_attn_scalar=config_dict.placeholder(float),
        attn_softcap=config_dict.placeholder(float),
        final_softcap=config_dict.placeholder(float),
    ))

    c.data = ml_collections.ConfigDict(dict(
        train="",  # files / globs, comma separated, tfds:name[/config]:split, hf:...; a mixture gives every part a :WEIGHT, e.g. "legal/*.jsonl:0.8,general.jsonl:0.2"
        eval="",  # eval files, as data.train; "" holds out data.eval_fraction of data.train instead
        eval_fraction=0.0,  # held out from train when data.eval is empty
        tokenizer="",  # tokenizer.model; "" looks beside model.init_checkpoint
        seq_len=512,  # tokens per training row
        packing=True,  # several examples per row (segment ids keep them apart)
        overlong="truncate",  # truncate | drop
        train_on_prompt=False,  # also compute the loss on user turns (default: model turns only)
        skip_invalid=False,  # skip malformed records (counted in the data stats) instead of failing
        field_map="",  # e.g. "input=text,output=summary"
        default_instruction="",  # instruction for records that have only input/output
        text_split="line",  # line | paragraph (plain-text files)
        num_epochs=0,  # 0 repeats until train.steps
        tfds_data_dir="",  # TFDS data_dir for tfds: specs ("" is TFDS's default)
        cache_dir="",  # tokenized cache, local or gs://, shared by runs; "" = $GEMMA_JAX_DATA_CACHE, else ~/.cache/gemma_jax/data
        num_workers=0,  # tokenizer processes when the cache is built; 0 = all cores (at most 32)
        input_workers=0,  # grain worker processes reading train batches ahead; 0 = 2 threads of the trainer
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,  # optimizer steps in total (a resumed run continues to this)
        batch_size=8,  # global, in sequences, per optimizer step
        grad_accum=1,  # micro-batches per step; batch_size must divide by it
        log_every=10,  # steps between metric lines (metrics.jsonl, TensorBoard, stdout)
        eval_every=0,  # 0: only at the end
        eval_batches=0,  # 0: the whole eval set
        seed=0,  # init, data order, dropout and the data.eval_fraction hold-out
        loss_chunk=1024,  # tokens per logits chunk in the loss (bounds [chunk, vocab] f32 memory)
        export_format="",  # hf | official | gemma_jax: written to workdir/export at the end
        progress=True,  # progress bar on stdout
        objective="sft",  # sft | dpo | orpo | simpo (preference pairs: README, Preference tuning) | grpo (RL on prompts: grpo.*)
        allow_changes=False,  # resume a workdir although lr, schedule, batch, data, steps or seed changed (recorded in manifest.json)
        max_nonfinite_steps=5,  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run (exit 2)
    ))

    # Preference objectives, with TRL's names and defaults (gemma_jax.train.objectives).
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # how far the policy may move from the reference (higher: closer)
        loss="sigmoid",  # sigmoid (the DPO paper's) | ipo (squared, per-token averaged log-ratios)
        label_smoothing=0.0,  # > 0: conservative DPO, the assumed share of flipped labels (sigmoid only)
        precompute_reference=False,  # reference log-probs from one pass before training (stored in the workdir): no reference forward per step, no frozen copy
    ))
    c.orpo = ml_collections.ConfigDict({
        "lambda": 0.1,  # weight of the odds-ratio term next to the chosen NLL (TRL's ORPOConfig.beta)
    })
    c.simpo = ml_collections.ConfigDict(dict(
        beta=2.0,  # scale of the length-normalised reward difference (the SimPO paper's 2.0-2.5)
        gamma=0.5,  # target reward margin (TRL's CPOConfig.simpo_gamma)
    ))

    # RL from rewards on prompts (train.objective=grpo), with TRL's GRPOConfig names and defaults
    # (gemma_jax.train.grpo). train.batch_size counts completions: batch_size / group_size prompts per step.
    c.grpo = ml_collections.ConfigDict(dict(
        rewards="",  # comma separated: path/file.py:fn, package.module:fn, or a built-in (exact_match | regex | code_tests); fn(prompts, completions, **columns) -> list[float | None]
        reward_weights="",  # comma separated floats, one per reward; "" weighs each 1.0
        group_size=8,  # >= 2; completions sampled per prompt (TRL's num_generations); divides train.batch_size
        max_new_tokens=256,  # >= 1; completion length limit (rows stop earlier at <end_of_turn> or EOS)
        temperature=1.0,  # > 0; sampling temperature of the rollouts
        top_p=1.0,  # in (0, 1]; nucleus mass of the rollouts (1: off)
        beta=0.0,  # >= 0; weight of the KL to the reference (k3 times the ratio, as TRL; 0: no reference pass at all)
        epsilon=0.2,  # in (0, 1); ratio clipped below at 1 - epsilon
        epsilon_high=config_dict.placeholder(float),  # >= 0 or None; ratio clipped above at 1 + epsilon_high (DAPO's clip-higher); None: epsilon
        num_iterations=1,  # >= 1; optimizer steps on each batch of rollouts (the paper's mu)
        loss_type="dapo",  # one of grpo | bnpo | dr_grpo | dapo: how per-token terms are averaged (TRL's definitions)
        scale_rewards="group",  # one of group | batch | none: advantages divided by the group's reward std, the batch's, or not at all
        answer_field="answer",  # data field the built-in exact_match reward compares against
        format_regex="",  # pattern the built-in regex reward requires the whole completion to match
        tests_field="tests",  # data field (a list of assert strings) the built-in code_tests reward runs
        code_timeout=10.0,  # > 0; seconds per program for code_tests
        log_rollouts_every=10,  # >= 0; steps between samples of rollouts written to WORKDIR/rollouts.jsonl (0: never)
        log_rollouts=8,  # >= 1; completions written per sample
    ))

    c.opt = ml_collections.ConfigDict(dict(
        lr=2e-5,  # peak learning rate
        schedule="cosine",  # cosine | linear | constant (all after warmup)
        warmup_steps=100,  # linear warmup from 0 to opt.lr
        min_lr_ratio=0.1,  # final lr as a fraction of opt.lr (cosine, linear)
        weight_decay=0.01,  # AdamW decoupled weight decay
        b1=0.9,  # Adam first-moment decay
        b2=0.999,  # Adam second-moment decay
        eps=1e-8,  # Adam epsilon
        grad_clip=1.0,  # global norm; 0 disables
        decay_embeddings=False,  # apply weight decay to the embedding table too
        decay_norms=False,  # apply weight decay to norm scales too
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, tensor=1,  # -1 fills with the remaining devices
        rules=tuple((name, axes) for name, axes in sharding.DEFAULT_RULES),  # logical axis -> mesh axes
    ))

    c.lora = ml_collections.ConfigDict(dict(
        rank=0,  # > 0 trains low-rank adapters on a frozen base instead of every weight
        alpha=16.0,  # adapter output scaled by alpha / rank
        dropout=0.0,  # on the adapter input, training only
        targets=DEFAULT_LORA_TARGETS,  # regex over parameter paths such as layers/local/attn/q_einsum/w
        quantize="none",  # none | int8 | int4: the frozen base held quantized (QLoRA-style)
        base_dtype="bfloat16",  # dtype of the frozen base when not quantized
    ))

    c.eval = ml_collections.ConfigDict(dict(
        task="lm",  # lm | summarization | translation | qa | code
        metric="loss",  # the headline metric of the task (rouge_l, chrf, exact_match, pass_rate, loss)
        general="data/general/eval.txt",  # general text for the forgetting check; "" skips it
        forgetting_threshold=0.10,  # warn when general-text loss rises by more than this fraction
        max_examples=64,  # examples generated from per evaluation (0: all)
        max_new_tokens=128,  # generated tokens per example
        temperature=0.0,  # 0: greedy
        in_training=False,  # also run generation metrics at train.eval_every and at the end
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=500,  # steps between checkpoints (also saved at the end and on SIGTERM)
        keep=2,  # newest checkpoints kept
        async_save=True,  # save in the background while training goes on
    ))
    return c


def load(spec: str) -> ml_collections.ConfigDict:
    """configs/NAME.py[:ARG] -> its get_config(ARG): the same syntax as --config of gemma_jax.train.
    A training workdir (or its config.json) gives the config that run recorded."""
    if spec.endswith(".json") or (not spec.endswith(".py") and ".py:" not in spec and paths.Path(spec).is_dir()):
        return load_recorded(spec)
    path, arg = (spec.rsplit(":", 1) if ".py:" in spec else (spec, None))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_gemma_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config={spec}: {path} defines no get_config()")
    return module.get_config() if arg is None else module.get_config(arg)


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Freezes the key set so typos fail."""
    c.lock()
    return c


# Full fine-tuning hyperparameters per model size (AdamW, f32 master weights, bf16 compute).
# Memory at ~16 bytes/param (weights + Adam) needs: 2B ~39 GiB, 9B ~138 GiB, 27B ~406 GiB
# across the mesh, hence fsdp over every device and full remat for the larger two.
_SIZES = {
    "2b": dict(preset="gemma2_2b", lr=2e-5, batch_size=16, seq_len=2048, remat="dots_no_batch"),
    "9b": dict(preset="gemma2_9b", lr=1e-5, batch_size=16, seq_len=2048, remat="full"),
    "27b": dict(preset="gemma2_27b", lr=1e-5, batch_size=16, seq_len=2048, remat="full"),
}


# LoRA variants, sized for one TPU v5e-8 host (8 x 16 GiB); `python -m gemma_jax.memory
# --config=configs/legal.py:27b_qlora --device=tpu-v5e` prints the plan. Adapters train in f32
# with Adam; the base is frozen in bfloat16 (or int8 for QLoRA).
_LORA = {
    "2b_lora": dict(size="2b", rank=16, lr=2e-4, quantize="none", remat="dots_no_batch", accum=1),
    "9b_lora": dict(size="9b", rank=16, lr=2e-4, quantize="none", remat="full", accum=2),
    "27b_lora": dict(size="27b", rank=16, lr=1e-4, quantize="none", remat="full", accum=2),
    "27b_qlora": dict(size="27b", rank=16, lr=1e-4, quantize="int8", remat="full", accum=2),
}


def experiment(arg: str, *, domain: str, tiny_train: str, tiny_eval: str, full: dict,
               task: str = "lm", metric: str = "loss") -> ml_collections.ConfigDict:
    """An experiment config for variant `arg`: "tiny" (shipped sample data, CPU), "2b"/"9b"/"27b"
    (full fine-tuning) or "2b_lora"/"9b_lora"/"27b_lora"/"27b_qlora" (adapters on a frozen base).

    `full` holds the data keys of the real public dataset used by the full-size variants and may
    give `epochs` (converted to steps from `examples`, the dataset's size). `task` and `metric`
    tell `gemma_jax.evaluate` what to measure.
    """
    c = base_config()
    c.eval.task, c.eval.metric = task, metric
    if arg == "tiny":
        c.model.preset = "gemma2_tiny"
        c.model.dtype = "float32"  # bf16 is slower than f32 on CPUs
        c.data.train, c.data.eval = tiny_train, tiny_eval
        c.data.tokenizer = "data/tokenizer.model"
        c.data.seq_len = 256
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 300, 8, 25, 100
        c.opt.lr, c.opt.warmup_steps, c.opt.weight_decay = 3e-3, 20, 0.01
        c.checkpoint.every_steps = 100
        c.train.export_format = "hf"
    elif arg in _SIZES or arg in _LORA:
        lo = _LORA.get(arg)
        s = _SIZES[lo["size"] if lo else arg]
        c.model.preset = s["preset"]
        c.model.init_checkpoint = f"weights/gemma2-{lo['size'] if lo else arg}-it"
        c.model.remat = s["remat"]
        c.data.seq_len = s["seq_len"]
        c.train.batch_size = s["batch_size"]
        c.opt.lr, c.opt.warmup_steps = s["lr"], 100
        full = dict(full)
        epochs, examples = full.pop("epochs", 2), full.pop("examples", 0)
        for k, v in full.items():
            c.data[k] = v
        if examples:
            c.train.steps = max(1, epochs * examples // c.train.batch_size)
        c.train.log_every, c.train.eval_every, c.train.eval_batches = 10, 500, 50
        c.checkpoint.every_steps = 500
        if lo:
            c.lora.rank, c.lora.alpha, c.lora.quantize = lo["rank"], 2.0 * lo["rank"], lo["quantize"]
            c.opt.lr, c.opt.weight_decay, c.model.remat = lo["lr"], 0.0, lo["remat"]
            # Micro-batches and 256-token loss chunks keep the activations (mostly T x T scores
            # and [chunk, 256k] logits) inside a 16 GiB chip.
            c.train.grad_accum, c.train.loss_chunk = lo["accum"], 256
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/{domain}.py; choose tiny, "
                         f"{', '.join(list(_SIZES) + list(_LORA))}")
    return lock(c)


# ----------------------------------------------------------------------------- recorded configs

CONFIG_JSON = "config.json"


def load_recorded(spec: str) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote: WORKDIR/config.json (or a path to such a file;
    a workdir with only a manifest.json: its latest run's config), over base_config()'s keys."""
    path = spec if spec.endswith(".json") else paths.join(spec, CONFIG_JSON)
    if paths.exists(path):
        values = json.loads(paths.Path(path).read_text())
        if spec.endswith(".json") and isinstance(values, dict) and "runs" in values and "identity" in values:
            values = values["runs"][-1]["config"]  # a manifest.json named directly
    elif not spec.endswith(".json") and paths.exists(paths.join(spec, "manifest.json")):
        runs = json.loads(paths.Path(paths.join(spec, "manifest.json")).read_text()).get("runs") or [{}]
        values = runs[-1].get("config") or {}
    else:
        raise FileNotFoundError(f"--config={spec}: no {CONFIG_JSON} in {spec} (a training workdir has one; "
                                "otherwise pass an experiment file such as configs/legal.py:tiny)")
    if not isinstance(values, dict):
        raise errors.UserError(f"--config={spec}: {path} does not hold a config (a JSON object of sections)")
    c = base_config()
    _update_from(c, values, spec)
    return lock(c)


def _update_from(c, values: dict, where: str, prefix: str = "") -> None:
    """Sets the keys of `values` that `c` has (JSON lists back to tuples where the default is one);
    keys this version does not know are skipped with a warning (a workdir from a newer version)."""
    unknown = []
    for key, value in values.items():
        if key not in c:
            unknown.append(prefix + key)
            continue
        current = c[key]
        if isinstance(current, ml_collections.ConfigDict):
            if isinstance(value, dict):
                _update_from(current, value, where, f"{prefix}{key}.")
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = _tuples(value)
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        c[key] = value
    if unknown:
        from absl import logging

        logging.warning("%s: config keys unknown to this version skipped: %s", where, ", ".join(unknown))


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def flat_keys(c, prefix: str = "") -> list[str]:
    """Every leaf key of a config as section.key, in definition order."""
    out = []
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


# ----------------------------------------------------------------------------- data.train overrides

# data.eval_fraction used when data.train is overridden and the experiment's own eval file is dropped.
OVERRIDE_EVAL_FRACTION = 0.05


def adjust_eval_for_train_override(c, overridden) -> str | None:
    """An experiment's data.eval belongs to its own data.train. When the command line replaces
    data.train but gives no data.eval, evaluating the new data on the old domain's file means
    nothing (a recipe run scored on legal text); this switches to a hold-out of the new training
    data instead: data.eval cleared and, unless given, data.eval_fraction set to
    OVERRIDE_EVAL_FRACTION. Works in place on `c` (unlocked keys are not needed); returns the
    message to log, or None when nothing changed. `overridden` holds the overridden key paths."""
    keys = set(overridden)
    if "data.train" not in keys or "data.eval" in keys or not c.data.eval:
        return None
    old = c.data.eval
    c.data.eval = ""
    if "data.eval_fraction" not in keys and not c.data.eval_fraction:
        c.data.eval_fraction = OVERRIDE_EVAL_FRACTION
    return (f"data.train was overridden without data.eval: not evaluating on the experiment's own eval set "
            f"{old!r} (another dataset); holding out data.eval_fraction={c.data.eval_fraction} of "
            f"{c.data.train!r} instead (set --config.data.eval=... to choose)")


# ----------------------------------------------------------------------------- describing the keys

def key_comments() -> dict[str, str]:
    """{section.key: its comment in base_config()}: the comment on the key's line, else the
    comment line(s) just above it in the same section (one that introduces a group of keys)."""
    import ast
    import io
    import tokenize

    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    trailing, standalone = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (standalone if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
    lines = source.splitlines()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "base_config")
    out = {}
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)
                and isinstance(node.value, ast.Call) and node.value.args):
            continue
        section, arg = node.targets[0].attr, node.value.args[0]
        if isinstance(arg, ast.Call):  # ConfigDict(dict(k=v, ...))
            entries = [(kw.arg, kw.value) for kw in arg.keywords]
        elif isinstance(arg, ast.Dict):  # ConfigDict({"k": v, ...})
            entries = [(k.value, v) for k, v in zip(arg.keys, arg.values) if isinstance(k, ast.Constant)]
        else:
            continue
        group, last = "", node.lineno
        for key, value in entries:
            above = [standalone[i] for i in range(last + 1, value.lineno) if i in standalone]
            if above:
                group = " ".join(above)
            elif any(not lines[i - 1].strip() for i in range(last + 1, value.lineno)):
                group = ""
            comment = next((trailing[i] for i in (value.end_lineno,) if i in trailing), "")
            out[f"{section}.{key}"] = comment or group
            last = value.end_lineno
    return out


def describe(c, comments: dict[str, str] | None = None) -> str:
    """Every key of `c` as `section.key = value  # comment`, sections in order (for --show_config)."""
    comments = key_comments() if comments is None else comments
    keys = flat_keys(c)
    rows = []
    for key in keys:
        value = c
        for part in key.split("."):
            value = value[part]
        rows.append((key, repr(value), comments.get(key, "")))
    width = min(max(len(k) + len(v) + 3 for k, v, _ in rows), 60)
    out, section = [], None
    for key, value, comment in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            out.append(f"[{section}]" if not out else f"\n[{section}]")
        text = f"{key} = {value}"
        out.append(f"{text:<{width}}  # {comment}" if comment else text)
    return "\n".join(out)


# ----------------------------------------------------------------------------- the --config flag

CONFIG_HELP = ("experiment config configs/NAME.py[:variant], or a training workdir (its config.json); "
               "override keys with --config.KEY=VALUE (`python -m gemma_jax.train --config=... --show_config` "
               "lists them)")


class _ExperimentParser(flags.ArgumentParser):
    """Parses --config: an experiment file (configs/x.py:variant), a workdir or a config.json."""

    def __init__(self, name: str):
        self.name = name

    def parse(self, spec):
        if not isinstance(spec, str):  # a ConfigDict default
            return spec
        cfg = load(spec)
        check_override_keys(cfg, self.name, spec, sys.argv)
        return cfg

    def flag_type(self):
        return "config object"


def overrides_in(argv, name: str = "config") -> list[str]:
    """The KEYs of --NAME.KEY=VALUE (or --NAME.KEY / --noNAME.KEY) arguments, in order."""
    out = []
    for arg in argv:
        m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if m and m.group(1) not in out:
            out.append(m.group(1))
    return out


def check_override_keys(cfg, name: str, spec: str, argv) -> None:
    """Raises UserError naming an overridden key the config does not have, with the closest ones."""
    keys = flat_keys(cfg)
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for key in overrides_in(argv, name):
        if key in keys or key in sections:
            continue
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise errors.UserError(f"--{name}.{key}: no such config key in {spec}{hint} "
                               f"(--show_config of gemma_jax.train lists every key)")


def define_config_flag(name: str = "config", default: str | None = None, help_string: str = CONFIG_HELP, *,
                       flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """A config flag like ml_collections' DEFINE_config_file (same --NAME.KEY=VALUE overrides and
    type checks) that also takes a training workdir or a config.json."""
    holder = config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values, lock_config=True)
    flag_values[name].parser = _ExperimentParser(name)
    return holder


def overridden_keys(flag_values: flags.FlagValues, name: str = "config") -> list[str]:
    """Config keys set on the command line (--config.KEY=VALUE), for config.adjust_eval_for_train_override."""
    try:
        return list(flag_values[name].override_values)
    except (AttributeError, flags.Error):
        return overrides_in(sys.argv, name)
