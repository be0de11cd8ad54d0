"""Tests for gemma_jax.data: readers, schemas, errors, loss masks, packing, grain pipeline, TFDS."""

import collections
import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gemma_jax import data
from gemma_jax import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "data")
EOT = "<end_of_turn>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = list(tokenizer_lib.read_texts(os.path.join(SAMPLES, "*", "*.jsonl")))
    texts += ["Summarise.\n\nThe tenant pays rent.", "café naïve résumé", "alpha beta gamma delta"]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(texts, str(path), vocab_size=1024))


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def turns(user, model):
    return [{"role": "user", "content": user}, {"role": "model", "content": model}]


# ---------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("rec,expected", [
    ({"instruction": "Summarise.", "input": "The clause.", "output": "A summary."},
     turns("Summarise.\n\nThe clause.", "A summary.")),
    ({"instruction": "Define waiver.", "input": "", "output": "A choice."},
     turns("Define waiver.", "A choice.")),
    ({"instruction": "Define waiver.", "output": "A choice."}, turns("Define waiver.", "A choice.")),
    ({"input": "Only input.", "output": "Out."}, turns("Only input.", "Out.")),
    ({"prompt": "Translate: cat", "completion": "chat"}, turns("Translate: cat", "chat")),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                   {"role": "model", "content": "Bye."}]},
     turns("Be brief.\n\nHi", "Hello.") + turns("Bye", "Bye.")),
])
def test_schemas_map_to_documented_turns(rec, expected):
    ex = data.to_example(rec, "f.jsonl:1")
    assert ex.turns == expected and ex.text is None and ex.source == "f.jsonl:1"


def test_text_schema_and_default_instruction():
    ex = data.to_example({"text": "Raw document.\nSecond line."}, "w")
    assert ex.text == "Raw document.\nSecond line." and ex.turns is None
    ex = data.to_example({"input": "Bill text.", "output": "Short."}, "w",
                         default_instruction="Summarise the bill.")
    assert ex.turns == turns("Summarise the bill.\n\nBill text.", "Short.")
    # An explicit instruction wins over the default.
    ex = data.to_example({"instruction": "Mine.", "input": "x", "output": "y"}, "w",
                         default_instruction="Default.")
    assert ex.turns[0]["content"] == "Mine.\n\nx"


@pytest.mark.parametrize("field_map", ["instruction=question, output=answer",
                                       {"instruction": "question", "output": "answer"}])
def test_field_map(tmp_path, field_map):
    p = write(tmp_path, "qa.jsonl", jsonl({"question": "Why?", "answer": "Because.", "id": 3}))
    exs, _ = data.read_examples(p, field_map=field_map)
    assert exs[0].turns == turns("Why?", "Because.")
    # Errors name the user's column, not the canonical one.
    p = write(tmp_path, "qa2.jsonl", jsonl({"question": "Why?", "answer": ""}))
    with pytest.raises(data.DataError, match=r'qa2\.jsonl:1: field "answer": empty response'):
        data.read_examples(p, field_map=field_map)


@pytest.mark.parametrize("bad", ["instruction", "nonsense=col", {"output": ""}])
def test_bad_field_map(bad):
    with pytest.raises(data.DataError, match="field_map"):
        data.parse_field_map(bad)


# ---------------------------------------------------------------------------------- formats


def test_file_formats(tmp_path):
    recs = [{"instruction": "A", "input": "", "output": "1"}, {"prompt": "B", "completion": "2"}]
    paths = {
        "jsonl": write(tmp_path, "a.jsonl", "\n" + jsonl(*recs)),  # blank line 1 is skipped
        "json": write(tmp_path, "a.json", json.dumps(recs, indent=1)),
        "json_data": write(tmp_path, "b.json", json.dumps({"data": recs})),
    }
    for kind, p in paths.items():
        exs, skipped = data.read_examples(p)
        assert [e.turns for e in exs] == [turns("A", "1"), turns("B", "2")], kind
        assert not skipped
    exs, _ = data.read_examples(paths["jsonl"])
    assert [e.source for e in exs] == [f"{paths['jsonl']}:2", f"{paths['jsonl']}:3"]
    exs, _ = data.read_examples(paths["json"])
    assert [e.source for e in exs] == [f"{paths['json']}[0]", f"{paths['json']}[1]"]


def test_csv_tsv(tmp_path):
    csv_text = ('prompt,completion\n"Hello, world",Bonjour\n\n'
                '"two\nlines","deux\nlignes"\nlast,dernier\n')
    p = write(tmp_path, "t.csv", "\ufeff" + csv_text)  # a BOM must not leak into the header
    exs, _ = data.read_examples(p)
    assert [e.turns for e in exs] == [turns("Hello, world", "Bonjour"),
                                      turns("two\nlines", "deux\nlignes"), turns("last", "dernier")]
    # Line numbers are where each record starts, also after a quoted multi-line cell.
    assert [e.source.rsplit(":", 1)[1] for e in exs] == ["2", "4", "7"]
    p = write(tmp_path, "t.tsv", "instruction\tinput\toutput\nSum\tx, y\tz\n")
    exs, _ = data.read_examples(p)
    assert exs[0].turns == turns("Sum\n\nx, y", "z")


def test_txt_line_vs_paragraph(tmp_path):
    p = write(tmp_path, "g.txt", "First doc.\nSecond doc.\n\n\nThird para\ncontinues.\n")
    exs, _ = data.read_examples(p)
    assert [e.text for e in exs] == ["First doc.", "Second doc.", "Third para", "continues."]
    assert [e.source.rsplit(":", 1)[1] for e in exs] == ["1", "2", "5", "6"]
    exs, _ = data.read_examples(p, text_split="paragraph")
    assert [e.text for e in exs] == ["First doc.\nSecond doc.", "Third para\ncontinues."]
    assert [e.source.rsplit(":", 1)[1] for e in exs] == ["1", "5"]


def test_several_files_and_globs(tmp_path):
    write(tmp_path, "x1.jsonl", jsonl({"text": "one"}))
    write(tmp_path, "x2.jsonl", jsonl({"text": "two"}, {"text": "three"}))
    t = write(tmp_path, "y.txt", "four\n")
    exs, _ = data.read_examples(f"{tmp_path}/x*.jsonl, {t}")
    assert [e.text for e in exs] == ["one", "two", "three", "four"]
    with pytest.raises(data.DataError, match="no files match"):
        data.read_examples(f"{tmp_path}/nothing*.jsonl")
    with pytest.raises(data.DataError, match="no such file"):
        data.read_examples(f"{tmp_path}/missing.jsonl")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.read_examples(write(tmp_path, "z.xlsx", "x"))


# ---------------------------------------------------------------------------------- bad input

GOOD = {"prompt": "p", "completion": "c"}
BAD_CASES = [
    # (file name, content, expected location, expected field or None, reason, message part)
    ("m.jsonl", jsonl(GOOD, '{"prompt": "p", "completion": }'), "m.jsonl:2", None, "malformed",
     "malformed JSON"),
    ("s.jsonl", jsonl(GOOD, GOOD, {"instruction": "Summarise."}), "s.jsonl:3", "output",
     "missing_field", 'expected schema {"instruction","input","output"}'),
    ("s2.jsonl", jsonl({"prompt": "only a prompt"}), "s2.jsonl:1", "completion", "missing_field",
     'expected schema {"prompt","completion"}'),
    ("u.jsonl", jsonl({"question": "q"}), "u.jsonl:1", None, "missing_field", "no known schema"),
    ("t.jsonl", jsonl({"instruction": "Add.", "output": 5}), "t.jsonl:1", "output", "wrong_type",
     "expected a string, got int"),
    ("e.jsonl", jsonl(GOOD, {"prompt": "p", "completion": "  "}), "e.jsonl:2", "completion",
     "empty_response", "empty response"),
    ("e2.jsonl", jsonl({"instruction": "", "input": "", "output": "o"}), "e2.jsonl:1",
     "instruction", "empty_prompt", "empty prompt"),
    ("b.jsonl", b'{"prompt": "p", "completion": "caf\xe9"}\n', "b.jsonl:1", "completion",
     "bad_encoding", "not valid UTF-8"),
    ("r.jsonl", jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
     "r.jsonl:1", "messages", "bad_roles", "expected a model turn"),
    ("r2.jsonl", jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}),
     "r2.jsonl:1", "messages", "bad_roles", "unknown role"),
    ("r3.jsonl", jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]}),
     "r3.jsonl:1", "messages[1].content", "wrong_type", "expected a string"),
    ("r4.jsonl", jsonl({"messages": [{"role": "user", "content": "a"}]}), "r4.jsonl:1", "messages",
     "empty_response", "no assistant/model message"),
    ("r5.jsonl", jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}),
     "r5.jsonl:1", "messages[1].content", "empty_response", "empty response"),
    ("x.txt", b"fine\nbad \xff byte\n", "x.txt:2", "text", "bad_encoding", "not valid UTF-8"),
    ("c.csv", "prompt,completion\na,b\nc,d,extra\n", "c.csv:3", None, "malformed", "3 columns"),
    ("c2.csv", "prompt,completion\na,b\n\nc,\n", "c2.csv:4", "completion", "empty_response",
     "empty response"),
    ("c3.csv", b"prompt,completion\na,\xc3(\n", "c3.csv:2", "completion", "bad_encoding",
     "not valid UTF-8"),
    ("j.json", json.dumps([GOOD, {"prompt": "p", "completion": ""}]), "j.json[1]", "completion",
     "empty_response", "empty response"),
    ("j2.json", json.dumps([GOOD, {"text": ["not", "a", "string"]}]), "j2.json[1]", "text",
     "wrong_type", "got list"),
]


@pytest.mark.parametrize("name,content,where,field,reason,part", BAD_CASES,
                         ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_line_field(tmp_path, name, content, where, field, reason, part):
    p = write(tmp_path, name, content)
    with pytest.raises(data.DataError) as info:
        data.read_examples(p)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / where) + ":"), msg
    if field is not None:
        assert f'field "{field}"' in msg, msg
    assert part in msg and info.value.reason == reason, msg


def test_file_level_errors_always_raise(tmp_path):
    p = write(tmp_path, "broken.json", '[{"prompt": "a",\n "completion": ]')
    with pytest.raises(data.DataError, match=r"broken\.json:2:16: malformed JSON"):
        data.read_examples(p, skip_invalid=True)
    p = write(tmp_path, "obj.json", '{"rows": []}')
    with pytest.raises(data.DataError, match="expected a JSON array"):
        data.read_examples(p, skip_invalid=True)


def test_skip_invalid_counts_each_reason_and_keeps_good(tmp_path, caplog):
    lines = [GOOD, '{"prompt": ', {"instruction": "x"}, {"prompt": "p", "completion": 3},
             {"prompt": "p", "completion": ""}, {"prompt": "q", "completion": "d"},
             {"messages": [{"role": "model", "content": "hi"}]}, {"question": "?"}]
    body = jsonl(*lines).encode() + b'{"text": "\xff"}\n' + jsonl({"text": "last"}).encode()
    p = write(tmp_path, "mixed.jsonl", body)
    with pytest.raises(data.DataError):
        data.read_examples(p)
    exs, skipped = data.read_examples(p, skip_invalid=True)
    assert [e.source for e in exs] == [f"{p}:1", f"{p}:6", f"{p}:10"]
    assert skipped == collections.Counter(malformed=1, missing_field=2, wrong_type=1,
                                          empty_response=1, bad_roles=1, bad_encoding=1)
    assert any("skipped 7 invalid records" in r.getMessage() for r in caplog.records)
    with pytest.raises(data.DataError, match="no valid examples"):
        data.read_examples(write(tmp_path, "allbad.jsonl", jsonl({"text": ""})), skip_invalid=True)


# ---------------------------------------------------------------------------------- tokens


def masked_runs(rows, tok, r=0):
    """Decoded runs of consecutive loss-masked targets in row r."""
    m, t = rows["loss_mask"][r] > 0, rows["targets"][r]
    runs, cur = [], []
    for on, tgt in zip(m, t):
        if on:
            cur.append(tgt)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(x) for x in runs], runs


def test_loss_mask_covers_model_turns_only(tok):
    ex = data.to_example({"messages": [
        {"role": "system", "content": "You summarise notes."},
        {"role": "user", "content": "Note: cough for 3 days."},
        {"role": "assistant", "content": "Complaint: cough\nPlan: rest"},
        {"role": "user", "content": "What is the plan?"},
        {"role": "assistant", "content": "Rest and fluids."}]}, "w")
    ex2 = data.to_example({"instruction": "Summarise.", "input": "The tenant pays rent.",
                           "output": "Rent is due."}, "w")
    for e, responses in [(ex, ["Complaint: cough\nPlan: rest", "Rest and fluids."]),
                         (ex2, ["Rent is due."])]:
        rows, _ = data.pack(data.encode([e], tok), 256, pad_id=tok.pad_id)
        texts, _ = masked_runs(rows, tok)
        assert texts == [r + EOT for r in responses]
        # train_on_prompt puts loss on every target of the example.
        rows, _ = data.pack(data.encode([e], tok, train_on_prompt=True), 256, pad_id=tok.pad_id)
        assert rows["loss_mask"][0].sum() == (rows["segment_ids"][0] > 0).sum()


def test_text_loss_on_every_token(tok):
    rows, stats = data.pack(data.encode([data.Example("w", text="alpha beta gamma")], tok), 64,
                            pad_id=tok.pad_id)
    texts, runs = masked_runs(rows, tok)
    assert texts == ["alpha beta gamma"] and runs[0][-1] == tok.eos_id
    assert rows["inputs"][0, 0] == tok.bos_id and stats["target_tokens"] == len(runs[0])


# ---------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def encoded(tok):
    exs, _ = data.read_examples(",".join(os.path.join(SAMPLES, d, "eval.jsonl")
                                         for d in ("legal", "creative")))
    return data.encode(exs, tok)


def segments(rows):
    """Every packed segment as its full id sequence (inputs + last target), checking invariants."""
    out = []
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (rows["loss_mask"][r][used:] == 0).all()
        ids = sorted(set(seg[:used].tolist()))
        assert ids == list(range(1, len(ids) + 1))  # 1, 2, 3, ... in order, contiguous
        assert (np.diff(seg[:used]) >= 0).all()
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert (pos[where] == np.arange(len(where))).all()  # positions restart per segment
            inp, tgt = rows["inputs"][r][where], rows["targets"][r][where]
            assert (inp[1:] == tgt[:-1]).all()
            out.append(tuple(inp.tolist()) + (int(tgt[-1]),))
    return out


def test_packing_keeps_every_token_once(encoded, tok):
    seq_len = 256
    assert max(len(i) for i, _ in encoded) <= seq_len + 1
    rows, stats = data.pack(encoded, seq_len, pad_id=tok.pad_id, seed=3)
    assert rows["inputs"].shape[1] == seq_len and stats["truncated"] == 0
    assert sorted(segments(rows)) == sorted(tuple(i.tolist()) for i, _ in encoded)
    assert stats["rows"] < len(encoded) and stats["tokens"] == sum(len(i) - 1 for i, _ in encoded)
    assert (rows["segment_ids"].max(axis=1) > 1).any()  # several examples per row
    assert stats["fill"] == pytest.approx(stats["tokens"] / (stats["rows"] * seq_len))
    for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("segment_ids", np.int32), ("positions", np.int32)]:
        assert rows[k].dtype == dtype
    again, _ = data.pack(encoded, seq_len, pad_id=tok.pad_id, seed=3)
    other, _ = data.pack(encoded, seq_len, pad_id=tok.pad_id, seed=4)
    assert all((again[k] == rows[k]).all() for k in rows)
    assert not np.array_equal(other["inputs"][0], rows["inputs"][0])


def test_padding_mode(encoded, tok):
    rows, stats = data.pack(encoded, 256, pad_id=tok.pad_id, packing=False)
    assert stats["rows"] == len(encoded) and rows["segment_ids"].max() == 1
    pad = rows["segment_ids"] == 0
    assert pad.any()
    assert (rows["inputs"][pad] == tok.pad_id).all() and (rows["targets"][pad] == tok.pad_id).all()
    assert (rows["positions"][pad] == 0).all() and (rows["loss_mask"][pad] == 0).all()
    assert sorted(segments(rows)) == sorted(tuple(i.tolist()) for i, _ in encoded)


def test_truncate_vs_drop(encoded, tok):
    seq_len = 120
    long = sum(len(i) - 1 > seq_len for i, _ in encoded)
    assert 0 < long < len(encoded)
    rows, st = data.pack(encoded, seq_len, pad_id=tok.pad_id, overlong="truncate")
    assert st["truncated"] + st["dropped_no_target"] == long and st["dropped_overlong"] == 0
    assert len(segments(rows)) == len(encoded) - st["dropped_no_target"]
    rows, st = data.pack(encoded, seq_len, pad_id=tok.pad_id, overlong="drop")
    assert st["dropped_overlong"] == long and st["truncated"] == 0
    assert sorted(segments(rows)) == sorted(tuple(i.tolist()) for i, _ in encoded
                                            if len(i) - 1 <= seq_len)
    # A truncation that cuts off the whole response leaves nothing to learn: dropped and counted.
    ids = np.arange(10, 60, dtype=np.int32)
    mask = np.zeros(50, bool)
    mask[45:] = True
    _, st = data.pack([(ids, mask)], 20, pad_id=0)
    assert st["dropped_no_target"] == 1 and st["rows"] == 0 and st["truncated"] == 0


# ---------------------------------------------------------------------------------- pipeline


def synthetic_rows(n, seq_len=4):
    rows = {k: np.zeros((n, seq_len), np.float32 if k == "loss_mask" else np.int32)
            for k in data.FIELDS}
    rows["inputs"][:, 0] = np.arange(n)  # identifies the row
    rows["loss_mask"][:] = 1
    return rows


def take(it, k):
    return [next(it) for _ in range(k)]


def ids_of(batches):
    return [b["inputs"][:, 0].tolist() for b in batches]


def test_iterator_determinism_epochs_and_resume():
    rows = synthetic_rows(12)
    a = ids_of(take(data.train_iterator(rows, global_batch_size=4, seed=7), 9))
    assert a == ids_of(take(data.train_iterator(rows, global_batch_size=4, seed=7), 9))
    assert a != ids_of(take(data.train_iterator(rows, global_batch_size=4, seed=8), 9))
    for e in range(3):  # every epoch sees every row once, in a different order
        epoch = sum(a[3 * e:3 * e + 3], [])
        assert sorted(epoch) == list(range(12))
    assert a[:3] != a[3:6]
    it = data.train_iterator(rows, global_batch_size=4, seed=7)
    take(it, 4)
    state = it.get_state()
    rest = ids_of(take(it, 5))
    resumed = data.train_iterator(rows, global_batch_size=4, seed=7)
    resumed.set_state(state)
    assert ids_of(take(resumed, 5)) == rest == a[4:9]


def test_finite_epochs():
    rows = synthetic_rows(10)
    batches = list(data.train_iterator(rows, global_batch_size=4, seed=0, num_epochs=2))
    assert len(batches) == 5
    assert sorted(sum(ids_of(batches), [])) == sorted(list(range(10)) * 2)
    with pytest.raises(data.DataError, match="do not fill one global batch"):
        data.train_iterator(synthetic_rows(3), global_batch_size=4, seed=0, num_epochs=1)


def test_process_slices_equal_global_batch():
    rows = synthetic_rows(20)
    full = take(data.train_iterator(rows, global_batch_size=8, seed=1), 6)
    parts = [take(data.train_iterator(rows, global_batch_size=8, seed=1, process_index=p,
                                      process_count=2), 6) for p in range(2)]
    for i, b in enumerate(full):
        assert parts[0][i]["inputs"].shape == (4, 4)
        for k in b:
            assert np.array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), b[k])
    ev = data.eval_batches(rows, global_batch_size=8, pad_id=5)
    ev_parts = [data.eval_batches(rows, global_batch_size=8, pad_id=5, process_index=p,
                                  process_count=2) for p in range(2)]
    assert len(ev) == 3 and all(len(e) == 3 for e in ev_parts)
    for i, b in enumerate(ev):
        for k in b:
            assert np.array_equal(np.concatenate([ev_parts[0][i][k], ev_parts[1][i][k]]), b[k])
    with pytest.raises(data.DataError, match="multiple of the process count"):
        data.train_iterator(rows, global_batch_size=5, seed=0, process_count=2)


def test_eval_batches_in_order_and_padded():
    rows = synthetic_rows(10)
    ev = data.eval_batches(rows, global_batch_size=4, pad_id=9)
    assert [b["inputs"].shape for b in ev] == [(4, 4)] * 3
    assert ev[0]["inputs"][:, 0].tolist() == [0, 1, 2, 3]
    last = ev[2]
    assert last["inputs"][:2, 0].tolist() == [8, 9] and (last["inputs"][2:] == 9).all()
    assert (last["loss_mask"][2:] == 0).all() and (last["segment_ids"][2:] == 0).all()
    assert sum(b["loss_mask"].sum() for b in ev) == rows["loss_mask"].sum()


# ---------------------------------------------------------------------------------- build


def cfg(**kw):
    import ml_collections  # pylint: disable=g-import-not-at-top
    base = dict(train=os.path.join(SAMPLES, "legal", "train.jsonl"), eval="", eval_fraction=0.0,
                seq_len=256, packing=True, overlong="truncate", train_on_prompt=False,
                skip_invalid=False, field_map="", default_instruction="", text_split="line",
                num_epochs=0, tfds_data_dir="")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_build_with_eval_file(tok):
    d = data.build(cfg(eval=os.path.join(SAMPLES, "legal", "eval.jsonl")), tok,
                   global_batch_size=4, seed=0)
    b = next(d.train)
    assert set(b) == set(data.FIELDS) and b["inputs"].shape == (4, 256)
    assert d.stats["train"]["examples"] == 300 and d.stats["eval"]["examples"] == 40
    assert sum(int((e["segment_ids"] > 0).sum()) for e in d.eval) == d.stats["eval"]["tokens"]
    assert d.num_batches is None and d.epoch(0) == 0
    assert d.epoch(d.rows_per_epoch // 4 + 1) == 1


def test_eval_fraction_is_disjoint_from_train(tok):
    exs, _ = data.read_examples(os.path.join(SAMPLES, "legal", "train.jsonl"))
    train, held = data.holdout(exs, 0.1, seed=0)
    assert len(held) == 30 and len(train) == 270
    assert not {e.source for e in train} & {e.source for e in held}
    assert {e.source for e in train} | {e.source for e in held} == {e.source for e in exs}
    assert [e.source for e in data.holdout(exs, 0.1, seed=0)[1]] == [e.source for e in held]
    d = data.build(cfg(eval_fraction=0.1, num_epochs=1), tok, global_batch_size=8, seed=0)
    assert d.stats["train"]["examples"] == 270 and d.stats["eval"]["examples"] == 30
    assert d.num_batches == d.rows_per_epoch // 8 == len(list(d.train))


@pytest.mark.parametrize("key,value", [("seq_len", 0), ("overlong", "cut"), ("packing", "yes"),
                                       ("eval_fraction", 1.5), ("num_epochs", -1),
                                       ("text_split", "word"), ("field_map", "output"),
                                       ("train", "")])
def test_build_rejects_bad_config(tok, key, value):
    with pytest.raises(data.DataError, match=f"data.{key}"):
        data.build(cfg(**{key: value}), tok, global_batch_size=4, seed=0)


def test_build_skip_invalid_stats(tok, tmp_path):
    p = write(tmp_path, "t.jsonl", jsonl(GOOD, {"prompt": "p", "completion": ""}, GOOD))
    d = data.build(cfg(train=p, skip_invalid=True), tok, global_batch_size=1, seed=0)
    assert d.stats["train"]["skipped"] == {"empty_response": 1}
    assert d.stats["train"]["examples"] == 2


# ---------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")

    class GemmaJaxTestBills(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "summary": tfds.features.Text(),
                 "year": tfds.features.Scalar(np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "test": self._generate_examples(1)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"Bill {i}: the café tax rises.", "summary": f"Tax rise {i}.",
                          "year": 2000 + i}

    root = tmp_path_factory.mktemp("tfds")
    GemmaJaxTestBills(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_tfds_array_record(tfds_dir):
    exs, _ = data.read_examples("tfds:gemma_jax_test_bills:train", tfds_data_dir=tfds_dir,
                                field_map="input=text,output=summary",
                                default_instruction="Summarise the bill.")
    assert [e.turns for e in exs] == [
        turns(f"Summarise the bill.\n\nBill {i}: the café tax rises.", f"Tax rise {i}.") for i in range(3)]
    assert exs[2].source == "tfds:gemma_jax_test_bills:train[2]"
    # name:version:split, a dict field map, and no instruction at all: the input is the prompt.
    exs, _ = data.read_examples("tfds:gemma_jax_test_bills:1.0.0:test", tfds_data_dir=tfds_dir,
                                field_map={"input": "text", "output": "summary"})
    assert len(exs) == 1 and exs[0].turns == turns("Bill 0: the café tax rises.", "Tax rise 0.")
    # Without a field map the "text" column makes raw documents.
    exs, _ = data.read_examples("tfds:gemma_jax_test_bills:train", tfds_data_dir=tfds_dir)
    assert [e.text for e in exs] == [f"Bill {i}: the café tax rises." for i in range(3)]
    with pytest.raises(data.DataError, match=r'tfds:gemma_jax_test_bills:train\[0\]: field "output": missing'):
        data.read_examples("tfds:gemma_jax_test_bills:train", tfds_data_dir=tfds_dir,
                           field_map="input=text")
    with pytest.raises(data.DataError, match="split 'validation'"):
        data.read_examples("tfds:gemma_jax_test_bills:validation", tfds_data_dir=tfds_dir)


def test_tfds_tfrecord_error(tfds_dir, tmp_path):
    # A tfrecord-prepared copy (TFDS cannot write tfrecord without TensorFlow): rename the files.
    src = os.path.join(tfds_dir, "gemma_jax_test_bills", "1.0.0")
    dst = tmp_path / "gemma_jax_test_bills" / "1.0.0"
    dst.mkdir(parents=True)
    for f in os.listdir(src):
        content = open(os.path.join(src, f), "rb").read()
        if f == "dataset_info.json":
            content = content.replace(b'"array_record"', b'"tfrecord"')
        (dst / f.replace("array_record", "tfrecord")).write_bytes(content)
    with pytest.raises(data.DataError) as info:
        data.read_examples("tfds:gemma_jax_test_bills:train", tfds_data_dir=str(tmp_path))
    msg = str(info.value)
    assert "tfrecord" in msg and "pip install tensorflow" in msg and "file_format='array_record'" in msg


def test_tfds_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(data.DataError, match="pip install tensorflow-datasets"):
        data.read_examples("tfds:billsum:train")


# ---------------------------------------------------------------------------------- samples


def test_shipped_samples_load_and_are_regenerated_exactly(tmp_path):
    expect = {"legal/train.jsonl": 300, "legal/eval.jsonl": 40, "translation/train.csv": 300,
              "translation/eval.csv": 40, "medical/train.jsonl": 300, "medical/eval.jsonl": 40,
              "creative/train.jsonl": 300, "creative/eval.jsonl": 40, "code/train.json": 300,
              "code/eval.json": 40, "general/eval.txt": 100}
    for name, n in expect.items():
        exs, skipped = data.read_examples(os.path.join(SAMPLES, name))
        assert len(exs) == n and not skipped, name
    size = sum(os.path.getsize(os.path.join(SAMPLES, n)) for n in expect)
    assert size < 2 * 2**20
    for rec in json.load(open(os.path.join(SAMPLES, "code", "eval.json"))):
        exec(rec["output"] + "\n" + "\n".join(rec["tests"]), {})  # the reference passes its tests
    subprocess.run([sys.executable, os.path.join(SAMPLES, "make_samples.py"), f"--out={tmp_path}"],
                   check=True, capture_output=True)
    for name in expect:
        assert filecmp.cmp(os.path.join(SAMPLES, name), tmp_path / name, shallow=False), name


def test_data_module_does_not_import_jax():
    code = "import sys, gemma_jax.data; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": REPO})


# ---------------------------------------------------------------------------------- more sources


RECS = [{"instruction": "A", "input": "", "output": "1"}, {"prompt": "B", "completion": "2"}]


def test_compressed_jsonl_keeps_lines(tmp_path):
    import gzip  # pylint: disable=g-import-not-at-top
    body = ("\n" + jsonl(*RECS)).encode()
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(body))
    exs, _ = data.read_examples(str(p))
    assert [e.turns for e in exs] == [turns("A", "1"), turns("B", "2")]
    assert [e.source for e in exs] == [f"{p}:2", f"{p}:3"]  # line numbers of the decompressed text
    bad = tmp_path / "b.jsonl.gz"
    bad.write_bytes(gzip.compress(jsonl(GOOD, {"prompt": "p", "completion": ""}).encode()))
    with pytest.raises(data.DataError, match=rf'{bad}:2: field "completion": empty response'):
        data.read_examples(str(bad))
    zstd = pytest.importorskip("zstandard")
    z = tmp_path / "c.jsonl.zst"
    z.write_bytes(zstd.ZstdCompressor().compress(body))
    assert [e.turns for e in data.read_examples(str(z))[0]] == [turns("A", "1"), turns("B", "2")]


def test_parquet_rows_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    p = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"question": ["Why?", "How?", "When?"], "answer": ["Because.", "", "Now."]}), p,
                   row_group_size=2)
    with pytest.raises(data.DataError, match=rf'{p}\[1\]: field "answer": empty response'):
        data.read_examples(p, field_map="prompt=question,completion=answer")
    exs, skipped = data.read_examples(p, field_map="prompt=question,completion=answer", skip_invalid=True)
    assert [e.turns for e in exs] == [turns("Why?", "Because."), turns("When?", "Now.")]
    assert exs[1].source == f"{p}[2]" and skipped == collections.Counter(empty_response=1)
    with pytest.raises(data.DataError, match="unreadable parquet"):
        data.read_examples(write(tmp_path, "bad.parquet", "not parquet"))


def test_sharegpt_schema():
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}]}
    assert data.to_example(rec, "w").turns == turns("Be brief.\n\nHi", "Hello.")
    for conv, field, part in [
        ([{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}], "conversations[1].from", "unknown speaker"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}], "conversations[1].value", "empty response"),
        ([{"from": "human", "value": "Hi"}, {"from": "gpt"}], "conversations[1].value", "missing"),
        ([{"from": "human", "value": "Hi"}], "conversations", "no assistant/model message"),
    ]:
        with pytest.raises(data.DataError, match=rf'^f\.jsonl:4: field "{re.escape(field)}": {part}'):
            data.to_example({"conversations": conv}, "f.jsonl:4")


def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "B", "completion": "2"}, {"prompt": "C", "completion": "3"}]  # one Arrow schema
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list([{"text": "held out"}])})
    d.save_to_disk(str(tmp_path / "ds"))
    exs, _ = data.read_examples(f"hf:{tmp_path / 'ds'}")  # the train split by default
    assert [e.turns for e in exs] == [turns("B", "2"), turns("C", "3")]
    assert exs[1].source == f"hf:{tmp_path / 'ds'}[1]"
    exs, _ = data.read_examples(f"hf:{tmp_path / 'ds'}:test")
    assert [e.text for e in exs] == ["held out"]
    with pytest.raises(data.DataError, match="no split 'validation'"):
        data.read_examples(f"hf:{tmp_path / 'ds'}:validation")


# ---------------------------------------------------------------------------------- preference data and seq_len


def test_preference_pairs_cut_by_seq_len_warn_like_sft_and_none_left_names_seq_len(tok, tmp_path, caplog):
    """Pairs truncated or dropped by data.seq_len: the SFT data's WARNING (the seq_len that keeps
    95% / 99% whole); every pair too long: the error names data.seq_len, not an empty batch."""
    import logging  # pylint: disable=g-import-not-at-top

    import ml_collections  # pylint: disable=g-import-not-at-top

    from gemma_jax.data import preference  # pylint: disable=g-import-not-at-top
    pairs = [{"prompt": "word " * (10 + i), "chosen": "yes it is", "rejected": "no"} for i in range(40)]
    path = write(tmp_path, "pairs.jsonl", jsonl(*pairs))
    encoded = preference.encode_pairs(preference.read_pairs(path)[0], tok)
    need = sorted(max(len(ids) for ids, _ in sides) - 1 for sides in encoded)
    p95, p99 = (int(np.ceil(np.percentile(need, q))) for q in (95, 99))

    def build(seq_len, overlong="truncate"):
        c = ml_collections.ConfigDict(dict(train=path, eval="", eval_fraction=0.0, seq_len=seq_len, packing=True,
                                           overlong=overlong, train_on_prompt=False, skip_invalid=False,
                                           field_map="", text_split="line", tfds_data_dir="", num_epochs=0))
        return preference.build(c, tok, global_batch_size=1, seed=0)

    for overlong, counted in (("truncate", "truncated"), ("drop", "dropped as overlong")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build(need[20], overlong)
        msg = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "keeps 95%" in r.getMessage()]
        assert len(msg) == 1, caplog.text
        lost = sum(n > need[20] for n in need)
        assert f"data.seq_len={p95} keeps 95% of the pairs" in msg[0] and f"{p99} keeps 99%" in msg[0]
        counts = re.match(r"data train: (\d+) truncated, (\d+) dropped as overlong, (\d+) dropped with no target",
                          msg[0])
        assert counts and sum(map(int, counts.groups())) == lost > 0, msg[0]
        assert f" {counted}" in msg[0] and "of 40 pairs" in msg[0] and f"at data.seq_len={need[20]}" in msg[0]
        if overlong == "drop":
            assert int(counts.group(2)) == lost
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(need[-1])
    assert "keeps 95%" not in caplog.text  # nothing lost, no warning
    # Every prompt alone is longer than seq_len: nothing left, and the error says which key to raise.
    with pytest.raises(data.DataError, match=rf"data train: nothing left at data\.seq_len=8: .*of 40 pairs; "
                                             rf"data\.seq_len={p95} keeps 95% whole, {p99} keeps 99%"):
        build(8)
    for bad in (0, -4, 1):
        with pytest.raises(data.DataError, match=rf"data\.seq_len: invalid value {bad} \(expected an integer >= 2\)"):
            build(bad)
