"""`python -m gemma_jax.prepare --config=configs/legal.py:tiny [--config.KEY=VALUE ...]`.

Builds (or finds) the tokenized cache of data.train and data.eval that training reads: every
record validated (a bad one stops here, with its file:line:field, unless data.skip_invalid),
formatted with the chat template, tokenized on --num_workers processes (default: all cores) and
written to data.cache_dir. Training builds a missing cache itself; running this first moves that
work off the accelerators' clock. --preview=N prints N formatted examples with the tokens that
carry loss between [[ and ]] and exits, to check the loss mask before training.

A cache found already built is checked as with data.verify_cache=full (every byte of the cache
and of its source files against the manifest's sha256s) and rebuilt when anything differs;
--rebuild builds it again regardless, beside the old one, then swaps it in and removes the old.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from gemma_jax import cli, config as config_lib
from gemma_jax.data import cache as cache_lib
from gemma_jax.data import pipeline
from gemma_jax.data.schema import DataError

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
    config_lib.validate(cfg)
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
        c = cache_lib.ensure(spec, tok, cfg.data, num_workers=num_workers, rebuild=rebuild, verify="full")
        m = c.manifest
        out[spec] = dict(cache=c.dir, examples=m["examples"], tokens=m["tokens"], skipped=m["skipped"],
                         length_p95=m["length_p95"], length_p99=m["length_p99"], build_seconds=m["build_seconds"])
    print(json.dumps(cli.rounded(out), indent=1))
    return out


def main(fv: flags.FlagValues, args: list[str]) -> int:
    """Entry point of `python -m gemma_jax.prepare`."""
    cli.no_positional(args)
    cfg = fv.config
    if fv.cache_dir:
        cfg.data.cache_dir = fv.cache_dir
    workers = fv.num_workers or int(cfg.data.get("num_workers", 0))
    prepare(cfg, num_workers=workers, preview=fv.preview, rebuild=fv.rebuild)
    return 0


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of `python -m gemma_jax.prepare`."""
    config_lib.define_config_flag("config", None, "experiment config file, e.g. configs/legal.py:tiny; override keys "
                                  "with --config.KEY=VALUE", flag_values=fv)
    flags.DEFINE_string("cache_dir", "", "overrides data.cache_dir (default: $GEMMA_JAX_DATA_CACHE, else "
                        "~/.cache/gemma_jax/data)", flag_values=fv)
    flags.DEFINE_integer("num_workers", 0, "tokenizer processes; 0: data.num_workers, else all cores", flag_values=fv)
    flags.DEFINE_integer("preview", 0, "print this many formatted examples with [[trained spans]] and exit",
                         flag_values=fv)
    flags.DEFINE_bool("rebuild", False, "build the cache again even when an intact one exists (beside it, then swapped in)", flag_values=fv)
    cli.require(fv, "config")


def run(argv: list[str] | None = None) -> int:
    """`python -m gemma_jax.prepare` (argv None) or the same flags in-process."""
    return cli.run(main, define_flags, argv, prog="python -m gemma_jax.prepare")


if __name__ == "__main__":
    sys.exit(run())
