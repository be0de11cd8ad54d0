"""lm-evaluation-harness backend: any checkpoint gemma_jax.load reads, scored on the mesh.

`GemmaJaxLM` (registered with lm_eval as "gemma_jax") implements the three request types the
harness sends. Tokenisation, truncation, rolling windows and stop handling follow lm_eval's own
`hf` backend, so scores are comparable with it:

  loglikelihood          requests sharing a context (a question's choices) scored as one tree:
                         the context once, each continuation a branch that sees it (model
                         branch_BT masks); trees packed into rows of PACK_LEN tokens, one
                         compiled forward per row length; float32 log-softmax over the
                         tokenizer's vocabulary, [tokens, vocab] logits one chunk at a time;
                         exact continuation log-probs and greedy flags;
  loglikelihood_rolling  documents cut into windows of the model's length (lm_eval's windows),
                         scored as loglikelihood requests;
  generate_until         the KV-cache sampler (gemma_jax.sample.generate_ids): `until` stop
                         strings, max_gen_toks, temperature / top_k / top_p, greedy by default.

`run_harness` / `harness_scores` run tasks on params already in memory (gemma_jax.evaluate).
lm_eval is an optional dependency (the `harness` extra); only this module imports it.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax import sample, sharding, weights
from gemma_jax.errors import UserError
from gemma_jax.eval.task_files import check_limit, check_tasks, local_tasks  # noqa: F401  (check_limit: the CLI's)
from gemma_jax.model import layers as M
from gemma_jax.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # an optional extra: say how to get it
    raise UserError("the lm-evaluation-harness backend needs lm_eval: pip install 'gemma_jax[harness]' "
                    f"(or pip install 'lm-eval>=0.4'); import failed: {exc}") from None

HARNESS_NAME = "gemma_jax"
CHUNK = 1024  # tokens of [tokens, vocab] logits at a time, as the eval loss does
PACK_LEN = 256  # rows that hold several shared-prefix trees (attention grows with the row, MLP does not)
PACK_LIMIT = 1024  # longer requests are scored one per row
BOS = "<bos>"
# Gemma 2's chat format as a Jinja template (for lm_eval's logs and request-cache keys); a system
# message is folded into the first user turn, as everywhere in gemma_jax.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\n\n' %}"
    "{% else %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if loop.index0 == 1 and ns.system else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@functools.lru_cache(maxsize=16)
def _score_fn(config, vocab_limit: int, mesh, rules):
    """Jitted (target log-probs [B, T], target is the argmax [B, T]) of a padded token batch (or of
    packed shared-prefix rows: positions, segment ids and branch ids given)."""

    def score(params, tokens_BT, targets_BT, positions_BT=None, segment_ids_BT=None, branch_BT=None):
        hidden_BTD = M.Transformer(config).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT,
                                                 return_hidden=True, branch_BT=branch_BT)
        table_VD = params["embedder"]["input_embedding"]
        b, t, d = hidden_BTD.shape
        x_ND, y_N = hidden_BTD.reshape(-1, d), targets_BT.reshape(-1)
        n = x_ND.shape[0]
        chunk = min(CHUNK, n)
        pad = -n % chunk
        x_ND, y_N = jnp.pad(x_ND, ((0, pad), (0, 0))), jnp.pad(y_N, (0, pad))

        def one(_, xs):
            x_CD, y_C = xs
            logits_CV = M.final_logits(config, x_CD[None], table_VD)[0].astype(jnp.float32)
            # Padding rows of the embedding (256128 vs 256000) are no tokens: the HF export drops them.
            if vocab_limit < logits_CV.shape[-1]:
                logits_CV = jnp.where(jnp.arange(logits_CV.shape[-1]) < vocab_limit, logits_CV, -jnp.inf)
            logp_CV = jax.nn.log_softmax(logits_CV, axis=-1)
            logp_C = jnp.take_along_axis(logp_CV, y_C[:, None], axis=-1)[:, 0]
            return None, (logp_C, jnp.argmax(logp_CV, axis=-1) == y_C)

        _, (logp, greedy) = jax.lax.scan(one, None, (x_ND.reshape(-1, chunk, d), y_N.reshape(-1, chunk)))
        return logp.reshape(-1)[:n].reshape(b, t), greedy.reshape(-1)[:n].reshape(b, t)

    if mesh is None:
        return jax.jit(score)
    # Replicated outputs are addressable on every process (multi-host meshes).
    rep = sharding.replicated(mesh)
    return jax.jit(score, out_shardings=(rep, rep))


def _trees(trees, limit: int):
    """{context: [(request, continuation)]} -> [(context, [(request, continuation)])] trees of at
    most `limit` tokens (a context with many long continuations becomes several trees)."""
    out = []
    for ctx, reqs in trees.items():
        ctx, branches = list(ctx), []
        for i, cont in reqs:
            if branches and _tree_len((ctx, branches)) + len(cont) > limit:
                out.append((ctx, branches))
                branches = []
            branches.append((i, cont))
        out.append((ctx, branches))
    return out


def _tree_len(tree) -> int:
    ctx, branches = tree
    return len(ctx) - 1 + sum(len(cont) for _, cont in branches)


def _pack_trees(trees, t: int, window: int = 128):
    """Trees -> rows of at most t tokens: longest first, each into the first of the last `window`
    rows with room (as data packing does), else a new row."""
    rows, room = [], []
    for tree in sorted(trees, key=_tree_len, reverse=True):
        n = _tree_len(tree)
        lo = max(0, len(rows) - window)
        k = next((j for j in range(lo, len(rows)) if room[j] >= n), None)
        if k is None:
            rows.append([])
            room.append(t)
            k = len(rows) - 1
        rows[k].append(tree)
        room[k] -= n
    return rows


def score_bucket(n: int) -> int:
    """Compiled lengths of scoring batches: multiples of 32 to 256, of 128 to 1024, then the
    sampler's. Finer than powers of two (which pad a 70-token request to 128): scoring is
    compute-bound, so padding is time, while each extra length costs one compile."""
    n = max(int(n), 1)
    if n <= 256:
        return -(-n // 32) * 32
    if n <= 1024:
        return -(-n // 128) * 128
    return sample.bucket(n)


@register_model(HARNESS_NAME)
class GemmaJaxLM(TemplateLM):
    """lm_eval model backed by gemma_jax: `pretrained` is any checkpoint gemma_jax.load reads."""

    def __init__(self, pretrained: str | None = None, *, config=None, params=None, tokenizer=None,
                 mesh="auto", rules=sharding.DEFAULT_RULES, dtype: str | None = None, lora_base: str | None = None,
                 batch_size: int | str = 32, max_batch_tokens: int = 32768, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0, **unused):
        super().__init__()
        if isinstance(mesh, str):
            mesh = sharding.parse_mesh(mesh)
        self.mesh, self.rules = mesh, rules
        if params is None:
            if not pretrained:
                raise UserError("gemma_jax harness model: pass pretrained=CHECKPOINT (or config, params, tokenizer)")
            config, params = weights.load(pretrained, dtype=dtype, mesh=mesh, rules=rules, lora_base=lora_base)
            owned = True
        else:
            owned = False
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            path = tokenizer or (weights.find_tokenizer(pretrained) if pretrained else None)
            if not path:
                raise UserError(f"no tokenizer.model in or beside {pretrained}; pass tokenizer=PATH")
            tokenizer = Tokenizer(path)
        self.tokenizer = tokenizer
        # One layout for scoring and decoding (on CPU: layers unrolled, see sample.decoding_layout).
        self.config, self.params = sample.decoding_layout(config, params, donate=owned)
        self.pretrained = pretrained or ""
        self.vocab_limit = min(self.config.vocab_size, tokenizer.vocab_size)
        self.batch_rows = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self._max_length = int(max_length) if max_length else int(self.config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        # Decoded text drops what HF's skip_special_tokens drops for Gemma.
        self._special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id,
                         tokenizer.start_of_turn_id, tokenizer.end_of_turn_id}
        if unused:
            ignored = {k: v for k, v in unused.items() if v is not None and k not in ("device", "max_batch_size")}
            if ignored:
                raise UserError(f"gemma_jax harness model: unknown arguments {sorted(ignored)}")

    # ------------------------------------------------------------------ lm_eval's model interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja form of the Gemma turn format that apply_chat_template writes."""
        start, end = getattr(self.tokenizer, "turn_markers", (START_OF_TURN, END_OF_TURN))  # Gemma 4: <|turn>, <turn|>
        return CHAT_TEMPLATE.replace(START_OF_TURN, start).replace(END_OF_TURN, end) if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """Messages -> Gemma turn text (contents trimmed, as Gemma's HF template does); without
        add_generation_prompt a final model message stays open (HF's continue_final_message)."""
        turns = [dict(m, content=m["content"].strip()) for m in chat_history]
        if not add_generation_prompt and turns and turns[-1]["role"] in ("assistant", "model"):
            text = self.tokenizer.format_chat(turns)
            end = getattr(self.tokenizer, "turn_markers", (START_OF_TURN, END_OF_TURN))[1]
            return text[:-len(end + "\n")]
        return self.tokenizer.format_chat(turns, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids as lm_eval's hf backend gets them: BOS first unless told not to or already there."""
        if string.startswith(BOS):  # SentencePiece does not parse control pieces from text
            return [self.tokenizer.bos_id] + self.tokenizer.encode(string[len(BOS):], add_bos=False)
        add = True if add_special_tokens is None else bool(add_special_tokens)
        return self.tokenizer.encode(string, add_bos=add)

    def get_model_info(self) -> dict:
        """Recorded in the results JSON's config."""
        return dict(model_num_parameters=int(sum(x.size for x in jax.tree.leaves(self.params))),
                    model_dtype=str(self.config.param_dtype), checkpoint=self.pretrained)

    # ------------------------------------------------------------------ scoring

    def _put(self, x):
        if self.mesh is None:
            return x
        sh = sharding.batch_sharding(self.mesh, self.rules)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    def _rows_for(self, t: int, n: int) -> int:
        """Rows of every batch of one length bucket: token budget, row cap, the rows there are (in
        multiples of 8: padding rows cost as much as real ones), mesh shards."""
        shards = 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in sample._batch_axes(self.rules)]))
        rows = max(1, min(self.batch_rows, self.max_batch_tokens // t, -(-n // 8) * 8))
        return -(-rows // shards) * shards

    def score_tokens(self, pairs):
        """(sum of continuation log-probs, all greedy) for (context ids, continuation ids) pairs.

        Requests that share a context (the choices of a multiple-choice question) are scored as
        one tree: the context once (the trunk), each continuation as a branch that sees the trunk
        and itself, with the positions it has in its own sequence, so every log-prob is the one
        of the request alone. Trees are packed into rows of PACK_LEN tokens (longer ones into
        rows of their own bucket), so rows are not mostly padding. Requests longer than
        PACK_LIMIT are scored one per row.
        """
        out = [None] * len(pairs)
        limit = PACK_LIMIT
        trees, plain = defaultdict(list), []
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation tokens")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n_cont = len(cont)
            if n_cont >= len(whole) or len(whole) - 1 > limit:
                plain.append((i, whole, n_cont))
            else:
                trees[tuple(whole[:-n_cont])].append((i, whole[-n_cont:]))
        fn = _score_fn(self.config, self.vocab_limit, self.mesh, self.rules)
        with sharding.mesh_context(self.mesh, self.rules):
            self._score_trees(fn, _trees(trees, limit), out)
            self._score_plain(fn, plain, out)
        return out

    def _score_trees(self, fn, groups, out):
        by_len = defaultdict(list)  # row length -> groups
        for g in groups:
            n = _tree_len(g)
            by_len[max(PACK_LEN, score_bucket(n))].append(g)
        for t, gs in sorted(by_len.items()):
            rows = _pack_trees(gs, t)
            per_batch = self._rows_for(t, len(rows))
            for start in range(0, len(rows), per_batch):
                batch = rows[start:start + per_batch]
                arrays = np.zeros((5, per_batch, t), np.int32)  # tokens, targets, positions, segments, branches
                arrays[0] = self.tokenizer.pad_id
                spans = []  # (request, row, first, end) of each continuation's targets
                for r, row in enumerate(batch):
                    o = 0
                    for seg, (ctx, branches) in enumerate(row, 1):
                        trunk = ctx[:-1]
                        arrays[0, r, o:o + len(trunk)] = trunk
                        arrays[2, r, o:o + len(trunk)] = np.arange(len(trunk))
                        arrays[3, r, o:o + len(trunk)] = seg
                        o += len(trunk)
                        for b, (i, cont) in enumerate(branches, 1):
                            n = len(cont)  # inputs: the context's last token, then cont[:-1]
                            arrays[0, r, o:o + n] = [ctx[-1], *cont[:-1]]
                            arrays[1, r, o:o + n] = cont
                            arrays[2, r, o:o + n] = len(trunk) + np.arange(n)
                            arrays[3, r, o:o + n] = seg
                            arrays[4, r, o:o + n] = b
                            spans.append((i, r, o, o + n))
                            o += n
                logp, greedy = jax.device_get(fn(self.params, *(self._put(a) for a in arrays)))
                for i, r, a, b in spans:
                    out[i] = (float(np.sum(logp[r, a:b], dtype=np.float64)), bool(np.all(greedy[r, a:b])))

    def _score_plain(self, fn, items, out):
        """One request per row, rows of a length bucket batched (long requests)."""
        by_bucket = defaultdict(list)
        for it in items:
            by_bucket[score_bucket(len(it[1]) - 1)].append(it)
        for t, group in sorted(by_bucket.items()):
            group.sort(key=lambda it: -len(it[1]))
            rows = self._rows_for(t, len(group))
            for start in range(0, len(group), rows):
                batch = group[start:start + rows]
                tokens = np.full((rows, t), self.tokenizer.pad_id, np.int32)
                targets = np.zeros((rows, t), np.int32)
                for r, (_, whole, _) in enumerate(batch):
                    tokens[r, :len(whole) - 1] = whole[:-1]
                    targets[r, :len(whole) - 1] = whole[1:]
                logp, greedy = jax.device_get(fn(self.params, self._put(tokens), self._put(targets)))
                for r, (i, whole, n_cont) in enumerate(batch):
                    end = len(whole) - 1
                    out[i] = (float(np.sum(logp[r, end - n_cont:end], dtype=np.float64)),
                              bool(np.all(greedy[r, end - n_cont:end])))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods in windows of max_length (lm_eval's rolling windows)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.score_tokens(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _text(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self._special])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string, EOS / <end_of_turn> or max_gen_toks, batched per settings."""
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out = [None] * len(requests)
        eos = self.tokenizer.id_to_piece(self.eot_token_id)
        for n, indices in enumerate(groups.values()):
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
            if max_gen >= self.max_length:
                raise UserError(f"max_gen_toks={max_gen} must be below the model's max_length {self.max_length}")
            budget = self.max_length - max_gen
            prompts = {i: self.tok_encode(requests[i].args[0])[-budget:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))

            def check(rows, done):
                return np.array([bool(d) or any(s in self._text(r) for s in until) for r, d in zip(rows, done)])

            for start in range(0, len(order), self.batch_rows):
                batch = order[start:start + self.batch_rows]
                gen = sample.generate_ids(
                    self.config, self.params, [prompts[i] for i in batch], max_new_tokens=max_gen,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=self.seed + 1000 * n + start,
                    stop_ids=[self.tokenizer.eos_id, self.tokenizer.end_of_turn_id], pad_id=self.tokenizer.pad_id,
                    vocab_limit=self.vocab_limit, check=check, check_every=sample.STOP_CHECK_EVERY,
                    mesh=self.mesh, rules=self.rules)
                for i, ids in zip(batch, gen.tokens):
                    text = postprocess_generated_text(self._text(ids), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


# ----------------------------------------------------------------------------- running tasks


@functools.lru_cache(maxsize=8)
def _manager(include_path: str | None):
    # Indexing lm_eval's thousands of task YAMLs takes ~10 s; evaluate asks for it up to three times.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_manager(tasks, include_path: str | None = None):
    """(task names, lm_eval TaskManager); raises UserError naming any task it does not know (and
    the task files under include_path that could not be read), checks as check_tasks first."""
    tasks = check_tasks(tasks, include_path)
    manager = _manager(None if include_path is None else str(include_path))
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in {include_path}" if include_path else " (pass --include_path for local task YAMLs)"
        unread = local_tasks(str(include_path))[1] if include_path else []
        also = ("; task files that could not be read: " + "; ".join(p for _, p in unread)) if unread else ""
        raise UserError(f"unknown lm_eval task(s) {missing}: not built into lm_eval {lm_eval.__version__}{where}"
                        f"{also}")
    return list(tasks), manager


def run_harness(lm: GemmaJaxLM, tasks, *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: float | None = None, apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                log_samples: bool = False, evaluation_tracker=None, model_args: dict | None = None,
                bootstrap_iters: int = 100000) -> dict:
    """lm_eval.simple_evaluate of `tasks` (names, or a comma-separated string) on `lm`: its results dict."""
    check_limit(limit)
    tasks, manager = task_manager(tasks, include_path)
    return lm_eval.simple_evaluate(
        model=lm, model_args=model_args or {"pretrained": lm.pretrained}, tasks=tasks, num_fewshot=num_fewshot,
        limit=limit, task_manager=manager, apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn, log_samples=log_samples, evaluation_tracker=evaluation_tracker,
        bootstrap_iters=bootstrap_iters)


def flat_scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval's results dict (filter "none" dropped, no stderr)."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "_stderr" in key or not isinstance(value, (int, float)) or key == "alias":
                continue
            name, _, filt = key.partition(",")
            row[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        out[task] = row
    return out


def harness_scores(config, params, tokenizer, tasks, *, include_path: str | None = None,
                   num_fewshot: int | None = None, limit: float | None = None, apply_chat_template: bool = False,
                   mesh=None, rules=sharding.DEFAULT_RULES, batch_size: int = 32, max_length: int | None = None,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm_eval tasks on params in memory (for gemma_jax.evaluate)."""
    lm = GemmaJaxLM(config=config, params=params, tokenizer=tokenizer, mesh=mesh, rules=rules,
                    batch_size=batch_size, max_length=max_length, seed=seed)
    results = run_harness(lm, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                          apply_chat_template=apply_chat_template, bootstrap_iters=0)
    return flat_scores(results)
