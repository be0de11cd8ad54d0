"""gs:// workdirs and checkpoints, against a fake bucket (etils' epath mock mapped onto tmp_path).

Orbax reaches GCS through tensorstore and cannot be faked here; these tests cover everything
else a remote run writes: metrics (rewritten, since buckets have no append), plots, TensorBoard,
run files, checkpoints in formats that need local files (staged), and reading them back.
"""

import contextlib
import json
import os

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

import gemma_jax
from gemma_jax import model as model_lib, paths
from gemma_jax.train import log as train_log
from gemma_jax.model import ModelConfig


@contextlib.contextmanager
def fake_bucket(root):
    """Every gs://X path in epath becomes root/X on local disk."""
    def local(path):
        s = os.fspath(path)
        return os.path.join(root, s.split("://", 1)[1]) if "://" in s else s

    def fn(orig, path, *args, **kwargs):
        return orig(local(path), *args, **kwargs)

    def open_(orig, path, mode, *args, **kwargs):
        if any(c in mode for c in "wa"):  # a bucket has no directories to create first
            os.makedirs(os.path.dirname(local(path)), exist_ok=True)
        return orig(local(path), mode, *args, **kwargs)

    def two(orig, src, dst, *args, **kwargs):
        return orig(local(src), local(dst), *args, **kwargs)

    with epath_testing.mock_epath(
            open=open_, exists=fn, isdir=fn, listdir=fn, makedirs=fn, mkdir=fn, remove=fn, rmtree=fn, stat=fn,
            walk=fn, glob=fn, copy=two, rename=two, replace=two):
        yield


def test_remote_metrics_are_rewritten_whole_and_keep_earlier_lines(tmp_path):
    with fake_bucket(tmp_path):
        w = paths.JsonlWriter("gs://b/run/metrics.jsonl", interval=3600)
        w.write('{"step": 1}\n')
        assert (tmp_path / "b/run/metrics.jsonl").read_text() == '{"step": 1}\n'  # first write goes out
        w.write('{"step": 2}\n')  # inside the interval: held back
        assert (tmp_path / "b/run/metrics.jsonl").read_text() == '{"step": 1}\n'
        w.close()
        assert (tmp_path / "b/run/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
        resumed = paths.JsonlWriter("gs://b/run/metrics.jsonl")
        resumed.write('{"step": 3}\n')
        resumed.close()
    lines = (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_logger_writes_metrics_plots_and_tensorboard_to_a_bucket(tmp_path):
    config = ModelConfig.from_preset("gemma2_test")
    with fake_bucket(tmp_path):
        log = train_log.Logger("gs://b/run", config=config, seq_len=16, batch_size=2, total_steps=2,
                               start_step=0, progress=False)
        for step in (1, 2):
            log.step(step, dict(loss=3.0 - step, accuracy=0.1, learning_rate=1e-3, grad_norm=1.0, tokens=32.0),
                     log=True)
        log.close()
    run = tmp_path / "b" / "run"
    assert [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2.0, 1.0]
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())


def test_hf_save_to_a_bucket_is_staged_and_loads_back(tmp_path):
    config = ModelConfig.from_preset("gemma2_test")
    params = model_lib.init_params(config, jax.random.key(0))
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"not a real model, only copied")
    with fake_bucket(tmp_path / "gcs"):
        out = gemma_jax.save("gs://b/export", config, params, format="hf", tokenizer=str(tok))
        assert out == "gs://b/export"
        with pytest.raises(ValueError, match="exists and is not empty"):
            gemma_jax.save("gs://b/export", config, params, format="hf")
        loaded_config, loaded = gemma_jax.load("gs://b/export")
    files = {p.name for p in (tmp_path / "gcs" / "b" / "export").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= files
    assert loaded_config.num_layers == config.num_layers
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_local_paths_are_untouched(tmp_path):
    assert not paths.is_remote(tmp_path) and paths.is_remote("gs://b/x")
    assert paths.absolute("gs://b/x") == "gs://b/x"
    assert paths.absolute("rel") == os.path.abspath("rel")
    assert paths.local_copy(str(tmp_path)) == str(tmp_path)
