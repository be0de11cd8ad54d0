"""Fused attention kernels for the training forward pass, chosen by ModelConfig.attention_impl.

  xla     the einsum path in model/attention.py: materialises [B, K, G, T, S] logits; runs everywhere and
          is the only path that can hand back attention probabilities.
  splash  the Pallas TPU splash-attention kernel: blockwise, never holds the full logits, and
          skips key blocks the causal / sliding-window mask hides entirely.
  flash_gpu  our Pallas (Triton) flash kernel for GPUs (model/flash_gpu.py): blockwise forward
          and backward with the soft-cap, window and segments, fully masked key blocks skipped.
  auto    splash on TPU, flash_gpu on GPU, when the shapes suit them; else xla.

There is no cuDNN choice: `jax.nn.dot_product_attention(implementation="cudnn")` has no logit
soft-cap, and Gemma 2 is wrong without one (the cap changes every attention weight); it also
stops at head dim 128, and the 2B and 9B use 256. That is why GPUs get a kernel of our own.

Off their hardware, an explicit "splash" or "flash_gpu" runs the same kernel in Pallas
interpret mode, which is slow but exact: that is how the CPU tests check them against xla.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

IMPLS = ("auto", "xla", "splash", "flash_gpu")

# The kernel tiles queries and keys in blocks whose key side must fill whole 128-lane vregs.
MIN_BLOCK = 128
# Larger tiles amortise per-block overhead; 512 is the largest that divides the usual lengths.
MAX_BLOCK = 512
# flash_gpu's smallest tile (Triton's dot needs 16 along every axis); the same as
# flash_gpu.MIN_BLOCK, kept here so choosing never imports Pallas.
FLASH_MIN_BLOCK = 16


def check_impl(impl: str) -> None:
    """Raises for a value ModelConfig.attention_impl does not accept, saying why for cudnn."""
    if impl == "cudnn":
        raise ValueError("attention_impl='cudnn' is not offered: jax.nn.dot_product_attention has no "
                         "attention-logit soft-cap, which Gemma 2 needs; GPUs use 'flash_gpu' (the 'auto' default)")
    if impl not in IMPLS:
        raise ValueError(f"ModelConfig.attention_impl={impl!r}; choose one of {list(IMPLS)}")


def splash_fits(seq_len: int, head_dim: int) -> bool:
    """Whether the kernel runs these shapes well on TPU: whole blocks, lane-aligned head dim."""
    return seq_len % MIN_BLOCK == 0 and head_dim % 128 == 0


def flash_gpu_runs(seq_len: int, head_dim: int) -> bool:
    """Whether the GPU kernel takes these shapes: whole 16-token tiles, and a power-of-two
    head dim up to 256 (Triton tiles are powers of two; 256 is the largest Gemma 2 uses)."""
    return seq_len % FLASH_MIN_BLOCK == 0 and head_dim in (16, 32, 64, 128, 256)


def choose(impl: str, backend: str, seq_len: int, head_dim: int) -> str:
    """The implementation ("xla", "splash" or "flash_gpu") that runs for a config value on a backend.

    "auto" takes splash only on TPU and flash_gpu only on GPU, each only for shapes it runs
    well (every Gemma 2 size at a sequence length divisible by 128). An explicit kernel runs
    on any backend (interpret mode off its hardware), but shapes it cannot take still run
    xla: the one-token pass of `init_params` and odd-length evaluation must work whatever
    the config says.
    """
    check_impl(impl)
    if impl == "xla":
        return "xla"
    if impl == "splash":
        return "splash" if seq_len % MIN_BLOCK == 0 else "xla"
    if impl == "flash_gpu":
        return "flash_gpu" if flash_gpu_runs(seq_len, head_dim) else "xla"
    if backend == "tpu" and splash_fits(seq_len, head_dim):
        return "splash"
    if backend == "gpu" and seq_len % MIN_BLOCK == 0 and flash_gpu_runs(seq_len, head_dim):
        return "flash_gpu"
    return "xla"


def min_block(impl: str) -> int:
    """The sequence-length multiple an explicit kernel needs (for the fallback warning)."""
    return FLASH_MIN_BLOCK if impl == "flash_gpu" else MIN_BLOCK


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
    model.attention_masks. Under a mesh the kernel runs per shard (`_per_shard`).
    """
    _, t, _, g, h = q_BTKGH.shape
    block = block_size(t) if block is None else block
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    cap = float(softcap) if softcap else None

    def per_shard(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT):
        bs, _, ks = q_BTKGH.shape[:3]
        # The kernel maps query head n to kv head n // G, which is the K-major order of BTKGH.
        q_BNTH = q_BTKGH.reshape(bs, t, ks * g, h).transpose(0, 2, 1, 3)
        k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
        kernel = _kernel(ks * g, t, window, cap, block, interpret)
        segments = _splash().SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
        out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segments)
        return out_BNTH.transpose(0, 2, 1, 3).reshape(bs, t, ks, g, h)

    return _per_shard(per_shard, q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT)


def flash_gpu_attention(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None, softcap: float,
                        blocks=None, interpret: bool | None = None):
    """Causal grouped-query attention of pre-scaled queries -> [B, T, K, G, H], by the GPU kernel.

    Same conventions as splash_attention; interpret mode (Pallas on CPU) wherever the backend
    is not a GPU. blocks: a flash_gpu.Blocks, or None for the head dim's defaults.
    """
    from gemma_jax.model import flash_gpu  # pylint: disable=g-import-not-at-top

    interpret = jax.default_backend() != "gpu" if interpret is None else interpret

    def per_shard(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT):
        return flash_gpu.flash_attention(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window=window,
                                         softcap=softcap, blocks=blocks, interpret=interpret)

    return _per_shard(per_shard, q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT)


def attend(impl: str, q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, *, window: int | None, softcap: float):
    """The fused kernel `impl` ("splash" or "flash_gpu", from `choose`) on one layer's inputs."""
    kernel = {"splash": splash_attention, "flash_gpu": flash_gpu_attention}[impl]
    return kernel(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT, window=window, softcap=softcap)


def _per_shard(fn, q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT):
    """fn(q, k, v, segment ids) -> [B, T, K, G, H], per shard under a mesh (shard_map).

    Batch is split as the "batch" rule says and kv heads as "kv_heads" (a query head's group
    stays on its kv head's device): a Pallas call inside a partitioned program would
    otherwise be gathered onto every device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT)
    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "kv_heads"))
    batch, heads = _fit(batch_axes, q_BTKGH.shape[0], mesh), _fit(head_axes, q_BTKGH.shape[2], mesh)
    spec = jax.sharding.PartitionSpec
    q_spec, kv_spec = spec(batch, None, heads, None, None), spec(batch, None, heads, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec(batch, None)),
                         out_specs=q_spec, check_vma=False)(q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT)
