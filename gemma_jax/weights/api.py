"""Load and save Gemma 2 / 3 / 4 weights in any supported format: detection, dispatch, LoRA merging.

Formats: `hf` (hf.py), `official` (official.py: the Kaggle / Google Flax-Orbax layout), `keras`
(keras.py, optional extra), `gguf` (gguf.py: llama.cpp's single-file format, optional extra),
`gemma_jax` and `workdir` (native.py). Every reader goes through
the unrolled intermediate of layout.py, so each lands straight in the requested shardings.
`save` never replaces files unasked (`overwrite=True`) and writes beside the target, renaming
into place, so an interrupted save leaves the previous model intact.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

from gemma_jax import gguf_file, logs, paths, sharding
from gemma_jax.errors import UserError
from gemma_jax.model import layers as model, lora
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import GGUF_SUFFIX, Tokenizer, gguf_in
from gemma_jax.weights import gguf, hf, keras, layout, native, official

FORMATS = ("hf", "official", "keras", "gguf", "gemma_jax", "workdir")
SAVE_FORMATS = ("hf", "official", "gemma_jax", "keras", "gguf")
# Files an Orbax PyTree checkpoint directory holds (new OCDBT layout or the older msgpack one).
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


def _is_orbax_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in ORBAX_MARKERS)


def _resolve(path) -> tuple[str, Path, dict]:
    """(format, directory to read, extras such as the workdir step)."""
    p = paths.Path(path) if paths.is_remote(path) else Path(path).expanduser()
    looked_for = (
        "a Hugging Face dir (config.json with model_type gemma2, gemma3_text, gemma3, gemma4_text or gemma4 + "
        "model.safetensors or "
        "model.safetensors.index.json), a KerasHub preset (config.json + model.weights.h5), a "
        "gemma_jax checkpoint (model.json + params/), a training workdir (model.json + "
        "checkpoints/), an official Flax/Orbax checkpoint dir (_METADATA / checkpoint / "
        "manifest.ocdbt), a Kaggle dir holding one such weights folder, or a .gguf file (or a "
        "directory holding one)")
    if not p.exists():
        raise ValueError(f"checkpoint path {p} does not exist; expected {looked_for}")
    if not p.is_dir():
        if p.suffix == ".gguf" or gguf_file.is_gguf(p):
            return "gguf", p, {}
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
        if model_type not in hf.MODEL_TYPES and (has_weights or any(p.glob("*.safetensors"))):
            raise ValueError(f"{p}: config.json has model_type={model_type!r}; the Hugging Face checkpoints read "
                             f"are {', '.join(hf.MODEL_TYPES)} (Gemma 2, Gemma 3 / 4 text, Gemma 3 / 4 "
                             "multimodal)")
        if model_type in hf.MODEL_TYPES:
            if not has_weights:
                raise ValueError(f"{p}: Hugging Face config.json but no model.safetensors or "
                                 "model.safetensors.index.json (only safetensors weights are read; "
                                 "re-save with transformers save_pretrained)")
            return "hf", p, {}
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0], {}
    if len(ggufs) > 1:
        raise ValueError(f"{p} holds several GGUF files {[g.name for g in ggufs]}; pass one of them")
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
    """'hf' | 'official' | 'keras' | 'gguf' | 'gemma_jax' | 'workdir' for a checkpoint path."""
    return _resolve(path)[0]


def find_tokenizer(path) -> str | None:
    """A tokenizer.model stored in or beside a checkpoint (Kaggle: in the parent), a GGUF's own
    (the .gguf path, which gemma_jax.Tokenizer reads), else None."""
    p = paths.Path(path)
    if os.fspath(path).endswith(GGUF_SUFFIX) or (not paths.is_remote(path) and Path(path).is_file() and gguf_in(path)):
        return os.fspath(path)  # the file's own vocabulary, not a tokenizer.model that happens to lie beside it
    if not paths.is_remote(path) and Path(path).is_dir() and not (Path(path) / "tokenizer.model").is_file():
        found = sorted(Path(path).glob("*.gguf"))
        if len(found) == 1:
            return str(found[0])
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
            export = directory / "export"
            if export.is_dir() and any(export.iterdir()):
                # A train.steps=0 run (a baseline) saves no checkpoint; its export holds the weights.
                logging.info("workdir %s has no checkpoint; loading its export %s", directory, export)
                return load(export, dtype=dtype, mesh=mesh)
            raise UserError(f"workdir {directory}: no finished checkpoint under checkpoints/ and no export/ "
                            "(the run has not saved yet; load it after its first checkpoint)")
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



def load(path, *, dtype=None, mesh=None, rules=None, lora_base=None, config=None):
    """(ModelConfig, scanned params placed on devices) from any supported checkpoint directory.

    A LoRA training workdir loads as the merged model (base + adapters); `lora_base` overrides
    the base checkpoint named in its lora.json (e.g. after moving the weights). `config` gives
    the hyperparameters of an official checkpoint whose shapes match no published size (a
    ModelConfig, a dict of its fields, or a JSON file of them); other formats store their own.
    Orbax's and absl's notes about their internals (read-only managers, metadata files) are
    kept off the console while it loads, as the command lines do.
    """
    with logs.quiet_libraries():
        return _load(path, dtype=dtype, mesh=mesh, rules=rules, lora_base=lora_base, config=config)


def _load(path, *, dtype, mesh, rules, lora_base, config):
    fmt, directory, extras = _resolve(path)
    if config is not None and fmt != "official":
        raise ValueError(f"load(config=...) is only for official checkpoints (which store no "
                         f"hyperparameters); {directory} is a {fmt} checkpoint and has its own")
    if fmt in ("hf", "keras", "gguf") and paths.is_remote(directory):
        # Memory-mapped formats: read from a local copy (Orbax formats read gs:// directly).
        fmt, directory, extras = _resolve(paths.local_copy(directory))
    logging.info("loading %s checkpoint from %s", fmt, directory)
    if fmt == "hf":
        config, unrolled = hf.read(directory)
        config = layout.scanned_config(config, dtype)
        return config, layout.from_unrolled(config, unrolled, mesh=mesh, rules=rules)
    if fmt == "gguf":
        config, unrolled = gguf.read(directory)
        config = layout.scanned_config(config, dtype)
        return config, layout.from_unrolled(config, unrolled, mesh=mesh, rules=rules)
    if fmt == "official":
        return official.load(directory, dtype=dtype, mesh=mesh, rules=rules, config=config)
    if fmt == "keras":
        return keras.load(directory, dtype=dtype, mesh=mesh, rules=rules)
    return _load_orbax_dir(fmt, directory, extras, dtype, mesh, rules, lora_base)


# ----------------------------------------------------------------------------- save

# Everything any format's writer puts in its directory (and the Orbax internals of the official
# weights folder). An overwrite replaces these; any other file in the directory (a README, eval
# results, notes) is kept. A stale file of another layout (old shards, an old index, another
# format's config.json) would otherwise be read as part of the new model.
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    hf.INDEX, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",                                    # hf
    "*" + GGUF_SUFFIX,                                                             # gguf
    "model.weights.h5", "*.weights.h5", "model.weights.json", "metadata.json", "assets",  # keras
    native.MODEL_JSON, "params",                                                   # gemma_jax
    official.SIDECAR, *ORBAX_MARKERS, "_ROOT_METADATA", "_sharding", "d", "ocdbt.process_*",
    "array_metadatas", "descriptor", "commit_success.txt",                         # official (old layout)
)


class OutputExistsError(UserError, ValueError):
    """save() will not replace the files of a non-empty directory unless told to; the message
    names the option in the caller's spelling (`overwrite=True`, or `--overwrite` from the CLI).
    Also a ValueError, which callers caught before it had its own type."""

    def __init__(self, path, found: list[str], what: str, option: str = "overwrite=True"):
        self.path, self.found, self.what, self.option = str(path), found, what, option
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        super().__init__(f"{path} exists and is not empty (it holds {shown}); pass {option} to replace "
                         f"the model files in it with the {what} (other files are kept), or choose "
                         "another output directory")

    def reworded(self, option: str) -> "OutputExistsError":
        """The same error naming another interface's spelling of the option."""
        return OutputExistsError(self.path, self.found, self.what, option)


def _is_model_file(p) -> bool:
    return any(fnmatch.fnmatchcase(p.name, pat) for pat in MODEL_FILES) or _is_orbax_dir(p)


def _siblings(target: Path) -> tuple[Path, Path]:
    """(staging, old) directories beside `target`: one name for every process of a job."""
    return (target.parent / f".{target.name}.gemma_jax-partial",
            target.parent / f".{target.name}.gemma_jax-old")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _check_target(target, overwrite: bool, what: str) -> None:
    """Refuses a file, a training workdir, or (without overwrite) a non-empty directory."""
    p = paths.Path(target)
    if not p.exists():
        return
    if not p.is_dir():
        raise UserError(f"output {target} is a file; the output of save/convert is a directory")
    if (p / native.MODEL_JSON).exists() and (p / "checkpoints").is_dir():
        raise UserError(f"output {target} is a training workdir; write the {what} elsewhere "
                        "(the trainer's own export goes to WORKDIR/export)")
    found = sorted(x.name for x in p.iterdir())
    if found and not overwrite:
        raise OutputExistsError(target, found, what)


_WHAT = {"hf": "Hugging Face checkpoint", "official": "official checkpoint", "keras": "KerasHub preset",
         "gemma_jax": "gemma_jax checkpoint", "gguf": "GGUF file"}


def check_output(path, overwrite: bool = False, format: str = "hf") -> None:
    """Raises what save(path, ..., overwrite=overwrite) would refuse, before anything is loaded."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {format!r}; choose one of {SAVE_FORMATS}")
    _check_target(path if paths.is_remote(path) else Path(path).expanduser().absolute(), overwrite,
                  _WHAT[format])


def _move_old_out(old: Path, target: Path) -> None:
    """Carries the non-model files of a replaced directory into its successor, then deletes it."""
    for entry in list(old.iterdir()):
        if not _is_model_file(entry) and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)
    shutil.rmtree(old)


def _recover(target: Path) -> None:
    """Finishes what a killed save left: a staged copy is dropped; an old copy is put back if
    the new one never arrived, else its non-model files are carried over."""
    stage, old = _siblings(target)
    if stage.exists():
        shutil.rmtree(stage)
    if old.exists():
        if target.exists():
            _move_old_out(old, target)
        else:
            os.rename(old, target)


def _commit(stage: Path, target: Path) -> None:
    """Renames the finished staging directory into place; the old one is renamed away first and
    deleted after, so a kill at any moment leaves a complete old or new model under `target`."""
    _, old = _siblings(target)
    if target.exists():
        os.rename(target, old)
    os.rename(stage, target)
    if old.exists():
        _move_old_out(old, target)


def _write(directory, fmt: str, config: ModelConfig, params, tokenizer, kwargs) -> None:
    """Writes every file of `fmt` into `directory` (which exists and is empty, or is the remote
    target for gemma_jax)."""
    directory = paths.Path(directory)
    writer = jax.process_index() == 0
    if fmt == "hf":
        hf.write(directory, config, params, tokenizer=tokenizer, **kwargs)
        return
    if fmt == "gguf":  # the tokenizer goes inside the file
        gguf.write(directory, config, params, tokenizer=tokenizer, **kwargs)
        return
    if fmt == "official":
        # The Kaggle layout: the weights folder with tokenizer.model beside it.
        official.write(directory / official.folder_name(config), config, params, **kwargs)
    elif fmt == "keras":
        keras.save(directory, config, params, **kwargs)
    else:
        native.write(directory, config, params)
    if tokenizer and writer:
        paths.copy_file(tokenizer, directory / "tokenizer.model")


def _remove_remote_model_files(target) -> None:
    p = paths.Path(target)
    if p.exists():
        for entry in p.iterdir():
            if _is_model_file(entry):
                entry.rmtree() if entry.is_dir() else entry.unlink()


def save(path, config: ModelConfig, params, *, format: str, tokenizer=None, overwrite: bool = False,
         **kwargs) -> str:
    """Writes params in `format` ('hf', 'official', 'gemma_jax', 'keras', 'gguf'); returns the directory written.

    A non-empty directory is refused unless `overwrite=True`, which replaces the model files in
    it (MODEL_FILES) and keeps any others. A local save is written into a sibling directory
    and renamed into place, the old copy renamed away first and deleted after: a kill at any
    moment leaves the old model or the new one, never a truncated file under the final name.
    `tokenizer`: a tokenizer.model (or a .gguf, whose vocabulary is rebuilt as one) to include (hf:
    with the transformers tokenizer files; gguf: inside the file, with the chat template).
    Options: hf max_shard_bytes, dtype; official gating_layout, dtype, tree ("flat" Kaggle layout,
    or "nested" as the gemma library saves); keras dtype; gguf dtype (float32, float16, bfloat16
    or q8_0; it writes DIR/model.gguf).
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {format!r}; choose one of {SAVE_FORMATS}")
    allowed = {"hf": {"max_shard_bytes", "dtype"}, "official": {"gating_layout", "dtype", "tree"},
               "keras": {"dtype"}, "gemma_jax": set(), "gguf": {"dtype"}}[format]
    if set(kwargs) - allowed:
        raise ValueError(f"save(format={format!r}) got unknown arguments {sorted(set(kwargs) - allowed)}"
                         f" (it takes {sorted(allowed) or 'none'})")
    if format == "gguf" and kwargs.get("dtype") not in (None, *gguf.DTYPES):
        raise ValueError(f"save(format='gguf', dtype={kwargs['dtype']!r}): choose one of {', '.join(gguf.DTYPES)}")
    if tokenizer and (os.fspath(tokenizer).endswith(GGUF_SUFFIX)
                      or (not paths.is_remote(tokenizer) and gguf_in(tokenizer))):
        tokenizer = Tokenizer(paths.local_copy(tokenizer)).path  # a GGUF's vocabulary as a tokenizer.model
    what = _WHAT[format]
    writer = jax.process_index() == 0
    if paths.is_remote(path):
        _check_target(path, overwrite, what)
        if writer and overwrite:
            _remove_remote_model_files(path)
        _sync("gemma_jax.save.remote.cleared")
        if format == "gemma_jax":  # Orbax writes gs:// itself
            _write(path, format, config, params, tokenizer, kwargs)
        else:  # safetensors / h5 / the official writer want a local directory: write there, then upload
            with tempfile.TemporaryDirectory(prefix="gemma_jax_stage_") as local:
                _write(local, format, config, params, tokenizer, kwargs)
                if writer:
                    paths.copy_tree(local, path)
        _sync("gemma_jax.save.remote.done")
        logging.info("wrote %s checkpoint to %s", format, path)
        return str(path)

    target = Path(path).expanduser().absolute()
    if target.is_symlink():
        target = target.resolve()  # the renames below move the directory, not the link
    if writer:
        _recover(target)
    _sync("gemma_jax.save.recovered")
    _check_target(target, overwrite, what)
    stage, _ = _siblings(target)
    if writer:
        stage.mkdir(parents=True)
    _sync("gemma_jax.save.staged")
    try:
        _write(stage, format, config, params, tokenizer, kwargs)
    except BaseException:
        if writer:  # the target was never touched; a kill instead leaves the stage to _recover
            shutil.rmtree(stage, ignore_errors=True)
        raise
    _sync("gemma_jax.save.written")
    if writer:
        _commit(stage, target)
    _sync("gemma_jax.save.committed")
    logging.info("wrote %s checkpoint to %s", format, target)
    return str(target)
