"""Low-rank adapters (LoRA) and a quantised frozen base (QLoRA-style).

The base parameters stay frozen; each targeted weight W gets a pair A [inputs, r], B [r, outputs]
and the layer computes x W + (alpha / r) x A B. Adapters live in their own flax collection
("lora"), laid out like the parameter tree with {a, b} where the base has {w}, so the scanned
layers slice them per layer like any parameter and `jax.grad` can be taken over them alone:

  variables = {"params": base, "lora": adapters, "quant": scales}

A is random and B zero, so before the first update the adapted model is the base model. A and B
shard along their base weight's logical axes (A on the input axes, B on the output axes), with
the rank axis replicated.

Quantisation keeps each targeted base weight as int8 (or int4) with one float scale per output
channel (absmax over the contracted axes): w = q * scale, rebuilt in the layer, one layer at a
time inside the scan, so the full-precision weights never exist all at once.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gemma_jax.model import layers as model_lib
from gemma_jax.model.config import ModelConfig

Params = Any

QUANT_DTYPES = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}
# int4 keeps one scale per group of this many inputs (its 15 levels are too coarse for a whole
# row); int8 one per output channel.
INT4_GROUP = 32


def _leaves(tree, is_leaf=None) -> list[tuple[tuple[str, ...], Any]]:
    """(path of dict keys, leaf) pairs."""
    return [(tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _weight_eqn(path: tuple[str, ...]) -> str | None:
    """The product a parameter takes part in, for `.../<einsum module>/w` leaves."""
    if len(path) >= 2 and path[-1] == "w":
        return model_lib.EINSUMS.get(path[-2])
    return None


def target_paths(params: Params, targets: str) -> list[tuple[str, ...]]:
    """Paths of the einsum weights whose "a/b/c/w" path matches the regex `targets`."""
    pattern = re.compile(targets)
    out = [path for path, _ in _leaves(params)
           if _weight_eqn(path) and pattern.search("/".join(path))]
    if not out:
        names = sorted({"/".join(p) for p, _ in _leaves(params) if _weight_eqn(p)})
        raise ValueError(f"lora.targets={targets!r} matches no weight; weights are e.g. {names[:6]}")
    return out


def _letters(path, ndim: int, of: str = "w") -> tuple[str, str, str, str]:
    """(weight letters with leading layer axes, A letters, B letters, merge equation).

    `ndim` is the rank of the array `of` ("w", "a" or "b") at this module: scanned layers add
    leading axes, which the einsum letters L, M, ... carry through unchanged.
    """
    _, _, merge = model_lib.lora_equations(_weight_eqn(path[:-1] + ("w",)))
    ab, rhs = merge.split("->")
    a, b = ab.split(",")
    lead = "LMOP"[: ndim - len(dict(w=rhs, a=a, b=b)[of])]
    return lead + rhs, lead + a, lead + b, f"{lead}{a},{lead}{b}->{lead}{rhs}"


def init(params: Params, rank: int, targets: str, rng, dtype=jnp.float32) -> Params:
    """Adapters for the weights of `params` (arrays or ShapeDtypeStructs) matched by `targets`.

    A ~ N(0, 1/fan_in) over its input axes, B = 0.
    """
    if rank <= 0:
        raise ValueError(f"lora.rank must be positive, got {rank}")
    shapes = dict(_leaves(params))
    out: dict = {}
    for i, path in enumerate(target_paths(params, targets)):
        shape = shapes[path].shape
        w, a, b, _ = _letters(path, len(shape))
        size = dict(zip(w, shape), R=rank)
        a_shape = tuple(size[c] for c in a)
        fan_in = int(np.prod([size[c] for c in model_lib.contracted_axes(_weight_eqn(path))]))
        key = jax.random.fold_in(rng, i)
        _set(out, path[:-1] + ("a",), (jax.random.normal(key, a_shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype))
        _set(out, path[:-1] + ("b",), jnp.zeros(tuple(size[c] for c in b), dtype))
    return out


def shapes(params: Params, rank: int, targets: str, dtype=jnp.float32) -> Params:
    """ShapeDtypeStruct tree of `init`, computed without allocating."""
    return jax.eval_shape(lambda: init(params, rank, targets, jax.random.key(0), dtype))


def axes(config: ModelConfig, rank: int, targets: str) -> Params:
    """Logical PartitionSpecs of the adapters: A on the weight's input axes, B on its outputs."""
    base_axes = dict(_leaves(model_lib.param_axes(config), is_leaf=lambda x: isinstance(x, P)))
    base = model_lib.param_shapes(config)
    base_shapes = dict(_leaves(base))
    out: dict = {}
    for path in target_paths(base, targets):
        w, a, b, _ = _letters(path, len(base_shapes[path].shape))
        name = dict(zip(w, tuple(base_axes[path])))
        _set(out, path[:-1] + ("a",), P(*(name.get(c) for c in a)))
        _set(out, path[:-1] + ("b",), P(*(name.get(c) for c in b)))
    return out


def delta(path, a, b, scale: float):
    """scale * A B laid out as the base weight at `path` (.../w)."""
    _, _, _, eqn = _letters(path, a.ndim, of="a")
    return scale * jnp.einsum(eqn, a.astype(jnp.float32), b.astype(jnp.float32))


def merge(config: ModelConfig, params: Params, adapters: Params) -> Params:
    """Base + adapters as plain parameters (W + scale A B), in each base weight's dtype."""
    ad = dict(_leaves(adapters))
    out: dict = {}
    for path, w in _leaves(params):
        a = ad.get(path[:-1] + ("a",))
        if a is not None and path[-1] == "w":
            b = ad[path[:-1] + ("b",)]
            w = (w.astype(jnp.float32) + delta(path, a, b, config.lora_scale)).astype(w.dtype)
        _set(out, path, w)
    return out


# ----------------------------------------------------------------------------- quantised base


def quantize(params: Params, bits: str, targets: str = ".") -> tuple[Params, Params]:
    """(params with int weights, "quant" collection of per-output-channel scales).

    Every einsum weight matching `targets` (default: all of them) is replaced by
    round(w / scale) with scale = absmax over its contracted axes / qmax; embeddings and norms
    stay as they are.
    """
    if bits not in QUANT_DTYPES:
        raise ValueError(f"lora.quantize={bits!r}; choose none, {', '.join(QUANT_DTYPES)}")
    qdtype, qmax = QUANT_DTYPES[bits]
    chosen = set(target_paths(params, targets))
    out: dict = {}
    scales: dict = {}
    for path, w in _leaves(params):
        if path in chosen:
            letters, _, _, _ = _letters(path, w.ndim)
            summed = model_lib.contracted_axes(_weight_eqn(path))
            contracted = [i for i, c in enumerate(letters) if c in summed]
            group = 0
            if bits == "int4":  # group along the longest contracted axis that divides evenly
                axis = max(contracted, key=lambda i: (w.shape[i] % INT4_GROUP == 0, w.shape[i]))
                if w.shape[axis] % INT4_GROUP == 0 and w.shape[axis] > INT4_GROUP:
                    group = axis + 1  # 0 means none
            q, scale = _quantize_one(w, tuple(contracted), group, qdtype, qmax)
            _set(out, path, q)
            _set(scales, path[:-1] + ("scale",), scale)
        else:
            _set(out, path, w)
    return out, scales


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_one(w, contracted, group, qdtype, qmax):
    """Absmax scales over the contracted axes; with group = axis + 1, per INT4_GROUP along it."""
    w32 = w.astype(jnp.float32)
    if group:
        axis = group - 1
        shape = w.shape[:axis] + (w.shape[axis] // INT4_GROUP, INT4_GROUP) + w.shape[axis + 1:]
        grouped = jnp.abs(w32).reshape(shape)
        reduce = tuple(i + (i > axis) for i in contracted if i != axis) + (axis + 1,)
        absmax = jnp.max(grouped, axis=reduce, keepdims=True).squeeze(axis + 1)
    else:
        absmax = jnp.max(jnp.abs(w32), axis=contracted, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    q = jnp.clip(jnp.round(w32 / model_lib.dequantize(jnp.ones_like(w32), scale, jnp.float32)), -qmax, qmax)
    return q.astype(qdtype), scale.astype(w.dtype)


def dequantize(params: Params, scales: Params) -> Params:
    """Inverse of quantize (up to rounding): float weights in the scales' dtype."""
    sc = dict(_leaves(scales))
    out: dict = {}
    for path, w in _leaves(params):
        s = sc.get(path[:-1] + ("scale",)) if path[-1] == "w" else None
        _set(out, path, w if s is None else model_lib.dequantize(w, s, jnp.float32).astype(s.dtype))
    return out
