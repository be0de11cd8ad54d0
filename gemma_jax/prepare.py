"""`python -m gemma_jax.prepare --config=configs/legal.py:tiny [--config.KEY=VALUE ...]`.

Builds (or finds) the tokenized cache of data.train and data.eval that training reads: every
record validated (a bad one stops here, with its file:line:field, unless data.skip_invalid),
formatted with the chat template, tokenized on --num_workers processes (default: all cores) and
written to data.cache_dir. Training builds a missing cache itself; running this first moves that
work off the accelerators' clock. --preview=N prints N formatted examples with the tokens that
carry loss between [[ and ]] and exits, to check the loss mask before training.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from gemma_jax import errors
from gemma_jax.data import cache as cache_lib
from gemma_jax.data import pipeline
from gemma_jax.data.schema import DataError

FLAGS = flags.FLAGS


def _tokenizer(cfg):
    """data.tokenizer, else the one beside model.init_checkpoint (as training finds it)."""
    from gemma_jax import paths  # pylint: disable=g-import-not-at-top
    from gemma_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    path = cfg.data.tokenizer
    if not path and cfg.model.init_checkpoint:
        from gemma_jax import weights  # pylint: disable=g-import-not-at-top  (imports jax)
        path = weights.find_tokenizer(cfg.model.init_checkpoint)
    if not path:
        raise DataError("no tokenizer: set data.tokenizer to the tokenizer.model training uses "
                        "(or model.init_checkpoint to weights with one beside them)")
    return Tokenizer(paths.local_copy(path))


def prepare(cfg, *, num_workers: int = 0, preview: int = 0, rebuild: bool = False) -> dict:
    """Builds or reuses the caches of cfg.data (or prints a preview); returns what it did."""
    tok = _tokenizer(cfg)
    specs = [part for part, _ in pipeline.parse_mixture(cfg.data.train)] if cfg.data.train else []
    if not specs:
        raise DataError("data.train is empty: name files, globs, tfds:name:split or hf:name:split")
    if preview:
        print(cache_lib.preview(specs[0], tok, cfg.data, preview))
        return {}
    if cfg.data.get("eval", ""):
        specs.append(cfg.data.eval)
    out = {}
    for spec in specs:
        c = cache_lib.ensure(spec, tok, cfg.data, num_workers=num_workers, rebuild=rebuild)
        m = c.manifest
        out[spec] = dict(cache=c.dir, examples=m["examples"], tokens=m["tokens"], skipped=m["skipped"],
                         length_p95=m["length_p95"], length_p99=m["length_p99"], build_seconds=m["build_seconds"])
    print(json.dumps(out, indent=1))
    return out


def main(argv) -> None:
    del argv
    cfg = FLAGS.config
    if FLAGS.cache_dir:  # until config.py has data.cache_dir, and beside it
        with cfg.unlocked():
            cfg.data.cache_dir = FLAGS.cache_dir
    errors.run_cli(prepare, cfg, num_workers=FLAGS.num_workers, preview=FLAGS.preview,
                   rebuild=FLAGS.rebuild)


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/legal.py:tiny.",
                                    lock_config=False)
    flags.DEFINE_string("cache_dir", "", "Overrides data.cache_dir (default ~/.cache/gemma_jax/data).")
    flags.DEFINE_integer("num_workers", 0, "Tokenizer processes; 0: all cores.")
    flags.DEFINE_integer("preview", 0, "Print this many formatted examples with [[trained spans]] and exit.")
    flags.DEFINE_bool("rebuild", False, "Build the cache again even when a complete one exists.")
    flags.DEFINE_bool("debug", False, "Show the traceback of user errors.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    app.run(main)
