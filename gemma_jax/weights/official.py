"""Official Gemma 2 / 3 / 4 Flax checkpoints: the Kaggle / GCS release and the `gemma` library's own saves.

Two tree layouts hold the same leaves (an Orbax PyTree either way):
  FLAT (Kaggle `google/gemma-2/flax`): top-level keys are slash-joined module paths,
    "transformer/layer_3/attn/q_einsum" -> {"w": (N, D, H)}, "transformer/layer_3/mlp/linear" -> {"w": (F, D)}.
  NESTED (`gm.ckpts.save_params`, the tree of the library's `model.init()`):
    {"embedder": {"input_embedding"}, "layer_3": {"attn": {"q_einsum": {"w"}}, "mlp": {"gating_einsum", "linear"}},
    ...}, its MLP weights bare arrays (no "w"), sometimes under a "transformer" or (Kauldron) "params" key.
Gemma 3 adds per-head QK-norms, stored as `attn/_query_norm` and `attn/_key_norm` {"scale": (H,)}
(the model's attn/query_norm, attn/key_norm); its multimodal releases add a vision tower
(`SigLiPFromPatches_0/...`, nested `vision_encoder`) and `embedder/mm_*` projections, which the
text model skips. Both are read through one canonical name per leaf ("layer_3/mlp/linear/w"). The per-layer leaves
already have the model's einsum layouts, so the only surgery is (a) stacking layers for the
scanned model, (b) the MLP gating weight, which the 2B release stores as (2, D, F) while 9B/27B
(and the model) use (2, F, D), and (c) the embedding, which has 256128 rows (the 256000
tokenizer pieces plus 128 padding rows).

The files carry no hyperparameters. Shapes give the dimensions; the query scale, window and caps
come from the matching published size, or from the gemma_jax_config.json beside the arrays
(`write` leaves one), or from the caller (`load(config=...)`). A shape of no published size with
neither is refused rather than guessed: a wrong query scale or window still runs, just wrongly.
The family is told by the weights themselves: QK-norm scales mean Gemma 3, a per-layer
skip_scale Gemma 4 (whose names and extra fields are in official_gemma4.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gemma_jax.errors import UserError
from gemma_jax.model import layers as model
from gemma_jax.model.config import FAMILY_DEFAULTS, ModelConfig
from gemma_jax.weights import layout, official_gemma4 as g4

SIDECAR = "gemma_jax_config.json"
HF_VOCAB, OFFICIAL_VOCAB = 256000, 256128
_SHAPE_FIELDS = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim")
# What the shapes cannot tell and a custom-shaped checkpoint must be given (the rest of
# ModelConfig's numerics, rope_base, norm_eps and max_seq_len, are the same for every Gemma 2;
# for Gemma 3 the caps (none), RoPE bases and the 5:1 layer pattern are the family's).
REQUIRED_HPARAMS = ("query_pre_attn_scalar", "sliding_window", "attn_softcap", "final_softcap")
REQUIRED_HPARAMS_GEMMA3 = ("query_pre_attn_scalar", "sliding_window", "rope_scale")
PRESETS = {"gemma2": ("gemma2_2b", "gemma2_9b", "gemma2_27b"),
           "gemma3": ("gemma3_270m", "gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b"),
           "gemma4": g4.PRESETS}
# The official names of the QK-norm modules, and the image side of multimodal checkpoints.
_QK_NORMS = {"_query_norm": "query_norm", "_key_norm": "key_norm"}
_IMAGE_SIDE = re.compile(r"^(SigLiPFromPatches_0|vision_encoder)/|^embedder/mm_")
# Keys above the model's own tree: the library's "transformer" scope, a Kauldron state's "params".
_WRAPPERS = ("params", "transformer")
_BARE_MLP = re.compile(r"^layer_\d+/mlp2?/(gating_einsum|linear)$")  # mlp2: Gemma 4's dense FFW beside experts


class Stored(NamedTuple):
    """One stored array: its shape, dtype and path in the checkpoint's own tree."""
    shape: tuple[int, ...]
    dtype: np.dtype
    path: tuple[str, ...]


def default_gating_layout(embed_dim: int) -> str:
    """'DF' for the 2B release (embed_dim 2304), else 'FD', as Google published them."""
    return "DF" if embed_dim == 2304 else "FD"


def _leaves(tree, prefix=()):
    for key, sub in tree.items():
        if isinstance(sub, Mapping):
            yield from _leaves(sub, prefix + (str(key),))
        elif hasattr(sub, "shape"):
            yield prefix + (str(key),), sub


def _canonical(path: tuple[str, ...]) -> tuple[str, str]:
    """Stored path -> (wrapper prefix, canonical name), e.g. ('transformer/layer_0/mlp/linear', 'w') ->
    ('transformer/', 'layer_0/mlp/linear/w') and ('layer_0', 'mlp', 'linear') -> ('', 'layer_0/mlp/linear/w')."""
    name, prefix = "/".join(path), ""
    for wrapper in _WRAPPERS:
        if name.startswith(wrapper + "/"):
            prefix, name = prefix + wrapper + "/", name[len(wrapper) + 1:]
    if _BARE_MLP.match(name):
        name += "/w"
    parts = name.split("/")
    if len(parts) > 3 and parts[1] == "attn" and parts[2] in _QK_NORMS:
        name = "/".join(parts[:2] + [_QK_NORMS[parts[2]]] + parts[3:])
    return prefix, name


def read_metadata(directory) -> dict[str, Stored]:
    """{canonical name ('layer_0/attn/q_einsum/w'): Stored} of a flat or nested official checkpoint,
    read without the arrays."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    out: dict[str, Stored] = {}
    for path, leaf in _leaves(dict(tree)):
        _, name = _canonical(path)
        if name in out:
            raise ValueError(f"{directory}: both {'/'.join(out[name].path)} and {'/'.join(path)} hold "
                             f"{name}; the checkpoint mixes two layouts")
        out[name] = Stored(tuple(leaf.shape), np.dtype(leaf.dtype), path)
    return out


def _display(meta: dict[str, Stored], name: str) -> str:
    """A canonical name as the checkpoint spells it (its wrapper prefix, e.g. 'transformer/')."""
    emb = meta.get("embedder/input_embedding")
    prefix = _canonical(emb.path)[0] if emb is not None else ""
    return prefix + name


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _matching_preset(dims: dict, family: str = "gemma2") -> ModelConfig | None:
    for name in PRESETS[family]:
        preset = ModelConfig.from_preset(name)
        if all(getattr(preset, k) == dims[k] for k in _SHAPE_FIELDS):
            return preset
    return None


def _given_hparams(config, what: str) -> dict:
    """`config` (a ModelConfig, a dict of ModelConfig fields, or a JSON file of one) as a dict."""
    if isinstance(config, ModelConfig):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config).expanduser()
    if not path.is_file():
        raise UserError(f"{what} {str(config)!r}: no such JSON file (expected ModelConfig fields, "
                        "e.g. a model.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object of ModelConfig fields, got {type(d).__name__}")
    return d


def _missing_hparams_error(directory: Path, dims: dict, missing: list[str], family: str = "gemma2") -> UserError:
    shape = ", ".join(f"{k}={v}" for k, v in dims.items())
    if family == "gemma3":
        example = json.dumps({"query_pre_attn_scalar": dims["head_dim"], "sliding_window": 1024, "rope_scale": 8.0})
        what = "Gemma 3 size (270m, 1b, 4b, 12b, 27b)"
    elif family == "gemma4":
        example = json.dumps({"attention_pattern": ["local"] * 5 + ["global"], "sliding_window": 1024,
                              "num_kv_shared_layers": 0})
        what = "Gemma 4 size (e2b, e4b, 31b, 26b_a4b)"
    else:
        example = json.dumps({"query_pre_attn_scalar": dims["head_dim"], "sliding_window": 4096,
                              "attn_softcap": 50.0, "final_softcap": 30.0})
        what = "Gemma 2 size (2b, 9b, 27b)"
    name = {"gemma3": "Gemma 3", "gemma4": "Gemma 4"}.get(family, "Gemma 2")
    return UserError(
        f"official checkpoint {directory}: its shapes ({shape}) match no published {what} "
        f"and official checkpoints store no hyperparameters, so {', '.join(missing)} "
        f"must be given (the rest default to {name}'s): write them as JSON to "
        f"{directory / SIDECAR} (e.g. {example}), or pass them to gemma_jax.load(path, config={{...}}) "
        "or `python -m gemma_jax.convert --model_config=FILE.json`")


def infer_config(directory, meta: dict[str, Stored], gating_layout: str | None = None,
                 config=None) -> tuple[ModelConfig, str]:
    """(ModelConfig, gating layout 'DF'|'FD') from the stored shapes plus the hyperparameters of
    `config` (ModelConfig / dict / JSON file), the sidecar file, or the matching published size."""
    directory = Path(directory)

    def shape(name):
        if name not in meta:
            sample = sorted(_display(meta, k) for k in meta)[:5]
            raise ValueError(f"missing {_display(meta, name)} in official checkpoint {directory} "
                             f"(found keys like {sample})")
        return meta[name].shape

    v, d = shape("embedder/input_embedding")
    layers = sorted({int(m.group(1)) for k in meta if (m := re.match(r"^layer_(\d+)/", k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{directory}: layer keys {_display(meta, 'layer_i')} are not 0..L-1 "
                         f"(found {layers[:10]})")
    if any(k.startswith("stacked_layers/") for k in meta):
        raise ValueError(f"{directory}: {_display(meta, 'stacked_layers')} is the gemma library's STACKED layout, "
                         "which is not read; save it FLAT or NESTED (gm.ckpts.save_params) and load that")
    if "layer_0/attn/qkv_einsum/w" in meta:
        raise ValueError(f"{directory}: {_display(meta, 'layer_0/attn/qkv_einsum')} (as many kv heads as query "
                         "heads) is a Gemma 1 layout; Gemma 2 checkpoints have q_einsum and kv_einsum")
    n, d_q, h = shape("layer_0/attn/q_einsum/w")
    _, k, _, _ = shape("layer_0/attn/kv_einsum/w")
    family = ("gemma4" if g4.FAMILY_MARKER in meta else "gemma3" if "layer_0/attn/query_norm/scale" in meta
              else "gemma2")
    moe = family == "gemma4" and "layer_0/mlp/router_logits/w" in meta
    two, a, b = shape(f"layer_0/{'mlp2' if moe else 'mlp'}/gating_einsum/w")
    if d_q != d:
        raise ValueError(f"{directory}: {_display(meta, 'layer_0/attn/q_einsum/w')} has shape {(n, d_q, h)} "
                         f"but the embedding has D={d}")
    if gating_layout is None:
        gating_layout = "DF" if (a == d and b != d) else "FD" if (b == d and a != d) else default_gating_layout(d)
    if gating_layout not in ("DF", "FD"):
        raise ValueError(f"gating_layout must be 'DF' or 'FD', got {gating_layout!r}")
    f = b if gating_layout == "DF" else a
    if two != 2 or (a, b) != ((d, f) if gating_layout == "DF" else (f, d)):
        raise ValueError(f"{directory}: {_display(meta, 'layer_0/mlp/gating_einsum/w')} has shape {(two, a, b)}, "
                         f"which is neither (2, D, F) nor (2, F, D) with D={d}")
    dims = dict(num_layers=len(layers), embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k, head_dim=h)

    given, sources = {}, []
    sidecar = directory / SIDECAR
    if sidecar.is_file():
        given.update(_given_hparams(sidecar, "sidecar"))
        sources.append(str(sidecar))
    if config is not None:
        given.update(_given_hparams(config, "config"))
        sources.append("config=" if not isinstance(config, (str, Path)) else str(config))
    for key in ("format", "vocab_size", "param_dtype", "scan_layers", "qk_norm"):
        given.pop(key, None)  # the stored arrays decide these
    where = " / ".join(sources)
    if given.get("family", family) != family:
        why = {"gemma4": "with per-layer skip_scale", "gemma3": "with QK-norm scales"}.get(family, "without QK-norm scales")
        raise ValueError(f"config/weights disagree: {where} says family={given['family']} but the weights of "
                         f"{directory} are {family} ({why})")
    for field, value in dims.items():
        if field in given and given[field] != value:
            raise ValueError(f"config/weights disagree: {where} says {field}={given[field]} "
                             f"but the weights of {directory} imply {value}")
    base = _matching_preset(dims, family)
    if base is None:
        required = {"gemma3": REQUIRED_HPARAMS_GEMMA3, "gemma4": g4.REQUIRED_HPARAMS}.get(family, REQUIRED_HPARAMS)
        if moe:
            required += ("experts_per_token",)
        missing = [k for k in required if k not in given]
        if missing:
            raise _missing_hparams_error(directory, dims, missing, family)
    start = base.to_dict() if base else {**FAMILY_DEFAULTS[family], "family": family}
    try:
        merged = ModelConfig.from_dict({**start, **given, **dims, "qk_norm": family != "gemma2"})
        if family == "gemma4":  # the rest of the shapes, given the pattern and the KV sharing
            shapes = {name: stored.shape for name, stored in meta.items()}
            merged = merged.replace(vocab_size=v, **g4.derived_fields(merged.replace(vocab_size=v), shapes))
    except (TypeError, ValueError) as e:
        raise UserError(f"hyperparameters for {directory} ({where}): {e}") from None
    param_dtype = layout.dtype_name(meta["embedder/input_embedding"].dtype)
    return merged.replace(vocab_size=v, param_dtype=param_dtype, scan_layers=True), gating_layout


def load(directory, *, dtype=None, mesh=None, rules=None, gating_layout=None, config=None):
    """(ModelConfig, scanned params) from an official flat or nested Orbax checkpoint, placed on devices.

    `config`: hyperparameters for a checkpoint of no published size (see infer_config).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    meta = read_metadata(directory)
    config, gating = infer_config(directory, meta, gating_layout, config)
    image_side = sorted(k for k in meta if _IMAGE_SIDE.match(k))
    if image_side:
        logging.info("%s: loading the text model; skipping the image side (%d arrays: %s ...)", directory,
                     len(image_side), _display(meta, image_side[0]))
    config = layout.scanned_config(config, dtype)
    target_dtype = config.weight_dtype
    shapes = layout.flatten(model.param_shapes(config))
    shardings = layout.flatten(layout.target_shardings(config, mesh, rules))

    # Every stored array is restored straight into the sharding its scanned leaf will have
    # (minus the layer axis), so each device reads only its slice; layers are then stacked on
    # device by a jitted stack whose output sharding is the target.
    item, restore_args, plan = {}, {}, []
    for path, sds in shapes.items():
        sources, stacked = layout.layer_sources(config, path)
        per_layer = sds.shape[1:] if stacked else sds.shape
        target = shardings[path]
        layer_sharding = _drop_leading(target) if stacked else target
        perm = official_name(config, sources[0])[1] if sources else None
        if path[-2:] == ("gating_einsum", "w") and gating == "DF":
            perm = (0, 2, 1)  # stored (2, D, F)
        if perm:  # restore in the stored layout, permute on device
            inverse = tuple(perm.index(i) for i in range(len(perm)))
            per_layer = tuple(per_layer[j] for j in inverse)
            layer_sharding = _permute(layer_sharding, inverse)
        stored_paths = []
        for src in sources:
            name = official_name(config, src)[0]
            if name not in meta:
                raise ValueError(f"missing {_display(meta, name)} in official checkpoint {directory}")
            found = meta[name].shape
            if found != tuple(per_layer):
                raise ValueError(f"{_display(meta, name)} in {directory}: expected shape {tuple(per_layer)}, "
                                 f"found {found}")
            stored = meta[name].path
            _put(item, stored, jax.ShapeDtypeStruct(per_layer, target_dtype))
            _put(restore_args, stored, ocp.ArrayRestoreArgs(sharding=layer_sharding, dtype=target_dtype,
                                                            global_shape=per_layer))
            stored_paths.append(stored)
        plan.append((path, stored_paths, stacked, perm))
    restored = ocp.PyTreeCheckpointer().restore(
        directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))

    out = {}
    for path, stored_paths, stacked, perm in plan:
        arrays = [_pop(restored, s) for s in stored_paths]
        if stacked or perm:
            out[path] = _stacker(stacked, perm, shardings[path])(*arrays)
            for a in arrays:
                a.delete()  # frees each layer as soon as its stacked copy exists
        else:
            out[path] = arrays[0]
    return config, layout.unflatten(out)


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _pop(tree: dict, path: tuple[str, ...]):
    for key in path[:-1]:
        tree = tree[key]
    return tree.pop(path[-1])


def official_name(config: ModelConfig, path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
    """(canonical official name, permutation from the stored axes to the model's or None) of an
    unrolled leaf path."""
    if config.family == "gemma4":
        return g4.official_name(config, path)
    return _name(path), None


def _stacker(stacked: bool, perm, out_sharding):
    def fn(*xs):
        xs = [jnp.transpose(x, perm) if perm else x for x in xs]
        return jnp.stack(xs) if stacked else xs[0]

    return jax.jit(fn, out_shardings=out_sharding)


def _drop_leading(s):
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[1:]))
    return s


def _permute(s, order):
    if isinstance(s, jax.sharding.NamedSharding):
        spec = tuple(s.spec) + (None,) * (len(order) - len(s.spec))
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*(spec[i] for i in order)))
    return s


def folder_name(config: ModelConfig) -> str:
    """Name of the weights folder in an export, as Kaggle names its downloads (gemma2-2b, gemma3-1b, ...)."""
    dims = {k: getattr(config, k) for k in _SHAPE_FIELDS}
    family = config.family if config.family in PRESETS else "gemma2"
    preset = next((name for name in PRESETS[family]
                   if all(getattr(ModelConfig.from_preset(name), k) == v for k, v in dims.items())), None)
    return preset.replace("_", "-") if preset else f"{family}-custom"


TREE_LAYOUTS = ("flat", "nested")


def write(path, config: ModelConfig, params, *, gating_layout: str | None = None, dtype=None,
          tree: str = "flat") -> None:
    """Writes the official layout into `path` (which must not exist yet), with
    gemma_jax_config.json beside the arrays: `tree="flat"` is the Kaggle release's FLAT tree,
    "nested" the gemma library's own (gm.ckpts.save_params: nested modules, bare MLP arrays)."""
    import orbax.checkpoint as ocp

    gating = gating_layout or ("FD" if config.family == "gemma4" else default_gating_layout(config.embed_dim))
    if gating not in ("DF", "FD"):
        raise ValueError(f"gating_layout must be 'DF' or 'FD', got {gating!r}")
    if tree not in TREE_LAYOUTS:
        raise ValueError(f"official tree layout {tree!r}; choose one of {list(TREE_LAYOUTS)}")
    official_names = {ours: theirs for theirs, ours in _QK_NORMS.items()}
    src = layout.flatten(layout.unrolled_view(config, params, dtype=dtype, host=False))
    gemma4 = config.family == "gemma4"
    out: dict = {}
    leaves = []
    for p, get in src.items():
        x = get()
        name, perm = official_name(config, p)
        if perm:
            x = jnp.transpose(x, tuple(perm.index(i) for i in range(len(perm))))  # back to the stored axes
        if p[-2:] == ("gating_einsum", "w") and gating == "DF":
            x = jnp.swapaxes(x, 1, 2)
        if p == ("embedder", "input_embedding") and x.shape[0] == HF_VOCAB:
            # The official table has 128 zero padding rows after the 256000 pieces.
            x = jnp.pad(x, ((0, OFFICIAL_VOCAB - HF_VOCAB), (0, 0)))
        if not gemma4:  # Gemma 3's QK-norms are _query_norm / _key_norm; Gemma 4's keep the plain names
            name = "/".join(official_names.get(part, part) if j == 2 and p[1] == "attn" else part
                            for j, part in enumerate(p))
        leaves.append((name, x))
    if gemma4:  # weights the library declares in KV-shared layers but never reads
        wdtype = jnp.dtype(layout.dtype_name(dtype) or config.param_dtype)
        leaves += [(name, jnp.full(shape, fill, wdtype)) for i in range(config.num_layers)
                   for name, (shape, fill) in g4.placeholders(config, i).items()]
    for name, x in leaves:
        p = tuple(name.split("/"))
        if tree == "flat":
            out.setdefault("transformer/" + "/".join(p[:-1]), {})[p[-1]] = x
        else:
            bare = g4.bare(config, name) if gemma4 else p[-3:-1] in (("mlp", "gating_einsum"), ("mlp", "linear"))
            _put(out, p[:-1] if bare else p, x)
    ocp.PyTreeCheckpointer().save(path, out)
    if jax.process_index() == 0:
        # The official files hold no hyperparameters; keep ours so a reload is exact.
        cfg = config.replace(param_dtype=layout.dtype_name(dtype) or config.param_dtype, scan_layers=True)
        (Path(path) / SIDECAR).write_text(json.dumps({**cfg.to_dict(), "format": "official"}, indent=2))
