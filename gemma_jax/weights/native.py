"""gemma_jax's own checkpoints: model.json + an Orbax params item, and training workdirs.

  CHECKPOINT/model.json, CHECKPOINT/params/                  (save(..., format="gemma_jax"))
  WORKDIR/model.json, WORKDIR/checkpoints/<step>/params/    (a training run; see train/checkpoints.py)
  WORKDIR/lora.json                                          (a LoRA run: adapter settings, its base)

Leaves are stored scanned (layers/{local,global} with a leading layer axis), as the model holds them.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from gemma_jax import paths
from gemma_jax.model import layers as model
from gemma_jax.model.config import ModelConfig
from gemma_jax.weights import layout

MODEL_JSON = "model.json"
LORA_JSON = "lora.json"


def write_model_json(directory, config: ModelConfig, fmt: str = "gemma_jax") -> str:
    """Writes model.json (ModelConfig.to_dict() plus the format name) into `directory`."""
    paths.Path(directory).mkdir(parents=True, exist_ok=True)
    path = paths.join(directory, MODEL_JSON)
    paths.write_text_atomic(path, json.dumps({**config.to_dict(), "format": fmt}, indent=2))
    return path


def read_model_json(directory) -> ModelConfig:
    """The ModelConfig of a gemma_jax checkpoint or workdir."""
    d = json.loads(paths.Path(paths.join(directory, MODEL_JSON)).read_text())
    d.pop("format", None)
    return ModelConfig.from_dict(d)


def write_lora_json(workdir, lora_cfg, base: str) -> None:
    """WORKDIR/lora.json: the adapter settings and where the frozen base comes from."""
    meta = dict(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
                targets=str(lora_cfg.targets), quantize=str(lora_cfg.quantize),
                base_dtype=str(lora_cfg.base_dtype), base=base)
    paths.write_text_atomic(paths.join(workdir, LORA_JSON), json.dumps(meta, indent=2))


def read_lora_json(workdir) -> dict | None:
    """The lora.json of a LoRA workdir, or None for a full fine-tuning run."""
    p = paths.Path(paths.join(workdir, LORA_JSON))
    return json.loads(p.read_text()) if p.exists() else None


def stored_tree(params_dir):
    """{path: metadata with .shape and .dtype} of an Orbax params item, read without the data."""
    import orbax.checkpoint as ocp

    return layout.flatten(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)


def restore_params(params_dir, config: ModelConfig, mesh, rules, *, shapes=None, shardings=None,
                   what: str = "model.json"):
    """Restores a params item, checking every leaf against `shapes` (default: the model's)."""
    import orbax.checkpoint as ocp

    if shapes is None:
        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, config.weight_dtype), model.param_shapes(config))
        shardings = layout.target_shardings(config, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    stored = stored_tree(params_dir)
    for path, sds in layout.flatten(abstract).items():
        name = "/".join(path)
        if path not in stored:
            raise ValueError(f"{params_dir}: missing parameter {name} ({what} implies shape {sds.shape})")
        if tuple(stored[path].shape) != tuple(sds.shape):
            raise ValueError(f"{params_dir}: parameter {name}: expected shape {tuple(sds.shape)} from "
                             f"{what}, found {tuple(stored[path].shape)}")
    extra = sorted("/".join(p) for p in stored if p not in layout.flatten(abstract))
    if extra:
        raise ValueError(f"{params_dir}: parameters {extra[:5]} are not in the model of {what}")
    return ocp.StandardCheckpointer().restore(params_dir, abstract)


def latest_workdir_step(directory) -> int | None:
    """The newest finished step under WORKDIR/checkpoints, or None."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(paths.join(directory, "checkpoints"), options=options) as manager:
        return manager.latest_step()


def write(path, config: ModelConfig, params) -> None:
    """A gemma_jax checkpoint (model.json + params/) of scanned or unrolled params."""
    import orbax.checkpoint as ocp

    scanned = "layers" in params or config.num_layers < 2
    if not scanned:
        params = model.stack_layers(config, params)
    cfg = config.replace(scan_layers=True)
    layout.unrolled_view(cfg, params)  # validates every leaf's shape against the config
    params = jax.tree.map(lambda x: jnp.asarray(x).astype(cfg.weight_dtype), params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "params", params)
        ckpt.wait_until_finished()
    if jax.process_index() == 0:
        write_model_json(path, cfg)
