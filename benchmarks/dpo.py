"""DPO: loss parity with TRL's DPOTrainer on the same HF-exported model and batch, and step time vs SFT.

  python benchmarks/dpo.py [--pairs 4 --seq 256 --steps 3]

Parity: a random float32 Gemma 2 (and a perturbed copy as the reference) in transformers, loaded
into gemma_jax from its safetensors export; the same token pairs go through TRL's own
DPOTrainer._compute_loss (sigmoid, beta 0.1; then ipo) and through gemma_jax's objectives. Step
time: gemma_jax's full fine-tuning DPO step (policy forward + backward on 2 x pairs sequences,
plus the frozen reference's forward) against its SFT step on the same 2 x pairs sequences, on the
benchmark shape (benchmarks/common.py).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from gemma_jax import config as config_lib, sharding, train  # noqa: E402
from gemma_jax.train import objectives  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_pairs(vocab, n, rng, prompt_len=12):
    """n pairs of token ids: (prompt, chosen, rejected), responses of 3-10 tokens."""
    return [(rng.integers(3, vocab, prompt_len), rng.integers(3, vocab, rng.integers(3, 11)),
             rng.integers(3, vocab, rng.integers(3, 11))) for _ in range(n)]


def trl_loss(policy, ref, pairs, loss_type, beta=0.1):
    """TRL's DPO loss of the pairs (its trainer's own _compute_loss on a collated batch)."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as d:
        import shutil
        shutil.copy(os.path.join(REPO, "data", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            f.write('{"tokenizer_class": "GemmaTokenizer", "add_bos_token": true}')
        tok = transformers.AutoTokenizer.from_pretrained(d)
        args = DPOConfig(output_dir=d, beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
                         max_length=None, bf16=False, per_device_train_batch_size=len(pairs))
        ds = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        seqs = [np.concatenate([p, c]) for p, c, _ in pairs] + [np.concatenate([p, r]) for p, _, r in pairs]
        comp = [len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs]
        length = max(map(len, seqs))
        ids = np.zeros((len(seqs), length), np.int64)
        attn, cmask = np.zeros_like(ids), np.zeros_like(ids)
        for i, (s, n) in enumerate(zip(seqs, comp)):
            ids[i, :len(s)], attn[i, :len(s)], cmask[i, len(s) - n:len(s)] = s, 1, 1
        inputs = {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=attn, completion_mask=cmask).items()}
        trainer.model.eval()
        with torch.no_grad():
            return float(trainer._compute_loss(trainer.model, inputs, False))


def our_loss(config, params, ref_params, pairs, loss_type, beta=0.1):
    """gemma_jax's DPO loss of the same pairs (one pair per row)."""
    t = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) - 1
    rows = {k: np.zeros((len(pairs), 2, t), np.float32 if k == "loss_mask" else np.int32)
            for k in objectives.ROW_FIELDS}
    for i, (p, c, r) in enumerate(pairs):
        for s, resp in enumerate((c, r)):
            ids = np.concatenate([p, resp])
            n = len(ids) - 1
            rows["inputs"][i, s, :n], rows["targets"][i, s, :n] = ids[:-1], ids[1:]
            rows["loss_mask"][i, s, len(p) - 1:n] = 1
            rows["segment_ids"][i, s, :n], rows["positions"][i, s, :n] = 1, np.arange(n)
    obj = objectives.Objective("dpo", beta, loss_type)
    flat = {k: jnp.asarray(v) for k, v in objectives.pair_rows(rows).items()}
    ref = objectives.reference_logps(flat, None, ref_params, config=config, chunk=256)
    s = objectives.pair_scores(params, flat, ref, obj=obj, config=config, chunk=256)
    return float(objectives.step_loss(s, s["pairs"], s["chosen_tokens"]))


def parity():
    import torch

    config = common.gemma_config(num_layers=2, embed_dim=128, hidden_dim=256, num_heads=4, num_kv_heads=2,
                                 head_dim=32, query_pre_attn_scalar=32, sliding_window=8, dtype="float32")
    policy = common.hf_model(config, seed=0).float()
    ref = common.hf_model(config, seed=0).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params, ref_params = common.params_from_hf(config, policy), common.params_from_hf(config, ref)
    pairs = random_pairs(config.vocab_size, 6, np.random.default_rng(0))
    print("parity with TRL DPOTrainer (float32, 6 pairs, reference = perturbed copy):")
    for loss_type in ("sigmoid", "ipo"):
        a, b = our_loss(config, params, ref_params, pairs, loss_type), trl_loss(policy, ref, pairs, loss_type)
        print(f"  {loss_type:8s} gemma_jax {a:.6f}  trl {b:.6f}  |diff| {abs(a - b):.2e}")


def step_times(pairs, seq, steps):
    config = common.gemma_config(dtype="float32")
    out = {}
    for objective in ("sft", "dpo"):
        cfg = config_lib.base_config()
        cfg.train.objective = objective
        cfg.train.steps, cfg.train.batch_size = 1000, pairs * (2 if objective == "sft" else 1)
        cfg.opt.warmup_steps, cfg.mesh.fsdp = 0, 1
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        trainer = train.Trainer.create(cfg, config, mesh)
        trainer.set_reference(None)
        batch = common.batch_of(config, 2 * pairs, seq)
        if objective == "dpo":  # the same sequences as pairs, the second half of each in the loss
            batch = {k: v.reshape(pairs, 2, seq) for k, v in batch.items()}
            batch["loss_mask"][..., : seq // 2] = 0
        out[objective], _, _ = common.time_train_steps(trainer, trainer.init_state(), trainer.put_batch(batch), steps)
    print(f"step time on {common.machine()}, {common.BENCH['num_layers']} layers width {common.BENCH['embed_dim']} "
          f"vocab {common.BENCH['vocab_size']}, {2 * pairs} sequences x {seq} (float32, full fine-tuning):")
    print(f"  SFT {out['sft'] * 1e3:.0f} ms  DPO {out['dpo'] * 1e3:.0f} ms  DPO/SFT {out['dpo'] / out['sft']:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip_parity", action="store_true")
    args = ap.parse_args()
    if not args.skip_parity:
        parity()
    step_times(args.pairs, args.seq, args.steps)


if __name__ == "__main__":
    main()
