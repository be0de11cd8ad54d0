"""Hugging Face exports are drop-in for transformers: tokenizer, chat template, generation config.

A tiny random model and an in-process SentencePiece model (with <start_of_turn>/<end_of_turn>)
are exported with gemma_jax.save; transformers then reads the directory alone (offline) and must
encode, format chats and generate exactly as gemma_jax does.
"""

import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest

import helpers
from gemma_jax import sample, weights
from gemma_jax.model import ModelConfig
from gemma_jax.tokenizer import Tokenizer, train_sentencepiece
from gemma_jax.weights import hf as hf_format

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

WORDS = ("the court shall decide whether a contract clause holds; party user model agreement "
         "hereby café naïve 日本語 🙂 (a) [b] 3.14 it's e-mail").split()
TEXTS = ["the court shall decide", "  two leading spaces\n\nand blank lines\t tab", "café naïve 日本語 🙂 ẞ",
         "numbers 1234567 and 3.14", "<start_of_turn>user\nhi<end_of_turn>\n", "", "model\n", "a  b   c"]
CHATS = [
    [{"role": "user", "content": "What is a clause?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Define tort."},
     {"role": "assistant", "content": " A civil wrong.\n"}, {"role": "user", "content": "Thanks  🙂"}],
    [{"role": "user", "content": "\nleading newline"}, {"role": "model", "content": "ok"},
     {"role": "user", "content": "trailing space "}],
]


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + rng.choice([".", "\n", "\n\n", " 42"])
            for _ in range(n)]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(export dir, Tokenizer, config, params) of a random 2-layer model with a real tokenizer."""
    root = tmp_path_factory.mktemp("hf_export")
    spm_path = train_sentencepiece(corpus(), str(root / "spm" / "tokenizer.model"), vocab_size=512)
    tok = Tokenizer(spm_path)
    config = ModelConfig(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
                         query_pre_attn_scalar=16, vocab_size=tok.vocab_size, sliding_window=16)
    helpers.make_hf_model(config, root / "random", scale=3.0, seed=2)
    cfg, params = weights.load(root / "random")
    # A random model with tied embeddings mostly repeats its last token (the residual stream
    # points at it); large post-norm scales let the blocks dominate, so greedy text varies.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 100.0 if path[-2].key in ("post_attention_norm", "post_ffw_norm") else x, params)
    # Zero logits for the byte-fallback pieces: lone bytes of random text are invalid UTF-8,
    # which SentencePiece and transformers replace differently when decoding.
    table = np.asarray(params["embedder"]["input_embedding"]).copy()
    table[[i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]] = 0.0
    params = {**params, "embedder": {"input_embedding": jax.numpy.asarray(table)}}
    out = weights.save(root / "export", cfg, params, format="hf", tokenizer=spm_path)
    return out, tok, cfg, params


@pytest.fixture(scope="module")
def hf_tok(export):
    return transformers.AutoTokenizer.from_pretrained(export[0])


def test_export_holds_the_transformers_files(export):
    out, tok, _, _ = export
    names = {p.name for p in Path(out).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= names
    gen = json.loads((Path(out) / "generation_config.json").read_text())
    assert gen == {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eos_id, tok.end_of_turn_id],
                   "pad_token_id": tok.pad_id}
    cfg = json.loads((Path(out) / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_auto_tokenizer_encodes_like_ours(export, hf_tok):
    _, tok, _, _ = export
    assert type(hf_tok).__name__ == "GemmaTokenizer"
    assert len(hf_tok) == tok.vocab_size  # no token added beyond the vocabulary (e.g. a <mask>)
    for text in TEXTS + corpus(30, seed=5):
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text), repr(text)  # BOS added, specials atomic
        assert hf_tok.decode(ids[1:]) == tok.decode(ids), repr(text)  # ours drops BOS, keeps turn markers
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    assert hf_tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [tok.start_of_turn_id,
                                                                                tok.end_of_turn_id]
    # Marked special, so pipelines strip them from generated text.
    assert hf_tok.decode([tok.end_of_turn_id] + tok.encode("x", add_bos=False), skip_special_tokens=True) == "x"
    # Generated text leaves out the specials as transformers' pipelines do (<unk> too, which
    # SentencePiece alone would show as " ⁇ ").
    ids = tok.encode("the court", add_bos=False) + [tok.unk_id, tok.pad_id] + tok.encode(" shall", add_bos=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True) == "the court shall"


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_is_our_chat_format(export, hf_tok, chat, add_generation_prompt):
    _, tok, _, _ = export
    messages = CHATS[chat]
    if add_generation_prompt and messages[-1]["role"] != "user":
        pytest.skip("a generation prompt follows a user turn")
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == tok.format_chat(messages, add_generation_prompt=add_generation_prompt)
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                     return_dict=True)["input_ids"]
    assert list(ids) == tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)[0].tolist()


def test_chat_template_refuses_what_we_refuse(hf_tok):
    for bad in ([{"role": "assistant", "content": "x"}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                [{"role": "tool", "content": "a"}]):
        with pytest.raises(Exception, match="alternate|only allowed first|unknown role|no user turn"):
            hf_tok.apply_chat_template(bad, tokenize=False)


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def test_pipeline_greedy_equals_gemma_jax(export, hf_tok):
    out, tok, cfg, params = export
    pipe = transformers.pipeline("text-generation", model=_hf_model(out), tokenizer=hf_tok, device="cpu")
    prompt = "the court shall"
    theirs = pipe(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    ours = sample.generate(cfg, params, tok, prompt, max_new_tokens=12)[0]
    assert theirs == ours and len(set(ours)) > 3
    ids = [tok.bos_id] + tok.encode(prompt, add_bos=False)
    hf_ids = pipe.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert hf_ids[len(ids):] == sample.generate_ids(cfg, params, [ids], max_new_tokens=12).tokens[0]
    chat = CHATS[1]
    theirs = pipe(chat, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    ours = sample.generate(cfg, params, tok, [chat], max_new_tokens=12)[0]
    assert theirs == ours and ours


def test_generation_stops_at_end_of_turn(export, hf_tok, tmp_path):
    """A model made to emit <end_of_turn> at step k: transformers stops there (generation_config),
    with the same text as gemma_jax.generate."""
    _, tok, cfg, params = export
    prompt = [tok.bos_id] + tok.encode("the court shall", add_bos=False)
    free = sample.generate_ids(cfg, params, [prompt], max_new_tokens=16).tokens[0]  # no stop ids
    stops = {tok.eos_id, tok.end_of_turn_id}
    # Swapping the embedding rows of t (first generated at step k, not in the prompt) and
    # <end_of_turn> changes nothing before step k and makes <end_of_turn> the greedy choice at k.
    k = next(i for i, t in enumerate(free) if i >= 2 and t not in prompt and t not in free[:i]
             and t not in stops and t >= 4 and not any(s in free[:i] for s in stops))
    t = free[k]
    table = np.asarray(params["embedder"]["input_embedding"]).copy()
    table[[t, tok.end_of_turn_id]] = table[[tok.end_of_turn_id, t]]
    swapped = {**params, "embedder": {"input_embedding": jax.numpy.asarray(table)}}
    out = weights.save(tmp_path / "swapped", cfg, swapped, format="hf", tokenizer=tok.path)
    ours = sample.generate(cfg, swapped, tok, "the court shall", max_new_tokens=16)[0]
    assert ours == tok.decode(free[:k])
    model = _hf_model(out)
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0].tolist()
    assert ids[len(prompt):] == free[:k] + [tok.end_of_turn_id]  # stopped right after <end_of_turn>
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=hf_tok, device="cpu")
    theirs = pipe("the court shall", max_new_tokens=16, do_sample=False, return_full_text=False)
    assert theirs[0]["generated_text"] == ours


def test_export_without_tokenizer_still_stops_like_gemma(tmp_path):
    """No tokenizer given: a Gemma-sized vocabulary gets Gemma's stop ids (EOS 1, <end_of_turn> 107)."""
    config = ModelConfig(num_layers=1, embed_dim=8, hidden_dim=16, num_heads=2, num_kv_heads=1, head_dim=4,
                         vocab_size=256128)
    gen = hf_format.generation_config(config, None)
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 107], "pad_token_id": 0}
    assert hf_format.generation_config(config.replace(vocab_size=300), None)["eos_token_id"] == [1]
