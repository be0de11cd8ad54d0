"""Load and save Gemma 2 weights in any supported format: detection, dispatch, LoRA merging.

Formats: `hf` (hf.py), `official` (official.py: the Kaggle / Google Flax-Orbax layout), `keras`
(keras.py, optional extra), `gemma_jax` and `workdir` (native.py). Every reader goes through
the unrolled intermediate of layout.py, so each lands straight in the requested shardings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

from gemma_jax import paths, sharding
from gemma_jax.model import layers as model, lora
from gemma_jax.model.config import ModelConfig
from gemma_jax.weights import hf, keras, layout, native, official

FORMATS = ("hf", "official", "keras", "gemma_jax", "workdir")
SAVE_FORMATS = ("hf", "official", "gemma_jax", "keras")
# Files an Orbax PyTree checkpoint directory holds (new OCDBT layout or the older msgpack one).
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


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
    if (p / native.MODEL_JSON).exists() and (p / "params").is_dir():
        return "gemma_jax", p, {}
    if (p / native.MODEL_JSON).exists() and (p / "checkpoints").is_dir():
        return "workdir", p, {}
    if (p / "params").is_dir() and (p.parent.parent / native.MODEL_JSON).exists() and p.name.isdigit():
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
        if p.name == "params" and (p.parent / native.MODEL_JSON).exists():
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


def _load_orbax_dir(fmt: str, directory: Path, extras: dict, dtype, mesh, rules, lora_base=None):
    config = layout.scanned_config(native.read_model_json(directory), dtype)
    if fmt == "gemma_jax":
        return config, native.restore_params(directory / "params", config, mesh, rules)
    step = extras.get("step")
    if step is None:
        step = native.latest_workdir_step(directory)
        if step is None:
            raise ValueError(f"workdir {directory}: no finished checkpoint under checkpoints/")
    params_dir = directory / "checkpoints" / str(step) / "params"
    if not params_dir.is_dir():
        raise ValueError(f"workdir {directory}: step {step} has no params item ({params_dir})")
    logging.info("loading step %d of workdir %s", step, directory)
    meta = native.read_lora_json(directory)
    if meta is None:
        return config, native.restore_params(params_dir, config, mesh, rules)
    return _merge_lora_workdir(directory, meta, params_dir, dtype, mesh, rules, lora_base)


def _merge_lora_workdir(directory: Path, meta: dict, params_dir: Path, dtype, mesh, rules, lora_base=None):
    """A LoRA run's adapters merged into the base checkpoint its lora.json names (or `lora_base`).

    The merge uses the base as stored (not the quantised copy a QLoRA run trained against), so
    the result is what the adapters would add to the released weights.
    """
    base_path = lora_base or meta["base"]
    if not os.path.isabs(base_path) and not paths.is_remote(base_path):
        inside = directory / base_path
        base_path = str(inside) if inside.exists() else base_path  # "base": the run's random base
    if not paths.exists(base_path):
        raise ValueError(f"LoRA workdir {directory}: its base checkpoint {base_path} (lora.json 'base') does "
                         "not exist; pass the base with lora_base=... (--lora_base on the command line)")
    config, base = load(base_path, dtype=dtype or meta.get("base_dtype"), mesh=mesh, rules=rules)
    run_config = native.read_model_json(directory)
    config = config.replace(lora_scale=run_config.lora_scale)
    rank, targets = int(meta["rank"]), meta["targets"]
    shapes = lora.shapes(model.param_shapes(config), rank, targets, jnp.float32)
    stored = native.stored_tree(params_dir)
    shapes = layout.unflatten({p: jax.ShapeDtypeStruct(s.shape, stored[p].dtype if p in stored else s.dtype)
                        for p, s in layout.flatten(shapes).items()})
    if mesh is None:
        device = jax.config.jax_default_device or jax.devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
    else:
        shardings = sharding.logical_to_shardings(lora.axes(config, rank, targets), shapes, mesh,
                                                  rules or sharding.DEFAULT_RULES)
    adapters = native.restore_params(params_dir, config, mesh, rules, shapes=shapes, shardings=shardings,
                                 what=f"lora.json (rank {rank}, targets {targets!r})")
    logging.info("merging rank-%d LoRA adapters of %s into %s", rank, directory, base_path)
    merged = jax.jit(lora.merge, static_argnums=0)(config, base, adapters)
    return config.replace(lora_scale=ModelConfig.lora_scale, lora_dropout=0.0), merged

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
        config, unrolled = hf.read(directory)
        config = layout.scanned_config(config, dtype)
        return config, layout.from_unrolled(config, unrolled, mesh=mesh, rules=rules)
    if fmt == "official":
        return official.load(directory, dtype=dtype, mesh=mesh, rules=rules)
    if fmt == "keras":
        return keras.load(directory, dtype=dtype, mesh=mesh, rules=rules)
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
        hf.write(path, config, params, **kwargs)
    elif format == "official":
        _prepare_dir(path, overwrite, "official checkpoint")
        official.write(path, config, params, **kwargs)
    elif format == "keras":
        _prepare_dir(path, overwrite, "KerasHub preset")
        keras.save(path, config, params, **kwargs)
    else:
        if kwargs:
            raise ValueError(f"save(format='gemma_jax') got unknown arguments {sorted(kwargs)}")
        _prepare_dir(path, overwrite, "gemma_jax checkpoint")
        native.write(path, config, params)
    if tokenizer and jax.process_index() == 0:
        paths.copy_file(tokenizer, path / "tokenizer.model")
    logging.info("wrote %s checkpoint to %s", format, path)
    return str(path)