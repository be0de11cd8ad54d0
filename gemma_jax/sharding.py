"""Device mesh and logical-axis sharding. The only module that names device axes.

The model names every parameter axis logically (embed, vocab, heads, ...); rules map those
names to the mesh axes `data`, `fsdp` and `tensor`. A mesh axis that does not divide the
dimension it would shard is dropped for that array (it stays replicated along that axis)
rather than failing, so one rule set serves every model size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gemma_jax.model import layers

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are sharded over fsdp (embed) and tensor (heads, mlp,
# vocab); activations over data and fsdp along the batch. Gemma 4's experts split over fsdp
# (expert parallelism, gemma_jax.model.moe: each device runs its experts on the tokens gathered
# over that axis); a mesh axis serves one array axis only, the first rule naming it wins, so
# "expert" comes before "embed". The per-layer input tables (PLE) shard their width over fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("expert", "fsdp"),
    ("embed", "fsdp"),
    ("per_layer", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves the axis sizes; one of them may be -1 to take the remaining devices."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices cannot be split with data={data} "
                             f"fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices "
                         f"are available; set one axis to -1 to fill")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (needed for sharding constraints)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(cfg) -> Mesh:
    """Mesh from the `mesh` section of a config (data, fsdp, tensor)."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor)


def rules_from_config(cfg) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules of a config's `mesh.rules` (a sequence of (name, mesh axes) pairs)."""
    rules = cfg.get("rules", None) if hasattr(cfg, "get") else None
    if not rules:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, what: str) -> P:
    """Drops mesh axes that do not divide the dimension they shard."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept = []
        for name in names:
            size = mesh.shape[name]
            if dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0:
                kept.append(name)
            elif size > 1:
                logging.info("sharding: %s dim %d not divisible by mesh axis %s=%d; replicated",
                             what, dim, name, size)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*fitted)


def logical_to_shardings(logical_specs, shapes, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding tree for a tree of logical PartitionSpecs and matching shapes."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    paths = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        mesh_specs, is_leaf=lambda x: isinstance(x, P))}

    def one(path, shape):
        spec = paths[jax.tree_util.keystr(path)]
        return NamedSharding(mesh, _fit(spec, shape.shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, shapes)


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every model parameter."""
    return logical_to_shardings(layers.param_axes(config), layers.param_shapes(config), mesh, rules)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of [batch, length] input arrays."""
    (spec,) = nn.logical_to_mesh([P("batch", "length")], rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on the mesh."""
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    """One line such as 'mesh data=2 fsdp=2 tensor=2 over 8 cpu devices'."""
    axes = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"mesh {axes} over {mesh.devices.size} {np.ravel(mesh.devices)[0].platform} devices"


def mesh_context(mesh: Mesh | None, rules=DEFAULT_RULES):
    """The mesh and logical-axis rules active while tracing (so activation constraints apply);
    a no-op without a mesh."""
    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def parse_mesh(spec: str) -> Mesh | None:
    """--mesh of the inference CLIs: none, auto (tensor parallel over the host's accelerators,
    none on CPU), or DATA,FSDP,TENSOR axis sizes."""
    if spec == "none" or (spec == "auto" and (jax.device_count() == 1 or jax.default_backend() == "cpu")):
        return None
    if spec == "auto":  # tensor parallel across the host: decoding reads every weight each step
        return make_mesh(1, 1, -1)
    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh={spec!r}: expected auto, none, or DATA,FSDP,TENSOR such as 1,1,8") from None
    return make_mesh(data, fsdp, tensor)
