"""GGUF files opened through the `gguf` package (llama.cpp's Python reader and writer).

Shared by the weights reader (gemma_jax.weights.gguf) and the tokenizer (a `.gguf` holds its
vocabulary as metadata). `open_reader` turns every way a file can be wrong into one line naming
it: not a GGUF at all, truncated, or otherwise damaged.

`gguf.GGUFReader` walks metadata arrays one element at a time through numpy views: Gemma 3's
262144-entry vocabulary (tokens, scores, types) takes ~12 s to open. `Reader` parses arrays of
numbers as one view and arrays of strings with `struct` (~0.5 s for the same file, the same
fields), and bounds-checks every read so a truncated file is reported as truncated rather than
failing deep inside a reshape.
"""

from __future__ import annotations

import functools
import os
import struct
import sys

from gemma_jax.errors import UserError

MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'gemma_jax[gguf]' (or pip install 'gguf>=0.10')"


class TruncatedError(Exception):
    """A read past the end of the file: (bytes needed, file size)."""


def require_gguf():
    """The `gguf` package, or a UserError saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise UserError(f"reading or writing GGUF files needs the gguf package: {INSTALL_HINT} ({e})") from None
    return gguf


def is_gguf(path) -> bool:
    """Whether `path` is a local file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _reader_class():
    gguf = require_gguf()
    import numpy as np
    from gguf.constants import GGUFValueType

    class Reader(gguf.GGUFReader):
        """GGUFReader with bounds-checked reads and a fast path for metadata arrays."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
            if end > len(self.data):
                raise TruncatedError(end, len(self.data))
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            # Same parts/data layout as the parent (ReaderField.contents reads it unchanged), but
            # one view per numeric array and no per-element numpy indexing for strings.
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs
            raw_itype = self._get(offs, np.uint32)
            alen = self._get(offs + 4, np.uint64)
            offs += 12
            itype, n = int(raw_itype[0]), int(alen[0])
            nptype = self.gguf_scalar_to_np.get(GGUFValueType(itype)) if itype in GGUFValueType._value2member_map_ \
                else None
            if nptype is not None:
                values = self._get(offs, nptype, n)
                return offs + values.nbytes - orig_offs, [raw_itype, alen, values], [2], \
                    [GGUFValueType.ARRAY, GGUFValueType(itype)]
            if itype != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            size, view, parts = len(self.data), memoryview(self.data), [raw_itype, alen]
            for _ in range(n):
                if offs + 8 > size:
                    raise TruncatedError(offs + 8, size)
                (length,) = struct.unpack_from("<Q", view, offs)
                if offs + 8 + length > size:
                    raise TruncatedError(offs + 8 + length, size)
                parts.append(np.frombuffer(view, np.uint8, length, offs + 8))
                offs += 8 + length
            return offs - orig_offs, parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, GGUFValueType.STRING]

    return Reader


def open_reader(path):
    """A gguf.GGUFReader of `path`; one UserError naming the file if it is not a readable GGUF."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); pass a .gguf "
                        "model file such as llama.cpp writes")
    reader_class = _reader_class()
    try:
        return reader_class(path)
    except TruncatedError as e:
        need, have = e.args
        raise UserError(f"{path}: truncated GGUF file ({have:,} bytes, but its header describes data up to "
                        f"byte {need:,}); download or copy it again") from None
    except Exception as e:  # noqa: BLE001 - the gguf package raises many kinds on a damaged header
        raise UserError(f"{path}: damaged GGUF file, the gguf package cannot read it "
                        f"({type(e).__name__}: {e}; {size:,} bytes)") from None


_MISSING = object()


def field(reader, key: str, default=_MISSING):
    """A metadata value (str, number, bool, or list for arrays); `default` if absent."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise KeyError(key)
        return default
    return f.contents()
