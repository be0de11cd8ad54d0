"""Training data: sources -> records -> Examples (chat turns) -> tokens + loss mask -> packed batches.

Host side only: numpy, grain and absl; nothing here imports jax (grain does, so it is imported
only when a train iterator is made).

  readers.py   files (jsonl, json, csv, tsv, txt) and TFDS -> records with file:line places
  schema.py    records -> Examples: the schemas, field renames, DataError with file/line/field
  packing.py   Examples -> token ids and loss masks -> packed rows (segment ids, positions)
  fingerprint.py  what identifies a source (the cache key) and digests of its content
  cache.py     sources -> validated, tokenized examples in ArrayRecord shards + manifest (built once,
               rebuilt when a source changed or a cache file is damaged)
  cache_store.py  a built cache on disk: record format, checks against its manifest, reads
  pipeline.py  cache -> per-epoch packing plans -> the resumable, per-process train iterator and
               eval batches, mixtures; build()

`from gemma_jax import data` keeps the names it always had.
"""

from gemma_jax.data.cache_store import CacheDamaged
from gemma_jax.data.packing import encode, pack
from gemma_jax.data.pipeline import Data, EvalBatches, build, eval_batches, holdout, parse_mixture, train_iterator
from gemma_jax.data.readers import read_examples, records, sources
from gemma_jax.data.schema import CANONICAL, EXTENSIONS, FIELDS, DataError, Example, parse_field_map, to_example

__all__ = ["CacheDamaged", "encode", "pack", "Data", "EvalBatches", "build", "eval_batches", "holdout", "parse_mixture",
           "train_iterator", "read_examples",
           "records", "sources", "CANONICAL", "EXTENSIONS", "FIELDS", "DataError", "Example",
           "parse_field_map", "to_example"]
