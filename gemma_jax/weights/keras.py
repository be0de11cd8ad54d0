"""Read and write KerasHub / keras-nlp Gemma 2 presets (Kaggle `keras/gemma2`).

A preset is a directory with `config.json` (a `GemmaBackbone` config), `model.weights.h5`
(or, for backbones over 10 GB saved by recent keras-hub, `model.weights.json` plus
`model_NNNNN.weights.h5` shards) and `assets/tokenizer/vocabulary.spm`. The weights are read
straight from the H5 files with h5py, so neither keras nor keras-hub is needed at run time, and
lazily: each device reads only its own slices. `weights.find_tokenizer` finds the tokenizer.

Keras 3 names H5 groups by the Python attribute path, not by the variable path:
`layers/gemma_decoder_block_2/attention/query_dense/vars/0` holds what `backbone.weights`
calls `decoder_block_2/attention/query/kernel` (the first block's group has no `_0` suffix).
Keras's own loader walks the same attribute paths, so this layout is as stable as keras.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import ml_dtypes  # a jax dependency; h5py has no bfloat16 type
import numpy as np

from gemma_jax.errors import UserError
from gemma_jax.model.config import ModelConfig
from gemma_jax.weights import layout

_INSTALL_HINT = ('reading KerasHub presets needs h5py: pip install "gemma_jax[keras]" '
                 '(or just pip install h5py)')

# keras variable path inside a block -> H5 attribute path inside the block's group.
_BLOCK_H5 = {
    "pre_attention_norm/scale": "pre_attention_norm",
    "post_attention_norm/scale": "post_attention_norm",
    "pre_ffw_norm/scale": "pre_ffw_norm",
    "post_ffw_norm/scale": "post_ffw_norm",
    "attention/query/kernel": "attention/query_dense",
    "attention/key/kernel": "attention/key_dense",
    "attention/value/kernel": "attention/value_dense",
    "attention/attention_output/kernel": "attention/output_dense",
    "ffw_gating/kernel": "gating_ffw",
    "ffw_gating_2/kernel": "gating_ffw_2",
    "ffw_linear/kernel": "ffw_linear",
}
_NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return h5py


def _h5_path(name: str) -> str:
    """H5 dataset path of a keras variable path."""
    if name == "token_embedding/embeddings":
        return "layers/reversible_embedding/vars/0"
    if name == "final_normalization/scale":
        return "layers/rms_normalization/vars/0"
    block, rest = name.split("/", 1)
    i = int(block.removeprefix("decoder_block_"))
    group = "gemma_decoder_block" + (f"_{i}" if i else "")
    return f"layers/{group}/{_BLOCK_H5[rest]}/vars/0"


def config_from_keras(keras_config: dict, **overrides) -> ModelConfig:
    """ModelConfig of a keras `GemmaBackbone` config (config.json, whole or its "config")."""
    cls = keras_config.get("class_name", "GemmaBackbone")
    if cls not in ("GemmaBackbone", "Gemma2Backbone"):
        raise ValueError(f"config.json describes a {cls}, not a Gemma 2 GemmaBackbone")
    c = keras_config.get("config", keras_config)
    # Gemma 1 presets share the class; our model always has the sandwich norms and windows.
    for flag in ("use_post_ffw_norm", "use_post_attention_norm", "use_sliding_window_attention"):
        if not c.get(flag, False):
            raise ValueError(f"config.json has {flag}={c.get(flag)}: a Gemma 1 preset? "
                             "gemma_jax implements Gemma 2 only")
    if c["intermediate_dim"] % 2:
        raise ValueError(f"odd intermediate_dim={c['intermediate_dim']}: keras stores 2*F")
    # keras-hub divides with //, so match it (27B: 4608 // 32 = 144).
    scalar = c["head_dim"] if c.get("query_head_dim_normalize", True) else c["hidden_dim"] // c["num_query_heads"]
    fields = dict(
        num_layers=c["num_layers"], embed_dim=c["hidden_dim"], hidden_dim=c["intermediate_dim"] // 2,
        num_heads=c["num_query_heads"], num_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
        vocab_size=c["vocabulary_size"], sliding_window=c.get("sliding_window_size", 4096),
        query_pre_attn_scalar=float(scalar),
        attn_softcap=float(c.get("attention_logit_soft_cap") or 0.0),
        final_softcap=float(c.get("final_logit_soft_cap") or 0.0),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-6)))
    return ModelConfig(**{**fields, **overrides})


def keras_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every keras variable path of the backbone with its expected shape."""
    d, f, n, k, h = config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads, config.head_dim
    block = {**{f"{norm}/scale": (d,) for norm in _NORMS},
             "attention/query/kernel": (n, d, h), "attention/key/kernel": (k, d, h),
             "attention/value/kernel": (k, d, h), "attention/attention_output/kernel": (n, h, d),
             "ffw_gating/kernel": (d, f), "ffw_gating_2/kernel": (d, f), "ffw_linear/kernel": (f, d)}
    out = {"token_embedding/embeddings": (config.vocab_size, d)}
    for i in range(config.num_layers):
        out.update({f"decoder_block_{i}/{name}": shape for name, shape in block.items()})
    out["final_normalization/scale"] = (d,)
    return out


class _H5Array:
    """Lazy, optionally transposed view of one H5 dataset: indexing reads only that slice."""

    def __init__(self, ds, transpose: bool = False):
        self.ds, self.transpose = ds, transpose
        tag = ds.attrs.get("dtype", "")
        # Keras writes bfloat16 as 2-byte opaque data tagged with a dtype attribute.
        self.bf16 = (tag.decode() if isinstance(tag, bytes) else tag) == "bfloat16"
        self.dtype = np.dtype(ml_dtypes.bfloat16) if self.bf16 else ds.dtype
        self.shape = tuple(ds.shape[::-1] if transpose else ds.shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.shape) - len(index))
        out = np.asarray(self.ds[index[::-1] if self.transpose else index])
        out = out.view(ml_dtypes.bfloat16) if self.bf16 else out
        return out.T if self.transpose else out


def _resolve(path) -> str:
    path = os.fspath(path)
    if path.startswith("kaggle://"):  # e.g. kaggle://keras/gemma2/keras/gemma2_2b_en/1
        import kagglehub
        return kagglehub.model_download(path.removeprefix("kaggle://"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} is not a KerasHub preset directory (no config.json)")
    return path


def _weight_files(path: str) -> list[str]:
    single = os.path.join(path, "model.weights.h5")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, "model.weights.json")
    if os.path.isfile(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        names = {n for v in weight_map.values() for n in (v if isinstance(v, list) else [v])}
        return [os.path.join(path, n) for n in sorted(names)]
    raise FileNotFoundError(f"no model.weights.h5 or model.weights.json in {path!r}")


def open_weights(path, config: ModelConfig, stack: contextlib.ExitStack) -> dict[str, _H5Array]:
    """Lazy arrays keyed by keras variable path, shape-checked; files stay open until `stack` closes."""
    h5py, expected = _h5py(), keras_shapes(config)
    files = [stack.enter_context(h5py.File(f, "r")) for f in _weight_files(path)]
    out, missing, wrong = {}, [], []
    for name, shape in expected.items():
        key = _h5_path(name)
        ds = next((f[key] for f in files if key in f), None)
        if ds is None:
            missing.append(f"missing {name} (H5 {key})")
        elif ds.shape != shape:
            wrong.append(f"{name}: preset {ds.shape}, config.json implies {shape}")
        else:
            out[name] = _H5Array(ds)
            if not (out[name].bf16 or np.issubdtype(ds.dtype, np.floating)):
                raise ValueError(f"{name} is {ds.dtype}: quantized presets are not supported")
    if missing or wrong:
        raise ValueError(f"KerasHub preset {path!r} does not match its config.json:\n  "
                         + "\n  ".join(missing + wrong))
    return out


def to_unrolled(config: ModelConfig, w: dict) -> dict:
    """Keras variables -> unrolled gemma_jax tree (embedder, layer_{i}, final_norm), still lazy."""
    tree = {"embedder": {"input_embedding": w["token_embedding/embeddings"]},
            "final_norm": {"scale": w["final_normalization/scale"]}}
    for i in range(config.num_layers):
        g = lambda name: w[f"decoder_block_{i}/{name}"]  # noqa: E731
        tree[f"layer_{i}"] = {
            **{norm: {"scale": g(f"{norm}/scale")} for norm in _NORMS},
            "attn": {"q_einsum": {"w": g("attention/query/kernel")},
                     "kv_einsum": {"w": layout.Stacked([g("attention/key/kernel"),
                                                            g("attention/value/kernel")])},
                     "attn_vec_einsum": {"w": g("attention/attention_output/kernel")}},
            # keras keeps gate and up as separate (D, F) kernels; ours is one (2, F, D).
            "mlp": {"gating_einsum": {"w": layout.Stacked([_H5Array(g("ffw_gating/kernel").ds, True),
                                                               _H5Array(g("ffw_gating_2/kernel").ds, True)])},
                    "linear": {"w": g("ffw_linear/kernel")}}}
    return tree


def load(path, *, dtype=None, mesh=None, rules=None):
    """(ModelConfig, params) of a KerasHub Gemma 2 preset directory or kaggle:// handle."""
    path = _resolve(path)
    with open(os.path.join(path, "config.json")) as fh:
        config = config_from_keras(json.load(fh))
    with contextlib.ExitStack() as stack:
        weights = open_weights(path, config, stack)
        # Without a dtype, keep the stored one (bfloat16 for the Kaggle presets).
        stored = layout.dtype_name(weights["token_embedding/embeddings"].dtype)
        config = layout.scanned_config(config.replace(param_dtype=stored or "float32"), dtype)
        params = layout.from_unrolled(config, to_unrolled(config, weights), mesh=mesh, rules=rules)
    return config, params


def _keras_leaf(view, name: str) -> np.ndarray:
    """One keras variable fetched from an `unrolled_view`: the inverse of to_unrolled."""
    if name == "token_embedding/embeddings":
        return view["embedder"]["input_embedding"]()
    if name == "final_normalization/scale":
        return view["final_norm"]["scale"]()
    block, rest = name.split("/", 1)
    b = view["layer_" + block.removeprefix("decoder_block_")]
    if rest.endswith("norm/scale"):
        return b[rest.split("/")[0]]["scale"]()
    attn, mlp = b["attn"], b["mlp"]
    return {"attention/query/kernel": lambda: attn["q_einsum"]["w"](),
            "attention/key/kernel": lambda: attn["kv_einsum"]["w"]()[0],
            "attention/value/kernel": lambda: attn["kv_einsum"]["w"]()[1],
            "attention/attention_output/kernel": lambda: attn["attn_vec_einsum"]["w"](),
            "ffw_gating/kernel": lambda: mlp["gating_einsum"]["w"]()[0].T,
            "ffw_gating_2/kernel": lambda: mlp["gating_einsum"]["w"]()[1].T,
            "ffw_linear/kernel": lambda: mlp["linear"]["w"]()}[rest]()


def save(path, config: ModelConfig, params, *, dtype=None) -> str:
    """Writes a KerasHub preset (config.json, metadata.json, model.weights.h5) that keras-hub loads."""
    if (config.family, config.qk_norm, config.attention_pattern, config.local_rope_base, config.rope_scale) != (
            "gemma2", False, ("local", "global"), config.rope_base, 1.0):
        # keras-hub's Gemma3Backbone has other variable names and its own preset format, not written here.
        raise UserError(f"the keras format writes Gemma 2 GemmaBackbone presets only; this model is "
                        f"family={config.family} (qk_norm={config.qk_norm}, attention_pattern="
                        f"{'/'.join(config.attention_pattern)}, rope_scale={config.rope_scale}): save it as "
                        "format='hf', 'official' or 'gemma_jax' instead")
    h5py = _h5py()
    d, n, h = config.embed_dim, config.num_heads, config.head_dim
    # keras-hub can only express these two query scales and a fixed RoPE base.
    if config.query_pre_attn_scalar not in (h, d // n) or config.rope_base != 10000.0:
        raise ValueError(f"query_pre_attn_scalar={config.query_pre_attn_scalar} (keras-hub allows {h} or "
                         f"{d // n}) / rope_base={config.rope_base} (keras-hub: 10000) cannot be saved")
    stored = layout.dtype_name(dtype) or config.param_dtype
    view = layout.unrolled_view(config, params, dtype=stored)  # one leaf at a time, on the host
    path, writer = os.fspath(path), jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        if writer:
            os.makedirs(path, exist_ok=True)
            f = stack.enter_context(h5py.File(os.path.join(path, "model.weights.h5"), "w"))
        for name in keras_shapes(config):
            arr = _keras_leaf(view, name)  # every process fetches: gathering is collective
            if writer:
                ds = f.create_dataset(_h5_path(name), data=np.ascontiguousarray(arr))
                if arr.dtype == ml_dtypes.bfloat16:
                    ds.attrs["dtype"] = "bfloat16"  # what keras writes and reads back
    if not writer:
        return path
    backbone = dict(
        name="gemma_backbone", trainable=True, dtype={"module": "keras", "class_name": "DTypePolicy",
                                                      "config": {"name": stored}, "registered_name": None},
        vocabulary_size=config.vocab_size, num_layers=config.num_layers, num_query_heads=n,
        num_key_value_heads=config.num_kv_heads, hidden_dim=d, intermediate_dim=2 * config.hidden_dim,
        head_dim=h, layer_norm_epsilon=config.norm_eps, dropout=0,
        query_head_dim_normalize=config.query_pre_attn_scalar == h, use_post_ffw_norm=True,
        use_post_attention_norm=True, final_logit_soft_cap=config.final_softcap or None,
        attention_logit_soft_cap=config.attn_softcap or None,
        sliding_window_size=config.sliding_window, use_sliding_window_attention=True)
    for name, content in (("config.json", {"module": "keras_hub.src.models.gemma.gemma_backbone",
                                           "class_name": "GemmaBackbone", "config": backbone,
                                           "registered_name": "keras_hub>GemmaBackbone"}),
                          ("metadata.json", {"parameter_count": config.num_params(), "tasks": ["CausalLM"]})):
        with open(os.path.join(path, name), "w") as fh:
            json.dump(content, fh, indent=4)
    return path
