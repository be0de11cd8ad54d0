"""lm-evaluation-harness on CPU: our backend (gemma_jax.eval.harness) vs lm_eval's own `hf` backend.

Same random model (exported to HF for the peer), same local tasks (a multiple-choice
loglikelihood task and a generation task with stop strings), one process; wall time inside each
backend's request methods (loglikelihood / generate_until: what a backend owns) and of the whole
simple_evaluate call (which adds lm_eval's fixed costs, e.g. ~0.3 s of environment logging),
and the ratios. The hf backend runs at its default batch size 1 (per-request
torch calls) and, with --hf_batch_size, batched. Our times include compilation (one program per
length bucket); warm times (a second run) are printed too.

  python benchmarks/harness.py [--questions 64] [--prompts 16] [--max_gen_toks 32] [--hf_batch_size 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main():
    """Prints the wall times and ratios."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max_gen_toks", type=int, default=32)
    ap.add_argument("--hf_batch_size", type=int, default=1)
    args = ap.parse_args()

    import jax
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import gemma_jax
    from gemma_jax.eval.harness import GemmaJaxLM
    from gemma_jax.model import ModelConfig
    from gemma_jax.tokenizer import Tokenizer
    import test_harness as th

    config = ModelConfig(num_layers=4, embed_dim=256, hidden_dim=1024, num_heads=4, num_kv_heads=2, head_dim=64,
                         query_pre_attn_scalar=64, vocab_size=2048, sliding_window=128, max_seq_len=1024)
    rng = np.random.default_rng(0)

    def one(path, s):
        std = 0.5 if "input_embedding" in jax.tree_util.keystr(path) else 0.05 if len(s.shape) > 1 else 0.1
        return rng.normal(0.0, std, s.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(one, gemma_jax.model.param_shapes(config))
    tok = Tokenizer(str(REPO / "data" / "tokenizer.model"))
    examples = [json.loads(line) for line in open(REPO / "data" / "legal" / "train.jsonl")]
    texts = [(e.get("input") or e.get("instruction") or "")[:300] for e in examples]
    root = Path(tempfile.mkdtemp())
    hf = root / "hf"
    gemma_jax.save(str(hf), config, params, format="hf", tokenizer=str(tok.path))
    tasks = root / "tasks"
    tasks.mkdir()
    with open(tasks / "mc.jsonl", "w") as f:
        for i in range(args.questions):
            t = texts[i % len(texts)]
            cut = len(t) // 2
            wrong = texts[(i + 7) % len(texts)][cut:cut + 60]
            f.write(json.dumps({"question": t[:cut], "choices": [t[cut:cut + 60], wrong, " none of these."],
                                "gold": 0}) + "\n")
    with open(tasks / "gen.jsonl", "w") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"prompt": texts[i % len(texts)][:120], "answer": "x"}) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (tasks / "mc.yaml").write_text(
        f"task: bench_mc\n{common}dataset_kwargs:\n  data_files:\n    train: {tasks / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        f"task: bench_gen\n{common}dataset_kwargs:\n  data_files:\n    train: {tasks / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: {args.max_gen_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    manager = TaskManager(include_path=str(tasks))

    spent = {}  # backend -> seconds inside its request methods (the part a backend owns)

    def clocked(lm):
        for name in ("loglikelihood", "generate_until"):
            def call(requests, *a, _f=getattr(lm, name), **k):
                t0 = time.perf_counter()
                try:
                    return _f(requests, *a, **k)
                finally:
                    spent[id(lm)] = spent.get(id(lm), 0.0) + time.perf_counter() - t0
            setattr(lm, name, call)
        return lm

    def timed(lm, task):
        """(whole simple_evaluate wall time, time in the backend's request methods, results)."""
        spent[id(lm)] = 0.0
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0,
                                      log_samples=True)
        return time.perf_counter() - t0, spent[id(lm)], out

    import torch
    torch.set_num_threads(os.cpu_count())
    peer = clocked(HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=args.hf_batch_size))
    ours = clocked(GemmaJaxLM(str(hf), mesh="none", batch_size=32))
    print(f"model: {config.num_layers} layers, width {config.embed_dim}, vocab {config.vocab_size}; "
          f"{os.cpu_count()} CPU cores; hf batch size {args.hf_batch_size}")
    for task, what in (("bench_mc", f"{3 * args.questions} loglikelihood requests"),
                       ("bench_gen", f"{args.prompts} generations of {args.max_gen_toks} tokens")):
        t_hf, b_hf, r_hf = timed(peer, task)
        t_cold, b_cold, r_ours = timed(ours, task)
        t_warm, b_warm, _ = timed(ours, task)
        same = ([s["resps"] for s in r_hf["samples"][task]] == [s["resps"] for s in r_ours["samples"][task]]
                if task == "bench_gen" else
                max(abs(a[0][0] - b[0][0]) for sa, sb in zip(r_hf["samples"][task], r_ours["samples"][task])
                    for a, b in zip(sa["resps"], sb["resps"])))
        print(f"{task} ({what}):\n"
              f"  requests: hf {b_hf:.2f} s | gemma_jax {b_cold:.2f} s with compilation, {b_warm:.2f} s warm | "
              f"ratio {b_hf / b_cold:.2f}x (warm {b_hf / b_warm:.2f}x)\n"
              f"  whole task (lm_eval's own overhead included): hf {t_hf:.2f} s | gemma_jax {t_cold:.2f} s, "
              f"{t_warm:.2f} s warm | ratio {t_hf / t_cold:.2f}x (warm {t_hf / t_warm:.2f}x)\n  "
              + (f"same texts: {same}" if task == "bench_gen" else f"max |logp diff| {same:.2e}"))


if __name__ == "__main__":
    main()
