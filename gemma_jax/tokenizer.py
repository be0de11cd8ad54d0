"""SentencePiece tokenizer, special tokens and the Gemma 2 chat format (host side: no jax).

A `.gguf` file holds its tokenizer as metadata (llama.cpp's `tokenizer.ggml.*` keys);
`Tokenizer("model.gguf")` rebuilds the SentencePiece model from it (see `sentencepiece_from_gguf`)
and keeps the rebuilt `tokenizer.model` in a cache, so everything downstream (data workers, the
copy a training workdir keeps, exports) sees an ordinary SentencePiece file.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Mapping

import numpy as np
import sentencepiece as spm

USER, MODEL = "user", "model"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Gemma 4's tokenizer renamed the turn markers (same ids as Gemma 3's, 105 and 106).
GEMMA4_START_OF_TURN, GEMMA4_END_OF_TURN = "<|turn>", "<turn|>"
TURN_MARKERS = ((START_OF_TURN, END_OF_TURN), (GEMMA4_START_OF_TURN, GEMMA4_END_OF_TURN))
_ROLES = {"user": USER, "assistant": MODEL, "model": MODEL}
# Where a directory may hold the model: official/HF downloads, then a Keras preset.
_CANDIDATES = ("tokenizer.model", os.path.join("assets", "tokenizer", "vocabulary.spm"))
# SentencePiece silently drops training sentences longer than max_sentence_length bytes.
_MAX_SENTENCE_BYTES = 16384


def normalize_turns(messages) -> list[dict]:
    """Maps chat messages onto Gemma turns."""
    turns, system = [], None
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}")
        role, content = m["role"], m["content"]
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message is only allowed first")
            system = content
            continue
        if role not in _ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} "
                             "(expected system, user, assistant or model)")
        expected = USER if len(turns) % 2 == 0 else MODEL
        if _ROLES[role] != expected:
            raise ValueError(f"message {i}: expected a {expected} turn, got role {role!r} "
                             "(turns must alternate user/model, starting with user)")
        if system is not None and not turns:
            # Gemma has no system role; its own chat template folds it into the first user turn.
            content = system + "\n\n" + content
        turns.append({"role": expected, "content": content})
    if not turns:
        raise ValueError("no user turn: a chat needs at least one user message")
    return turns


# The chat format of Tokenizer.format_chat / encode_chat as a Jinja template for transformers'
# apply_chat_template (written into Hugging Face exports): the same role mapping, system folding,
# alternation checks and generation prompt, content unchanged (no trimming).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=none, turns=0) -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message is only allowed first') -}}{%- endif -%}"
    "{%- set ns.system = message['content'] -%}"
    "{%- else -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = 'user' -%}"
    "{%- elif message['role'] in ['assistant', 'model'] -%}{%- set role = 'model' -%}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role'] + "
    "' (expected system, user, assistant or model)') -}}{%- endif -%}"
    "{%- if (role == 'user') != (ns.turns % 2 == 0) -%}"
    "{{- raise_exception('turns must alternate user/model, starting with user') -}}{%- endif -%}"
    "{%- if ns.turns == 0 and ns.system is not none -%}"
    "{%- set content = ns.system + '\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{- '" + START_OF_TURN + "' + role + '\\n' + content + '" + END_OF_TURN + "\\n' -}}"
    "{%- set ns.turns = ns.turns + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.turns == 0 -%}{{- raise_exception('no user turn: a chat needs at least one user message') -}}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if ns.turns % 2 == 0 -%}{{- raise_exception('add_generation_prompt needs the chat to end with a "
    "user turn') -}}{%- endif -%}"
    "{{- '" + START_OF_TURN + "model\\n' -}}"
    "{%- endif -%}"
)

# Gemma 3 exports: the same turns; a message's content may also be a list of typed parts
# (transformers' multimodal message format), whose text parts are joined. Image parts are refused:
# the export is the text model.
_CONTENT_PARTS = (
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set joined = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set joined.text = joined.text + part['text'] -%}"
    "{%- else -%}{{- raise_exception('a content part of type ' + part['type'] + ': this text model reads "
    "text parts only') -}}{%- endif -%}"
    "{%- endfor -%}{%- set text = joined.text -%}{%- endif -%}"
)
CHAT_TEMPLATE_GEMMA3 = CHAT_TEMPLATE.replace("message['content']", "text").replace(
    "{%- for message in messages -%}", "{%- for message in messages -%}" + _CONTENT_PARTS)


def chat_template(start_of_turn: str = START_OF_TURN, end_of_turn: str = END_OF_TURN, *, parts: bool = True) -> str:
    """CHAT_TEMPLATE (parts: CHAT_TEMPLATE_GEMMA3) with the turn markers of a tokenizer (Gemma 4's
    are <|turn> and <turn|>)."""
    template = CHAT_TEMPLATE_GEMMA3 if parts else CHAT_TEMPLATE
    return template.replace(START_OF_TURN, start_of_turn).replace(END_OF_TURN, end_of_turn)


def _resolve(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for c in _CANDIDATES:
            if os.path.isfile(os.path.join(path, c)):
                return os.path.join(path, c)
    raise FileNotFoundError(
        f"no SentencePiece tokenizer at {path!r} (a file, a .gguf model, or a directory holding "
        f"{' or '.join(_CANDIDATES)} or one .gguf). Gemma's tokenizer.model ships next to the official "
        "weights (Kaggle google/gemma-2/flax/...) and in the Hugging Face repos "
        "(google/gemma-2-2b, ...); for tiny models train one with "
        "`python -m gemma_jax.tokenizer train`.")


def _check_generation_prompt(turns, add_generation_prompt):
    if add_generation_prompt and turns[-1]["role"] == MODEL:
        raise ValueError("add_generation_prompt needs the chat to end with a user turn "
                         "(it would open a second model turn in a row)")


class Tokenizer:
    """SentencePiece tokenizer with Gemma's special ids and turn format."""

    def __init__(self, path: str):
        self.source = os.fspath(path)  # as given: a tokenizer.model, a directory, or a .gguf
        gguf_path = gguf_in(self.source)
        # A GGUF's vocabulary becomes a tokenizer.model in the cache; `path` is always a SentencePiece file.
        self.path = rebuilt_model(gguf_path) if gguf_path else _resolve(self.source)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.vocab_size()
        self.pad_id, self.eos_id = self._sp.pad_id(), self._sp.eos_id()
        self.bos_id, self.unk_id = self._sp.bos_id(), self._sp.unk_id()
        # Gemma 2/3's <start_of_turn>/<end_of_turn>, else Gemma 4's <|turn>/<turn|>.
        self.turn_markers = next((m for m in TURN_MARKERS if all(self._has(p) for p in m)), TURN_MARKERS[0])
        self.start_of_turn_id = self._special(self.turn_markers[0])
        self.end_of_turn_id = self._special(self.turn_markers[1])
        # decode leaves out what transformers' skip_special_tokens=True leaves out of generated
        # text; SentencePiece alone would render <unk> as " ⁇ ".
        self._dropped = {self.pad_id, self.bos_id, self.eos_id, self.unk_id}

    def _has(self, piece: str) -> bool:
        return self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece

    def _special(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk_id for an unknown piece instead of failing.
        if self._sp.id_to_piece(i) != piece:
            raise ValueError(f"tokenizer {self.path!r} has no {piece!r} piece, so it is not "
                             "Gemma-style (see train_sentencepiece for the recipe)")
        return i

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Text -> ids, BOS first by default."""
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids) -> str:
        """Ids (list or 1-D array) -> text, dropping pad/bos/eos/unk."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
        return self._sp.decode([int(i) for i in ids if int(i) not in self._dropped])

    def id_to_piece(self, i) -> str:
        """Id -> piece string."""
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece) -> int:
        """Piece string -> id (unk_id if absent)."""
        return self._sp.piece_to_id(piece)

    def format_chat(self, turns, *, add_generation_prompt: bool = False) -> str:
        """Chat messages -> Gemma turn-format text, starting with "<bos>"."""
        turns = normalize_turns(turns)
        _check_generation_prompt(turns, add_generation_prompt)
        start, end = self.turn_markers
        text = "<bos>" + "".join(f"{start}{t['role']}\n{t['content']}{end}\n" for t in turns)
        return text + (f"{start}{MODEL}\n" if add_generation_prompt else "")

    def encode_chat(self, turns, *, add_generation_prompt: bool = False,
                    train_on_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Chat -> (int32 ids, bool loss mask on model contents and their <end_of_turn>)."""
        turns = normalize_turns(turns)
        _check_generation_prompt(turns, add_generation_prompt)
        ids, mask = [self.bos_id], [False]
        newline = self.encode("\n", add_bos=False)
        for t in turns:
            is_model = t["role"] == MODEL
            header = self.encode(t["role"] + "\n", add_bos=False)
            # Header and content are encoded together, as in encode(format_chat(...)); the
            # special pieces around them are atomic, so nothing merges across segments.
            body = self.encode(t["role"] + "\n" + t["content"], add_bos=False)
            # Content starting with whitespace may merge with the header's "\n" into one piece;
            # that piece counts as content, since the model has to produce it.
            k = 0
            while k < min(len(header), len(body)) and header[k] == body[k]:
                k += 1
            ids += [self.start_of_turn_id] + body + [self.end_of_turn_id] + newline
            mask += [False] * (1 + k) + [is_model] * (len(body) - k + 1) + [False] * len(newline)
        if add_generation_prompt:
            prompt = [self.start_of_turn_id] + self.encode(MODEL + "\n", add_bos=False)
            ids, mask = ids + prompt, mask + [False] * len(prompt)
        mask = np.asarray(mask, dtype=bool)
        if train_on_prompt:
            mask[1:] = True
        return np.asarray(ids, dtype=np.int32), mask

    def encode_text(self, text) -> tuple[np.ndarray, np.ndarray]:
        """Raw document -> ([bos] + ids + [eos], mask True on all but BOS)."""
        ids = [self.bos_id] + self.encode(text, add_bos=False) + [self.eos_id]
        mask = np.ones(len(ids), dtype=bool)
        mask[0] = False
        return np.asarray(ids, dtype=np.int32), mask


# ----------------------------------------------------------------------------- GGUF vocabularies

GGUF_SUFFIX = ".gguf"
# llama.cpp's token types use SentencePiece's numbering (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_REBUILD_VERSION = 2  # part of the cache key: a change to sentencepiece_from_gguf must not reuse old files


def gguf_in(path) -> str | None:
    """`path` if it is a GGUF file, the one .gguf of a directory without a tokenizer.model, else None."""
    from gemma_jax import gguf_file

    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(GGUF_SUFFIX) or gguf_file.is_gguf(path) else None
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, c)) for c in _CANDIDATES):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*" + GGUF_SUFFIX)))
        if len(found) > 1:
            raise ValueError(f"{path} holds several GGUF files {[os.path.basename(f) for f in found]}; pass one")
        return found[0] if found else None
    return None


def sentencepiece_from_gguf(path) -> bytes:
    """The serialized SentencePiece ModelProto described by a GGUF's `tokenizer.ggml.*` metadata.

    Encodes as transformers' tokenizer of the same file (its Gemma GGUF converter): pieces that
    are spaces only are stored with real spaces and written back with "\u2581", and are ordinary
    BPE pieces there (a run of 33 spaces is 16 + 17, not the longest piece first); merges rank by
    position in the file, not by the stored scores. CONTROL pieces other than <bos>/<eos>/<pad>
    (the turn markers, <mask>, <unusedN>, ...) become USER_DEFINED so they stay whole in text, as
    transformers' added tokens do. SentencePiece needs <bos>, <eos> and <pad> as CONTROL and <unk>
    as UNKNOWN, so those four are spelled out when they occur as text (transformers reads them as
    the special ids), as with any tokenizer.model.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    from gemma_jax import gguf_file
    from gemma_jax.errors import UserError

    reader = gguf_file.open_reader(path)
    get = lambda key, default=None: gguf_file.field(reader, "tokenizer.ggml." + key, default)  # noqa: E731
    kind, tokens = get("model"), get("tokens")
    if tokens is None:
        raise UserError(f"{path}: this GGUF holds no tokenizer (no tokenizer.ggml.tokens); pass a "
                        "tokenizer.model with data.tokenizer / --tokenizer")
    if kind != "llama":
        raise UserError(f"{path}: tokenizer.ggml.model={kind!r}; only SentencePiece vocabularies ('llama', "
                        "as in every Gemma GGUF) can be rebuilt")
    n = len(tokens)
    scores = get("scores") or [0.0] * n
    types = get("token_type") or [_NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise UserError(f"{path}: {n} tokens but {len(scores)} scores and {len(types)} token types")
    ids = {name: get(key + "_token_id") for name, key in
           (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    control = {ids["bos"], ids["eos"], ids["pad"]} - {None}

    m = pb.ModelProto()
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = _BYTE in types
    for name, i in ids.items():
        setattr(spec, f"{name}_id", -1 if i is None else int(i))
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(get("add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind in (_CONTROL, _USER_DEFINED) or not token.strip():
            token = token.replace(" ", "\u2581")
        if kind == _CONTROL and i not in control:
            kind = _USER_DEFINED
        if kind == _USER_DEFINED and token and not token.strip("\u2581"):
            kind = _NORMAL
        if i == ids["unk"]:
            kind = _UNKNOWN
        if kind == _NORMAL:
            score = -float(i)
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    data = m.SerializeToString()
    try:
        spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise UserError(f"{path}: its tokenizer metadata does not make a valid SentencePiece model ({e})") from None
    return data


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma_jax", "tokenizers")


def rebuilt_model(path) -> str:
    """A tokenizer.model rebuilt from the GGUF `path`, cached by the file's path, size and mtime
    (~/.cache/gemma_jax/tokenizers, or under $XDG_CACHE_HOME)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = hashlib.sha256(f"{_REBUILD_VERSION}\0{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    name = f"{os.path.splitext(os.path.basename(real))[0]}-{key}.model"
    directories = (_cache_dir(), os.path.join(tempfile.gettempdir(), "gemma_jax_tokenizers"))
    for directory in directories:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    data = sentencepiece_from_gguf(real)
    for directory in directories:  # the temporary directory when the cache is read-only
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".partial-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(directory, name))  # concurrent builders write the same bytes
            return os.path.join(directory, name)
        except OSError:
            continue
    raise PermissionError(f"cannot write the tokenizer rebuilt from {path} to {directories[0]} or {directories[1]}")


def _sentences(texts):
    """Splits texts at line ends into chunks SentencePiece will not drop as too long."""
    limit = _MAX_SENTENCE_BYTES // 4  # in chars: UTF-8 takes at most 4 bytes per char
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            if chunk and len(chunk) + len(line) > limit:
                yield chunk
                chunk = ""
            while len(line) > limit:
                yield line[:limit]
                line = line[limit:]
            chunk += line
        if chunk:
            yield chunk


def train_sentencepiece(texts, model_path: str, *, vocab_size: int = 2048) -> str:
    """Trains a small Gemma-style SentencePiece model (for tiny configs and tests)."""
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)  # sampling of large inputs is random; keep bytes stable
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=[START_OF_TURN, END_OF_TURN], byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, split_digits=True,
        # Without these three the round trip loses newlines and repeated spaces.
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        max_sentence_length=_MAX_SENTENCE_BYTES, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, minloglevel=1)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(buf.getvalue())
    return model_path


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def read_texts(patterns: str):
    """Yields the texts of files matching comma-separated globs (all strings of JSON records)."""
    files = []
    for p in filter(None, (s.strip() for s in patterns.split(","))):
        matched = sorted(glob.glob(os.path.expanduser(p), recursive=True))
        if not matched:
            raise FileNotFoundError(f"no files match {p!r}")
        files += matched
    for path in files:
        ext = os.path.splitext(path)[1].lower()
        with open(path, encoding="utf-8", newline="" if ext in (".csv", ".tsv") else None) as f:
            if ext == ".jsonl":
                for line in f:
                    if line.strip():
                        yield from _strings(json.loads(line))
            elif ext == ".json":
                yield from _strings(json.load(f))
            elif ext in (".csv", ".tsv"):
                for row in csv.reader(f, delimiter="\t" if ext == ".tsv" else ","):
                    yield from row
            elif ext in (".txt", ".md"):
                yield f.read()
            else:
                raise ValueError(f"{path}: unsupported extension {ext!r} "
                                 "(expected .jsonl .json .csv .tsv .txt .md)")


def define_flags(fv) -> None:
    """The flags of `python -m gemma_jax.tokenizer train`."""
    from absl import flags

    from gemma_jax import cli

    flags.DEFINE_string("input", None, "comma-separated globs of data files", flag_values=fv)
    flags.DEFINE_string("output", None, "path of the tokenizer.model to write", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 2048, "pieces in the trained model (at least the byte and special pieces)",
                         flag_values=fv)
    cli.require(fv, "input", "output")


def _main(fv, args) -> int:
    """`train`: a small Gemma-style SentencePiece model from data files."""
    from gemma_jax.errors import UserError

    if args != ["train"]:
        raise UserError(f"expected the command `train` (python -m gemma_jax.tokenizer train --input=... "
                        f"--output=...), got {args or 'none'}")
    train_sentencepiece(read_texts(fv.input), fv.output, vocab_size=fv.vocab_size)
    print(f"wrote {fv.output} (vocab_size={Tokenizer(fv.output).vocab_size})")
    return 0


def main(argv=None) -> int:
    """CLI: `python -m gemma_jax.tokenizer train --input=GLOB[,GLOB] --output=PATH [--vocab_size=N]`."""
    from gemma_jax import cli

    return cli.run(_main, define_flags, argv, prog="python -m gemma_jax.tokenizer")


if __name__ == "__main__":
    sys.exit(main())
