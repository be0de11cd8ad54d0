"""launch/colab.ipynb: valid nbformat v4 JSON, and it runs top to bottom on CPU with the tiny variant.

The notebook is executed the way papermill would run it: its code cells in order in one namespace,
with the values of the cell tagged "parameters" replaced right after that cell runs. The tiny
variant needs no download and no credentials. Its base is test_train's small random checkpoint
(2 layers, width 64) given as the notebook's `WEIGHTS` setting: the trainer's own random init
takes longer to compile than the whole run, and a base far from uniform lets the loss fall clearly.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import assert_trees_close, init_checkpoint, leaves  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab.ipynb"


def tiny_settings(tmp_path: Path, weights: str = "") -> dict:
    """Replaces the settings cell's values (every name must exist there); the mesh stays the
    config's, fsdp over the 8 virtual devices as on a v2-8."""
    overrides = {"lora.base_dtype": "float32", "train.eval_every": 0, "train.progress": False,
                 "checkpoint.async_save": False}
    return dict(VARIANT="tiny", WEIGHTS=weights, WORKDIR=str(tmp_path / "run"), EXPORT_DIR=str(tmp_path / "export"),
                STEPS=12, BATCH_SIZE=8, SEQ_LEN=128, MAX_NEW_TOKENS=16, OVERRIDES=overrides)


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def code_cells(nb) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_nbformat_v4():
    """nbformat 4 structure (checked by nbformat itself where installed), clean, plain Python."""
    nb = load_notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert set(nb) == {"nbformat", "nbformat_minor", "metadata", "cells"}
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["accelerator"] == "TPU"  # Colab opens it on a TPU runtime
    ids = [c.get("id") for c in nb["cells"]]
    if nb["nbformat_minor"] >= 5:  # cell ids are required from 4.5 on
        assert all(isinstance(i, str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", i) for i in ids), ids
        assert len(set(ids)) == len(ids), ids
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown"), cell
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (str, list)) and source(cell).strip()
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
            assert set(cell) <= {"id", "cell_type", "metadata", "source", "outputs", "execution_count"}
            src = source(cell)
            ast.parse(src)  # plain Python: no shell magics, so it also runs outside Jupyter
            assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines())
        else:
            assert set(cell) <= {"id", "cell_type", "metadata", "source", "attachments"}
    try:
        import nbformat

        nbformat.validate(nbformat.reads(NOTEBOOK.read_text(encoding="utf-8"), as_version=4))
    except ImportError:  # not a dependency; the checks above cover what its schema requires
        pass

    # Every code cell follows a markdown cell that explains it.
    for prev, cell in zip(nb["cells"], nb["cells"][1:]):
        if cell["cell_type"] == "code":
            assert prev["cell_type"] == "markdown", f"code cell {cell.get('id')} has no explanation before it"
    # One settings cell, first among the code cells, so a test (or papermill) can replace it.
    tagged = [c for c in code_cells(nb) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code_cells(nb)[0]
    settings: dict = {}
    exec(source(tagged[0]), settings)
    assert settings["VARIANT"] == "2b_lora" and settings["SOURCE"] in ("kaggle", "hf")
    assert set(tiny_settings(Path("/tmp"))) <= set(settings)  # no setting the test relies on is gone


@pytest.mark.slow
def test_notebook_runs_tiny_variant_on_cpu(tmp_path, monkeypatch, init_checkpoint):
    """Install check, config, LoRA training, loss curve, sampling and export, all from the notebook."""
    import gemma_jax

    monkeypatch.chdir(REPO)  # the notebook chdirs into the checkout; restored afterwards
    monkeypatch.setattr(sys, "path", list(sys.path))
    settings = tiny_settings(tmp_path, init_checkpoint)
    ns: dict = {"__name__": "__main__"}
    for cell in code_cells(load_notebook()):
        exec(compile(source(cell), f"{NOTEBOOK.name}:{cell.get('id')}", "exec"), ns)
        if "parameters" in cell["metadata"].get("tags", []):
            ns.update(settings)

    workdir, export = Path(settings["WORKDIR"]), Path(settings["EXPORT_DIR"])
    assert ns["metrics"]["step"] == settings["STEPS"]
    cfg = ns["cfg"]
    assert (cfg.lora.rank, cfg.model.init_checkpoint, cfg.data.seq_len) == (8, init_checkpoint, 128)
    assert json.loads((workdir / "lora.json").read_text())["base"] == init_checkpoint

    # The loss the notebook printed and plotted went down; the held-out set was evaluated.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert ns["losses"] == losses and losses[0][0] == 1 and losses[-1][0] == settings["STEPS"]
    assert losses[-1][1] < losses[0][1] - 1.0, losses  # 9.4 -> 7.6 with this base
    assert [s for s, _ in ns["evals"]] == [settings["STEPS"]] and math.isfinite(ns["evals"][0][1])
    assert (workdir / "plots" / "loss.png").stat().st_size > 0

    reply = ns["reply"]
    assert isinstance(reply, str) and reply.strip(), repr(reply)

    # The export is a Hugging Face checkpoint of exactly the merged model that was sampled...
    assert Path(ns["path"]) == export.absolute()
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert (export / name).is_file(), name
    assert json.loads((export / "config.json").read_text())["model_type"] == "gemma2"
    config, params = gemma_jax.load(str(export))
    assert (config.num_layers, config.embed_dim, config.vocab_size) == (
        ns["config"].num_layers, ns["config"].embed_dim, ns["config"].vocab_size)
    assert_trees_close(params, ns["params"], rtol=0, atol=0, what="export")
    # ... and not the base: the trained adapters are merged into the attention and MLP weights.
    _, base = gemma_jax.load(init_checkpoint)
    exported = leaves(params)
    moved = [k for k, v in leaves(base).items() if not np.allclose(v, exported[k], atol=1e-6)]
    assert any("attn" in k for k in moved) and any("mlp" in k for k in moved), moved
