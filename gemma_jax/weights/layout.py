"""The one intermediate every checkpoint format goes through, and the tree surgery around it.

Formats disagree on layout: the official checkpoint and Hugging Face name each layer
separately, while the scanned model holds one array per leaf with a leading layer axis (one
stack per position in the attention pattern's period: Gemma 2 `layers/local`, `layers/global`).
Rather than each format converting into the scanned tree on its own, every reader produces an *unrolled* host-side tree
{embedder, layer_0 .. layer_{L-1}, final_norm} in the model's own leaf layout, whose leaves are
arrays or zero-arg callables returning lazy views (memory maps). `from_unrolled` then builds
each scanned leaf straight into its target sharding from only the slices each device needs,
so no format ever needs a full unsharded host copy of the model. Writers get the reverse view
(`unrolled_view`): one layer's leaf at a time, fetched on demand.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import sharding
from gemma_jax.model import layers as model
from gemma_jax.model.config import ModelConfig


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
    groups = config.replace(scan_layers=True).scanned_groups()
    if path[0] in groups:
        # Scanned periods: block `name` stacks the layers at its position of every period (see
        # ModelConfig.scanned_groups and model.stack_layers).
        layers = groups[path[0]]
        if path[1] not in layers:
            raise ValueError(f"parameter {'/'.join(path)}: no block {path[1]!r} in the scanned layers of this "
                             f"config (blocks {list(layers)})")
        return [(f"layer_{i}",) + path[2:] for i in layers[path[1]]], True
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
        if stacked and not arrays:  # a model shorter than one period: its scan is empty
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
    scanned = "layers" in params
    for path in expected:
        sources, stacked = layer_sources(config, path) if scanned else ([path], False)
        for i, src in enumerate(sources):
            out[src] = (lambda x=flat[path], i=(i if stacked else None): fetch(x, i))
    return unflatten(out)

