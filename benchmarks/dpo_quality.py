"""DPO quality: does preference tuning keep the model? gemma_jax against TRL's DPOTrainer.

  python -m gemma_jax.train --config=configs/legal.py:tiny --workdir=/tmp/legal_tiny   # the SFT start
  python benchmarks/dpo_quality.py --sft=/tmp/legal_tiny [--pairs=shipped|legal|dates] [--sft_weights=0,1]

Both trainers start from the same SFT checkpoint (gemma_jax reads the workdir, TRL its HF export
in `export/`), train on the same token pairs (gemma_jax's chat encoding, handed to TRL already
tokenised) with the same beta, learning rate and schedule (linear warmup, cosine to 0.1x),
AdamW settings, steps and pairs per step (one pair per row: packing off), full fine-tuning or
LoRA of the same rank on the same projections; TRL with loss_type ["sigmoid"] or, for an NLL
weight w > 0, ["sigmoid", "sft"] with loss_weights [1, w] (gemma_jax: dpo.sft_weight=w). Every
model, the SFT start included, is then measured by the same gemma_jax code:

  rouge_l       ROUGE-L of greedy answers on the legal task (data/legal/eval.jsonl, 40 prompts)
  stop          share of those answers that end with <end_of_turn> within 128 tokens
  general       loss on data/general/eval.txt (the forgetting check)
  reward_acc    held-out implicit reward accuracy: beta * (log-ratio chosen - log-ratio rejected)
                > 0 against the SFT start as the reference, on the eval pairs
  logp_c/logp_r mean summed log-prob of the held-out chosen / rejected responses
  chosen_rate   share of greedy answers to the held-out pair prompts closer to the chosen response
                than to the rejected one (ROUGE-L; a tie counts as not chosen): the preference in
                use, as gemma_jax.evaluate reports it
  pair_stop     share of those answers that stop
  format        on the pairs whose chosen response is a date written "March 14, 2025.": the share
                of greedy answers written so (the preferred style, right date or not)

The settings default to configs/preference.py:tiny's; --pairs shipped is its data (both sets
below), legal is data/preference/{train,eval}.jsonl (precise over vague summaries), dates is
data/preference/dates_{train,eval}.jsonl (a date as "March 14, 2025." over "2025-03-14.", to
questions about clauses that write it "14 March 2025": a format the SFT model has never
produced). Other files: --train/--eval. Needs `pip install trl` (and peft
for --lora_rank > 0). Both sides run on the CPU unless JAX has a GPU and torch sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from gemma_jax import config as config_lib, loss as loss_lib, sample, train, weights  # noqa: E402
from gemma_jax.data import preference  # noqa: E402
from gemma_jax.eval import metrics as metrics_lib, tasks  # noqa: E402
from gemma_jax.tokenizer import Tokenizer  # noqa: E402
from gemma_jax.train import objectives  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR_SETS = {"legal": ("data/preference/train.jsonl", "data/preference/eval.jsonl"),
             "dates": ("data/preference/dates_train.jsonl", "data/preference/dates_eval.jsonl"),
             "shipped": (None, None)}  # configs/preference.py:tiny's data.train and data.eval
LEGAL_EVAL, GENERAL = "data/legal/eval.jsonl", "data/general/eval.txt"
COLUMNS = ("rouge_l", "stop", "general", "reward_acc", "logp_c", "logp_r", "chosen_rate", "pair_stop")


# ----------------------------------------------------------------------------- measuring a model


def greedy(config, params, tok, prompts, max_new_tokens):
    """(answers, stopped) of greedy decoding of chat prompts (lists of turns)."""
    ids = [sample.encode_prompt(tok, p, chat=True) for p in prompts]
    stops = (tok.eos_id, tok.end_of_turn_id)
    answers, stopped = [], []
    for i in range(0, len(ids), 16):
        out = sample.generate_ids(config, params, ids[i:i + 16], max_new_tokens=max_new_tokens, stop_ids=stops,
                                  pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        for row in out.tokens:
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            answers.append(tok.decode(row if cut is None else row[:cut]))
            stopped.append(cut is not None)
    return answers, stopped


def pair_logps(config, params, tok, pairs, seq_len):
    """Summed log-probs and lengths [P] of the chosen and rejected responses, one pair per row."""
    rows, _ = preference.pack_pairs(preference.encode_pairs(pairs, tok), seq_len, pad_id=tok.pad_id, packing=False)
    flat = {k: jnp.asarray(v) for k, v in objectives.pair_rows(rows).items()}
    fn = jax.jit(lambda p, r: loss_lib.sequence_logps(p, r, config=config, chunk=1024))
    sums, counts = fn(params, flat)
    logp_c, logp_r, len_c, len_r, _ = objectives.split_pairs(sums, counts)
    return [np.asarray(x).sum(-1) for x in (logp_c, logp_r, len_c, len_r)]


US_DATE = re.compile(r"[A-Z][a-z]+ \d{1,2}, \d{4}\.?")


class Judge:
    """Measures models against the SFT start (the reference of the implicit reward)."""

    def __init__(self, sft_dir, eval_pairs, beta, seq_len):
        self.tok = Tokenizer(weights.find_tokenizer(sft_dir))
        self.beta, self.seq_len = beta, seq_len
        self.pairs = eval_pairs
        legal = config_lib.load("configs/legal.py:tiny")
        self.items = tasks.generation_items(tasks.read_eval_data(LEGAL_EVAL, legal.data), task="summarization")
        self.legal_rows = tasks.pack_rows(tasks.read_eval_data(LEGAL_EVAL, legal.data), self.tok, seq_len=256)
        general, _ = tasks.data_lib.read_examples(GENERAL, text_split="line")
        self.general_rows = tasks.pack_rows(general, self.tok, seq_len=256)
        config, params = weights.load(sft_dir)
        self.ref_c, self.ref_r, _, _ = pair_logps(config, params, self.tok, eval_pairs, seq_len)

    def __call__(self, path) -> dict:
        config, params = weights.load(path)
        answers, stopped = greedy(config, params, self.tok, [it.prompt for it in self.items], 128)
        out = dict(rouge_l=metrics_lib.rouge(answers, [it.reference for it in self.items])["rouge_l"],
                   stop=float(np.mean(stopped)))
        out["general"] = tasks.token_loss(config, params, self.general_rows, pad_id=self.tok.pad_id)["loss"]
        out["legal_loss"] = tasks.token_loss(config, params, self.legal_rows, pad_id=self.tok.pad_id)["loss"]
        logp_c, logp_r, _, _ = pair_logps(config, params, self.tok, self.pairs, self.seq_len)
        margin = self.beta * ((logp_c - self.ref_c) - (logp_r - self.ref_r))
        out.update(reward_acc=float(np.mean(margin > 0)), logp_c=float(logp_c.mean()), logp_r=float(logp_r.mean()))
        answers, stopped = greedy(config, params, self.tok, [p.prompt for p in self.pairs], 128)
        chosen, rejected = [p.chosen for p in self.pairs], [p.rejected for p in self.pairs]
        dated = [i for i, c in enumerate(chosen) if US_DATE.fullmatch(c.strip())]
        in_format = [bool(US_DATE.fullmatch(answers[i].strip())) for i in dated]
        out.update(chosen_rate=tasks.chosen_rate(answers, chosen, rejected), pair_stop=float(np.mean(stopped)),
                   format=float(np.mean(in_format)) if dated else None,
                   exact_chosen=float(np.mean([a.strip() == c.strip() for a, c in zip(answers, chosen)])),
                   samples=answers[:2] + [answers[i] for i in dated[:2]])
        return out


# ----------------------------------------------------------------------------- the two trainers


def train_ours(args, sft_dir, sft_weight, workdir) -> str:
    """gemma_jax DPO from the SFT workdir with configs/preference.py:tiny and the run's settings."""
    cfg = config_lib.load("configs/preference.py:tiny")
    cfg.model.init_checkpoint = sft_dir
    cfg.data.train, cfg.data.eval = args.train, args.eval
    cfg.data.packing = False  # one pair per row: train.batch_size pairs per step, as TRL's batch
    cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every = args.steps, args.batch, 0
    cfg.train.progress = False
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay = args.lr, args.warmup, args.weight_decay
    cfg.dpo.beta, cfg.dpo.sft_weight = args.beta, sft_weight
    cfg.lora.rank, cfg.lora.alpha = args.lora_rank, args.lora_alpha
    cfg.checkpoint.every_steps = args.steps
    train.run(cfg, workdir)
    return workdir


def _hf_tokenizer(d):
    import transformers

    shutil.copy(os.path.join(REPO, "data", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "GemmaTokenizer", "add_bos_token": true}')
    return transformers.AutoTokenizer.from_pretrained(d)


def tokenised_pairs(tok, pairs):
    """TRL's pre-tokenised form of gemma_jax's encoding: prompt ids, then each response with its
    <end_of_turn> (the tokens gemma_jax's loss mask covers)."""
    rows = []
    for (c_ids, c_mask), (r_ids, r_mask) in preference.encode_pairs(pairs, tok):
        start = int(np.argmax(c_mask))
        assert (c_ids[:start] == r_ids[:start]).all() and int(np.argmax(r_mask)) == start
        end_c, end_r = len(c_mask) - int(np.argmax(c_mask[::-1])), len(r_mask) - int(np.argmax(r_mask[::-1]))
        rows.append(dict(prompt_ids=c_ids[:start].tolist(), chosen_ids=c_ids[start:end_c].tolist(),
                         rejected_ids=r_ids[start:end_r].tolist()))
    return rows


def train_trl(args, sft_dir, sft_weight, out_dir, train_pairs, tok) -> str:
    """TRL's DPOTrainer from the SFT workdir's HF export, the same pairs and settings; returns the
    saved (merged) HF model."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    class PreTokenised(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # already gemma_jax's tokens
            return dataset

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    export = os.path.join(sft_dir, "export")
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        export, dtype=torch.float32, attn_implementation="eager").to(common.torch_device())
    policy, ref, peft_config = load(), None, None
    if args.lora_rank:
        import peft

        peft_config = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    else:
        ref = load()
    losses = ["sigmoid", "sft"] if sft_weight else ["sigmoid"]
    with tempfile.TemporaryDirectory() as d:
        dpo_args = DPOConfig(
            output_dir=d, beta=args.beta, loss_type=losses, loss_weights=[1.0, sft_weight] if sft_weight else None,
            learning_rate=args.lr, max_steps=args.steps, per_device_train_batch_size=args.batch,
            warmup_steps=args.warmup, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
            max_length=None, report_to=[], use_cpu=common.torch_device() == "cpu", bf16=False,
            gradient_checkpointing=False,
            save_strategy="no", logging_steps=max(1, args.steps // 4), seed=args.seed, disable_tqdm=True)
        ds = datasets.Dataset.from_list(tokenised_pairs(tok, train_pairs))
        trainer = PreTokenised(model=policy, ref_model=ref, args=dpo_args, train_dataset=ds,
                               processing_class=_hf_tokenizer(d), peft_config=peft_config)
        trainer.train()
        model = trainer.model
        if args.lora_rank:
            model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    shutil.copy(os.path.join(export, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    return out_dir


# ----------------------------------------------------------------------------- main


def fmt_row(name, m):
    return (f"  {name:<22}" + f"{m['rouge_l']:8.1f}{m['stop']:7.2f}{m['general']:9.3f}"
            + ("      --" if m.get("reward_acc") is None else f"{m['reward_acc']:8.2f}")
            + f"{m['logp_c']:9.1f}{m['logp_r']:9.1f}{m['chosen_rate']:8.2f}{m['pair_stop']:7.2f}"
            + ("" if m.get("format") is None else f"{m['format']:7.2f}"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", default="/tmp/legal_tiny", help="the Quickstart's workdir (configs/legal.py:tiny)")
    ap.add_argument("--pairs", choices=sorted(PAIR_SETS), default="shipped")
    ap.add_argument("--train", default="", help="pair files (default: those of --pairs)")
    ap.add_argument("--eval", default="")
    ap.add_argument("--sft_weights", default="0,1", help="NLL weights to compare, comma separated")
    ap.add_argument("--beta", type=float, default=None, help="default: configs/preference.py:tiny's")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="pairs per step")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--weight_decay", type=float, default=None)
    ap.add_argument("--lora_rank", type=int, default=None)
    ap.add_argument("--lora_alpha", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_trl", action="store_true")
    ap.add_argument("--skip_ours", action="store_true")
    ap.add_argument("--out", default="", help="keep the trained models here (default: a temporary directory)")
    ap.add_argument("--json", default="", help="also write the table as JSON to this file")
    args = ap.parse_args()
    os.chdir(REPO)
    shipped = config_lib.load("configs/preference.py:tiny")
    for key, value in dict(beta=shipped.dpo.beta, lr=shipped.opt.lr, steps=shipped.train.steps,
                           batch=shipped.train.batch_size, warmup=shipped.opt.warmup_steps,
                           weight_decay=shipped.opt.weight_decay, lora_rank=shipped.lora.rank,
                           lora_alpha=shipped.lora.alpha).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    files = PAIR_SETS[args.pairs] if args.pairs != "shipped" else (shipped.data.train, shipped.data.eval)
    args.train, args.eval = args.train or files[0], args.eval or files[1]
    sft = os.path.abspath(args.sft)
    if not (os.path.isdir(os.path.join(sft, "checkpoints")) and os.path.isdir(os.path.join(sft, "export"))):
        sys.exit(f"error: --sft={args.sft}: not a finished Quickstart workdir with an HF export; run "
                 f"python -m gemma_jax.train --config=configs/legal.py:tiny --workdir={args.sft}")
    out = args.out or tempfile.mkdtemp(prefix="dpo_quality_")
    tok = Tokenizer(weights.find_tokenizer(sft))
    train_pairs, _ = preference.read_pairs(args.train)
    eval_pairs, _ = preference.read_pairs(args.eval)
    judge = Judge(sft, eval_pairs, args.beta, seq_len=int(shipped.data.seq_len))
    results = {"SFT start": dict(judge(sft), reward_acc=None)}
    for w in [float(x) for x in args.sft_weights.split(",")]:
        for side in ("gemma_jax", "trl"):
            if (side == "trl" and args.skip_trl) or (side == "gemma_jax" and args.skip_ours):
                continue
            t0 = time.perf_counter()
            path = os.path.join(out, f"{side}_w{w:g}")
            if side == "gemma_jax":
                train_ours(args, sft, w, path)
            else:
                train_trl(args, sft, w, path, train_pairs, tok)
            results[f"{side} sft_weight={w:g}"] = dict(judge(path), seconds=time.perf_counter() - t0)
    base_format = results["SFT start"].get("format")
    lora = f"LoRA rank {args.lora_rank} alpha {args.lora_alpha:g}" if args.lora_rank else "full fine-tuning"
    print(f"\nDPO from {args.sft} on {args.train} ({len(train_pairs)} pairs; {len(eval_pairs)} held out): beta "
          f"{args.beta:g}, lr {args.lr:g} ({args.warmup} warmup, cosine), {args.steps} steps x {args.batch} pairs, "
          f"{lora}, on {common.machine()}")
    print(f"  {'model':<22}{'rougeL':>8}{'stop':>7}{'general':>9}{'rew_acc':>8}{'logp_c':>9}{'logp_r':>9}"
          f"{'chosen':>8}{'p_stop':>7}" + ("" if base_format is None else f"{'format':>7}"))
    for name, m in results.items():
        print(fmt_row(name, m))
    base = results["SFT start"]
    print("  relative ROUGE-L change from the SFT start: " + ", ".join(
        f"{n} {100 * (m['rouge_l'] - base['rouge_l']) / base['rouge_l']:+.1f}%" for n, m in results.items()
        if n != "SFT start"))
    for name, m in results.items():
        print(f"  greedy on held-out pair prompts, {name}: {m['samples']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
