"""Base experiment config: every key and its default, in one place.

Experiment files under `configs/` start from `base_config()` and change what they need. The
config is locked, so a misspelled key on the command line or in a file is an error.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from gemma_jax import sharding


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
        scan_layers=True,
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
        train="",  # files / globs, comma separated, or tfds:name[/config]:split
        eval="",
        eval_fraction=0.0,  # held out from train when data.eval is empty
        tokenizer="",  # tokenizer.model; "" looks beside model.init_checkpoint
        seq_len=512,
        packing=True,
        overlong="truncate",  # truncate | drop
        train_on_prompt=False,
        skip_invalid=False,
        field_map="",  # e.g. "input=text,output=summary"
        default_instruction="",
        text_split="line",  # line | paragraph (plain-text files)
        num_epochs=0,  # 0 repeats until train.steps
        tfds_data_dir="",
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=8,  # global, in sequences, per optimizer step
        grad_accum=1,  # micro-batches per step; batch_size must divide by it
        log_every=10,
        eval_every=0,  # 0: only at the end
        eval_batches=0,  # 0: the whole eval set
        seed=0,
        loss_chunk=1024,  # tokens per logits chunk in the loss (bounds [chunk, vocab] f32 memory)
        export_format="",  # hf | official | gemma_jax: written to workdir/export at the end
        progress=True,  # progress bar on stdout
        objective="sft",  # sft | dpo | orpo | simpo (preference pairs: README, Preference tuning)
        allow_changes=False,  # resume a workdir although lr, schedule, batch, data, steps or seed changed (recorded in manifest.json)
        max_nonfinite_steps=5,  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run (exit 2)
    ))

    # Preference objectives, with TRL's names and defaults (gemma_jax.train.objectives).
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # how far the policy may move from the reference (higher: closer)
        loss="sigmoid",  # sigmoid (the DPO paper's) | ipo (squared, per-token averaged log-ratios)
        label_smoothing=0.0,  # > 0: conservative DPO, the assumed share of flipped labels (sigmoid only)
        precompute_reference=False,  # reserved: reference log-probs from one pass over the data (not yet)
    ))
    c.orpo = ml_collections.ConfigDict({
        "lambda": 0.1,  # weight of the odds-ratio term next to the chosen NLL (TRL's ORPOConfig.beta)
    })
    c.simpo = ml_collections.ConfigDict(dict(
        beta=2.0,  # scale of the length-normalised reward difference (the SimPO paper's 2.0-2.5)
        gamma=0.5,  # target reward margin (TRL's CPOConfig.simpo_gamma)
    ))

    c.opt = ml_collections.ConfigDict(dict(
        lr=2e-5,
        schedule="cosine",  # cosine | linear | constant (all after warmup)
        warmup_steps=100,
        min_lr_ratio=0.1,  # final lr as a fraction of opt.lr (cosine, linear)
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,  # global norm; 0 disables
        decay_embeddings=False,
        decay_norms=False,
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, tensor=1,  # -1 fills with the remaining devices
        rules=tuple((name, axes) for name, axes in sharding.DEFAULT_RULES),
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
        max_new_tokens=128,
        temperature=0.0,  # 0: greedy
        in_training=False,  # also run generation metrics at train.eval_every and at the end
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=500,
        keep=2,
        async_save=True,
    ))
    return c


def load(spec: str) -> ml_collections.ConfigDict:
    """configs/NAME.py[:ARG] -> its get_config(ARG): the same syntax as --config of gemma_jax.train."""
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
