"""Test setup: 8 virtual CPU devices so real meshes are exercised.

Many tests compile the same small train step, sampler or model again (in new Trainers, in the
command-line and multi-process tests' subprocesses, in the other xdist worker); JAX's
persistent compilation cache, on CPU too, lets each distinct program compile once per machine.
The cache key is the program itself, so a cached entry never changes a result.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gemma_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tokenized data cache of every test run goes to a temporary directory, not ~/.cache.
os.environ.setdefault("GEMMA_JAX_DATA_CACHE", os.path.join(tempfile.gettempdir(), "gemma_jax_test_data_cache"))

# The longest files first: pytest-xdist (--dist loadfile) hands files to the two workers in
# collection order, so a long file collected last leaves one worker idle while the other
# finishes it. Longest-first keeps both busy to the end (seconds: a cold run on 2 cores).
_LONGEST_FIRST = ["test_gemma4.py", "test_real_model.py", "test_dpo.py", "test_gguf.py", "test_grpo.py",
                  "test_train.py", "test_multiprocess.py", "test_gemma3.py", "test_reliability.py", "test_harness.py",
                  "test_cli.py", "test_train_lora.py", "test_checkpoint.py", "test_model.py", "test_data_cache.py",
                  "test_evaluate.py", "test_readme.py", "test_dpo_quality.py", "test_sample.py", "test_data.py",
                  "test_flash_gpu.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
