"""Fused attention kernels for the training forward pass, chosen by ModelConfig.attention_impl.

  xla     the einsum path in model/attention.py: materialises [B, K, G, T, S] logits; runs everywhere and
          is the only path that can hand back attention probabilities.
  splash  the Pallas TPU splash-attention kernel: blockwise, never holds the full logits, and
          skips key blocks the causal / sliding-window mask hides entirely.
  auto    splash on TPU when the shapes suit it, else xla.

There is no cuDNN choice: `jax.nn.dot_product_attention(implementation="cudnn")` has no logit
soft-cap, and Gemma 2 is wrong without one (the cap changes every attention weight), so GPUs
run the xla path.

Off TPU an explicit "splash" runs the same kernel in Pallas interpret mode, which is slow but
exact: that is how the CPU tests check it against the xla path.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

IMPLS = ("auto", "xla", "splash")

# The kernel tiles queries and keys in blocks whose key side must fill whole 128-lane vregs.
MIN_BLOCK = 128
# Larger tiles amortise per-block overhead; 512 is the largest that divides the usual lengths.
MAX_BLOCK = 512


def check_impl(impl: str) -> None:
    """Raises for a value ModelConfig.attention_impl does not accept, saying why for cudnn."""
    if impl == "cudnn":
        raise ValueError("attention_impl='cudnn' is not offered: jax.nn.dot_product_attention has no "
                         "attention-logit soft-cap, which Gemma 2 needs; GPUs use 'xla' (the 'auto' default)")
    if impl not in IMPLS:
        raise ValueError(f"ModelConfig.attention_impl={impl!r}; choose one of {list(IMPLS)}")


def splash_fits(seq_len: int, head_dim: int) -> bool:
    """Whether the kernel runs these shapes well on TPU: whole blocks, lane-aligned head dim."""
    return seq_len % MIN_BLOCK == 0 and head_dim % 128 == 0


def choose(impl: str, backend: str, seq_len: int, head_dim: int) -> str:
    """The implementation ("xla" or "splash") that runs for a config value on a backend.

    "auto" takes splash only on TPU and only for shapes it runs well (every Gemma 2 size at a
    sequence length divisible by 128). An explicit "splash" runs it on any backend and head
    dim, but a sequence that does not fill whole blocks still takes xla: the one-token pass of
    `init_params` and odd-length evaluation must work whatever the config says.
    """
    check_impl(impl)
    if impl == "xla" or seq_len % MIN_BLOCK:
        return "xla"
    if impl == "splash":
        return "splash"
    return "splash" if backend == "tpu" and splash_fits(seq_len, head_dim) else "xla"


def block_size(seq_len: int) -> int:
    """The largest supported tile that divides seq_len."""
    for b in (MAX_BLOCK, 256, MIN_BLOCK):
        if seq_len % b == 0:
            return b
    raise ValueError(f"sequence length {seq_len} is not a multiple of {MIN_BLOCK}")


def _splash():
    """jax's Pallas TPU splash-attention module, imported on first use: runs that never take
    the splash path (GPUs, most CPU runs) must not depend on where a jax release keeps it."""
    from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top

    return splash_attention


def _kernel(num_heads: int, seq_len: int, window: int | None, cap: float | None, block: int, interpret: bool):
    """A splash kernel for one sequence: [N, T, H] queries, [K, T, H] keys and values.

    Built afresh at every trace: it holds its block tables as jax arrays, which belong to the
    trace that made them (a cached kernel leaks tracers out of flax's scan). The costly part,
    walking the mask block by block in numpy, is cached inside jax by mask and block size.
    """
    splash, shape = _splash(), (seq_len, seq_len)
    # Gemma 2's window: a key k is visible from query q when 0 <= q - k < window, i.e. the
    # window_size (left, right) = (window - 1, 0) of LocalMask, which is causal by itself.
    mask = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window - 1, 0), 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                                  attn_logits_soft_cap=cap, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _fit(axes, dim: int, mesh) -> tuple[str, ...] | None:
    """Mesh axes a logical rule gives a dimension, or None where they do not divide it evenly."""
    if axes is None:
        return None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape)
    return axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else None


def splash_attention(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None, softcap: float,
                     block: int | None = None, interpret: bool | None = None):
    """Causal grouped-query attention of pre-scaled queries -> [B, T, K, G, H], by the splash kernel.

    The logits are soft-capped (softcap > 0) before the causal mask, the sliding window (local
    layers; None for global ones) and the segment mask, matching model.attention_logits and
    model.attention_masks. Under a mesh the kernel runs per shard (shard_map), batch split as
    the "batch" rule says and heads as "kv_heads": a Pallas call inside a partitioned program
    would otherwise be gathered onto every device.
    """
    b, t, k, g, h = q_BTKGH.shape
    block = block_size(t) if block is None else block
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    cap = float(softcap) if softcap else None
    # The kernel maps query head n to kv head n // G, which is the K-major order of BTKGH.
    q_BNTH = q_BTKGH.reshape(b, t, k * g, h).transpose(0, 2, 1, 3)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

    def per_shard(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT):
        kernel = _kernel(q_BNTH.shape[1], t, window, cap, block, interpret)
        segments = _splash().SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
        return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out_BNTH = per_shard(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT)
    else:
        batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "kv_heads"))
        batch, heads = _fit(batch_axes, b, mesh), _fit(head_axes, k, mesh)
        heads_spec = jax.sharding.PartitionSpec(batch, heads, None, None)
        out_BNTH = jax.shard_map(
            per_shard, mesh=mesh, in_specs=(heads_spec,) * 3 + (jax.sharding.PartitionSpec(batch, None),),
            out_specs=heads_spec, check_vma=False)(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT)
    return out_BNTH.transpose(0, 2, 1, 3).reshape(b, t, k, g, h)
