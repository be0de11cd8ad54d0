"""Tests for gemma_jax.tokenizer on a small Gemma-style SentencePiece model trained in-process."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from gemma_jax.tokenizer import MODEL, USER, Tokenizer, normalize_turns, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog; the party shall indemnify and hold harmless "
         "clause contract agreement hereby user model café naïve Straße 日本語 русский 🙂 "
         "Ω≈ç√ (a) [b] {c} \"quoted\" it's e-mail x@y.z 3.14 $1,000").split()


def _corpus(n=400, seed=0):
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
        s += rng.choice([".", "!", "?", ",", ";", ":", " —", "..."])
        s += rng.choice(["", " ", "  ", "\n", "\n\n", "\t"]) + str(rng.randint(0, 10**6))
        texts.append(s)
    return texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_sentencepiece(_corpus(), str(d / "tokenizer.model"), vocab_size=1024)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(str(tok_dir / "tokenizer.model"))


CONV = [
    {"role": "user", "content": "What is a clause?"},
    {"role": "model", "content": "A part of a contract.\n\nIt has 2 lines."},
    {"role": "user", "content": "Thanks — café 🙂"},
]
REF = ("<bos><start_of_turn>user\nWhat is a clause?<end_of_turn>\n"
       "<start_of_turn>model\nA part of a contract.\n\nIt has 2 lines.<end_of_turn>\n"
       "<start_of_turn>user\nThanks — café 🙂<end_of_turn>\n")


def test_round_trip_newlines_unicode(tok):
    text = "Line one.\n\n  Indented 12345\tand tabs — café naïve 日本語 🙂 ∮ unseen: ẞ\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
    assert tok.unk_id not in ids  # byte fallback covers characters never seen in training


def test_bos_prepended_no_eos_by_default(tok):
    ids = tok.encode("the fox")
    assert ids[0] == tok.bos_id and tok.eos_id not in ids
    assert tok.encode("the fox", add_bos=False) == ids[1:]
    assert tok.encode("the fox", add_eos=True) == ids + [tok.eos_id]


def test_decode_drops_pad_bos_eos_only(tok):
    ids = tok.encode("the fox", add_eos=True) + [tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "the fox"
    assert tok.decode([tok.start_of_turn_id, *tok.encode("x", add_bos=False)]) == "<start_of_turn>x"


def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert tok.piece_to_id("<end_of_turn>") == tok.end_of_turn_id
    assert tok.start_of_turn_id not in (0, 1, 2, 3)
    # The marker is one piece inside text, so the text and id forms of a chat agree.
    assert tok.encode("<end_of_turn>", add_bos=False) == [tok.end_of_turn_id]
    assert tok.vocab_size > 300


def test_format_chat_reference(tok):
    assert tok.format_chat(CONV) == REF
    assert tok.format_chat(CONV, add_generation_prompt=True) == REF + "<start_of_turn>model\n"
    with pytest.raises(ValueError, match="end with a user turn"):
        tok.format_chat(CONV[:2], add_generation_prompt=True)


def test_system_folded_and_assistant_is_model(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert normalize_turns(msgs) == [{"role": USER, "content": "Be brief.\n\nHi"},
                                     {"role": MODEL, "content": "Hello"}]
    assert tok.format_chat(msgs) == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                     "<start_of_turn>model\nHello<end_of_turn>\n")


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "model", "content": "x"}], "message 0: expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1: expected a model turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "message 1: a system message is only allowed first"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
     "message 1: expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     "message 1: unknown role"),
    ([{"role": "user"}], "message 0: expected"),
    ([{"role": "system", "content": "s"}], "no user turn"),
    ([], "no user turn"),
])
def test_bad_turns_raise(msgs, match):
    with pytest.raises(ValueError, match=match):
        normalize_turns(msgs)


def _masked_spans(tok, ids, mask):
    """Ids of each maximal run of masked tokens."""
    spans, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("gen", [False, True])
def test_encode_chat_matches_text_and_masks_model_turns(tok, gen):
    conv = CONV if gen else CONV + [{"role": "assistant", "content": "You're welcome. 42"}]
    ids, mask = tok.encode_chat(conv, add_generation_prompt=gen)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    text = tok.format_chat(conv, add_generation_prompt=gen)
    assert ids.tolist() == tok.encode(text[len("<bos>"):], add_bos=True)
    model_contents = [m["content"] for m in conv if m["role"] in ("model", "assistant")]
    spans = _masked_spans(tok, ids, mask)
    assert len(spans) == len(model_contents)
    for span, content in zip(spans, model_contents):
        assert span[-1] == tok.end_of_turn_id
        assert tok.decode(span[:-1]) == content
    # Every <end_of_turn> after a model header is masked, the ones after user turns are not.
    eot = np.flatnonzero(ids == tok.end_of_turn_id)
    assert mask[eot].tolist() == [False, True, False] + ([] if gen else [True])


def test_encode_chat_content_merging_with_header(tok):
    # "\n\n" is one piece here, so a content starting with "\n" merges with the header's newline.
    assert tok.encode("\n\n", add_bos=False) == [tok.piece_to_id("\n\n")]
    conv = [{"role": "user", "content": "q"}, {"role": "model", "content": "\nanswer 7"}]
    ids, mask = tok.encode_chat(conv)
    assert ids.tolist() == tok.encode(tok.format_chat(conv)[len("<bos>"):])
    (span,) = _masked_spans(tok, ids, mask)
    assert tok.decode(span[:-1]) == "\n\nanswer 7"  # the shared piece counts as content


def test_train_on_prompt_and_encode_text(tok):
    ids, mask = tok.encode_chat(CONV, train_on_prompt=True)
    assert ids[0] == tok.bos_id and not mask[0] and mask[1:].all()
    ids, mask = tok.encode_text("raw document.\n")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert mask.tolist() == [False] + [True] * (len(ids) - 1)
    assert tok.decode(ids) == "raw document.\n"


def test_directory_and_keras_layout(tok, tok_dir, tmp_path):
    assert Tokenizer(str(tok_dir)).path == str(tok_dir / "tokenizer.model")
    assets = tmp_path / "assets" / "tokenizer"
    assets.mkdir(parents=True)
    (assets / "vocabulary.spm").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    assert Tokenizer(tmp_path).encode("the fox") == tok.encode("the fox")


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value) and "tokenizer.model" in str(e.value)
    assert "Kaggle" in str(e.value) and "Hugging Face" in str(e.value)


def test_not_gemma_style_raises(tmp_path):
    import io

    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(100)), model_writer=buf,
                                   vocab_size=200, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="<start_of_turn>"):
        Tokenizer(str(tmp_path))


def test_training_is_deterministic(tmp_path):
    a = train_sentencepiece(_corpus(150), str(tmp_path / "a" / "deep" / "t.model"), vocab_size=600)
    b = train_sentencepiece(_corpus(150), str(tmp_path / "b.model"), vocab_size=600)
    assert a == str(tmp_path / "a" / "deep" / "t.model")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_cli_trains_from_jsonl(tmp_path):
    rows = [{"instruction": f"Summarise clause {i}", "input": "Ωmega clause text\n",
             "output": "Zygote " * 3} for i in range(50)]
    rows += [{"messages": [{"role": "user", "content": "Quorum?"},
                           {"role": "assistant", "content": "Quixotic answer."}]}]
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    out = tmp_path / "out" / "tokenizer.model"
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-m", "gemma_jax.tokenizer", "train", f"--input={src}",
                          f"--output={out}", "--vocab_size=400"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    n = int(re.search(r"vocab_size=(\d+)", res.stdout).group(1))
    trained = Tokenizer(str(out))
    assert n == trained.vocab_size > 260
    pieces = {trained.id_to_piece(i) for i in range(trained.vocab_size)}
    # Strings from instruction, input, output and nested messages all reached the trainer.
    assert {"Ω", "Z", "Q"} <= pieces


def test_cli_no_match_fails(tmp_path):
    res = subprocess.run([sys.executable, "-m", "gemma_jax.tokenizer", "train",
                          f"--input={tmp_path}/*.jsonl", f"--output={tmp_path}/t.model"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "no files match" in res.stderr


def test_matches_transformers_gemma_tokenizer(tok, tok_dir, tmp_path):
    pytest.importorskip("transformers")
    # conftest sets HF_HUB_OFFLINE=1: this must work from the local file alone.
    from transformers import AutoTokenizer
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    # Without add_bos_token the class is found but no BOS is added (transformers 5.x).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    # Not "<bos>" as text: transformers parses it as the BOS token, SentencePiece spells it out.
    texts = _corpus(100, seed=7) + [
        "  leading and trailing  ", "a\n\n\n b", "Ω≈ç√ 日本語 🙂 ẞ", "tab\t\tx 12345", "",
        REF[len("<bos>"):]]
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text), repr(text)
    assert hf.convert_tokens_to_ids("<end_of_turn>") == tok.end_of_turn_id
