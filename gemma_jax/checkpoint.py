"""Gemma 2 weights in and out: format detection, `load`, `save`, and on-device placement.

Every format is read into the same intermediate: an *unrolled* host-side tree
{embedder, layer_0 .. layer_{L-1}, final_norm} in the model's own leaf layout (the official
checkpoint's naming), whose leaves are arrays or zero-arg callables returning lazy array views
(memory maps). `from_unrolled` turns it into the scanned tree of `model.py`, building each
leaf straight into its target sharding from only the slices each device needs, so no format
ever needs a full unsharded host copy of the model. Writers get the reverse view
(`unrolled_view`): one layer's leaf at a time, fetched on demand.

Formats: `hf` (hf_format.py), `official` (official_format.py), `keras` (keras_format.py,
optional extra), `gemma_jax` (model.json + params/ Orbax StandardCheckpointer) and `workdir`
(model.json + checkpoints/<step>/params/ from a training run's CheckpointManager).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gemma_jax import model, paths, sharding
from gemma_jax.model import ModelConfig

FORMATS = ("hf", "official", "keras", "gemma_jax", "workdir")
SAVE_FORMATS = ("hf", "official", "gemma_jax", "keras")
MODEL_JSON = "model.json"
# Files an Orbax PyTree checkpoint directory holds (new OCDBT layout or the older msgpack one).
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def dtype_name(dtype) -> str | None:
    """'float32' / 'bfloat16' / 'float16' for a dtype given as a name or a numpy/jax dtype."""
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from e
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported parameter dtype {name}; use float32, bfloat16 or float16")
    return name


# ----------------------------------------------------------------------------- tree helpers


def flatten(tree) -> dict[tuple[str, ...], Any]:
    """{('layers', 'local', 'attn', 'q_einsum', 'w'): leaf, ...} for a nested dict."""
    return {tuple(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    """Inverse of flatten."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def layer_sources(config: ModelConfig, path: tuple[str, ...]) -> tuple[list[tuple[str, ...]], bool]:
    """Unrolled paths feeding one scanned leaf, and whether they are stacked on a layer axis."""
    if path[0] == "layers":
        # Scanned pairs: even layers form `local`, odd layers `global` (see model.stack_layers).
        first = 0 if path[1] == "local" else 1
        return [(f"layer_{2 * i + first}",) + path[2:] for i in range(config.num_layers // 2)], True
    return [path], False


def scanned_config(config: ModelConfig, dtype=None) -> ModelConfig:
    """The config that goes with a loaded tree: scanned layers, param_dtype = dtype if given."""
    return config.replace(scan_layers=True, param_dtype=dtype_name(dtype) or config.param_dtype)


def target_shardings(config: ModelConfig, mesh=None, rules=None):
    """Sharding of every scanned leaf: param_shardings on `mesh`, else the default device."""
    if mesh is None:
        device = jax.config.jax_default_device or jax.devices()[0]
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), model.param_shapes(config))
    return sharding.param_shardings(config, mesh, rules or sharding.DEFAULT_RULES)


class Stacked:
    """A lazy np.stack of same-shaped array-likes: indexing reads only the slices asked for."""

    def __init__(self, parts):
        self.parts = list(parts)
        shapes = {tuple(p.shape) for p in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack arrays of shapes {sorted(shapes)}")
        self.shape = (len(self.parts),) + shapes.pop()
        self.dtype = self.parts[0].dtype

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        head, rest = index[0], index[1:]
        if isinstance(head, slice):
            return np.stack([np.asarray(p[rest]) for p in self.parts[head]])
        return np.asarray(self.parts[head][rest])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _resolve_leaf(unrolled, path):
    node = unrolled
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"missing parameter {'/'.join(path)} in the checkpoint")
        node = node[key]
    return node() if callable(node) else node


def from_unrolled(config: ModelConfig, unrolled, *, dtype=None, mesh=None, rules=None):
    """Unrolled host tree (arrays or zero-arg callables giving lazy views) -> scanned tree on devices."""
    config = scanned_config(config, dtype)
    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    shapes = flatten(model.param_shapes(config))
    shardings = flatten(target_shardings(config, mesh, rules))
    out = {}
    for path, sds in shapes.items():
        sources, stacked = layer_sources(config, path)
        arrays = [_resolve_leaf(unrolled, p) for p in sources]
        expected = sds.shape[1:] if stacked else sds.shape
        for p, a in zip(sources, arrays):
            if tuple(a.shape) != tuple(expected):
                raise ValueError(f"parameter {'/'.join(p)}: expected shape {tuple(expected)}, "
                                 f"found {tuple(a.shape)}")
        if stacked and not arrays:  # a 1-layer model: its scan over layer pairs is empty
            source = np.zeros(sds.shape, np_dtype)
        else:
            source = Stacked(arrays) if stacked else arrays[0]
        cache: dict = {}

        def read(index, source=source, cache=cache):
            # Devices holding the same slice (replicated axes) share one read of it.
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key in cache:  # a private copy per device: CPU devices may alias host buffers
                return cache[key].copy()
            # np.array copies: jax must never alias a read-only memory map.
            cache[key] = np.array(source[index], dtype=np_dtype)
            return cache[key]

        out[path] = jax.make_array_from_callback(sds.shape, shardings[path], read)
    return unflatten(out)


def unrolled_view(config: ModelConfig, params, *, dtype=None, host: bool = True):
    """Unrolled tree of zero-arg callables giving one layer's leaf (numpy if host, else jax)."""
    target = jnp.dtype(dtype_name(dtype) or config.param_dtype)
    flat = flatten(params)
    expected = flatten(model.param_shapes(config.replace(scan_layers="layers" in params)))
    for path, sds in expected.items():
        if path not in flat:
            raise ValueError(f"params are missing {'/'.join(path)} (expected shape {sds.shape})")
        if tuple(flat[path].shape) != tuple(sds.shape):
            raise ValueError(f"params {'/'.join(path)}: expected shape {tuple(sds.shape)} for the config, "
                             f"found {tuple(flat[path].shape)}")

    def fetch(x, i):
        y = jnp.asarray(x if i is None else x[i]).astype(target)
        if not host:
            return y
        if isinstance(y, jax.Array) and not y.is_fully_addressable:
            from jax.experimental import multihost_utils
            y = multihost_utils.process_allgather(y, tiled=True)
        return np.asarray(jax.device_get(y))

    out = {}
    for path in expected:
        sources, stacked = layer_sources(config, path) if path[0] == "layers" else ([path], False)
        for i, src in enumerate(sources):
            out[src] = (lambda x=flat[path], i=(i if stacked else None): fetch(x, i))
    return unflatten(out)


# ----------------------------------------------------------------------------- detection


def _is_orbax_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in ORBAX_MARKERS)


def _resolve(path) -> tuple[str, Path, dict]:
    """(format, directory to read, extras such as the workdir step)."""
    p = paths.Path(path) if paths.is_remote(path) else Path(path).expanduser()
    looked_for = (
        "a Hugging Face dir (config.json with model_type gemma2 + model.safetensors or "
        "model.safetensors.index.json), a KerasHub preset (config.json + model.weights.h5), a "
        "gemma_jax checkpoint (model.json + params/), a training workdir (model.json + "
        "checkpoints/), an official Flax/Orbax checkpoint dir (_METADATA / checkpoint / "
        "manifest.ocdbt), or a Kaggle dir holding one such weights folder")
    if not p.exists():
        raise ValueError(f"checkpoint path {p} does not exist; expected {looked_for}")
    if not p.is_dir():
        raise ValueError(f"checkpoint path {p} is a file; expected a directory: {looked_for}")
    if (p / MODEL_JSON).exists() and (p / "params").is_dir():
        return "gemma_jax", p, {}
    if (p / MODEL_JSON).exists() and (p / "checkpoints").is_dir():
        return "workdir", p, {}
    if (p / "params").is_dir() and (p.parent.parent / MODEL_JSON).exists() and p.name.isdigit():
        return "workdir", p.parent.parent, {"step": int(p.name)}  # a step dir inside a workdir
    if (p / "config.json").exists() and ((p / "model.weights.h5").exists() or (p / "model.weights.json").exists()):
        return "keras", p, {}  # model.weights.json: a sharded preset (keras-hub shards past 10 GB)
    if (p / "config.json").is_file():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
        if model_type != "gemma2" and (has_weights or any(p.glob("*.safetensors"))):
            raise ValueError(f"{p}: config.json has model_type={model_type!r}; only 'gemma2' "
                             "Hugging Face checkpoints are supported")
        if model_type == "gemma2":
            if not has_weights:
                raise ValueError(f"{p}: Hugging Face config.json but no model.safetensors or "
                                 "model.safetensors.index.json (only safetensors weights are read; "
                                 "re-save with transformers save_pretrained)")
            return "hf", p, {}
    if _is_orbax_dir(p):
        if p.name == "params" and (p.parent / MODEL_JSON).exists():
            return "gemma_jax", p.parent, {}
        return "official", p, {}
    subdirs = [d for d in sorted(p.iterdir()) if _is_orbax_dir(d)]
    if len(subdirs) == 1:
        return "official", subdirs[0], {}  # Kaggle download: weights folder + tokenizer.model
    if len(subdirs) > 1:
        raise ValueError(f"{p} holds several Orbax checkpoints {[d.name for d in subdirs]}; "
                         "pass one of them")
    found = sorted(x.name for x in p.iterdir())[:20]
    raise ValueError(f"could not detect the checkpoint format of {p} (found {found}); "
                     f"looked for {looked_for}")


def detect_format(path) -> str:
    """'hf' | 'official' | 'keras' | 'gemma_jax' | 'workdir' for a checkpoint directory."""
    return _resolve(path)[0]


def find_tokenizer(path) -> str | None:
    """A tokenizer.model stored in or beside a checkpoint (Kaggle: in the parent), else None."""
    p = paths.Path(path)
    for cand in (p / "tokenizer.model", p.parent / "tokenizer.model",
                 p / "assets" / "tokenizer" / "vocabulary.spm"):
        if cand.is_file():
            return str(cand)
    return None


# ----------------------------------------------------------------------------- gemma_jax / workdir


def write_model_json(directory, config: ModelConfig, fmt: str = "gemma_jax") -> str:
    """Writes model.json (ModelConfig.to_dict() plus the format name) into `directory`."""
    paths.Path(directory).mkdir(parents=True, exist_ok=True)
    path = paths.join(directory, MODEL_JSON)
    paths.Path(path).write_text(json.dumps({**config.to_dict(), "format": fmt}, indent=2))
    return path


def read_model_json(directory) -> ModelConfig:
    """The ModelConfig of a gemma_jax checkpoint or workdir."""
    d = json.loads(paths.Path(paths.join(directory, MODEL_JSON)).read_text())
    d.pop("format", None)
    return ModelConfig.from_dict(d)


def _restore_standard(params_dir: Path, config: ModelConfig, mesh, rules, *, shapes=None, shardings=None,
                      what: str = "model.json"):
    """Restores a params item, checking every leaf against `shapes` (default: the model's)."""
    import orbax.checkpoint as ocp

    if shapes is None:
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, config.weight_dtype), model.param_shapes(config))
        shardings = target_shardings(config, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    ckpt = ocp.StandardCheckpointer()
    stored = flatten(ckpt.metadata(params_dir).item_metadata.tree)
    for path, sds in flatten(abstract).items():
        name = "/".join(path)
        if path not in stored:
            raise ValueError(f"{params_dir}: missing parameter {name} ({what} implies shape {sds.shape})")
        if tuple(stored[path].shape) != tuple(sds.shape):
            raise ValueError(f"{params_dir}: parameter {name}: expected shape {tuple(sds.shape)} from "
                             f"{what}, found {tuple(stored[path].shape)}")
    extra = sorted("/".join(p) for p in stored if p not in flatten(abstract))
    if extra:
        raise ValueError(f"{params_dir}: parameters {extra[:5]} are not in the model of {what}")
    return ckpt.restore(params_dir, abstract)


def _load_orbax_dir(fmt: str, directory: Path, extras: dict, dtype, mesh, rules, lora_base=None):
    import orbax.checkpoint as ocp

    config = scanned_config(read_model_json(directory), dtype)
    if fmt == "gemma_jax":
        return config, _restore_standard(directory / "params", config, mesh, rules)
    step = extras.get("step")
    if step is None:
        options = ocp.CheckpointManagerOptions(read_only=True)
        with ocp.CheckpointManager(directory / "checkpoints", options=options) as manager:
            step = manager.latest_step()
        if step is None:
            raise ValueError(f"workdir {directory}: no finished checkpoint under checkpoints/")
    params_dir = directory / "checkpoints" / str(step) / "params"
    if not params_dir.is_dir():
        raise ValueError(f"workdir {directory}: step {step} has no params item ({params_dir})")
    logging.info("loading step %d of workdir %s", step, directory)
    from gemma_jax import lora

    meta = lora.read_json(directory)
    if meta is None:
        return config, _restore_standard(params_dir, config, mesh, rules)
    return _merge_lora_workdir(directory, meta, params_dir, dtype, mesh, rules, lora_base)


def _merge_lora_workdir(directory: Path, meta: dict, params_dir: Path, dtype, mesh, rules, lora_base=None):
    """A LoRA run's adapters merged into the base checkpoint its lora.json names (or `lora_base`).

    The merge uses the base as stored (not the quantised copy a QLoRA run trained against), so
    the result is what the adapters would add to the released weights.
    """
    import orbax.checkpoint as ocp

    from gemma_jax import lora

    base_path = lora_base or meta["base"]
    if not os.path.isabs(base_path) and not paths.is_remote(base_path):
        inside = directory / base_path
        base_path = str(inside) if inside.exists() else base_path  # "base": the run's random base
    if not paths.exists(base_path):
        raise ValueError(f"LoRA workdir {directory}: its base checkpoint {base_path} (lora.json 'base') does "
                         "not exist; pass the base with lora_base=... (--lora_base on the command line)")
    config, base = load(base_path, dtype=dtype or meta.get("base_dtype"), mesh=mesh, rules=rules)
    run_config = read_model_json(directory)
    config = config.replace(lora_scale=run_config.lora_scale)
    rank, targets = int(meta["rank"]), meta["targets"]
    shapes = lora.shapes(model.param_shapes(config), rank, targets, jnp.float32)
    stored = flatten(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)
    shapes = unflatten({p: jax.ShapeDtypeStruct(s.shape, stored[p].dtype if p in stored else s.dtype)
                        for p, s in flatten(shapes).items()})
    if mesh is None:
        device = jax.config.jax_default_device or jax.devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
    else:
        shardings = sharding.logical_to_shardings(lora.axes(config, rank, targets), shapes, mesh,
                                                  rules or sharding.DEFAULT_RULES)
    adapters = _restore_standard(params_dir, config, mesh, rules, shapes=shapes, shardings=shardings,
                                 what=f"lora.json (rank {rank}, targets {targets!r})")
    logging.info("merging rank-%d LoRA adapters of %s into %s", rank, directory, base_path)
    merged = jax.jit(lora.merge, static_argnums=0)(config, base, adapters)
    return config.replace(lora_scale=model.ModelConfig.lora_scale, lora_dropout=0.0), merged


# ----------------------------------------------------------------------------- public API


def load(path, *, dtype=None, mesh=None, rules=None, lora_base=None):
    """(ModelConfig, scanned params placed on devices) from any supported checkpoint directory.

    A LoRA training workdir loads as the merged model (base + adapters); `lora_base` overrides
    the base checkpoint named in its lora.json (e.g. after moving the weights).
    """
    fmt, directory, extras = _resolve(path)
    if fmt in ("hf", "keras") and paths.is_remote(directory):
        # Memory-mapped formats: read from a local copy (Orbax formats read gs:// directly).
        fmt, directory, extras = _resolve(paths.local_copy(directory))
    logging.info("loading %s checkpoint from %s", fmt, directory)
    if fmt == "hf":
        from gemma_jax import hf_format

        config, unrolled = hf_format.read(directory)
        config = scanned_config(config, dtype)
        return config, from_unrolled(config, unrolled, mesh=mesh, rules=rules)
    if fmt == "official":
        from gemma_jax import official_format

        return official_format.load(directory, dtype=dtype, mesh=mesh, rules=rules)
    if fmt == "keras":
        from gemma_jax import keras_format  # optional extra, written separately

        return keras_format.load(directory, dtype=dtype, mesh=mesh, rules=rules)
    return _load_orbax_dir(fmt, directory, extras, dtype, mesh, rules, lora_base)


def _prepare_dir(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"{path} exists and is not empty; pass overwrite=True to replace the {what}")
        path.rmtree() if paths.is_remote(path) else shutil.rmtree(path)


def save(path, config: ModelConfig, params, *, format: str, **kwargs) -> str:
    """Writes params in `format` ('hf', 'official', 'gemma_jax', 'keras'); returns the directory written."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {format!r}; choose one of {SAVE_FORMATS}")
    tokenizer = kwargs.pop("tokenizer", None)
    overwrite = kwargs.pop("overwrite", False)
    if paths.is_remote(path) and format != "gemma_jax":
        # safetensors / h5 / the official writer want a local directory: write there, then upload.
        if paths.exists(path) and any(paths.Path(path).iterdir()) and not overwrite:
            raise ValueError(f"{path} exists and is not empty; pass overwrite=True to replace it")
        with paths.staged_dir(path) as local:
            save(local, config, params, format=format, tokenizer=tokenizer, overwrite=True, **kwargs)
        return str(path)
    path = paths.Path(path) if paths.is_remote(path) else Path(path).expanduser().absolute()
    if format == "hf":
        from gemma_jax import hf_format

        hf_format.write(path, config, params, **kwargs)
    elif format == "official":
        from gemma_jax import official_format

        _prepare_dir(path, overwrite, "official checkpoint")
        official_format.write(path, config, params, **kwargs)
    elif format == "keras":
        from gemma_jax import keras_format

        _prepare_dir(path, overwrite, "KerasHub preset")
        keras_format.save(path, config, params, **kwargs)
    else:
        import orbax.checkpoint as ocp

        if kwargs:
            raise ValueError(f"save(format='gemma_jax') got unknown arguments {sorted(kwargs)}")
        _prepare_dir(path, overwrite, "gemma_jax checkpoint")
        scanned = "layers" in params or config.num_layers < 2
        if not scanned:
            params = model.stack_layers(config, params)
        cfg = config.replace(scan_layers=True)
        unrolled_view(cfg, params)  # validates every leaf's shape against the config
        params = jax.tree.map(lambda x: jnp.asarray(x).astype(cfg.weight_dtype), params)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path / "params", params)
            ckpt.wait_until_finished()
        if jax.process_index() == 0:
            write_model_json(path, cfg)
    if tokenizer and jax.process_index() == 0:
        paths.copy_file(tokenizer, path / "tokenizer.model")
    logging.info("wrote %s checkpoint to %s", format, path)
    return str(path)
