"""An evaluation report on disk: report.json, report.md (baseline vs tuned, example generations)
and metrics.png (one bar panel per metric)."""

from __future__ import annotations

import json
import os

from gemma_jax.eval.tasks import LOWER_IS_BETTER


def code_fence(text: str) -> str:
    """A code fence longer than any backtick run inside the text, so generated Markdown stays inside."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _verdict(name: str, delta: float) -> str:
    if abs(delta) < 1e-12:
        return "same"
    better = delta < 0 if name in LOWER_IS_BETTER else delta > 0
    return "better" if better else "worse"


def markdown(report: dict, *, show: int = 3, chart: str = "metrics.png", names: tuple[str, str] = ("", "")) -> str:
    """report.md text: metrics table (baseline, tuned, delta), forgetting, example generations."""
    tuned, base = report["tuned"], report.get("baseline")
    tuned_name, base_name = names
    lines = [f"# Evaluation: {report['task']} on `{report['data']}`", ""]
    if tuned_name:
        lines += [f"Tuned `{tuned_name}`" + (f", baseline `{base_name}`" if base is not None else "") + ".", ""]
    s = report["settings"]
    lines += [f"{report['generated']} examples generated (max_new_tokens={s['max_new_tokens']}, "
              f"temperature={s['temperature']}); loss over every example, rows of {s['seq_len']} tokens. "
              "Scores are 0-100; token_accuracy is a fraction.", ""]
    if base is not None:
        lines += ["| metric | baseline | tuned | delta | |", "|---|---:|---:|---:|---|"]
    else:
        lines += ["| metric | tuned |", "|---|---:|"]
    for name, value in tuned.items():
        label = f"**{name}**" if name == report["metric"] else name
        if base is not None and name in base:
            d = value - base[name]
            delta = f"{d:+.4f}" if abs(d) < 10 else f"{d:+.2f}"
            lines.append(f"| {label} | {_fmt(base[name])} | {_fmt(value)} | {delta} | {_verdict(name, d)} |")
        else:
            lines.append(f"| {label} | {_fmt(value)} |")
    f = report.get("forgetting")
    if f:
        state = "**WARNING: past the threshold**" if f["exceeded"] else "within the threshold"
        lines += ["", f"Forgetting check on `{f['general']}`: general-text loss {f['loss_baseline']:.4f} -> "
                      f"{f['loss_tuned']:.4f} ({100 * f['relative_change']:+.1f}%, threshold "
                      f"{100 * f['threshold']:.0f}%): {state}."]
    if chart:
        lines += ["", f"![metrics]({chart})"]
    examples = report.get("examples", [])[:show]
    if examples:
        lines += ["", "## Example generations"]
    for i, ex in enumerate(examples, 1):
        lines += ["", f"### {i}. `{ex['source']}`"]
        parts = [("Prompt", ex["prompt"]), ("Reference", ex["reference"])]
        if "baseline" in ex:
            parts.append(("Baseline" + _pass_note(ex.get("baseline_passed")), ex["baseline"]))
        parts.append(("Tuned" + _pass_note(ex.get("tuned_passed")), ex["tuned"]))
        for title, text in parts:
            if not text.strip():
                lines += ["", f"**{title}**: *(empty or only whitespace)*"]
                continue
            fence = code_fence(text)
            lines += ["", f"**{title}**", "", f"{fence}text", text.strip("\n"), fence]
    return "\n".join(lines).rstrip() + "\n"


def _pass_note(passed) -> str:
    return "" if passed is None else " (tests pass)" if passed else " (tests fail)"


def bar_chart(report: dict, path: str) -> str:
    """metrics.png: one small panel per metric, baseline and tuned bars side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned, base = report["tuned"], report.get("baseline")
    names = list(tuned)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.2 * rows), dpi=80, squeeze=False)
    for ax, name in zip(axes.flat, names):
        labels, values, colors = ["tuned"], [tuned[name]], ["tab:blue"]
        if base is not None and name in base:
            labels, values, colors = ["baseline", "tuned"], [base[name], tuned[name]], ["tab:gray", "tab:blue"]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
        ax.set_title(name + (" *" if name == report["metric"] else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{report['task']}: baseline vs tuned (* headline metric)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict, output: str, *, show: int = 3, names: tuple[str, str] = ("", "")) -> list[str]:
    """Writes report.json, report.md and metrics.png into `output`; returns their paths."""
    os.makedirs(output, exist_ok=True)
    paths = [os.path.join(output, n) for n in ("report.json", "report.md", "metrics.png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    bar_chart(report, paths[2])
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(report, show=show, names=names))
    return paths
