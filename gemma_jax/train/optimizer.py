"""The optimizer: AdamW with warmup and a decay schedule, a weight-decay mask, gradient clipping."""

from __future__ import annotations

import functools
import re

import jax
import optax


def lr_schedule(opt, steps: int) -> optax.Schedule:
    """Linear warmup, then cosine / linear decay to min_lr_ratio * lr, or constant."""
    warmup = min(int(opt.warmup_steps), max(steps - 1, 0))
    decay_steps = max(steps - warmup, 1)
    end = opt.lr * opt.min_lr_ratio
    if opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        after = optax.linear_schedule(opt.lr, end, decay_steps)
    elif opt.schedule == "constant":
        after = optax.constant_schedule(opt.lr)
    else:
        raise ValueError(f"opt.schedule={opt.schedule!r}; choose cosine, linear or constant")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), after], [warmup])


def decay_mask(opt, params):
    """True for weights that get weight decay: matrices, minus embeddings unless asked."""
    def wants_decay(path, _):
        name = jax.tree_util.keystr(path)
        if "input_embedding" in name:
            return bool(opt.decay_embeddings)
        if re.search(r"norm", name):
            return bool(opt.decay_norms)
        return True
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt, steps: int) -> optax.GradientTransformation:
    """AdamW with warmup + schedule, decay mask and global-norm clipping."""
    # Clipping is always in the chain (0 = an infinite limit), so turning it on or off keeps the
    # optimizer state's structure and a resumed run can still read its checkpoints.
    parts = [optax.clip_by_global_norm(float(opt.grad_clip) or float("inf"))]
    parts.append(optax.adamw(lr_schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=functools.partial(decay_mask, opt)))
    return optax.chain(*parts)
