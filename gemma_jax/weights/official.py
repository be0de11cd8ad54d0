"""Official Gemma 2 Flax checkpoints (Kaggle `google/gemma-2/flax`, GCS): a FLAT Orbax PyTree.

Top-level keys are slash-joined module paths, e.g. "transformer/layer_3/attn/q_einsum" ->
{"w": (N, D, H)}; the per-layer leaves already have the model's einsum layouts, so the only
surgery is (a) stacking layers for the scanned model, (b) the MLP gating weight, which the 2B
release stores as (2, D, F) while 9B/27B (and the model) use (2, F, D), and (c) the embedding,
which has 256128 rows (the 256000 tokenizer pieces plus 128 padding rows).

The files carry no hyperparameters, so shapes give the dimensions and the query scale and
window come from the matching published size (27B: 144 = D/N), or from the
gemma_jax_config.json that `write` leaves beside the arrays, or default to head_dim.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gemma_jax.model import layers as model
from gemma_jax.model.config import ModelConfig
from gemma_jax.weights import layout

SIDECAR = "gemma_jax_config.json"
HF_VOCAB, OFFICIAL_VOCAB = 256000, 256128
_SHAPE_FIELDS = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim")


def default_gating_layout(embed_dim: int) -> str:
    """'DF' for the 2B release (embed_dim 2304), else 'FD', as Google published them."""
    return "DF" if embed_dim == 2304 else "FD"


def _key(path: tuple[str, ...]) -> tuple[str, str]:
    """Unrolled model path -> (flat top-level key, leaf name), e.g. ('transformer/layer_0/attn/q_einsum', 'w')."""
    return "transformer/" + "/".join(path[:-1]), path[-1]


def read_metadata(directory) -> dict[tuple[str, str], tuple[tuple[int, ...], np.dtype]]:
    """{(flat key, leaf name): (shape, dtype)} of an Orbax PyTree checkpoint, without reading arrays."""
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    out = {}
    for key, sub in dict(tree).items():
        if not isinstance(sub, dict):
            continue
        for name, leaf in sub.items():
            out[(key, name)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


def _matching_preset(dims: dict) -> ModelConfig | None:
    for name in ("gemma2_2b", "gemma2_9b", "gemma2_27b"):
        preset = ModelConfig.from_preset(name)
        if all(getattr(preset, k) == dims[k] for k in _SHAPE_FIELDS):
            return preset
    return None


def infer_config(directory, meta, gating_layout: str | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, gating layout 'DF'|'FD') from the stored shapes (and the sidecar, if any)."""
    directory = Path(directory)

    def shape(path):
        key = _key(path)
        if key not in meta:
            sample = sorted(k for k, _ in meta)[:5]
            raise ValueError(f"missing {key[0]}/{key[1]} in official checkpoint {directory} "
                             f"(found keys like {sample})")
        return meta[key][0]

    emb = shape(("embedder", "input_embedding"))
    v, d = emb
    layers = sorted({int(m.group(1)) for k, _ in meta if (m := re.match(r"^transformer/layer_(\d+)/", k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{directory}: layer keys transformer/layer_i are not 0..L-1 (found {layers[:10]})")
    n, d_q, h = shape(("layer_0", "attn", "q_einsum", "w"))
    _, k, _, _ = shape(("layer_0", "attn", "kv_einsum", "w"))
    two, a, b = shape(("layer_0", "mlp", "gating_einsum", "w"))
    if d_q != d:
        raise ValueError(f"{directory}: transformer/layer_0/attn/q_einsum/w has shape {(n, d_q, h)} "
                         f"but the embedding has D={d}")
    if gating_layout is None:
        gating_layout = "DF" if (a == d and b != d) else "FD" if (b == d and a != d) else default_gating_layout(d)
    if gating_layout not in ("DF", "FD"):
        raise ValueError(f"gating_layout must be 'DF' or 'FD', got {gating_layout!r}")
    f = b if gating_layout == "DF" else a
    if two != 2 or (a, b) != ((d, f) if gating_layout == "DF" else (f, d)):
        raise ValueError(f"{directory}: transformer/layer_0/mlp/gating_einsum/w has shape {(two, a, b)}, "
                         f"which is neither (2, D, F) nor (2, F, D) with D={d}")
    dims = dict(num_layers=len(layers), embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k, head_dim=h)
    sidecar = directory / SIDECAR
    if sidecar.is_file():
        saved = json.loads(sidecar.read_text())
        saved.pop("format", None)
        for field, value in dims.items():
            if saved.get(field) != value:
                raise ValueError(f"config/weights disagree: {sidecar} says {field}={saved.get(field)} "
                                 f"but the weights imply {value}")
        base = ModelConfig.from_dict(saved)
    else:
        base = _matching_preset(dims)
        if base is None:
            logging.warning("%s: shapes match no published Gemma 2 size and there is no %s; using "
                            "query_pre_attn_scalar=head_dim=%d and sliding_window=4096", directory, SIDECAR, h)
            base = ModelConfig(**dims, query_pre_attn_scalar=float(h))
    param_dtype = layout.dtype_name(meta[_key(("embedder", "input_embedding"))][1])
    return base.replace(**dims, vocab_size=v, param_dtype=param_dtype, scan_layers=True), gating_layout


def load(directory, *, dtype=None, mesh=None, rules=None, gating_layout=None):
    """(ModelConfig, scanned params) from an official FLAT Orbax checkpoint, placed on devices."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    meta = read_metadata(directory)
    config, gating = infer_config(directory, meta, gating_layout)
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
        transpose = path[-2:] == ("gating_einsum", "w") and gating == "DF"
        if transpose:  # stored (2, D, F): restore in that layout, swap on device
            per_layer = (per_layer[0], per_layer[2], per_layer[1])
            layer_sharding = _permute(layer_sharding, (0, 2, 1))
        for src in sources:
            key, name = _key(src)
            if (key, name) not in meta:
                raise ValueError(f"missing {key}/{name} in official checkpoint {directory}")
            found = meta[(key, name)][0]
            if found != tuple(per_layer):
                raise ValueError(f"{key}/{name} in {directory}: expected shape {tuple(per_layer)}, found {found}")
            item.setdefault(key, {})[name] = jax.ShapeDtypeStruct(per_layer, target_dtype)
            restore_args.setdefault(key, {})[name] = ocp.ArrayRestoreArgs(
                sharding=layer_sharding, dtype=target_dtype, global_shape=per_layer)
        plan.append((path, sources, stacked, transpose))
    restored = ocp.PyTreeCheckpointer().restore(
        directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))

    out = {}
    for path, sources, stacked, transpose in plan:
        arrays = [restored[_key(s)[0]].pop(_key(s)[1]) for s in sources]
        if stacked or transpose:
            out[path] = _stacker(stacked, transpose, shardings[path])(*arrays)
            for a in arrays:
                a.delete()  # frees each layer as soon as its stacked copy exists
        else:
            out[path] = arrays[0]
    return config, layout.unflatten(out)


def _stacker(stacked: bool, transpose: bool, out_sharding):
    def fn(*xs):
        xs = [jnp.swapaxes(x, 1, 2) if transpose else x for x in xs]
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


def write(path, config: ModelConfig, params, *, gating_layout: str | None = None, dtype=None) -> None:
    """Writes the FLAT Orbax layout of the official release (+ gemma_jax_config.json beside it)."""
    import orbax.checkpoint as ocp

    gating = gating_layout or default_gating_layout(config.embed_dim)
    if gating not in ("DF", "FD"):
        raise ValueError(f"gating_layout must be 'DF' or 'FD', got {gating!r}")
    src = layout.flatten(layout.unrolled_view(config, params, dtype=dtype, host=False))
    flat: dict = {}
    for p, get in src.items():
        x = get()
        if p[-2:] == ("gating_einsum", "w") and gating == "DF":
            x = jnp.swapaxes(x, 1, 2)
        if p == ("embedder", "input_embedding") and x.shape[0] == HF_VOCAB:
            # The official table has 128 zero padding rows after the 256000 pieces.
            x = jnp.pad(x, ((0, OFFICIAL_VOCAB - HF_VOCAB), (0, 0)))
        key, name = _key(p)
        flat.setdefault(key, {})[name] = x
    ocp.PyTreeCheckpointer().save(path, flat)
    if jax.process_index() == 0:
        # The official files hold no hyperparameters; keep ours so a reload is exact.
        cfg = config.replace(param_dtype=layout.dtype_name(dtype) or config.param_dtype, scan_layers=True)
        (Path(path) / SIDECAR).write_text(json.dumps({**cfg.to_dict(), "format": "official"}, indent=2))
