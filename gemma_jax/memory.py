"""Memory planner: bytes per device of a config's train step, full fine-tuning vs LoRA vs QLoRA.

  python -m gemma_jax.memory --config=configs/legal.py:9b --device=tpu-v5e [--devices=8]
  python -m gemma_jax.memory --config=configs/legal.py:2b_lora --device_memory_gib=24 --devices=1   # any GPU

Parameters, optimizer state and gradients come from `jax.eval_shape` of the real state and its
shardings on a mesh of the planned size. Activations come from a formula over the model shape
and the remat policy. Then the real train step is compiled for that mesh and XLA's memory
analysis of it (arguments + outputs - donated + temporaries, per device) is printed beside the
estimate. Nothing is allocated, so a laptop can plan a pod slice.

Where the compile runs decides what "fits" trusts. On a host with enough accelerators of the
planned kind (run it on the TPU VM), the compiled figure is the real program's and decides. Elsewhere the mesh
is emulated with virtual CPU devices; XLA:CPU keeps float32 copies of bfloat16 work and
schedules buffers its own way, so its figure is labelled an upper bound (not a device figure)
and the estimate decides (the estimate matches XLA within 20% on float32 steps; tests/test_memory.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gemma_jax import cli, config as config_lib, sharding, train
from gemma_jax.errors import UserError
from gemma_jax.model import kernels as attention_kernels, layers as model_lib, lora as lora_lib
from gemma_jax.model.attention import causal_blocks
from gemma_jax.model.config import ModelConfig

# HBM per chip, GiB.
DEVICES = {
    "tpu-v2": 8, "tpu-v3": 16, "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32,
    "h100": 80, "h200": 141, "a100-40g": 40, "a100-80g": 80, "l4": 24, "t4": 16,
}
# Chips per host: the device count a single-host plan assumes when --devices is not given.
_HOST_CHIPS = {"tpu-v2": 8, "tpu-v3": 8, "tpu-v4": 4, "tpu-v5e": 8, "tpu-v5p": 4, "tpu-v6e": 8}
MODES = ("full", "lora", "qlora-int8", "qlora-int4")
HEADROOM = 0.9  # usable share of HBM: runtimes and compilers keep some for themselves
COMPILE_MAX_DEVICES = 64  # compiling for more virtual CPU devices gets slow; estimate only past it
GiB = 1024 ** 3


def device_name(name: str) -> str:
    """Canonical device name: 'v5e' -> 'tpu-v5e', 'A100-40G' -> 'a100-40g'."""
    n = name.lower()
    if n in DEVICES:
        return n
    if f"tpu-{n}" in DEVICES:
        return f"tpu-{n}"
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one way to train a config."""

    mode: str  # full | lora | qlora-int8 | qlora-int4
    params: int  # trained params (the model, or the adapters)
    frozen: int  # frozen base (LoRA)
    opt_state: int
    grads: int
    activations: int  # estimate for one micro-batch, with the remat policy
    compiled: dict | None = None  # XLA memory analysis of the compiled step, per device

    @property
    def estimate(self) -> int:
        return self.params + self.frozen + self.opt_state + self.grads + self.activations

    @property
    def total(self) -> int:
        """The compiled peak when compiled for the real accelerator, else the estimate."""
        if self.compiled and self.compiled["backend"] != "cpu":
            return self.compiled["peak"]
        return self.estimate


def _bytes_per_value(dtype) -> float:
    """Stored size of one value; 4-bit types are packed two per byte on accelerators."""
    return 0.5 if dtype.name in ("int4", "uint4") else dtype.itemsize


def _per_device(shapes, shardings) -> int:
    return int(sum(math.prod(sh.shard_shape(s.shape)) * _bytes_per_value(s.dtype)
                   for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings))))


def activation_bytes(config, rows: int, seq_len: int, *, loss_chunk: int, table_grad: bool,
                     fused_attention: bool = False) -> int:
    """Estimated peak activation bytes of one micro-batch of `rows` sequences on one device.

    What a layer keeps for its backward pass: the residual stream, norms, q / k / v, the
    attention output and the MLP's gate, up and product (~8D + 4NH + 4KH + 4F values per token
    in the compute dtype), and per row and head ~4 float32 arrays over the key ranges the query
    blocks see (model.causal_blocks): the soft-capped logits that model.dense_attention keeps
    for its backward, and the logits, masked logits and probabilities XLA holds alongside.
    Remat "full" keeps only each layer's input and rebuilds one layer at a time; "dots_no_batch"
    also keeps the outputs of the weight products (q, k, v, the attention and MLP outputs, gate
    and up: the model folds batch and length into one axis, so these have no batch axis), and
    "dots" every matmul output. A LoRA layer keeps the same (its adapter products are recomputed,
    see model.layers.Einsum._lora). The backward pass of a layer adds ~3 float32
    score arrays (probabilities, their gradient, the logits' gradient) plus a forward's worth
    of transient ones. The loss adds three [chunk, vocab] float32 blocks (and the logits'
    gradient in the compute dtype when that is narrower, which the two gradient products
    read), the float32 hidden-state gradient and, for full fine-tuning, the [vocab, embed]
    float32 embedding-gradient accumulator. A fused attention kernel (splash on TPU) never
    forms the scores: it keeps float32 softmax statistics per query instead.
    (The coefficients were checked against XLA's memory analysis of the compiled step; see
    tests/test_memory.py.) Gemma 4: widths are averaged over the layers (global layers' own head
    dim and kv heads, KV-shared layers' missing keys and values, double-wide MLPs); a mixture of
    experts adds, per token and chosen expert, its gathered input and output and its gate, up and
    product (routed rows, as the ragged dispatch of TPU and GPU keeps them), and per-layer inputs
    add the [tokens, layers, P] table the layers read.
    """
    c = config
    a = _itemsize(c.compute_dtype)
    tok = rows * seq_len
    types = c.layer_types
    d = c.embed_dim
    f = sum(c.mlp_dim(i) for i in range(c.num_layers)) / c.num_layers
    nh = sum(c.num_heads * c.head_dim_of(t) for t in types) / c.num_layers
    kh = sum(0 if c.kv_shared(i) else c.kv_heads_of(t) * c.head_dim_of(t) for i, t in enumerate(types)) / c.num_layers
    if c.num_experts:  # routed rows: gathered input and output, gate / up / product (the router's [T, E] too)
        f += c.experts_per_token * (3 * c.expert_dim + 2 * d) / 4 + c.num_experts / 4
    if fused_attention:
        scores = rows * c.num_heads * seq_len * 2
    else:  # query x key entries per row and head, averaged over the layers (local ones see a window)
        def area(window):
            return sum((hi - lo) * (hi - first) for lo, hi, first in causal_blocks(seq_len, window))
        local = sum(t == "local" for t in c.layer_types) / c.num_layers
        scores = int(rows * c.num_heads * (local * area(c.sliding_window) + (1 - local) * area(None)))
    layer = int(tok * (8 * d + 4 * nh + 4 * kh + 4 * f) * a) + scores * 4 * 4
    backward = scores * 5 * 4 + tok * d * 4
    saved_input = tok * d * a
    if c.remat == "none":
        layers = c.num_layers * layer
    elif c.remat == "dots":
        dots = tok * (2 * nh + 2 * kh + 2 * d + 2 * f) * a
        layers = c.num_layers * (saved_input + dots) + layer
    elif c.remat == "dots_no_batch":
        products = tok * (nh + 2 * kh + 2 * d + 2 * f) * a
        layers = c.num_layers * (saved_input + products) + layer
    else:
        layers = c.num_layers * saved_input + layer
    chunk = min(loss_chunk, tok)
    narrow_dlogits = a if a < 4 else 0
    loss = chunk * c.vocab_size * (12 + narrow_dlogits) + tok * d * 4 + (c.vocab_size * d * 4 if table_grad else 0)
    if c.per_layer_dim:  # the per-layer inputs, and for full fine-tuning the PLE table's gradient accumulator
        rows_ple = c.per_layer_vocab or c.vocab_size
        loss += tok * c.num_layers * c.per_layer_dim * 4 + (rows_ple * c.num_layers * c.per_layer_dim * 4
                                                              if table_grad else 0)
    return int(layers + backward + loss)


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def backend_of(device: str | None) -> str:
    """jax backend name of a planned device: tpu-* -> tpu, GPUs -> gpu, none -> cpu."""
    if not device:
        return "cpu"
    return "tpu" if device.startswith("tpu") else "gpu"


def plan(cfg, config, mesh, *, mode: str, compile: bool = True, device: str | None = None) -> Plan:
    """The Plan of training `config` under `cfg` on `mesh` in `mode`, for `device` (sets the
    attention kernel the run would pick: splash on TPU)."""
    cfg = cfg.copy_and_resolve_references()
    if mode == "full":
        cfg.lora.rank = 0
    else:
        cfg.lora.rank = int(cfg.lora.rank) or 16
        cfg.lora.quantize = mode.split("-")[1] if mode.startswith("qlora") else "none"
        config = train.lora_model_config(cfg, config)
    trainer = train.Trainer.create(cfg, config, mesh)
    state_sh = trainer.state_sharding
    shapes = trainer.param_shapes
    opt_shapes = jax.eval_shape(trainer.tx.init, shapes)
    params_b = _per_device(shapes, state_sh["params"])
    opt_b = _per_device(opt_shapes, state_sh["opt_state"])
    grads_b = sum(math.prod(sh.shard_shape(s.shape)) * 4 for s, sh in
                  zip(jax.tree.leaves(shapes), jax.tree.leaves(state_sh["params"])))  # f32 accumulator
    frozen_shapes = None
    frozen_b = 0
    if trainer.lora:
        base = model_lib.param_shapes(config)
        if cfg.lora.quantize == "none":
            frozen_shapes = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, config.weight_dtype), base)}
        else:
            q, scales = jax.eval_shape(lambda p: lora_lib.quantize(p, cfg.lora.quantize), base)
            frozen_shapes = {"params": q, "quant": scales}
        frozen_b = _per_device(frozen_shapes, trainer.frozen_sharding)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch, accum, seq = int(cfg.train.batch_size), int(cfg.train.grad_accum), int(cfg.data.seq_len)
    rows = max(batch // (accum * shards), 1)
    fused = attention_kernels.choose(config.attention_impl, backend_of(device), seq, config.head_dim) != "xla"
    if trainer.objective is not None and trainer.objective.name == "grpo":  # one completion per row
        if trainer.reference_sharding is not None:  # a KL term with full fine-tuning: the initial weights
            frozen_b += _per_device(shapes, trainer.reference_sharding)
    elif trainer.objective is not None:
        # Two sequences per pair; the reference pass is forward-only and done before the policy's.
        rows *= 2
        if trainer.reference_sharding is not None:  # DPO, full fine-tuning: the frozen initial weights
            # (not with dpo.precompute_reference: then the batch carries the reference log-probs)
            frozen_b += _per_device(shapes, trainer.reference_sharding)
    act = activation_bytes(config, rows, seq, loss_chunk=int(cfg.train.loss_chunk), table_grad=not trainer.lora,
                           fused_attention=fused)
    result = Plan(mode, params_b, frozen_b, opt_b, grads_b, act)
    if compile:
        result.compiled = compiled_memory(trainer, shapes, opt_shapes, frozen_shapes, batch, seq)
    return result


def compiled_memory(trainer, shapes, opt_shapes, frozen_shapes, batch: int, seq: int) -> dict | None:
    """XLA's memory analysis of the compiled train step, per device (None if unavailable)."""

    def abstract(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    sh = trainer.state_sharding
    state = dict(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh["step"]),
                 params=abstract(shapes, sh["params"]), opt_state=abstract(opt_shapes, sh["opt_state"]),
                 rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sh["rng"]))
    bs = trainer.batch_sharding
    shape = trainer.batch_shape(batch, seq)  # [pairs, 2, T] for a preference objective
    fields = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
    if trainer.objective is not None and trainer.objective.name == "grpo":
        fields += trainer.objective.batch_fields()  # advantages, and the sampling policy's / reference's log-probs
    elif trainer.objective is not None and trainer.objective.precomputed:
        fields += ("ref_logps",)  # dpo.precompute_reference: the batch carries the reference
    rows = {k: jax.ShapeDtypeStruct(shape, jnp.int32 if k in ("inputs", "targets", "segment_ids", "positions")
                                    else jnp.float32, sharding=bs) for k in fields}
    frozen = None if frozen_shapes is None else abstract(frozen_shapes, trainer.frozen_sharding)
    with trainer.context():
        stats = trainer.lower_step(state, rows, frozen).compile().memory_analysis()
    if stats is None:
        return None
    args, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    return dict(arguments=args, outputs=out, aliased=alias, temporaries=temp, peak=args + out - alias + temp,
                backend=trainer.mesh.devices.flat[0].platform)


def budget_gib(device: str | None, device_memory_gib: float | None = None) -> float | None:
    """Memory of one device in GiB: --device_memory_gib when given, else the table's, else None."""
    if device_memory_gib:
        return float(device_memory_gib)
    return float(DEVICES[device]) if device else None


def fits(p: Plan, device: str | None, device_memory_gib: float | None = None) -> str:
    """'yes' / 'no' against HEADROOM of the device's memory ('' when no device is planned)."""
    gib = budget_gib(device, device_memory_gib)
    if not gib:
        return ""
    return "yes" if p.total <= gib * GiB * HEADROOM else "no"


# Why XLA:CPU's compiled figure is not a device figure (printed under the table).
CPU_COMPILED_NOTE = ("XLA:CPU peak: the step compiled for virtual CPU devices, an upper bound and not a device "
                     "figure (XLA:CPU keeps float32 copies of bfloat16 work, materialises attention scores a "
                     "fused kernel never forms, and schedules buffers its own way); the estimate decides \"fits\"")


def device_label(device: str | None, device_memory_gib: float | None = None) -> str:
    gib = budget_gib(device, device_memory_gib)
    return f"{device or 'device'} ({gib:g} GiB)" if gib else ""


def table(plans: list[Plan], device: str | None, devices: int, device_memory_gib: float | None = None) -> str:
    """Markdown table of plans, GiB (MiB for small models) per device. A compiled figure gets its
    own column only where it was compiled: for the real accelerator it is the peak that decides,
    for emulated CPU devices it is labelled an upper bound (CPU_COMPILED_NOTE)."""
    unit, scale = ("GiB", GiB) if max(p.estimate for p in plans) >= GiB else ("MiB", 1024 ** 2)
    g = lambda b: f"{b / scale:.2f}"  # noqa: E731
    compiled = [p.compiled for p in plans if p.compiled]
    backend = compiled[0]["backend"] if compiled else ""
    head = "| mode | trained params | frozen base | optimizer | gradients | activations | estimate |"
    if compiled:
        head += " XLA:CPU peak (upper bound) |" if backend == "cpu" else f" compiled peak ({backend}) |"
    label = device_label(device, device_memory_gib)
    if label:
        head += f" fits {label} |"
    lines = [f"{unit} per device, {devices} devices", "", head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        row = (f"| {p.mode} | {g(p.params)} | {g(p.frozen)} | {g(p.opt_state)} | {g(p.grads)} | "
               f"{g(p.activations)} | {g(p.estimate)} |")
        if compiled:
            row += f" {g(p.compiled['peak']) if p.compiled else 'n/a'} |"
        if label:
            row += f" {fits(p, device, device_memory_gib)} |"
        lines.append(row)
    if backend == "cpu":
        lines += ["", CPU_COMPILED_NOTE]
    return "\n".join(lines)


def param_count(n: int) -> str:
    """'2.61B' from a billion up, else '12.3M' (a tiny model is not '0.00B')."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def variant_mode(cfg) -> str:
    """The planner mode a config trains in: full, lora, or qlora-int8/int4 (lora.quantize)."""
    if not int(cfg.lora.rank):
        return "full"
    return "lora" if cfg.lora.quantize == "none" else f"qlora-{cfg.lora.quantize}"


def variant_estimate_gib(spec: str, device: str = "tpu-v5e", devices: int | None = None) -> float:
    """Estimated GiB per device of config `spec` in its own mode on one host of `device` (the
    figure the configs' docstrings quote; the mesh is built from the current jax devices)."""
    cfg = config_lib.load(spec)
    config_lib.validate(cfg)
    n = devices or _HOST_CHIPS.get(device, 8)
    config = model_config_for(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.devices()[:n])
    return plan(cfg, config, mesh, mode=variant_mode(cfg), compile=False, device=device).estimate / GiB


class _Vocab:
    """Stands in for the tokenizer when none is at hand: only the vocabulary size matters here."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.path = vocab_size, ""


def model_config_for(cfg):
    """The run's ModelConfig without loading weights (tokenizer if found, else the preset's vocab)."""
    try:
        tok = train.find_tokenizer(cfg)
    except (FileNotFoundError, OSError):
        preset = ModelConfig.from_preset(cfg.model.preset) if cfg.model.preset else None
        tok = _Vocab(cfg.model.vocab_size or (preset.vocab_size if preset else 256128))
    config = train.model_config(cfg, tok)
    if isinstance(tok, _Vocab) and cfg.model.preset:
        config = config.replace(vocab_size=ModelConfig.from_preset(cfg.model.preset).vocab_size)
    return config


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.memory`."""
    config_lib.define_config_flag("config", None, "experiment config, e.g. configs/legal.py:9b (or a training workdir), "
                      "with --config.KEY=VALUE overrides", flag_values=fv)
    flags.DEFINE_string("device", "", f"one of {', '.join(DEVICES)} (or v5e, v4, ...)", flag_values=fv)
    flags.DEFINE_float("device_memory_gib", None, "memory of one device in GiB, for any device (a consumer GPU) "
                       "or to override the --device table", flag_values=fv)
    flags.DEFINE_integer("devices", 0, "devices in the mesh (default: one host of --device, else 8)", flag_values=fv)
    flags.DEFINE_list("modes", ["full", "lora", "qlora-int8"], "comma-separated: full, lora, qlora-int8, qlora-int4",
                      flag_values=fv)
    flags.DEFINE_bool("no_compile", False, "estimates only (no XLA compile)", flag_values=fv)
    flags.DEFINE_enum("backend", "auto", ["auto", "cpu"], "auto: compile for this host's accelerators when it has "
                      "enough, else emulate on CPU (an upper bound, not a device figure)", flag_values=fv)
    cli.require(fv, "config")


def _main(fv, args) -> int:
    """Plan the config's train step per mode and print the table."""
    cli.no_positional(args)
    device = device_name(fv.device) if fv.device else None
    if fv.device_memory_gib is not None and not fv.device_memory_gib > 0:
        raise UserError(f"--device_memory_gib={fv.device_memory_gib}: must be > 0 (GiB of one device)")
    modes = [m.strip() for m in fv.modes if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    n = fv.devices or _HOST_CHIPS.get(device or "", 8)
    # Virtual CPU devices for an emulated mesh; read when jax first initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    if fv.backend == "cpu":
        jax.config.update("jax_platforms", "cpu")
    devices = jax.devices()
    if len(devices) < n or devices[0].platform == "cpu":
        devices = jax.devices("cpu")
    if len(devices) < n:
        raise UserError(f"--devices={n}: this process has only {len(devices)} CPU devices to emulate the mesh "
                        "(jax was initialised before the planner could add more)")

    cfg = fv.config
    config_lib.validate(cfg, argv=sys.argv)  # (also done as --config was parsed)
    config = model_config_for(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices[:n])
    compile_ = not fv.no_compile and n <= COMPILE_MAX_DEVICES
    plans = []
    for mode in modes:
        print(f"planning {mode} ...", file=sys.stderr, flush=True)
        plans.append(plan(cfg, config, mesh, mode=mode, compile=compile_, device=device))
    total, active = config.num_params(), config.num_active_params()
    params = f"{param_count(total)} params" + (f" ({param_count(active)} active per token)" if active != total else "")
    print(f"{fv['config'].config_filename}: {params}, batch {cfg.train.batch_size} x "
          f"{cfg.data.seq_len} tokens, remat {config.remat}, {sharding.describe(mesh)}")
    print(table(plans, device, n, fv.device_memory_gib))
    if not compile_ and not fv.no_compile:
        print(f"(no compiled figures: more than {COMPILE_MAX_DEVICES} devices)")
    gib = budget_gib(device, fv.device_memory_gib)
    if gib:
        real = compile_ and devices[0].platform != "cpu"
        print(f"fits: total <= {HEADROOM:.0%} of {gib:g} GiB, using the " + ("compiled peak" if real else "estimate"))
    return 0


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.memory` (argv None), or its flags as a list in-process."""
    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.memory")


if __name__ == "__main__":
    sys.exit(main())
