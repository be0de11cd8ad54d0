"""KV-cache sampling: one compiled prefill, a compiled decode loop, `generate`, the CLI and chat.

A batch of prompts is right-padded to a bucketed length and prefilled in one call; each row then
decodes at its own positions in a `jax.lax.while_loop` over a preallocated cache (see
`kv_cache`). Prompt length, batch size, cache length and the output buffer are rounded
up to buckets, so a run compiles a handful of programs however many prompts it serves. Stop
tokens end rows inside the loop; stop strings and streaming are handled on the host between
short runs of the loop.

  python -m gemma_jax.sample --checkpoint=PATH --prompt="The capital of France is"
  python -m gemma_jax.sample --checkpoint=PATH --chat            # multi-turn, reads stdin (/reset, /exit)
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gemma_jax import cli, paths, sharding, weights
from gemma_jax.errors import UserError
from gemma_jax.model import kv_cache, layers as M
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 256
# Smallest compiled prompt length, cache length and output buffer: below these, one program
# serves every size (the cost of the spare slots is negligible).
MIN_PROMPT_BUCKET, MIN_CACHE_BUCKET, MIN_STEPS_BUCKET = 32, 128, 32
# See decoding_layout; tests switch it off to exercise the scanned decode path on CPU.
UNROLL_LAYERS_ON_CPU = True
# Decode steps between host checks of stop strings (streaming checks after every token).
STOP_CHECK_EVERY = 16


def bucket(n: int, minimum: int = 8) -> int:
    """Compiled sizes: powers of two up to 1024, then multiples of 1024."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length() if n <= 1024 else -(-n // 1024) * 1024


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The static part of a sampling setup (temperature and top_p are traced values)."""

    greedy: bool
    top_k: int = 0
    top_p: bool = False
    vocab_limit: int = 0  # ids >= this are never sampled (padding rows of the embedding); 0: none


def validate_sampling(temperature, top_k, top_p) -> None:
    """Raises ValueError on a sampling setting outside its domain."""
    if temperature is None or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def sample_tokens(logits_BV, rng, temperature, top_p, sampler: Sampler):
    """Next token ids [B]: argmax if greedy, else temperature -> top-k -> top-p -> draw (as in HF)."""
    v = logits_BV.shape[-1]
    if sampler.vocab_limit and sampler.vocab_limit < v:
        logits_BV = jnp.where(jnp.arange(v) < sampler.vocab_limit, logits_BV, -jnp.inf)
    if sampler.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if not (sampler.top_k or sampler.top_p):
        return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
    if sampler.top_k:
        # Top-k first shrinks the candidates, so nucleus filtering sorts only k values.
        vals_BC, idx_BC = jax.lax.top_k(logits_BV, min(sampler.top_k, v))
    else:
        idx_BC = jnp.argsort(-logits_BV, axis=-1)
        vals_BC = jnp.take_along_axis(logits_BV, idx_BC, axis=-1)
    if sampler.top_p:
        probs_BC = jax.nn.softmax(vals_BC, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass before it
        # is below top_p (HF's rule), so the most likely token always stays.
        before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
        vals_BC = jnp.where(before_BC < top_p, vals_BC, -jnp.inf)
    choice_B = jax.random.categorical(rng, vals_BC, axis=-1)
    return jnp.take_along_axis(idx_BC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _next_logits(config, params, hidden_BD, rows):
    """float32 logits [B, V] of the next token; only the first `rows` rows are computed."""
    logits_RV = M.final_logits_by_vocab(config, hidden_BD[:rows], params["embedder"]["input_embedding"])
    return jnp.pad(logits_RV, ((0, hidden_BD.shape[0] - rows), (0, 0)))


def _finish(state, logits_BV, step, stop_ids, temperature, top_p, rng, sampler):
    """Samples the token of `step`, records it, and marks rows that are now done."""
    done_B = state["done"]
    tok_B = sample_tokens(logits_BV, jax.random.fold_in(rng, step), temperature, top_p, sampler)
    tok_B = jnp.where(done_B, state["pad"], tok_B)
    state["tokens"] = jax.lax.dynamic_update_index_in_dim(state["tokens"], tok_B, step, axis=1)
    if "logits" in state:
        state["logits"] = jax.lax.dynamic_update_index_in_dim(state["logits"], logits_BV, step, axis=1)
    stopped_B = jnp.isin(tok_B, stop_ids) | (step + 1 >= state["limit"])
    state["count"] = state["count"] + (~done_B).astype(jnp.int32)
    state["done"] = done_B | stopped_B
    state["last"] = tok_B
    state["step"] = jnp.asarray(step + 1, jnp.int32)
    return state


def _pad_rows(extra, path, x):
    """Appends `extra` empty rows to a cache leaf (batch axis 1 under the scanned pairs, else 0)."""
    axis = 1 if jax.tree_util.keystr(path).startswith("['layers']") else 0
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=-1 if x.dtype == jnp.int32 else 0)


@functools.partial(jax.jit, static_argnames=("config", "cache_length", "num_steps", "sampler", "return_logits",
                                             "rows"))
def _prefill(config, params, tokens_BT, lengths_B, limits_B, stop_ids, temperature, top_p, rng, pad, *,
             cache_length, num_steps, sampler, return_logits, rows):
    """Runs the padded prompts through the model into a fresh cache and samples the first token."""
    b, t = tokens_BT.shape
    t_T = jnp.arange(t, dtype=jnp.int32)
    # Only the real rows are prefilled; the cache gets the spare rows after (see generate_ids).
    positions_RT = jnp.where(t_T < lengths_B[:rows, None], t_T, -1)
    hidden_RTD, cache = M.Transformer(config).apply(
        {"params": params}, tokens_BT[:rows], positions_RT, return_hidden=True,
        cache=kv_cache.init_cache(config, rows, cache_length))
    if rows < b:
        cache = jax.tree_util.tree_map_with_path(functools.partial(_pad_rows, b - rows), cache)
    last_RD = hidden_RTD[jnp.arange(rows), jnp.maximum(lengths_B[:rows] - 1, 0)]
    logits_BV = _next_logits(config, params, jnp.pad(last_RD, ((0, b - rows), (0, 0))), rows)
    state = dict(cache=cache, tokens=jnp.full((b, num_steps), pad, jnp.int32), pos=lengths_B,
                 limit=limits_B, done=lengths_B == 0, count=jnp.zeros((b,), jnp.int32),
                 pad=jnp.asarray(pad, jnp.int32))
    if return_logits:
        state["logits"] = jnp.zeros((b, num_steps, logits_BV.shape[-1]), jnp.float32)
    return _finish(state, logits_BV, 0, stop_ids, temperature, top_p, rng, sampler)


@functools.partial(jax.jit, static_argnames=("config", "sampler", "rows"), donate_argnames=("state",))
def _decode(config, params, state, until, stop_ids, temperature, top_p, rng, *, sampler, rows):
    """Decodes one token per live row per iteration until step `until` or every row is done."""

    def cond(s):
        return (s["step"] < until) & ~jnp.all(s["done"])

    def body(s):
        s = dict(s)
        # Finished rows feed position -1: nothing of theirs is attended to or written.
        pos_B = jnp.where(s["done"], -1, s["pos"])
        hidden_BTD, s["cache"] = M.Transformer(config).apply(
            {"params": params}, s["last"][:, None], pos_B[:, None], return_hidden=True, cache=s["cache"])
        s["pos"] = s["pos"] + 1
        return _finish(s, _next_logits(config, params, hidden_BTD[:, 0], rows), s["step"], stop_ids,
                       temperature, top_p, rng, sampler)

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class Generation:
    """Token ids per row (up to and including its stop token) and, if asked, per-step logits [n, V]."""

    tokens: list[list[int]]
    logits: list[np.ndarray] | None = None


def _on_cpu(params) -> bool:
    leaves = jax.tree.leaves(params)
    if not all(isinstance(x, jax.Array) for x in leaves):
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for x in leaves for d in x.devices())


@jax.jit
def _slice_layers(x):
    return [x[i] for i in range(x.shape[0])]


def decoding_layout(config: ModelConfig, params, *, donate: bool = False):
    """(config, params) as decoding runs fastest: on CPU, layers unrolled (scan_layers=False).

    XLA:CPU copies each layer's weights out of the stacked arrays at every decode step (the
    slices do not fuse into its matmuls), which triples the memory traffic of a step; separate
    per-layer arrays are read in place. Elsewhere the scanned layout stays as it is. With
    `donate`, each stacked array is freed once sliced, so the conversion needs no second copy
    of the model.
    """
    if not (config.scan_layers and UNROLL_LAYERS_ON_CPU and _on_cpu(params)):
        return config, params
    groups = config.scanned_groups()
    out = {k: v for k, v in params.items() if k not in groups}
    for group, blocks in groups.items():
        for name, layers in blocks.items():
            leaves, treedef = jax.tree.flatten(params[group][name])
            per_leaf = []
            for x in leaves:
                per_leaf.append(_slice_layers(x))
                if donate and isinstance(x, jax.Array):
                    x.delete()
            for j, i in enumerate(layers):
                out[f"layer_{i}"] = jax.tree.unflatten(treedef, [parts[j] for parts in per_leaf])
    return config.replace(scan_layers=False), out


# None: decide by size (see _spare_row); True/False force it (benchmarks, tests).
SPARE_ROW = None


def _spare_row(config, params, cache_length) -> bool:
    """Whether one prompt decodes on CPU with a spare, empty cache row.

    At batch 1 XLA:CPU copies each layer's cache about four times per decode step (the
    degenerate batch axis defeats its in-place update); with two rows it updates in place but
    runs the layer matmuls through a 2-row kernel that reads weights about half as fast. The
    spare row pays once the cache traffic (8 passes) outweighs the layer weights.
    """
    if SPARE_ROW is not None:
        return SPARE_ROW
    # Per layer with a cache of its own (Gemma 4's KV-shared layers have none): its slots times the
    # kv heads and head dim of its type.
    values = sum((min(config.sliding_window, cache_length) if kind == "local" else cache_length)
                 * config.kv_heads_of(kind) * config.head_dim_of(kind)
                 for i, kind in enumerate(config.layer_types) if not config.kv_shared(i))
    cache_bytes = 2 * values * jnp.dtype(config.compute_dtype).itemsize
    layer_bytes = sum(x.nbytes for k, x in jax.tree_util.tree_leaves_with_path(params)
                      if "embedder" not in jax.tree_util.keystr(k))
    return 8 * cache_bytes > layer_bytes


def generate_ids(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
                 pad_id: int = 0, vocab_limit: int | None = None, cache_length: int | None = None,
                 return_logits: bool = False, check: Callable | None = None, check_every: int = 0,
                 mesh=None, rules=sharding.DEFAULT_RULES) -> Generation:
    """Samples continuations of token-id prompts (BOS included); the engine under `generate`.

    `max_new_tokens` may be one limit per prompt. `check(rows, done [B]) -> bool [B]`, if given,
    runs on the host every `check_every` steps with each row's tokens so far and may stop rows
    (stop strings, streaming). `cache_length` defaults to the longest prompt + its limit,
    rounded up to a bucket.
    """
    validate_sampling(temperature, top_k, top_p)
    config, params = decoding_layout(config, params)
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        return Generation([], [] if return_logits else None)
    limits = [max_new_tokens] * len(prompts) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts")
    for i, (p, n) in enumerate(zip(prompts, limits)):
        if not p:
            raise ValueError(f"prompt {i} is empty (it needs at least BOS)")
        if int(n) != n or n < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {n} for prompt {i}")
        if cache_length is not None and len(p) + n > cache_length:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={n} it needs "
                             f"{len(p) + n} cache slots but the cache holds {cache_length}")
        if len(p) + n > config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={n} it would reach "
                             f"{len(p) + n} tokens, past the model's max_seq_len {config.max_seq_len}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    # Batch rows are bucketed too (and divisible by the batch's mesh axes); spare rows are empty.
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in _batch_axes(rules)]))
    b = rows = -(-bucket(len(prompts), 1) // shards) * shards
    t = bucket(lengths.max(), MIN_PROMPT_BUCKET)
    total = int(max(lengths + np.array(limits)))
    cache_length = cache_length or min(max(bucket(total, MIN_CACHE_BUCKET), t), config.max_seq_len)
    if b == 1 and _on_cpu(params) and _spare_row(config, params, cache_length):
        b = 2  # only `rows` rows are prefilled and projected to logits
    num_steps = bucket(max(limits), MIN_STEPS_BUCKET)
    tokens = np.full((b, t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.pad(lengths, (0, b - len(prompts)))
    limits = np.pad(np.array(limits, np.int32), (0, b - len(prompts)), constant_values=1)
    sampler = Sampler(greedy=temperature == 0, top_k=0 if temperature == 0 else int(top_k),
                      top_p=temperature != 0 and top_p < 1,
                      vocab_limit=min(vocab_limit or config.vocab_size, config.vocab_size))
    # Padded to a fixed size so a new stop list does not recompile (-1 matches no token).
    stop = np.full(bucket(len(stop_ids), 4), -1, np.int32)
    stop[:len(stop_ids)] = list(stop_ids)
    dyn = (jnp.asarray(stop), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jax.random.key(seed))
    with sharding.mesh_context(mesh, rules):
        state = _prefill(config, params, tokens, lengths, limits, *dyn, pad_id, cache_length=cache_length,
                         num_steps=num_steps, sampler=sampler, return_logits=return_logits, rows=rows)
        step = 1
        while True:
            if check is not None:
                done = np.asarray(state["done"])[:len(prompts)]
                counts = np.asarray(state["count"])[:len(prompts)]
                host_tokens = np.asarray(state["tokens"])[:len(prompts)]
                stop_rows = np.asarray(check([r[:n] for r, n in zip(host_tokens, counts)], done), bool)
                if (stop_rows & ~done).any():
                    state["done"] = state["done"] | jnp.pad(jnp.asarray(stop_rows), (0, b - len(prompts)))
            if step >= num_steps or bool(jnp.all(state["done"])):
                break
            until = min(step + check_every, num_steps) if check is not None and check_every else num_steps
            state = _decode(config, params, state, until, *dyn, sampler=sampler, rows=rows)
            step = int(state["step"])
    counts = np.asarray(state["count"])[:len(prompts)]
    out_tokens = np.asarray(state["tokens"])[:len(prompts)]
    logits = [np.asarray(state["logits"][i, :n]) for i, n in enumerate(counts)] if return_logits else None
    return Generation([[int(x) for x in row[:n]] for row, n in zip(out_tokens, counts)], logits)


def _batch_axes(rules) -> tuple[str, ...]:
    axes = dict(rules).get("batch")
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


# ----------------------------------------------------------------------------- text level


def encode_prompt(tokenizer, prompt, *, chat: bool) -> list[int]:
    """Prompt ids: BOS + raw text, or the Gemma turn format ending with the model's turn header.

    A prompt that is a list of {"role", "content"} messages is always a chat.
    """
    if isinstance(prompt, str) and not chat:
        return [tokenizer.bos_id] + tokenizer.encode(prompt, add_bos=False)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not (isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt)):
        raise ValueError(f"a prompt is a string or a list of {{'role', 'content'}} messages, got {prompt!r}")
    ids, _ = tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
    return [int(i) for i in ids]


class _TextTracker:
    """Decodes one row incrementally: cuts at stop strings and streams only settled text."""

    def __init__(self, tokenizer, stop_ids, stop_strings, emit=None):
        self.tokenizer, self.stop_ids, self.stop_strings, self.emit = tokenizer, set(stop_ids), stop_strings, emit
        # Text that could still grow into a stop string is held back from the stream.
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1
        self.text, self.sent, self.final = "", 0, False
        self.prefix_ids, self.prefix_text = 0, ""  # decoded once, so long streams stay linear

    def update(self, ids, done: bool) -> bool:
        """Takes the row's ids so far; returns True once the row is finished (stop string included)."""
        if self.final:
            return True
        ids = list(ids)
        for j, tok in enumerate(ids):
            if tok in self.stop_ids:
                ids, done = ids[:j], True
                break
        tail = self.tokenizer.decode(ids[self.prefix_ids:])
        text = self.prefix_text + tail
        if len(ids) - self.prefix_ids > 64 and not tail.endswith("\ufffd"):
            # A tail ending on a whole character decodes the same alone as after its prefix.
            self.prefix_ids, self.prefix_text = len(ids), text
        hit = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hit:
            text, done = text[:min(hit)], True
        self.text, self.final = text, done
        # Held back: a possible stop-string start, and a trailing half character (byte fallback).
        settled = text if done else text[:len(text) - self.holdback].rstrip("\ufffd")
        if self.emit is not None and len(settled) > self.sent:
            self.emit(settled[self.sent:])
            self.sent = len(settled)
        return done


def generate(config: ModelConfig, params, tokenizer, prompts, *, max_new_tokens: int | None = None,
             max_length: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, chat: bool = False, stop: Sequence[str] | str = (), stop_ids: Sequence[int] = (),
             stream: Callable[[int, str], None] | None = None, mesh=None,
             rules=sharding.DEFAULT_RULES) -> list[str]:
    """Generated continuations (text only, without the stop token or stop string) of each prompt.

    `chat=False` feeds each prompt as raw text after BOS; `chat=True` wraps it in the Gemma turn
    format with the model's turn opened (a list of messages is always a chat). Temperature 0 is
    greedy; otherwise temperature -> top_k -> top_p, reproducible by `seed`. `max_length` counts
    prompt + output tokens per prompt (BOS included), as in HF; `max_new_tokens` only the output
    (default 256). Rows stop at EOS, <end_of_turn>, `stop_ids` or a `stop` string. `stream(i, text)`
    receives each new piece of row i's text as soon as it is settled.
    """
    single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                          and all(isinstance(m, Mapping) for m in prompts))
    prompts = [prompts] if single else list(prompts)
    validate_sampling(temperature, top_k, top_p)
    ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    if max_new_tokens is not None and max_length is not None:
        raise ValueError("pass max_new_tokens (output only) or max_length (prompt + output), not both")
    if max_length is not None:
        too_long = [i for i, p in enumerate(ids) if len(p) >= max_length]
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {i} is already {len(ids[i])} tokens, not shorter than max_length="
                             f"{max_length} (which counts prompt + output)")
        limits = [max_length - len(p) for p in ids]
    else:
        limits = [DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens] * len(ids)
    stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    all_stop_ids = [tokenizer.eos_id, tokenizer.end_of_turn_id, *stop_ids]
    trackers = [_TextTracker(tokenizer, all_stop_ids, stop,
                             None if stream is None else functools.partial(stream, i)) for i in range(len(ids))]

    def check(tokens, done):
        return np.array([trackers[i].update(tokens[i], bool(done[i])) for i in range(len(ids))])

    host = bool(stop) or stream is not None
    out = generate_ids(config, params, ids, max_new_tokens=limits, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop_ids=all_stop_ids, pad_id=tokenizer.pad_id,
                       vocab_limit=tokenizer.vocab_size, check=check if host else None,
                       check_every=1 if stream is not None else STOP_CHECK_EVERY, mesh=mesh, rules=rules)
    for i, row in enumerate(out.tokens):
        trackers[i].update(row, True)
    return [t.text for t in trackers]


# ----------------------------------------------------------------------------- command line


def _chat_loop(run, read=None, out=None):
    """Multi-turn chat on stdin: the history is re-sent in the turn format each time."""
    read, out = read or sys.stdin, out or sys.stdout
    history = []
    interactive = read.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = read.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = run(history)
        out.write("\n")
        out.flush()
        history.append({"role": "model", "content": reply})


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.sample`."""
    flags.DEFINE_string("checkpoint", None, "any directory gemma_jax.load reads (a workdir too)", flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "tokenizer.model; default: found beside the checkpoint", flag_values=fv)
    flags.DEFINE_string("prompt", None, "the prompt; with --chat and no prompt, chat on stdin", flag_values=fv)
    flags.DEFINE_bool("chat", False, "Gemma turn format (instruction-tuned models); without --prompt a multi-turn "
                      "chat on stdin (/reset starts over, /exit or end of input quits)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", None, f"generated tokens (default: {DEFAULT_MAX_NEW_TOKENS}, "
                         "or what --max_length leaves)", flag_values=fv)
    flags.DEFINE_integer("max_length", None, "prompt + output tokens", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 is greedy", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: all)", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1: off)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    flags.DEFINE_multi_string("stop", [], "stop string (repeatable)", flag_values=fv)
    flags.DEFINE_string("dtype", None, "parameter dtype to load as (float32, bfloat16)", flag_values=fv)
    flags.DEFINE_string("mesh", "auto", "auto, none, or DATA,FSDP,TENSOR axis sizes", flag_values=fv)
    cli.require(fv, "checkpoint")


def _main(fv, args) -> int:
    """Stream a continuation (raw, base models) or chat (--chat) with any checkpoint."""
    cli.no_positional(args)
    if fv.prompt is None and not fv.chat:
        raise UserError("--prompt is required (or --chat for an interactive conversation)")
    validate_sampling(fv.temperature, fv.top_k, fv.top_p)
    if not paths.exists(fv.checkpoint):
        raise FileNotFoundError(f"--checkpoint={fv.checkpoint}: no such checkpoint (a directory gemma_jax.load "
                                "reads: Hugging Face, official, KerasHub, gemma_jax or a training workdir)")
    tok_path = fv.tokenizer or weights.find_tokenizer(fv.checkpoint)
    if not tok_path:
        raise UserError(f"no tokenizer.model in or beside {fv.checkpoint}; pass --tokenizer=PATH")
    tokenizer = Tokenizer(tok_path)
    mesh = sharding.parse_mesh(fv.mesh)
    config, params = decoding_layout(*weights.load(fv.checkpoint, dtype=fv.dtype, mesh=mesh), donate=True)

    def run(prompt):
        def emit(_, text):
            sys.stdout.write(text)
            sys.stdout.flush()
        texts = generate(config, params, tokenizer, [prompt], max_new_tokens=fv.max_new_tokens,
                         max_length=fv.max_length, temperature=fv.temperature, top_k=fv.top_k,
                         top_p=fv.top_p, seed=fv.seed, chat=fv.chat, stop=fv.stop, stream=emit,
                         mesh=mesh)
        return texts[0]

    if fv.prompt is not None:
        run(fv.prompt)
        sys.stdout.write("\n")
    else:
        if sys.stdin.isatty():
            print("chat: type a message and Enter; /reset starts a new conversation, /exit (or Ctrl-D) quits",
                  file=sys.stderr, flush=True)
        _chat_loop(run)
    return 0


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.sample` (argv None), or its flags as a list in-process."""
    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.sample")


if __name__ == "__main__":
    sys.exit(main())
