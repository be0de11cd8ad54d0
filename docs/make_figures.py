"""Regenerates the figures and tables published in docs/ from the commands that produce them.

  python docs/make_figures.py report      # docs/report.md, metrics.png, attention_heatmap.png and the
                                          # tables quoted in docs/evaluation.md (CPU, ~10 minutes)
  python docs/make_figures.py memory      # the memory planner tables in docs/fine-tuning.md (~1 minute)
  python docs/make_figures.py all

`report` runs the README's own commands on a fresh Quickstart workdir (the Quickstart itself, the
`train.steps=0` baseline, `evaluate`, `attention` and `harness` on the shipped legal_mc task)
under --root (default /tmp, so the paths match the README), copies the report and images here
and rewrites the blocks between `<!-- make_figures NAME: begin -->` and `... end -->` markers
in the pages. Every step is a subprocess running the documented command line, so what is
published is what a reader gets. A finished workdir is reused (its re-run says it is done);
pass --fresh to train again. Benchmark tables (docs/benchmarks.md) name their own scripts:
those need their peers and quiet machines and are not re-run here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MEMORY_VARIANTS = ("2b_lora", "9b_lora", "27b_lora")


def run(cmd: list[str], **kwargs) -> str:
    """Runs one documented command from the repository root; its stdout (stderr passes through)."""
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, **kwargs)
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}")
    return res.stdout


def replace_block(page: Path, name: str, body: str) -> None:
    """Replaces the text between the page's begin/end markers for `name` with `body`."""
    begin, end = f"<!-- make_figures {name}: begin -->", f"<!-- make_figures {name}: end -->"
    text = page.read_text()
    if begin not in text or end not in text:
        sys.exit(f"{page}: no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def report_table(report_md: str) -> str:
    """The metrics table and forgetting line of a report.md."""
    lines = report_md.splitlines()
    table = [line for line in lines if line.startswith("|")]
    forgetting = [line for line in lines if line.startswith("Forgetting check")]
    return "\n".join(table + [""] + forgetting)


def attention_summary(attention: dict) -> str:
    """One sentence on the heads: how their entropy moved and where the largest change is."""
    ranked = attention["ranked"]
    change = [h["entropy_tuned"] - h["entropy_base"] for h in ranked]
    top = ranked[0]
    sharpened = sum(c < 0 for c in change)
    return (f"For the Quickstart model, {sharpened} of {len(ranked)} heads sharpened (entropy change from "
            f"{min(change):+.2f} to {max(change):+.2f} bits); the most changed head is layer {top['layer']} "
            f"({top['kind']}) head {top['head']}, JS divergence {top['js']:.3f} bits.")


def make_report(root: Path, fresh: bool) -> None:
    """The README's "After the Quickstart" evaluation commands, then their outputs into docs/."""
    py = sys.executable
    tiny, init = root / "legal_tiny", root / "legal_init"
    if fresh:
        shutil.rmtree(tiny, ignore_errors=True)
    shutil.rmtree(init, ignore_errors=True)
    run([py, "-m", "gemma_jax.train", "--config=configs/legal.py:tiny", f"--workdir={tiny}"])
    run([py, "-m", "gemma_jax.train", "--config=configs/legal.py:tiny", f"--workdir={init}",
         "--config.train.steps=0"])
    run([py, "-m", "gemma_jax.evaluate", f"--checkpoint={tiny}", f"--baseline={init}/export",
         f"--output={tiny}/eval"])
    run([py, "-m", "gemma_jax.attention", f"--base={init}/export", f"--tuned={tiny}",
         "--data=data/legal/eval.jsonl", f"--output={tiny}/attention"])
    run([py, "-m", "gemma_jax.harness", f"--checkpoint={tiny}", "--tasks=legal_mc",
         "--include_path=tasks/legal_mc", "--apply_chat_template", "--mesh=none", f"--output={tiny}/harness"])
    def shown(text: str) -> str:  # paths as the README writes them: /tmp/..., repository files relative
        return text.replace(str(root).rstrip("/") + "/", "/tmp/").replace(str(REPO) + "/", "")

    report_md = shown((tiny / "eval" / "report.md").read_text())
    (DOCS / "report.md").write_text(report_md)
    shutil.copyfile(tiny / "eval" / "metrics.png", DOCS / "metrics.png")
    shutil.copyfile(tiny / "attention" / "attention_heatmap.png", DOCS / "attention_heatmap.png")
    harness = "\n".join(line for line in (tiny / "harness" / "results.md").read_text().splitlines()
                        if line.startswith("|"))
    replace_block(DOCS / "evaluation.md", "report",
                  report_table(report_md) + "\n\nThe shipped harness task on the same model "
                  "(`python -m gemma_jax.harness --checkpoint=/tmp/legal_tiny --tasks=legal_mc "
                  "--include_path=tasks/legal_mc --apply_chat_template --mesh=none`; chance is 0.25):\n\n" + harness)
    attention = json.loads((tiny / "attention" / "attention.json").read_text())
    replace_block(DOCS / "evaluation.md", "attention", attention_summary(attention))
    print(f"wrote {DOCS / 'report.md'}, metrics.png, attention_heatmap.png and the blocks in docs/evaluation.md")


def make_memory() -> None:
    """The planner's --no_compile tables for the LoRA variants, into docs/fine-tuning.md."""
    blocks = []
    for variant in MEMORY_VARIANTS:
        out = run([sys.executable, "-m", "gemma_jax.memory", f"--config=configs/legal.py:{variant}",
                   "--device=tpu-v5e", "--no_compile", "--modes=full,lora,qlora-int8,qlora-int4"])
        table = [line for line in out.splitlines() if line.startswith("|")]
        if not table:
            sys.exit(f"no table in the planner's output for {variant}:\n{out}")
        blocks.append(f"configs/legal.py:{variant}\n\n" + "\n".join(table))
    replace_block(DOCS / "fine-tuning.md", "memory", "\n\n".join(blocks))
    print(f"wrote the planner tables of {', '.join(MEMORY_VARIANTS)} into {DOCS / 'fine-tuning.md'}")


def main() -> None:
    """Parse the subcommand and run it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["report", "memory", "all"])
    ap.add_argument("--root", default="/tmp", help="where the Quickstart and baseline workdirs go")
    ap.add_argument("--fresh", action="store_true", help="train the Quickstart workdir again")
    args = ap.parse_args()
    if args.what in ("memory", "all"):
        make_memory()
    if args.what in ("report", "all"):
        make_report(Path(args.root), args.fresh)


if __name__ == "__main__":
    main()
