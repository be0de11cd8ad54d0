"""What fine-tuning changed in attention: per-head entropy, distance and base-vs-tuned divergence.

Both models read the same domain prompts. For every layer and query head, over the query
positions of every prompt (padding excluded) and only over the keys each query can see:

  entropy    -sum_s p log2 p, in bits: 0 is one key, log2(k) is spread evenly over k keys;
  distance   sum_s p (t - s), in tokens: how far back the head looks on average;
  js         Jensen-Shannon divergence between the base and the tuned distribution, in bits
             (0 = identical, 1 = disjoint supports), the measure of how much the head changed.

The model sows its attention probabilities ([B, K, G, T, S], float32, masked and soft-capped)
when applied with mutable=["intermediates"]; `layer_probs` puts them in layer order as
[L, B, N, T, S] with query head n = k * G + g. The command line is `gemma_jax.attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import sample, sharding
from gemma_jax.eval.report import code_fence
from gemma_jax.model import layers as model_lib
from gemma_jax.model.config import ModelConfig

# Architecture fields both models must share for their heads to be compared one to one.
_SHAPE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "sliding_window", "attention_pattern", "qk_norm")


# ----------------------------------------------------------------------------- probabilities


def _sown(node, *path):
    """The array sown at intermediates/<path>/attention_probs (sow stores a 1-tuple)."""
    for key in path:
        if key not in node:
            raise KeyError(f"no attention probabilities at intermediates/{'/'.join(path)}: "
                           "apply the model with mutable=['intermediates']")
        node = node[key]
    (probs,) = node["attn"]["attention_probs"]
    return probs


def _heads_last(probs_BKGTS):
    """[B, K, G, T, S] -> [B, N, T, S]; K is the major axis, so query head n = k * G + g."""
    b, k, g, t, s = probs_BKGTS.shape
    return probs_BKGTS.reshape(b, k * g, t, s)


def layer_probs(config: ModelConfig, intermediates) -> jax.Array:
    """Sown attention probabilities as [L, B, N, T, S], layers in model order.

    Scanned models keep one stack per position of the attention pattern's period (leading axis:
    the period), plus the layers after the last whole period as `layer_{i}`; unrolled ones keep
    one `layer_{i}` entry per layer.
    """
    tree = intermediates.get("intermediates", intermediates)
    layers: dict[int, jax.Array] = {}
    if config.scan_layers:
        for group, blocks in config.scanned_groups().items():
            for name, indices in blocks.items():
                if indices:
                    stacked_PBKGTS = _sown(tree, group, name)
                    layers.update({i: _heads_last(stacked_PBKGTS[j]) for j, i in enumerate(indices)})
    for i in config.unscanned_layers():
        layers[i] = _heads_last(_sown(tree, f"layer_{i}"))
    return jnp.stack([layers[i] for i in range(config.num_layers)])


def attention_probs(config: ModelConfig, params, tokens_BT, segment_ids_BT=None) -> jax.Array:
    """float32 attention probabilities [L, B, N, T, S] of the model on `tokens_BT`."""
    _, state = model_lib.Transformer(config).apply(
        {"params": params}, tokens_BT, None, segment_ids_BT, return_hidden=True, mutable=["intermediates"])
    return layer_probs(config, state)


# ----------------------------------------------------------------------------- per-head statistics


def _plogp(p):
    """p log2 p with 0 log 0 = 0, so masked keys (probability exactly 0) add nothing."""
    return jax.scipy.special.xlogy(p, p) / math.log(2.0)


def entropy(probs_LBNTS):
    """Entropy in bits of each query's distribution over keys: [L, B, N, T]."""
    return -jnp.sum(_plogp(probs_LBNTS), axis=-1)


def mean_distance(probs_LBNTS):
    """Expected query-minus-key offset in tokens of each query's distribution: [L, B, N, T].

    Row offsets equal position offsets inside a packed segment, since segments are contiguous.
    """
    t, s = probs_LBNTS.shape[-2:]
    offset_TS = (jnp.arange(t)[:, None] - jnp.arange(s)[None, :]).astype(jnp.float32)
    return jnp.sum(probs_LBNTS * offset_TS, axis=-1)


def js_divergence(p_LBNTS, q_LBNTS):
    """Jensen-Shannon divergence in bits between two models' distributions per query: [L, B, N, T].

    Bounded by 1 and defined even where one model gives a key zero weight, unlike KL.
    """
    m = 0.5 * (p_LBNTS + q_LBNTS)
    plogm = jax.scipy.special.xlogy(p_LBNTS, m) / math.log(2.0)
    qlogm = jax.scipy.special.xlogy(q_LBNTS, m) / math.log(2.0)
    js = 0.5 * jnp.sum(_plogp(p_LBNTS) - plogm + _plogp(q_LBNTS) - qlogm, axis=-1)
    return jnp.maximum(js, 0.0)  # rounding can leave -1e-9 where the two agree


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_sums(config: ModelConfig, base_params, tuned_params, tokens_BT, segment_ids_BT):
    """Per-head sums over this batch's real query positions: [L, N] each, plus the query count.

    Both models run in one program so only [L, N] numbers leave the device, never the
    [L, B, N, T, S] probabilities.
    """
    p = attention_probs(config, base_params, tokens_BT, segment_ids_BT)
    q = attention_probs(config, tuned_params, tokens_BT, segment_ids_BT)
    real_BT = (segment_ids_BT > 0).astype(jnp.float32)

    def total(x_LBNT):
        return jnp.einsum("LBNT,BT->LN", x_LBNT, real_BT)

    return dict(entropy_base=total(entropy(p)), entropy_tuned=total(entropy(q)),
                distance_base=total(mean_distance(p)), distance_tuned=total(mean_distance(q)),
                js=total(js_divergence(p, q)), queries=jnp.sum(real_BT))


def _rows(prompts, seq_len: int, pad_id: int):
    """Token-id prompts -> (tokens, segment ids) [n, T], cut to seq_len, T a multiple of 8."""
    if not prompts:
        raise ValueError("no prompts to analyse")
    t = min(seq_len, max(len(p) for p in prompts))
    t = -(-t // 8) * 8
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    segments = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[:t]
        tokens[i, :len(p)], segments[i, :len(p)] = p, 1
    return tokens, segments


def check_comparable(base: ModelConfig, tuned: ModelConfig) -> None:
    """Raises ValueError when the two models' heads cannot be paired up."""
    clash = [f"{f}: base {getattr(base, f)} vs tuned {getattr(tuned, f)}"
             for f in _SHAPE_FIELDS if getattr(base, f) != getattr(tuned, f)]
    if clash:
        raise ValueError("the base and tuned models differ in shape, so their heads cannot be "
                         "compared: " + "; ".join(clash))


def head_changes(config: ModelConfig, base_params, tuned_params, prompts, *, seq_len: int = 256,
                 batch_size: int = 4, pad_id: int = 0, mesh=None, rules=None) -> dict[str, np.ndarray]:
    """Mean per-head statistics of both models over the prompts (token-id lists): [L, N] arrays.

    Keys: entropy_base, entropy_tuned, distance_base, distance_tuned, js; `queries` is the count
    of query positions averaged over.
    """
    tokens, segments = _rows(prompts, seq_len, pad_id)
    pad = -len(tokens) % batch_size  # empty rows (segment 0) keep one compiled shape
    tokens = np.pad(tokens, ((0, pad), (0, 0)), constant_values=pad_id)
    segments = np.pad(segments, ((0, pad), (0, 0)))
    sums = None
    with sharding.mesh_context(mesh, rules or sharding.DEFAULT_RULES):
        for i in range(0, len(tokens), batch_size):
            out = jax.device_get(_batch_sums(config, base_params, tuned_params, tokens[i:i + batch_size],
                                             segments[i:i + batch_size]))
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
    queries = float(sums.pop("queries"))
    stats = {k: np.asarray(v, np.float64) / queries for k, v in sums.items()}
    stats["queries"] = queries
    return stats


def rank_heads(config: ModelConfig, stats: dict[str, np.ndarray]) -> list[dict]:
    """Every (layer, head), most changed (largest js) first, with its statistics."""
    js_LN = stats["js"]
    order = np.argsort(-js_LN, axis=None, kind="stable")
    ranked = []
    for flat in order:
        layer, head = (int(i) for i in np.unravel_index(flat, js_LN.shape))
        ranked.append(dict(
            layer=layer, head=head, kind="local" if config.is_local(layer) else "global",
            kv_head=head // config.num_groups, js=float(js_LN[layer, head]),
            entropy_base=float(stats["entropy_base"][layer, head]),
            entropy_tuned=float(stats["entropy_tuned"][layer, head]),
            distance_base=float(stats["distance_base"][layer, head]),
            distance_tuned=float(stats["distance_tuned"][layer, head])))
    return ranked


# ----------------------------------------------------------------------------- one sample prompt


_probs_jit = jax.jit(attention_probs, static_argnames=("config",))


def attended_tokens(config: ModelConfig, params, ids, heads, tokenizer, *, top: int = 5) -> list[list[dict]]:
    """For each (layer, head), the `top` tokens of prompt `ids` its last position attends to most.

    The last position of a prompt is where the answer's first token is predicted, so its
    attention is what the prompt feeds into the answer. (A mean over all query positions would
    mostly rank the earliest tokens first, since every later query can see them.)
    """
    tokens_1T = np.asarray([ids], np.int32)
    probs_LNTS = np.asarray(jax.device_get(_probs_jit(config, params, tokens_1T)))[:, 0]
    out = []
    for layer, head in heads:
        weight_S = probs_LNTS[layer, head, len(ids) - 1]
        best = np.argsort(-weight_S, kind="stable")[:top]
        out.append([dict(position=int(s), token=tokenizer.id_to_piece(int(ids[s])), weight=float(weight_S[s]))
                    for s in best])
    return out


# ----------------------------------------------------------------------------- outputs


def heatmap(stats: dict[str, np.ndarray], path: str, *, title: str = "", kinds: list[str] | None = None) -> str:
    """PNG of layers x heads: JS divergence, and tuned-minus-base entropy next to it.

    `kinds` ("local"/"global" per layer) label the rows, since the two kinds see different keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    js_LN = stats["js"]
    change_LN = stats["entropy_tuned"] - stats["entropy_base"]
    layers, heads = js_LN.shape
    width = min(2.0 + 0.45 * heads, 9.0)
    height = min(2.0 + 0.35 * layers, 12.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height), dpi=80)
    span = float(np.abs(change_LN).max()) or 1.0
    panels = ((js_LN, "JS divergence base vs tuned (bits)", "viridis", 0.0, max(float(js_LN.max()), 1e-9)),
              (change_LN, "entropy change tuned - base (bits)", "coolwarm", -span, span))
    for ax, (grid, name, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer (L local, G global)" if kinds else "layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers), [f"{i} {kinds[i][0].upper()}" if kinds else str(i) for i in range(layers)])
        ax.tick_params(labelsize=7)
        if layers * heads <= 128:  # numbers stay legible
            for (layer, head), v in np.ndenumerate(grid):
                dark = cmap == "viridis" and v < 0.6 * vmax
                ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, newlines shown as \\n, spaces visible."""
    return "`" + text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") + "`"


def write_markdown(report: dict, path: str, *, top: int = 10) -> str:
    """attention.md: the most changed heads and what the sample prompt's top heads attend to."""
    lines = ["# Attention changes: base vs tuned", "",
             f"Base `{report['base']}`, tuned `{report['tuned']}`, {report['prompts']} prompts from "
             f"`{report['data']}` ({int(report['queries'])} query positions).", "",
             "JS divergence and entropy in bits, distance in tokens; averaged over query positions.", "",
             "![attention heatmap](attention_heatmap.png)", "",
             f"## Top {min(top, len(report['ranked']))} changed heads", "",
             "| rank | layer | kind | head | JS | entropy base -> tuned | distance base -> tuned |",
             "|---:|---:|---|---:|---:|---|---|"]
    for i, h in enumerate(report["ranked"][:top], 1):
        lines.append(f"| {i} | {h['layer']} | {h['kind']} | {h['head']} | {h['js']:.4f} | "
                     f"{h['entropy_base']:.2f} -> {h['entropy_tuned']:.2f} | "
                     f"{h['distance_base']:.1f} -> {h['distance_tuned']:.1f} |")
    sample_ = report.get("sample")
    if sample_:
        fence = code_fence(sample_["text"])
        lines += ["", "## Sample prompt", "", fence, sample_["text"], fence, "",
                  "Tokens the last prompt position (which predicts the first answer token) attends to most, "
                  "before and after:", "",
                  "| layer | head | base | tuned |", "|---:|---:|---|---|"]
        for h in sample_["heads"]:
            fmt = lambda toks: ", ".join(f"{_cell(t['token'])}@{t['position']} {t['weight']:.2f}" for t in toks)  # noqa: E731
            lines.append(f"| {h['layer']} | {h['head']} | {fmt(h['base'])} | {fmt(h['tuned'])} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def prompt_ids(examples, tokenizer, *, with_response: bool = False) -> list[list[int]]:
    """Token ids of each example as the model sees it: the chat-formatted prompt up to the model's
    turn header (as at generation), or the whole training example with `with_response`."""
    out = []
    for ex in examples:
        if ex.text is not None:
            out.append([int(i) for i in tokenizer.encode_text(ex.text)[0]])
        elif with_response:
            out.append([int(i) for i in tokenizer.encode_chat(ex.turns)[0]])
        else:
            last_model = max(i for i, t in enumerate(ex.turns) if t["role"] == "model")
            out.append(sample.encode_prompt(tokenizer, ex.turns[:last_model], chat=True))
    return out


def compare(config: ModelConfig, base_params, tuned_params, tokenizer, prompts, *, seq_len: int = 256,
            batch_size: int = 4, top_heads: int = 10, sample_index: int = 0, mesh=None, rules=None) -> dict:
    """The whole analysis of token-id prompts: grids, ranked heads, and one sample prompt's tokens."""
    stats = head_changes(config, base_params, tuned_params, prompts, seq_len=seq_len, batch_size=batch_size,
                         pad_id=tokenizer.pad_id, mesh=mesh, rules=rules)
    ranked = rank_heads(config, stats)
    if not 0 <= sample_index < len(prompts):
        raise ValueError(f"sample_index={sample_index} but there are {len(prompts)} prompts")
    ids = list(prompts[sample_index])[:seq_len]
    heads = [(h["layer"], h["head"]) for h in ranked[:top_heads]]
    before = attended_tokens(config, base_params, ids, heads, tokenizer)
    after = attended_tokens(config, tuned_params, ids, heads, tokenizer)
    return dict(
        grids={k: np.round(v, 6).tolist() for k, v in stats.items() if k != "queries"},
        queries=stats["queries"], prompts=len(prompts), ranked=ranked,
        sample=dict(index=sample_index, text=tokenizer.decode(ids),
                    heads=[dict(layer=layer, head=head, base=b, tuned=a)
                           for (layer, head), b, a in zip(heads, before, after)]))
