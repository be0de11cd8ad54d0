"""The data pipeline's targets (issue 15): RSS and launch time vs corpus size, parallel cache build,
packed tokens/s from a warm cache.

  python benchmarks/data_pipeline.py                          # 20k and 200k examples of ~1,000 tokens
  python benchmarks/data_pipeline.py --sizes 20000,100000 --dir /tmp/data_bench

For each size: the corpus (benchmarks/make_corpus.py, written once into --dir), its cache built
with 2 workers (and, for the first size, with 1, for the speed-up), then a fresh process with the
warm cache that times launch -> data.build -> first batch, draws --batches batches of
--batch x --seq_len (tokens/s, packed and non-padding) and reports its peak RSS (ru_maxrss). The
shipped tokenizer (data/tokenizer.model) is used. Build times also come with CPU seconds (reading
process, workers) and the build time they imply on an idle machine, since shared machines skew
wall-clock ratios. The process never imports a model: the RSS is
that of the input side of a training process (jax is imported, by grain).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "tokenizer.model")
sys.path.insert(0, REPO)  # runs from a checkout without an install


def _cfg(train, cache_dir, seq_len, num_workers):
    import ml_collections
    return ml_collections.ConfigDict(dict(train=train, eval="", seq_len=seq_len, cache_dir=cache_dir,
                                          num_workers=num_workers))


def child(a):
    """Runs in a fresh process: warm-cache launch -> first batch, tokens/s, peak RSS."""
    launched = float(os.environ["BENCH_LAUNCHED"])
    from gemma_jax import data
    from gemma_jax.tokenizer import Tokenizer
    t0 = time.time()
    cfg = _cfg(a.corpus, a.cache_dir, a.seq_len, 2)
    cfg.input_workers = a.input_workers
    d = data.build(cfg, Tokenizer(TOKENIZER), global_batch_size=a.batch, seed=0)
    next(d.train)
    first = time.time()
    real = 0
    for _ in range(a.batches):
        real += int((next(d.train)["segment_ids"] > 0).sum())
    dt = time.time() - first
    packed = a.batches * a.batch * a.seq_len
    print(json.dumps(dict(launch_to_first_batch_s=round(first - launched, 2), build_s=round(first - t0, 2),
                          packed_tokens_per_s=round(packed / dt), real_tokens_per_s=round(real / dt),
                          peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                          examples=d.stats["train"]["examples"], rows_per_epoch=d.rows_per_epoch)))


def build_time(corpus, cache_dir, seq_len, workers):
    from gemma_jax.data import cache as cache_lib
    from gemma_jax.tokenizer import Tokenizer
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = _cfg(corpus, cache_dir, seq_len, workers)
    cpu = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))  # noqa: E731
    t0, main0, kids0 = time.time(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    c = cache_lib.ensure(corpus, Tokenizer(TOKENIZER), cfg, num_workers=workers)
    main, kids = cpu(resource.RUSAGE_SELF) - main0, cpu(resource.RUSAGE_CHILDREN) - kids0
    # On an idle machine with `workers` cores the build takes about the larger of the reading
    # process's CPU time and the total CPU time spread over the cores.
    idle = max(main, (main + kids) / max(1, workers))
    return time.time() - t0, c.manifest, dict(cpu_main_s=round(main, 1), cpu_workers_s=round(kids, 1),
                                              idle_estimate_s=round(idle, 1))


def train_run(corpus, cache_dir, workdir):
    """Launch -> end of a 1-step `python -m gemma_jax.train` run (tiny model) and its peak RSS."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "gemma_jax.train", "--config=configs/legal.py:tiny", f"--workdir={workdir}",
           f"--config.data.train={corpus}", "--config.data.eval=", "--config.train.steps=1",
           "--config.train.eval_every=0", "--config.train.export_format=", "--config.train.progress=False",
           "--config.checkpoint.every_steps=1000", "--config.data.seq_len=2048", "--config.train.batch_size=4"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "GEMMA_JAX_DATA_CACHE": cache_dir},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed ({status})")
    return dict(train_1_step_wall_s=round(time.time() - t0, 1), train_peak_rss_mb=round(usage.ru_maxrss / 1024))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,200000")
    p.add_argument("--dir", default="/tmp/gemma_jax_data_bench")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--no_speedup", action="store_true", help="skip the 1-worker build")
    p.add_argument("--input_workers", type=int, default=0, help="data.input_workers of the warm-cache process")
    p.add_argument("--train", action="store_true",
                   help="also time a 1-step tiny-model training run on the warm cache (seq 2048, batch 4)")
    p.add_argument("--warm_only", action="store_true", help="reuse caches of an earlier run in --dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    os.makedirs(a.dir, exist_ok=True)
    results = {}
    for k, n in enumerate(int(s) for s in a.sizes.split(",")):
        corpus = os.path.join(a.dir, f"corpus_{n}.jsonl")
        if not os.path.exists(corpus):
            subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "make_corpus.py"), "--n", str(n),
                            "--out", corpus], check=True)
        r = dict(corpus_mb=round(os.path.getsize(corpus) / 1e6))
        cache_dir = os.path.join(a.dir, f"cache_{n}")
        if k == 0 and not a.no_speedup:
            t1, _, cpu1 = build_time(corpus, os.path.join(a.dir, "cache_1w"), a.seq_len, 1)
            r["build_1_worker_s"], r["build_1_worker_cpu"] = round(t1, 1), cpu1
            shutil.rmtree(os.path.join(a.dir, "cache_1w"), ignore_errors=True)
        if a.warm_only and os.path.isdir(cache_dir):  # reuse a cache built by an earlier run
            from gemma_jax.data import cache as cache_lib
            from gemma_jax.tokenizer import Tokenizer
            c = cache_lib.ensure(corpus, Tokenizer(TOKENIZER), _cfg(corpus, cache_dir, a.seq_len, 2))
            t, manifest, cpu2 = c.manifest["build_seconds"], c.manifest, {}
        else:
            t, manifest, cpu2 = build_time(corpus, cache_dir, a.seq_len, 2)
        r["build_2_workers_s"], r["build_2_workers_cpu"] = round(t, 1), cpu2
        if "build_1_worker_s" in r:
            r["build_speedup"] = round(r["build_1_worker_s"] / r["build_2_workers_s"], 2)
            r["build_speedup_idle_estimate"] = round(cpu1["idle_estimate_s"] / cpu2["idle_estimate_s"], 2)
        r["tokens"], r["examples"] = manifest["tokens"], manifest["examples"]
        env = {**os.environ, "BENCH_LAUNCHED": repr(time.time()), "PYTHONPATH": REPO}
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--corpus", corpus,
                              "--cache_dir", cache_dir, "--seq_len", str(a.seq_len), "--batch", str(a.batch),
                              "--batches", str(a.batches), "--input_workers", str(a.input_workers)],
                             check=True, capture_output=True, text=True, env=env)
        r.update(json.loads(out.stdout.strip().splitlines()[-1]))
        if a.train:
            r.update(train_run(corpus, cache_dir, os.path.join(a.dir, f"wd_{n}")))
        results[n] = r
        print(json.dumps({n: r}), flush=True)
    sizes = sorted(results)
    if len(sizes) > 1:
        lo, hi = results[sizes[0]], results[sizes[-1]]
        growth = dict(rss_growth_mb=hi["peak_rss_mb"] - lo["peak_rss_mb"],
                      launch_growth_s=round(hi["launch_to_first_batch_s"] - lo["launch_to_first_batch_s"], 2))
        if a.train:
            growth.update(train_rss_growth_mb=hi["train_peak_rss_mb"] - lo["train_peak_rss_mb"],
                          train_wall_growth_s=round(hi["train_1_step_wall_s"] - lo["train_1_step_wall_s"], 1))
        print(json.dumps(growth))
    print(f"({os.cpu_count()} CPU cores, shared with other work: times are upper bounds)")


if __name__ == "__main__":
    main()
