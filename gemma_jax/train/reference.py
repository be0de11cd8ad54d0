"""DPO's reference log-probabilities computed once, before training (dpo.precompute_reference).

The DPO loss needs, for every pair, the reference model's summed log-probs of both responses.
They never change (the reference is frozen), so instead of a reference forward in every step
(and, with full fine-tuning, a second sharded copy of the weights in device memory for the whole
run) one forward pass over the training and eval pairs computes them up front. They then travel
with the pair rows as a per-token field (objectives.REF_FIELD: a sequence's sum at its segment's
first token, zeros elsewhere), which batches, shuffles and shards like the tokens, so the step
gets them back by a per-segment sum. Packing, epochs, resume and the mesh need nothing new.

The values are stored in WORKDIR/reference_logps/<key>.npz, the key hashing the pair rows and what
the reference is (init checkpoint or seed, LoRA base), so a resumed or re-run job reads them back
instead of running the pass again (after a resume the policy is no longer the reference, so the
pass would need the initial weights loaded again).
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import jax
import numpy as np
from absl import logging

from gemma_jax import model as model_lib, paths, sharding
from gemma_jax.train import objectives

DIRNAME = "reference_logps"


def key_of(cfg, train_rows, eval_rows) -> str:
    """What the stored values depend on: the rows (tokens, masks, segments) and the reference."""
    h = hashlib.sha256()
    for rows in (train_rows, eval_rows):
        for name in ("inputs", "targets", "loss_mask", "segment_ids"):
            if rows is not None:
                h.update(np.ascontiguousarray(rows[name]).tobytes())
        h.update(b"|")
    lora = {k: cfg.lora[k] for k in ("rank", "quantize", "base_dtype")} if int(cfg.lora.rank) else None
    h.update(json.dumps(dict(init=str(cfg.model.init_checkpoint), seed=int(cfg.train.seed), lora=lora,
                             dtype=str(cfg.model.param_dtype)), sort_keys=True).encode())
    return h.hexdigest()[:20]


def scatter_to_tokens(sums_NS, segment_ids_NT):
    """Per-segment sums [N, T+1] -> [N, T]: each segment's sum at its first token, 0 elsewhere."""
    seg = np.asarray(segment_ids_NT)
    first = (seg > 0) & np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    out = np.zeros(seg.shape, np.float32)
    r, t = np.nonzero(first)
    out[r, t] = np.asarray(sums_NS)[r, seg[r, t]]
    return out


def compute(trainer, rows, reference_params):
    """The reference's per-token field [rows, 2, T] for pair rows, in global batches on the mesh."""
    if rows is None:
        return None
    g = trainer.cfg.train.batch_size
    lo, hi = _local(g)
    n, t = rows["inputs"].shape[0], rows["inputs"].shape[-1]
    frozen = trainer.frozen if trainer.lora else None  # LoRA: the base with adapters off
    fn = _reference_fn(trainer)
    out = np.zeros((n, 2, t), np.float32)
    fields = objectives.ROW_FIELDS
    with trainer.context():
        for start in range(0, n, g):
            idx = np.arange(start, start + g)
            real = idx < n
            local = {k: np.where(real.reshape(-1, *[1] * (rows[k].ndim - 1))[lo:hi],
                                 rows[k][np.minimum(idx, n - 1)][lo:hi], 0) for k in fields}
            sums = np.asarray(jax.device_get(fn(trainer.put_batch(local), frozen, reference_params)))  # [2G, T+1]
            seg = rows["segment_ids"][np.minimum(idx, n - 1)].reshape(2 * g, t)
            field = scatter_to_tokens(sums, np.where(np.repeat(real, 2)[:, None], seg, 0)).reshape(g, 2, t)
            out[idx[real]] = field[real]
    return out


def _local(global_batch_size):
    per = global_batch_size // jax.process_count()
    return jax.process_index() * per, (jax.process_index() + 1) * per


def _reference_fn(trainer):
    rep = sharding.replicated(trainer.mesh)

    def sums(batch, frozen, reference):
        rows = objectives.pair_rows(batch)
        return objectives.reference_logps(rows, frozen, reference, config=trainer.config,
                                          chunk=int(trainer.cfg.train.loss_chunk))

    return jax.jit(sums, out_shardings=rep)


def _read(path, train_rows, eval_rows):
    """The stored (train, eval) fields, or None (with a warning) when the file is damaged or does
    not fit the rows: the pass then runs again, from the same initial weights, and replaces it."""
    want = [None if rows is None else (len(rows["inputs"]), 2, rows["inputs"].shape[-1])
            for rows in (train_rows, eval_rows)]
    try:
        with np.load(io.BytesIO(paths.Path(path).read_bytes())) as z:
            got = z["train"], (z["eval"] if "eval" in z.files else None)
        if [None if g is None else g.shape for g in got] != want or not all(
                g is None or np.isfinite(g).all() for g in got):
            raise ValueError(f"shapes {[None if g is None else g.shape for g in got]}, expected {want}")
    except Exception as e:  # noqa: BLE001  a damaged zip raises many types; all mean "compute again"
        logging.warning("DPO reference log-probs: %s is unreadable (%s: %s); computing them again",
                        path, type(e).__name__, e)
        return None
    return got


def fields(train_rows, eval_rows, *, cfg, trainer, workdir: str, init_params):
    """{REF_FIELD: (train field, eval field)}: read from the workdir when stored, else computed
    (with the initial weights, or the LoRA base) and stored."""
    key = key_of(cfg, train_rows, eval_rows)
    path = paths.join(workdir, DIRNAME, f"{key}.npz")
    stored = _read(path, train_rows, eval_rows) if paths.exists(path) else None
    if stored is not None:
        logging.info("DPO reference log-probs: read from %s", path)
        return {objectives.REF_FIELD: stored}
    t0 = time.time()
    params = None
    if not trainer.lora:
        params = init_params
        if params is None:  # a random start: the same init as Trainer.init_state's
            seed = int(cfg.train.seed)
            with trainer.context():
                params = jax.jit(lambda: model_lib.init_params(trainer.config, jax.random.key(seed)),
                                 out_shardings=trainer.state_sharding["params"])()
    train, ev = compute(trainer, train_rows, params), compute(trainer, eval_rows, params)
    n = len(train_rows["inputs"]) + (0 if eval_rows is None else len(eval_rows["inputs"]))
    logging.info("DPO reference log-probs: one pass over %d pair rows in %.1f s, stored in %s", n,
                 time.time() - t0, path)
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez_compressed(buf, train=train, **({} if ev is None else {"eval": ev}))
        paths.write_bytes_atomic(path, buf.getvalue())  # replaces a damaged file too
    return {objectives.REF_FIELD: (train, ev)}
