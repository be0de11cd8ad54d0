"""A run you can trust: refused re-runs, the workdir lock, paths, non-finite steps, damaged
checkpoints, finishing stages that complete on a re-run, data running out.

Each test reproduces a failure seen on earlier code (README, "What survives what") on the
2-layer model of test_train.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import REPO, _cli_env, loss_records, small_config  # noqa: F401 (shared helpers)

import gemma_jax
from gemma_jax import train
from gemma_jax.data.schema import DataError
from gemma_jax.errors import WorkdirError
from gemma_jax.train import checkpoints, divergence, workdir as workdir_lib


def _cfg(**kwargs):
    cfg = small_config(**kwargs)
    cfg.mesh.fsdp = -1  # over the 8 test devices
    return cfg


def _steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _snapshot(workdir) -> dict[str, bytes]:
    """Every small file of a workdir (not the checkpoints' arrays) by relative path."""
    out = {}
    for p in Path(workdir).rglob("*"):
        if p.is_file() and "checkpoints" not in p.parts and p.name != ".lock":
            out[str(p.relative_to(workdir))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def trained_and_exported(tmp_path_factory):
    """A finished 2-step full fine-tuning workdir (checkpoint at step 2) with its hf export, its
    config and the bytes of each export file as first written."""
    wd = tmp_path_factory.mktemp("trained") / "wd"
    cfg = _cfg(steps=2, batch_size=8, seq_len=64)
    cfg.train.export_format = "hf"
    assert train.run(cfg, str(wd))["step"] == 2
    files = {str(p.relative_to(wd / "export")): p.read_bytes() for p in (wd / "export").rglob("*") if p.is_file()}
    return wd, cfg, files


@pytest.fixture(scope="module")
def trained(trained_and_exported):
    """The finished workdir of trained_and_exported (refused re-runs must leave it as it is)."""
    return trained_and_exported[0]


# ----------------------------------------------------------------------------- 1. manifest


@pytest.mark.parametrize("change", ["shape", "tokenizer", "lora", "objective", "preset", "init_checkpoint",
                                    "implied_by_preset"])
def test_identity_change_is_refused_and_the_workdir_still_loads(trained, tmp_path, change, monkeypatch):
    before = _snapshot(trained)
    params_before = gemma_jax.load(str(trained))[1]
    cfg = _cfg(steps=4, batch_size=8, seq_len=64)
    cfg.train.allow_changes = True  # identity is refused whatever this says
    if change == "preset":  # the explicit dims stay: the preset alone names another model
        cfg.model.preset = "gemma2_test"
        key = "model.preset: gemma2_tiny -> gemma2_test"
    elif change == "init_checkpoint":  # refused before the (missing) checkpoint is looked for
        cfg.model.init_checkpoint = str(tmp_path / "other_weights")
        key = f"model.init_checkpoint: '' -> {tmp_path / 'other_weights'}"
    elif change == "implied_by_preset":  # a ModelConfig field no config key sets (Gemma 3's would be alike)
        from gemma_jax.model.config import ModelConfig

        real = ModelConfig.from_preset.__func__
        monkeypatch.setattr(ModelConfig, "from_preset",
                            classmethod(lambda cls, name, **kw: real(cls, name, **kw).replace(rope_base=1e6)))
        key = "model.rope_base: 10000.0 -> 1000000.0"
    elif change == "shape":
        cfg.model.num_layers = 3
        key = "model.num_layers"
    elif change == "tokenizer":
        # Same pieces, other bytes: a tokenizer file that is not the one the run trained with.
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(cfg.data.tokenizer).read_bytes())
        proto.pieces[-1].score -= 1.0
        other = tmp_path / "tokenizer.model"
        other.write_bytes(proto.SerializeToString())
        cfg.data.tokenizer = str(other)
        key = "tokenizer (sha256)"
    elif change == "lora":
        cfg.lora.rank = 8
        key = "lora.rank"
    else:
        cfg.train.objective = "orpo"
        key = "train.objective"
    with pytest.raises(WorkdirError) as e:
        train.run(cfg, str(trained))
    assert key in str(e.value) and "new --workdir" in str(e.value), str(e.value)
    assert _snapshot(trained) == before, "a refused re-run wrote into the workdir"
    assert not (trained / "base").exists() and not (trained / "lora.json").exists()
    _, params = gemma_jax.load(str(trained))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_before)):
        np.testing.assert_array_equal(a, b)


def test_optimisation_change_needs_allow_changes_and_history_is_kept(tmp_path):
    wd = tmp_path / "wd"
    cfg = _cfg(steps=2, batch_size=8, seq_len=64)
    train.run(cfg, str(wd))
    first_config = json.loads((wd / "config.json").read_text())

    cfg = _cfg(steps=3, batch_size=8, seq_len=64)
    cfg.opt.lr = 5e-3
    with pytest.raises(WorkdirError) as e:
        train.run(cfg, str(wd))
    assert "opt.lr" in str(e.value) and "train.steps" in str(e.value) and "train.allow_changes" in str(e.value)
    assert _steps(wd) == [2]

    cfg.train.allow_changes = True
    assert train.run(cfg, str(wd))["step"] == 3
    manifest = json.loads((wd / "manifest.json").read_text())
    runs = manifest["runs"]
    assert len(runs) == 2, "the refused run must not be recorded as a run"
    assert runs[0]["config"] == first_config, "the first run's record was lost"
    assert runs[1]["changes"]["opt.lr"][1] == 5e-3
    assert json.loads((wd / "config.json").read_text())["opt"]["lr"] == 5e-3

    # Harmless changes (logging, checkpoint cadence, another mesh) need no override.
    cfg.train.allow_changes = False
    cfg.train.log_every, cfg.checkpoint.every_steps, cfg.mesh.data = 2, 7, 4
    assert train.run(cfg, str(wd))["step"] == 3


def test_changed_training_data_is_an_optimisation_change(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(Path(_cfg().data.train).read_text())
    cfg = _cfg(steps=2, batch_size=8, seq_len=64)
    cfg.data.train = str(data)
    train.run(cfg, str(tmp_path / "wd"), stop_after=1)
    with data.open("a") as f:  # same name, new content
        f.write(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    with pytest.raises(WorkdirError, match="data \\(fingerprint\\)"):
        train.run(cfg, str(tmp_path / "wd"))


def test_mixture_spec_is_fingerprinted_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _cfg(steps=1, batch_size=8, seq_len=64)
    cfg.data.train = "data/legal/train.jsonl:0.8,data/legal/eval.jsonl:0.2"
    assert train.run(cfg, str(tmp_path / "wd"))["step"] == 1
    recorded = json.loads((tmp_path / "wd" / "config.json").read_text())["data"]["train"]
    assert recorded == f"{REPO}/data/legal/train.jsonl:0.8,{REPO}/data/legal/eval.jsonl:0.2"


def test_workdir_that_is_the_init_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "gemma2"}')
    cfg = _cfg(steps=1)
    cfg.model.init_checkpoint = str(ckpt)
    with pytest.raises(WorkdirError, match="same directory"):
        train.run(cfg, str(ckpt) + "/")
    assert (ckpt / "config.json").read_text() == '{"model_type": "gemma2"}'


# ----------------------------------------------------------------------------- 2. lock


def test_second_trainer_exits_naming_the_holder(tmp_path):
    wd = tmp_path / "wd"
    with workdir_lib.WorkdirLock(str(wd)):
        with pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
            train.run(_cfg(steps=1), str(wd))
    assert not (wd / "metrics.jsonl").exists()
    assert train.run(_cfg(steps=1, seq_len=64), str(wd))["step"] == 1  # released on exit


def test_lock_of_a_dead_process_is_released(tmp_path):
    """flock: the kernel drops the lock of a process that was killed."""
    wd = tmp_path / "wd"
    code = ("import os, sys; from gemma_jax.train import workdir as w; l = w.WorkdirLock(sys.argv[1]); "
            "l.__enter__(); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, str(wd)], check=False, env=_cli_env(), timeout=60)
    with workdir_lib.WorkdirLock(str(wd)):
        pass


def test_object_store_lock_heartbeat_and_stale_takeover(tmp_path):
    """The gs:// protocol, on a local directory: a fresh holder blocks, a stale one is taken over."""
    wd = str(tmp_path / "wd")
    holder = workdir_lib.WorkdirLock(wd, mode="object", heartbeat_s=0.2, stale_s=5.0)
    with holder:
        with pytest.raises(WorkdirError, match="in use"):
            with workdir_lib.WorkdirLock(wd, mode="object", heartbeat_s=0.2, stale_s=5.0):
                pass
    assert not (tmp_path / "wd" / "lock.json").exists(), "released lock left behind"
    stale = {"host": "gone", "pid": 1, "token": "dead", "heartbeat": 0.0, "started": "long ago"}
    (tmp_path / "wd" / "lock.json").write_text(json.dumps(stale))
    with workdir_lib.WorkdirLock(wd, mode="object", heartbeat_s=0.2, stale_s=5.0) as lock:
        assert json.loads((tmp_path / "wd" / "lock.json").read_text())["token"] == lock.token


# ----------------------------------------------------------------------------- 3. paths


def test_tilde_and_relative_workdir_resolve_to_one_place(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg = _cfg(steps=1, seq_len=64)
    cfg.data.train = os.path.relpath(cfg.data.train, cwd)  # relative data path too
    train.run(cfg, "~/runs/x")
    wd = home / "runs" / "x"
    assert _steps(wd) == [1] and (wd / "metrics.jsonl").exists() and (wd / "config.json").exists()
    assert not (cwd / "~").exists()
    recorded = json.loads((wd / "config.json").read_text())
    assert os.path.isabs(recorded["data"]["train"]) and os.path.exists(recorded["data"]["train"])


@contextlib.contextmanager
def _unwritable(directory: Path):
    """`directory` made unwritable: chmod for a normal user; root ignores modes, so chattr +i."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
        pytest.skip("running as root where chattr +i is refused: no way to make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def _workdir_error(capsys, workdir: str) -> str:
    from gemma_jax.train import __main__ as train_main

    with pytest.raises(SystemExit) as e:
        train_main.run([f"--config={REPO}/configs/legal.py:tiny", f"--workdir={workdir}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Errno" not in err and "Traceback" not in err, err
    assert lines[0].startswith(f"error: --workdir={workdir}: "), err
    return lines[0]


def test_unusable_workdirs_are_one_line_naming_the_flag(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert "is a file" in _workdir_error(capsys, str(a_file))
    assert "a_file is a file" in _workdir_error(capsys, str(a_file / "wd"))
    assert a_file.read_text() == "keep me"
    locked = tmp_path / "locked"
    locked.mkdir()
    with _unwritable(locked):
        assert "cannot create it in" in _workdir_error(capsys, str(locked / "new" / "wd"))
        assert "cannot write in it" in _workdir_error(capsys, str(locked))
    assert list(locked.iterdir()) == []


def test_a_failed_start_leaves_no_directory_behind(tmp_path):
    """A start that fails (here: no training data) removes the directories it made, parents
    included; an existing empty workdir gets no lone .lock."""
    cfg = _cfg(steps=1, seq_len=64)
    cfg.data.train = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file"):
        train.run(cfg, str(tmp_path / "new" / "runs" / "wd"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no such file"):
        train.run(cfg, str(tmp_path / "empty"))
    assert list((tmp_path / "empty").iterdir()) == []
    # Refused because another trainer holds the workdir: its lock file stays.
    with workdir_lib.WorkdirLock(str(tmp_path / "empty")):
        with pytest.raises(WorkdirError, match="in use"):
            train.run(cfg, str(tmp_path / "empty"))
        assert [p.name for p in (tmp_path / "empty").iterdir()] == [".lock"]


# ----------------------------------------------------------------------------- 4. non-finite


def test_diverging_run_stops_nonzero_keeps_last_finite_checkpoint_and_never_exports(tmp_path):
    wd = tmp_path / "wd"
    cfg = _cfg(steps=4, batch_size=8, seq_len=64)
    cfg.checkpoint.every_steps, cfg.checkpoint.keep = 2, 1
    train.run(cfg, str(wd))
    good = gemma_jax.load(str(wd))[1]

    cfg = _cfg(steps=30, batch_size=8, seq_len=64)
    cfg.checkpoint.every_steps, cfg.checkpoint.keep = 2, 1
    cfg.opt.lr, cfg.opt.warmup_steps, cfg.opt.grad_clip = 1e30, 0, 0.0
    cfg.train.allow_changes, cfg.train.max_nonfinite_steps = True, 3
    cfg.train.export_format = "gemma_jax"
    with pytest.raises(divergence.DivergedError, match="in a row"):
        train.run(cfg, str(wd))
    assert not (wd / "export").exists()
    steps = _steps(wd)
    _, params = gemma_jax.load(str(wd))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), f"non-finite checkpoint kept: {steps}"
    records = [r for r in loss_records(wd) if r["step"] > 4]
    assert records and any(r.get("nonfinite") for r in records), "skipped steps not logged"
    assert steps == [4], "rotation deleted the last good checkpoint"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)


def test_skipped_step_leaves_params_and_optimizer_untouched():
    import optax

    from gemma_jax.train import step as step_lib

    params = {"w": jax.numpy.ones((3,))}
    tx = optax.adamw(1e-2)
    state = dict(step=jax.numpy.int32(0), params=params, opt_state=tx.init(params))
    bad = {"w": jax.numpy.array([1.0, np.nan, 0.0])}
    new, norm, skipped = step_lib.apply_if_finite(state, bad, jax.numpy.float32(1.0), tx)
    assert float(skipped) == 1.0 and int(new["step"]) == 1
    np.testing.assert_array_equal(new["params"]["w"], params["w"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["opt_state"]),
                                                     jax.tree.leaves(state["opt_state"])))
    good = {"w": jax.numpy.array([1.0, 1.0, 0.0])}
    new, _, skipped = step_lib.apply_if_finite(state, good, jax.numpy.float32(1.0), tx)
    assert float(skipped) == 0.0 and not np.array_equal(new["params"]["w"], params["w"])


def test_finite_divergence_is_warned_about():
    seen = []
    watch = divergence.Watch(3, vocab_size=2048, warn=seen.append)
    for step in range(1, 4):
        watch.observe(step, dict(nonfinite=0.0, loss=52.0, grad_norm=0.0, tokens=100.0))
    watch.settle()
    assert any("2 ln(vocab)" in s for s in seen) and any("exactly 0" in s for s in seen)
    assert len(seen) == 2, "warnings must not repeat every step"


# ----------------------------------------------------------------------------- 5. damaged checkpoints


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 4-step workdir with checkpoints at steps 2 and 4 (copied by each damage case)."""
    wd = tmp_path_factory.mktemp("two") / "wd"
    cfg = _cfg(steps=4, batch_size=8, seq_len=64)
    cfg.checkpoint.every_steps = 2
    train.run(cfg, str(wd))
    assert _steps(wd) == [2, 4]
    return wd


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_meta"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, two_checkpoints, damage):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(two_checkpoints, wd)
    cfg = _cfg(steps=4, batch_size=8, seq_len=64)
    cfg.checkpoint.every_steps = 2
    latest = wd / "checkpoints" / "4"
    if damage == "no_meta":
        shutil.rmtree(latest / "meta")
    else:
        f = _largest_data_file(latest)
        size = f.stat().st_size
        if damage == "truncated":
            with f.open("r+b") as fh:
                fh.truncate(size // 2)
        else:
            rng = np.random.default_rng(0)
            data = bytearray(f.read_bytes())
            # Overwrite the middle of the file: past any header, inside the array bytes.
            lo, hi = size // 4, 3 * size // 4
            data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
            f.write_bytes(bytes(data))
    out = train.run(cfg, str(wd))
    assert out["step"] == 4
    assert [r["step"] for r in loss_records(wd)] == [1, 2, 3, 4, 3, 4], "did not retrain steps 3-4 from step 2"
    damaged = list((wd / checkpoints.DAMAGED).iterdir())
    assert len(damaged) == 1 and damaged[0].name.startswith("4-")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(gemma_jax.load(str(wd))[1]))


def test_failed_async_save_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """A save that hits the file-size limit (a full disk, as far as the writer can tell) stops the
    run at the next step with the error; step 2 stays the latest checkpoint."""
    wd = tmp_path / "wd"
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from test_train import small_config
from gemma_jax import train
cfg = small_config(steps=8, batch_size=8, seq_len=64)
cfg.mesh.fsdp = -1
cfg.checkpoint.every_steps, cfg.checkpoint.async_save = 2, True
train.run(cfg, {str(wd)!r}, stop_after=2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
try:
    train.run(cfg, {str(wd)!r})
except Exception as e:
    import traceback; traceback.print_exc()
    print("RAISED", type(e).__name__, e)
    sys.exit(3)
"""
    env = _cli_env()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + str(REPO / "tests")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    assert "RAISED CheckpointError" in res.stdout and "step 4" in res.stdout, res.stdout[-2000:]
    assert _steps(wd) == [2]
    records = loss_records(wd)
    assert records[-1]["step"] <= 6, "training went on long after the failed save"


# ----------------------------------------------------------------------------- 6. signals


def test_ctrl_c_saves_at_the_step_boundary(tmp_path, monkeypatch):
    """Ctrl-C during step 3: the run saves step 3 and returns (exit 0 on the command line). The
    subprocess version for SIGTERM is test_train::test_sigterm_saves_and_resume_finishes."""
    import signal

    from gemma_jax.train.state import Trainer

    real_step = Trainer.step

    def step(self, state, batch):
        out = real_step(self, state, batch)
        if int(jax.device_get(out[0]["step"])) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step)
    wd = tmp_path / "wd"
    before = signal.getsignal(signal.SIGINT)
    cfg = _cfg(steps=20, batch_size=8, seq_len=64)
    cfg.train.log_every = 2  # the stop falls between log steps
    cfg.train.eval_every = 1  # with no eval data: no eval records at all
    out = train.run(cfg, str(wd))
    assert out["step"] == 3
    # The summary is step 3's own record (not step 2's values labelled step 3), and the last
    # line of metrics.jsonl.
    records = loss_records(wd)
    assert [r["step"] for r in records] == [2, 3]
    assert out["loss"] == records[-1]["loss"] and out["learning_rate"] == records[-1]["learning_rate"]
    assert out["loss"] != records[0]["loss"]
    from test_train import read_metrics

    assert all(set(r) - {"step"} for r in read_metrics(wd)), "an empty {'step': N} eval record"
    assert _steps(wd) == [3]
    assert json.loads((wd / "manifest.json").read_text())["runs"][-1]["status"] == "stopped"
    assert signal.getsignal(signal.SIGINT) == before


def test_second_ctrl_c_aborts_at_once():
    import signal

    from gemma_jax.train.signals import StopRequests

    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass


# ----------------------------------------------------------------------------- 7. finishing stages


def test_bad_export_format_or_task_fails_before_training(tmp_path):
    for key, value in (("export_format", "safetensor"), ("task", "sumarization")):
        cfg = _cfg(steps=1)
        if key == "task":
            cfg.eval.task = value
        else:
            cfg.train.export_format = value
        with pytest.raises(Exception, match=value):
            train.run(cfg, str(tmp_path / key))
        assert not (tmp_path / key / "checkpoints").exists()


def test_killed_export_is_completed_by_the_rerun(tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    cfg = _cfg(steps=2, batch_size=8, seq_len=64)
    cfg.train.export_format = "gemma_jax"
    real_save = gemma_jax.weights.save

    def killed(path, *args, **kwargs):  # dies half way through the export, like kill -9
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.loop.weights, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, str(wd))
    assert _steps(wd) == [2] and not (wd / "export" / "model.json").exists()
    monkeypatch.setattr(train.loop.weights, "save", real_save)
    out = train.run(cfg, str(wd))
    assert out["step"] == 2
    config, exported = gemma_jax.load(str(wd / "export"))
    _, trained_params = gemma_jax.load(str(wd))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(trained_params)):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in loss_records(wd)] == [1, 2], "the re-run trained again"
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["stages"]["2"]["export"] == "gemma_jax"
    assert [r["status"] for r in manifest["runs"]] == ["failed", "finished"]


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif how == "garbage_appended":
        with path.open("ab") as f:
            f.write(b"\x00garbage\xff" * 10)
    else:  # same size and mtime: only a checksum can tell
        st = path.stat()
        data = bytearray(path.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(255 - b for b in data[mid:mid + 64])
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_export_files_are_recorded_with_size_and_checksum(trained_and_exported):
    wd, _, files = trained_and_exported
    import hashlib

    stage = json.loads((wd / "manifest.json").read_text())["stages"]["2"]
    assert stage["export"] == "hf" and set(stage["export_files"]) == set(files)
    for name, data in files.items():
        assert stage["export_files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("how,name", [("deleted", "tokenizer.model"), ("truncated", "model.safetensors"),
                                      ("same_size_and_mtime", "model.safetensors"),
                                      ("garbage_appended", "config.json")])
def test_damaged_export_is_rebuilt_from_the_final_checkpoint(trained_and_exported, tmp_path, how, name, caplog):
    import shutil

    src, cfg, files = trained_and_exported
    wd = tmp_path / "wd"
    shutil.copytree(src, wd)
    _damage(wd / "export" / name, how)
    caplog.set_level("WARNING")
    assert train.run(cfg, str(wd))["step"] == 2
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export: ")]
    assert len(said) == 1 and name in said[0] and said[0].endswith("rebuilding from step 2"), said
    assert ("missing" if how == "deleted" else "size" if how != "same_size_and_mtime" else "checksum") in said[0]
    rebuilt = {str(p.relative_to(wd / "export")): p.read_bytes() for p in (wd / "export").rglob("*") if p.is_file()}
    assert rebuilt == files, "the rebuilt export differs from the one first written"
    assert [r["step"] for r in loss_records(wd)] == [1, 2], "the re-run trained again"


def test_a_clean_rerun_of_a_finished_workdir_rewrites_nothing(trained_and_exported, tmp_path, caplog):
    import shutil

    src, cfg, _ = trained_and_exported
    wd = tmp_path / "wd"
    shutil.copytree(src, wd)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (wd / "export").rglob("*")}
    caplog.set_level("WARNING")
    assert train.run(cfg, str(wd))["step"] == 2
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (wd / "export").rglob("*")} == before
    assert not [r for r in caplog.records if r.getMessage().startswith("export: ")]


def test_running_out_of_data_ends_the_run_cleanly(tmp_path):
    wd = tmp_path / "wd"
    cfg = _cfg(steps=1000, batch_size=8, seq_len=512)
    cfg.data.num_epochs = 1
    cfg.train.export_format = "gemma_jax"
    out = train.run(cfg, str(wd))
    assert 1 <= out["step"] < 1000
    assert _steps(wd) == [out["step"]]
    assert (wd / "export" / "model.json").exists()
    assert train.run(cfg, str(wd))["step"] == out["step"]  # a re-run: nothing to do, no error


# ----------------------------------------------------------------------------- 11. clean errors


def test_loading_a_workdir_from_python_prints_no_library_chatter(trained):
    """gemma_jax.load keeps Orbax's notes about read-only managers and metadata files off the
    console (as the command lines do), and leaves the caller's logging as it was. (A handler of
    the test's own: pytest's caplog handlers outlive tests and carry the filter an in-process
    command line put on them.)"""
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep(logging.WARNING)
    logging.getLogger().addHandler(keep)
    try:
        gemma_jax.load(str(trained))
        assert seen == [], seen
        logging.getLogger("absl").warning("the caller's own warning")
        assert seen == ["the caller's own warning"]
    finally:
        logging.getLogger().removeHandler(keep)


def test_a_bigger_model_on_a_tiny_workdir_is_named_and_refused_before_any_download(trained, capsys):
    """configs/legal.py:2b on a tiny workdir: the model change is the error (not a list of changed
    training settings, nor a TFDS download failing later), whatever train.allow_changes says."""
    from gemma_jax.train import __main__ as train_main

    before = _snapshot(trained)
    for allow in ("False", "True"):
        with pytest.raises(SystemExit) as e:
            train_main.run([f"--config={REPO}/configs/legal.py:2b", f"--workdir={trained}",
                            f"--config.train.allow_changes={allow}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "another model" in lines[0], err
        assert "  model.preset: gemma2_tiny -> gemma2_2b" in err.splitlines(), err
        assert "tfds" not in err.lower() and "training settings" not in err
    assert _snapshot(trained) == before


def test_refused_rerun_on_the_command_line_is_one_error_line(trained):
    cmd = [sys.executable, "-m", "gemma_jax.train", "--config=configs/legal.py:tiny", f"--workdir={trained}",
           "--config.model.num_layers=7", "--config.model.embed_dim=64", "--config.model.hidden_dim=128",
           f"--config.data.tokenizer={REPO / 'data' / 'tokenizer.model'}", "--config.data.eval="]
    res = subprocess.run(cmd, cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.num_layers" in res.stderr and "Traceback" not in res.stderr
