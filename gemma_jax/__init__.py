"""gemma_jax: fine-tune Gemma 2 in JAX.

The public API is imported lazily, so `gemma_jax.data` and `gemma_jax.tokenizer` stay usable
in host-side processes that never import jax.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "gemma_jax.model",
    "logits": "gemma_jax.model",
    "load": "gemma_jax.weights",
    "save": "gemma_jax.weights",
    "Tokenizer": "gemma_jax.tokenizer",
    "generate": "gemma_jax.sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gemma_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
