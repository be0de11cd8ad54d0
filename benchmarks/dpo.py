"""DPO: loss parity with TRL's DPOTrainer on the same HF-exported model and batch, and step time vs SFT.

  python benchmarks/dpo.py [--pairs 4 --seq 256 --steps 3]

Parity: a random float32 Gemma 2 (and a perturbed copy as the reference) in transformers, loaded
into gemma_jax from its safetensors export; the same token pairs go through TRL's own
DPOTrainer._compute_loss (sigmoid, beta 0.1; then ipo) and through gemma_jax's objectives. Step
time: gemma_jax's full fine-tuning DPO step (policy forward + backward on 2 x pairs sequences,
plus the frozen reference's forward), the same with dpo.precompute_reference (no reference
forward) and its SFT step on the same 2 x pairs sequences, on the benchmark shape
(benchmarks/common.py); then TRL's DPOTrainer training step (its loss with the reference
forward, backward, AdamW) on the same shape in torch, and the ratio. Needs `pip install trl`.
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


def _trl_trainer(policy, ref, loss_type, beta, batch_size, d):
    """TRL's DPOTrainer over policy and ref (a throwaway dataset: the batches are given directly)."""
    import datasets
    import shutil
    import transformers
    from trl import DPOConfig, DPOTrainer

    shutil.copy(os.path.join(REPO, "data", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "GemmaTokenizer", "add_bos_token": true}')
    tok = transformers.AutoTokenizer.from_pretrained(d)
    args = DPOConfig(output_dir=d, beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
                     max_length=None, bf16=False, per_device_train_batch_size=batch_size)
    ds = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)


def _trl_inputs(seqs, comp):
    """TRL's collated form: chosen sequences then rejected ones, completion tokens marked."""
    import torch

    length = max(map(len, seqs))
    ids = np.zeros((len(seqs), length), np.int64)
    attn, cmask = np.zeros_like(ids), np.zeros_like(ids)
    for i, (s, n) in enumerate(zip(seqs, comp)):
        ids[i, :len(s)], attn[i, :len(s)], cmask[i, len(s) - n:len(s)] = s, 1, 1
    return {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=attn, completion_mask=cmask).items()}


def trl_loss(policy, ref, pairs, loss_type, beta=0.1):
    """TRL's DPO loss of the pairs (its trainer's own _compute_loss on a collated batch)."""
    import torch

    with tempfile.TemporaryDirectory() as d:
        trainer = _trl_trainer(policy, ref, loss_type, beta, len(pairs), d)
        seqs = [np.concatenate([p, c]) for p, c, _ in pairs] + [np.concatenate([p, r]) for p, _, r in pairs]
        comp = [len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs]
        trainer.model.eval()
        with torch.no_grad():
            return float(trainer._compute_loss(trainer.model, _trl_inputs(seqs, comp), False))


def trl_step_time(config, pairs, seq, steps):
    """Fastest of `steps` TRL DPO training steps (its loss with the reference forward, backward,
    AdamW step) on `pairs` pairs of seq tokens, the second half of each the response."""
    import time

    import torch

    torch.set_num_threads(os.cpu_count())
    policy, ref = common.hf_model(config, seed=0).float(), common.hf_model(config, seed=1).float()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, config.vocab_size, seq) for _ in range(2 * pairs)]
    inputs = _trl_inputs(seqs, [seq // 2] * (2 * pairs))
    with tempfile.TemporaryDirectory() as d:
        trainer = _trl_trainer(policy, ref, "sigmoid", 0.1, pairs, d)
        model = trainer.model
        model.train()
        opt = trainer.create_optimizer()
        times = []
        for i in range(steps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            loss = trainer._compute_loss(model, inputs, False)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:
                times.append(time.perf_counter() - t0)
    return min(times)


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


def step_times(pairs, seq, steps, with_trl=True):
    config = common.gemma_config(dtype="float32")
    out = {}
    for name, objective in (("sft", "sft"), ("dpo", "dpo"), ("dpo_pre", "dpo")):
        cfg = config_lib.base_config()
        cfg.train.objective = objective
        cfg.dpo.precompute_reference = name == "dpo_pre"
        cfg.dpo.sft_weight = 0.0  # plain DPO, as TRL's step below (loss_type ["sigmoid"])
        cfg.train.steps, cfg.train.batch_size = 1000, pairs * (2 if objective == "sft" else 1)
        cfg.opt.warmup_steps, cfg.mesh.fsdp = 0, 1
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        trainer = train.Trainer.create(cfg, config, mesh)
        trainer.set_reference(None)
        batch = common.batch_of(config, 2 * pairs, seq)
        if objective == "dpo":  # the same sequences as pairs, the second half of each in the loss
            batch = {k: v.reshape(pairs, 2, seq) for k, v in batch.items()}
            batch["loss_mask"][..., : seq // 2] = 0
            if name == "dpo_pre":  # the batch carries the reference sums (values do not change the cost)
                batch[objectives.REF_FIELD] = np.where(batch["positions"] == 0, -100.0, 0.0).astype(np.float32)
        out[name], _, _ = common.time_train_steps(trainer, trainer.init_state(), trainer.put_batch(batch), steps)
    print(f"step time on {common.machine()}, {common.BENCH['num_layers']} layers width {common.BENCH['embed_dim']} "
          f"vocab {common.BENCH['vocab_size']}, {2 * pairs} sequences x {seq} (float32, full fine-tuning):")
    print(f"  gemma_jax: SFT {out['sft'] * 1e3:.0f} ms  DPO {out['dpo'] * 1e3:.0f} ms (DPO/SFT {out['dpo'] / out['sft']:.2f}x)"
          f"  DPO with precompute_reference {out['dpo_pre'] * 1e3:.0f} ms ({out['dpo_pre'] / out['sft']:.2f}x)")
    if with_trl:
        t = trl_step_time(config, pairs, seq, steps)
        print(f"  TRL DPOTrainer (torch, same model and batch, live reference): {t * 1e3:.0f} ms"
              f"  -> gemma_jax DPO is {t / out['dpo']:.2f}x faster")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip_parity", action="store_true")
    ap.add_argument("--skip_trl_steps", action="store_true", help="time gemma_jax's steps only")
    args = ap.parse_args()
    if not args.skip_parity:
        parity()
    step_times(args.pairs, args.seq, args.steps, with_trl=not args.skip_trl_steps)


if __name__ == "__main__":
    main()
