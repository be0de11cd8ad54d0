"""What a workdir is allowed to become: its manifest, its lock, and the paths a run resolves.

A workdir outlives the command that made it: it is resumed after preemption, re-run with more
steps, evaluated and exported from. Three things keep it usable:

- `manifest.json` records once what defines the run (the identity: model shape, tokenizer
  checksum, LoRA and objective settings) and what shaped its optimisation (lr, schedule, batch,
  data and its fingerprint, steps, seed), plus one record per invocation with its full resolved
  config. Every later run compares before it writes anything: an identity change is refused
  (the checkpoints could not be read, or would mean something else), an optimisation change
  needs `train.allow_changes=True`, anything else (logging, eval cadence, export format, mesh)
  just works. The finishing stages after the last step are tracked there too.
- `.lock` (local disks: an flock, released by the kernel when the holder dies) or `lock.json`
  (object stores: a heartbeat object, taken over once it is stale) keeps a second trainer out.
- Every path the run reads or writes is resolved once (`~`, relative to the current directory).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging

from gemma_jax import paths
from gemma_jax.data import cache, pipeline, readers
from gemma_jax.errors import WorkdirError

MANIFEST = "manifest.json"
FORMAT = 1

# ModelConfig fields that decide what the checkpoint's arrays mean (model.json has them all).
SHAPE_FIELDS = ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                "sliding_window", "query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_base", "norm_eps")
# Config keys whose change alters the optimisation of a resumed run: allowed with train.allow_changes.
OPTIMISATION_PREFIXES = ("opt.", "dpo.", "orpo.", "simpo.", "grpo.", "data.", "train.batch_size", "train.grad_accum",
                         "train.steps", "train.seed", "lora.dropout", "lora.quantize", "lora.base_dtype",
                         "model.dtype", "model.param_dtype", "model.init_checkpoint")
# ... except these, which only say where things are or what is evaluated.
HARMLESS = ("data.eval", "data.tfds_data_dir", "data.cache_dir", "data.num_workers", "data.input_workers",
            "data.tokenizer", "dpo.precompute_reference", "grpo.log_rollouts_every", "grpo.log_rollouts")


# ----------------------------------------------------------------------------------------- paths

def resolve(path: str) -> str:
    """`~` expanded and made absolute against the current directory; URLs and "" unchanged."""
    return paths.absolute(path) if path else path


def _resolve_spec(spec: str) -> str:
    """Each file part of a data spec resolved; tfds:/hf: names and URLs kept as written."""
    parts = []
    for part in spec.split(","):
        p = part.strip()
        parts.append(p if not p or p.startswith(("tfds:", "hf:")) or paths.is_remote(p) else resolve(p))
    return ",".join(parts)


def resolve_config_paths(cfg) -> None:
    """Resolves, in place, every path key of the config, so config.json records where things were
    and the run reads the same files whatever directory a later command starts from."""
    for section, key in (("model", "init_checkpoint"), ("data", "tokenizer"), ("data", "tfds_data_dir"),
                         ("data", "cache_dir"), ("eval", "general")):
        if section in cfg and key in cfg[section] and isinstance(cfg[section][key], str):
            cfg[section][key] = resolve(cfg[section][key])
    for key in ("train", "eval"):
        if isinstance(cfg.data.get(key), str) and cfg.data[key].strip():
            cfg.data[key] = _resolve_spec(cfg.data[key])
    if "grpo" in cfg and cfg.grpo.rewards:  # path/to/file.py:fn entries; module:fn and built-ins as written
        cfg.grpo.rewards = ",".join(_resolve_reward(e.strip()) for e in cfg.grpo.rewards.split(",") if e.strip())


def _resolve_reward(entry: str) -> str:
    where, sep, fn = entry.rpartition(":")
    return f"{resolve(where)}{sep}{fn}" if where.endswith(".py") else entry


# --------------------------------------------------------------------------------- fingerprints

def file_digest(path: str, *, whole_below: int = 8 << 20, edge: int = 1 << 20) -> str:
    """sha256 of a file; of its size and first and last MiB when it is larger than `whole_below`
    (a resumed run must not read a large corpus just to recognise it)."""
    h = hashlib.sha256()
    with paths.Path(path).open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        if size <= whole_below:
            h.update(f.read())
        else:
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read())
    h.update(str(size).encode())
    return h.hexdigest()


MAX_DIGESTED_FILES = 64  # beyond this many files a spec's fingerprint is their names and the first 64


def data_fingerprint(spec: str) -> str:
    """One checksum over a data spec's sources: file contents (see file_digest), dataset names."""
    if not spec or not spec.strip():
        return ""
    h = hashlib.sha256()
    files = 0
    sources = [src for part, _ in pipeline.parse_mixture(spec) for src in readers.sources(part)]
    for source in sources:
        h.update(source.encode())
        if not source.startswith(("tfds:", "hf:")) and files < MAX_DIGESTED_FILES and not paths.Path(source).is_dir():
            files += 1
            h.update(file_digest(source).encode())
    return h.hexdigest()[:16]


def _flat(cfg) -> dict[str, Any]:
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v

    walk("", json.loads(cfg.to_json_best_effort()))
    return out


def identity(cfg, config, tokenizer_path: str, *, lora: bool, uses_reference: bool) -> dict[str, Any]:
    """What the checkpoints' arrays depend on: change any of it and they no longer fit or mean
    the same. Keys are the config keys a user would change."""
    ident: dict[str, Any] = {f"model.{k}": getattr(config, k) for k in SHAPE_FIELDS}
    ident["tokenizer (sha256)"] = cache.tokenizer_sha256(paths.local_copy(tokenizer_path))[:16]
    ident["train.objective"] = str(cfg.train.objective)
    if cfg.train.objective == "grpo":  # what the rewards are decides what the policy is trained towards
        ident["grpo.rewards"] = str(cfg.grpo.rewards)
    ident["lora.rank"] = int(cfg.lora.rank)
    if lora:
        ident["lora.targets"] = str(cfg.lora.targets)
        ident["lora.alpha"] = float(cfg.lora.alpha)
    if lora or uses_reference:  # the frozen base / the reference the adapters or policy are relative to
        ident["model.init_checkpoint"] = str(cfg.model.init_checkpoint)
    return ident


def settings(cfg) -> dict[str, Any]:
    """The optimisation-relevant config keys, plus the training data's fingerprint."""
    flat = _flat(cfg)
    out = {k: v for k, v in flat.items() if k.startswith(OPTIMISATION_PREFIXES) and k not in HARMLESS}
    out["data (fingerprint)"] = data_fingerprint(str(cfg.data.train))
    if cfg.train.objective == "grpo":  # an edited reward file changes the optimisation like edited data
        files = [e.rpartition(":")[0] for e in str(cfg.grpo.rewards).split(",") if e.rpartition(":")[0].endswith(".py")]
        out["grpo.rewards (sha256)"] = ",".join(file_digest(f)[:16] for f in files if paths.exists(f))
    return out


# ------------------------------------------------------------------------------------- manifest

def read_manifest(workdir: str) -> dict | None:
    p = paths.Path(paths.join(workdir, MANIFEST))
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise WorkdirError(f"{paths.join(workdir, MANIFEST)} is not valid JSON ({e}); restore it from a backup "
                           "or delete it to re-record the run from this config") from None


def write_manifest(workdir: str, manifest: dict) -> None:
    paths.write_text_atomic(paths.join(workdir, MANIFEST), json.dumps(manifest, indent=2, default=str))


def _legacy_identity(workdir: str) -> dict[str, Any] | None:
    """The identity of a workdir made before manifests existed, from its model.json and tokenizer."""
    model_json = paths.Path(paths.join(workdir, "model.json"))
    if not model_json.exists():
        return None
    m = json.loads(model_json.read_text())
    ident = {f"model.{k}": m[k] for k in SHAPE_FIELDS if k in m}
    tok = paths.join(workdir, "tokenizer.model")
    if paths.exists(tok):
        ident["tokenizer (sha256)"] = cache.tokenizer_sha256(paths.local_copy(tok))[:16]  # the data cache's key too
    lora_json = paths.Path(paths.join(workdir, "lora.json"))
    ident["lora.rank"] = int(json.loads(lora_json.read_text())["rank"]) if lora_json.exists() else 0
    return ident


def _diff(old: dict, new: dict) -> dict[str, list]:
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if k in old and k in new and old[k] != new[k]}


def _lines(changes: dict[str, list]) -> str:
    return "\n".join(f"  {k}: {old!r} (workdir) -> {new!r} (now)" for k, (old, new) in changes.items())


def check(workdir: str, cfg, ident: dict, *, resuming: bool) -> dict:
    """Compares this run with the workdir's record; raises WorkdirError before anything is
    written if the change is refused. Returns the manifest to `record` once the run starts."""
    manifest = read_manifest(workdir)
    now_settings = settings(cfg)
    shape_bound = resuming or paths.exists(paths.join(workdir, "base"))
    old_ident = manifest["identity"] if manifest else _legacy_identity(workdir)
    if old_ident is not None and shape_bound:
        changed = _diff(old_ident, ident)
        if changed:
            raise WorkdirError(
                f"{workdir} holds a run with a different model, tokenizer or training objective; its checkpoints "
                f"cannot continue under this config:\n{_lines(changed)}\nNothing in the workdir was changed. "
                "Use a new --workdir for this run (or delete the old one to start over).")
    changes = {}
    if manifest is not None:
        changes = _diff(manifest.get("settings", {}), now_settings)
        if changes and resuming and not bool(cfg.train.allow_changes):
            raise WorkdirError(
                f"resuming {workdir} with changed training settings:\n{_lines(changes)}\n"
                "Pass --config.train.allow_changes=True to continue with them (recorded in manifest.json), "
                "or use a new --workdir. Nothing in the workdir was changed.")
        if changes and resuming:
            logging.warning("resuming %s with changed settings (train.allow_changes=True):\n%s", workdir,
                            _lines(changes))
    manifest = manifest or dict(format=FORMAT, created=now(), runs=[], stages={})
    manifest["identity"], manifest["settings"] = ident, now_settings
    manifest["runs"].append(dict(started=now(), host=socket.gethostname(), pid=os.getpid(),
                                 argv=list(sys.argv), resumed=bool(resuming), changes=changes,
                                 config=json.loads(cfg.to_json_best_effort())))
    return manifest


def now() -> str:
    """UTC time as recorded in manifest.json and the lock."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- lock

class WorkdirLock:
    """One trainer per workdir. A context manager; process 0 of a job takes it.

    Local disks use flock on WORKDIR/.lock: the kernel drops it when the holder dies, so a lock
    is never stale. Object stores (gs://) have no locks: WORKDIR/lock.json names the holder and
    carries a heartbeat rewritten every `heartbeat_s`; one older than `stale_s` (by this host's
    clock) belongs to a dead process and is taken over. Two trainers starting within the same
    second could both write it; each reads it back after a pause and only the one whose token
    stayed there goes on.
    """

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_s: float = 300.0, mode: str = "auto"):
        self.workdir = workdir
        self.object_mode = mode == "object" or (mode == "auto" and paths.is_remote(workdir))
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self._file = None
        self._stop = threading.Event()
        self._thread = None

    def holder(self) -> dict:
        return dict(host=socket.gethostname(), pid=os.getpid(), started=now(), token=self.token,
                    argv=" ".join(sys.argv))

    def __enter__(self):
        paths.Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if self.object_mode:
            self._acquire_object()
        else:
            self._acquire_flock()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def _busy(self, info: dict, where: str):
        who = f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}" if info else "another process"
        raise WorkdirError(f"{self.workdir} is in use by {who} ({where}: {info.get('argv', '')!s}); wait for "
                           "that run to end or stop it, or use another --workdir")

    def _acquire_flock(self):
        import fcntl

        path = paths.join(self.workdir, ".lock")
        f = open(path, "a+")  # noqa: SIM115 (held open for the run)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            try:
                info = json.loads(f.read() or "{}")
            except ValueError:
                info = {}
            f.close()
            self._busy(info, path)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self.holder()))
        f.flush()
        self._file = f

    def _lock_path(self) -> str:
        return paths.join(self.workdir, "lock.json")

    def _read_object(self) -> dict | None:
        p = paths.Path(self._lock_path())
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except (ValueError, FileNotFoundError):
            return None

    def _write_object(self):
        paths.write_text_atomic(self._lock_path(), json.dumps({**self.holder(), "heartbeat": time.time()}))

    def _acquire_object(self):
        info = self._read_object()
        if info is not None and info.get("token") != self.token:
            age = time.time() - float(info.get("heartbeat", 0))
            if age < self.stale_s:
                self._busy(info, self._lock_path())
            logging.warning("taking over the lock of %s: its holder (pid %s on %s) has not written a "
                            "heartbeat for %.0f s", self.workdir, info.get("pid"), info.get("host"), age)
        self._write_object()
        time.sleep(min(2.0, self.heartbeat_s / 10))
        info = self._read_object()
        if info is None or info.get("token") != self.token:
            self._busy(info or {}, self._lock_path())
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _heartbeat(self):
        while not self._stop.wait(self.heartbeat_s):
            info = self._read_object()
            if info is not None and info.get("token") != self.token:
                logging.error("the lock of %s was taken over by pid %s on %s", self.workdir, info.get("pid"),
                              info.get("host"))
                return
            self._write_object()

    def release(self):
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            info = self._read_object()
            if info is not None and info.get("token") == self.token:
                paths.Path(self._lock_path()).unlink()
