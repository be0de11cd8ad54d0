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

import contextlib
import dataclasses
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
from gemma_jax.data import cache, fingerprint, pipeline, readers
from gemma_jax.errors import WorkdirError
from gemma_jax.model.config import ModelConfig

MANIFEST = "manifest.json"
FORMAT = 1

# ModelConfig fields a run may change without changing what the checkpoint's arrays are or mean:
# how the model computes (dtypes, remat, layer scan, attention kernel) and LoRA's run-time scale
# and dropout (lora.alpha is identity on its own). Every other field, present or added later
# (Gemma 3/4 layer patterns, QK-norm, RoPE variants, ...), is part of the run's identity.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "moe_impl", "lora_scale",
                        "lora_dropout")
# Config keys whose change alters the optimisation of a resumed run: allowed with train.allow_changes.
OPTIMISATION_PREFIXES = ("opt.", "dpo.", "orpo.", "simpo.", "grpo.", "data.", "train.batch_size", "train.grad_accum",
                         "train.steps", "train.seed", "lora.dropout", "lora.quantize", "lora.base_dtype",
                         "model.dtype", "model.param_dtype")
# ... except these, which only say where things are or what is evaluated.
HARMLESS = ("data.eval", "data.tfds_data_dir", "data.cache_dir", "data.verify_cache", "data.num_workers",
            "data.input_workers", "data.tokenizer", "dpo.precompute_reference", "grpo.log_rollouts_every",
            "grpo.log_rollouts")


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


def _why(e: OSError) -> str:
    """An OSError's reason in words ("permission denied"), without its [Errno N] and path."""
    return (e.strerror or type(e).__name__).lower()


def create(workdir: str) -> str | None:
    """Makes `workdir` (a resolved path) usable before the run writes to it: creates it and any
    missing parents, and checks that files can be created in it. Returns the topmost directory
    it created (so a start that fails can remove it again), None if the workdir existed.
    Raises WorkdirError naming --workdir for a file in the way, a parent that cannot be created,
    or a directory that cannot be written (permissions, an immutable or read-only one)."""
    flag = f"--workdir={workdir}"
    if paths.is_remote(workdir):
        paths.Path(workdir).mkdir(parents=True, exist_ok=True)
        return None
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"{flag}: is a file, not a directory; name a directory (it is created when missing)")
    created = None
    if not os.path.isdir(workdir):
        top = workdir
        while not os.path.lexists(os.path.dirname(top)) and os.path.dirname(top) != top:
            top = os.path.dirname(top)
        parent = os.path.dirname(top)
        if not os.path.isdir(parent):
            raise WorkdirError(f"{flag}: cannot create it: {parent} is a file, not a directory")
        try:
            os.makedirs(workdir)
        except OSError as e:
            raise WorkdirError(f"{flag}: cannot create it in {parent}: {_why(e)}") from None
        created = top
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    try:
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        if created:
            remove_created(created)
        raise WorkdirError(f"{flag}: cannot write in it: {_why(e)} (check its permissions, or use another "
                           "--workdir)") from None
    return created


def remove_created(top: str) -> None:
    """Removes a workdir (from `top`, the topmost directory `create` made) after a failed start,
    so no directory holding only a .lock is left behind; a failure to remove is only logged."""
    import shutil

    try:
        shutil.rmtree(top)
    except OSError as e:
        logging.warning("could not remove %s after the failed start: %s", top, _why(e))


def clean_failed_start(workdir: str, created: str | None) -> None:
    """After a start that failed before training: the directories `create` made are removed; a
    workdir that existed keeps its files but loses a .lock that is all the start left in it.
    Nothing is touched while another process holds the lock (the failure was that it runs there)."""
    import fcntl

    if paths.is_remote(workdir) or not os.path.isdir(workdir):
        return
    try:
        f = open(os.path.join(workdir, ".lock"), "a+")  # noqa: SIM115 (closed below)
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another trainer holds it
        if created:
            remove_created(created)
        elif os.listdir(workdir) == [".lock"]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(workdir, ".lock"))


# --------------------------------------------------------------------------------- fingerprints

def data_fingerprint(spec: str) -> str:
    """One checksum over a data spec's sources: file contents (fingerprint.quick_digest), dataset names."""
    if not spec or not spec.strip():
        return ""
    h = hashlib.sha256()
    files = 0
    sources = [src for part, _ in pipeline.parse_mixture(spec) for src in readers.sources(part)]
    for source in sources:
        h.update(source.encode())
        if not source.startswith(("tfds:", "hf:")) and files < fingerprint.MAX_DIGESTED_FILES and not paths.Path(source).is_dir():
            files += 1
            h.update(fingerprint.quick_digest(source).encode())  # as the data cache records it
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- stage outputs

def file_sha256(path: str, *, chunk: int = 1 << 20) -> str:
    """sha256 of a whole file, read in chunks (an export of many GB never sits in memory)."""
    h = hashlib.sha256()
    with paths.Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_files(directory: str) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `directory`, for manifest.json."""
    root = paths.Path(directory)
    out = {}

    def walk(d):  # (epath's rglob refuses ** on object stores)
        for p in sorted(d.iterdir(), key=str):
            if p.is_dir():
                walk(p)
            else:
                out[str(p.relative_to(root))] = dict(size=p.stat().length, sha256=file_sha256(str(p)))

    walk(root)
    return out


def changed_files(directory: str, record: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """[(path, what changed)] of the recorded files under `directory`: missing, another size
    (cheap: checked first for every file), else another sha256 (each file hashed in full)."""
    root = paths.Path(directory)
    problems, same_size = [], []
    for rel, want in record.items():
        p = root / rel
        if not p.exists():
            problems.append((str(p), "is missing (deleted since it was written)"))
        elif p.stat().length != want["size"]:
            problems.append((str(p), f"changed since it was written (size {want['size']} -> {p.stat().length} bytes)"))
        else:
            same_size.append((p, want))
    if problems:
        return problems
    return [(str(p), "changed since it was written (checksum)") for p, want in same_size
            if file_sha256(str(p)) != want["sha256"]]


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


def _plain(value):
    """A value as manifest.json stores it (tuples become lists), so a recorded and a new identity compare equal."""
    return json.loads(json.dumps(value, default=str))


def model_identity(model) -> dict[str, Any]:
    """{model.FIELD: value} for every ModelConfig field but RUNTIME_MODEL_FIELDS (a ModelConfig,
    or the dict of a model.json); derived from the dataclass, so new fields count automatically."""
    fields = model.to_dict() if isinstance(model, ModelConfig) else dict(model)
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    return {f"model.{k}": _plain(fields[k]) for k in names if k in fields and k not in RUNTIME_MODEL_FIELDS}


def config_identity(cfg) -> dict[str, Any]:
    """The identity keys the config alone decides, known before any file is read: the preset, the
    starting checkpoint, the dims the config sets (or the preset implies, without a checkpoint),
    the objective and LoRA's shape."""
    m = cfg.model
    ident: dict[str, Any] = {"model.preset": str(m.preset), "model.init_checkpoint": str(m.init_checkpoint)}
    dims = {}
    if m.preset and not m.init_checkpoint and m.preset in ModelConfig.presets():
        preset = ModelConfig.from_preset(m.preset).to_dict()
        dims = {k: v for k, v in preset.items() if k != "vocab_size"}  # vocab: from the tokenizer unless set
    for key in m.keys():
        if key in (f.name for f in dataclasses.fields(ModelConfig)) and m[key] is not None:
            dims[key] = m[key]
    ident.update({k: v for k, v in model_identity(dims).items()})
    ident["train.objective"] = str(cfg.train.objective)
    if cfg.train.objective == "grpo":  # what the rewards are decides what the policy is trained towards
        ident["grpo.rewards"] = str(cfg.grpo.rewards)
    ident["lora.rank"] = int(cfg.lora.rank)
    if int(cfg.lora.rank) > 0:
        ident["lora.targets"] = str(cfg.lora.targets)
        ident["lora.alpha"] = float(cfg.lora.alpha)
    return ident


def identity(cfg, config, tokenizer_path: str, *, lora: bool, uses_reference: bool) -> dict[str, Any]:
    """What the checkpoints' arrays depend on: change any of it and they no longer fit or mean
    the same. Keys are the config keys a user would change: model.preset and
    model.init_checkpoint, every model dimension (model_identity: as the preset or the
    checkpoint gave it, too), the tokenizer, the objective and LoRA's shape. `uses_reference`
    is kept for callers; the starting checkpoint is identity for every run now."""
    del uses_reference
    ident = config_identity(cfg)
    ident.update(model_identity(config))
    ident["tokenizer (sha256)"] = cache.tokenizer_sha256(paths.local_copy(tokenizer_path))[:16]
    if not lora:
        ident.pop("lora.targets", None), ident.pop("lora.alpha", None)
    return ident


def settings(cfg) -> dict[str, Any]:
    """The optimisation-relevant config keys, plus the training data's fingerprint."""
    flat = _flat(cfg)
    out = {k: v for k, v in flat.items() if k.startswith(OPTIMISATION_PREFIXES) and k not in HARMLESS}
    out["data (fingerprint)"] = data_fingerprint(str(cfg.data.train))
    if cfg.train.objective == "grpo":  # an edited reward file changes the optimisation like edited data
        files = [e.rpartition(":")[0] for e in str(cfg.grpo.rewards).split(",") if e.rpartition(":")[0].endswith(".py")]
        out["grpo.rewards (sha256)"] = ",".join(fingerprint.quick_digest(f)[:16] for f in files if paths.exists(f))
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
    ident = model_identity(json.loads(model_json.read_text()))
    tok = paths.join(workdir, "tokenizer.model")
    if paths.exists(tok):
        ident["tokenizer (sha256)"] = cache.tokenizer_sha256(paths.local_copy(tok))[:16]  # the data cache's key too
    lora_json = paths.Path(paths.join(workdir, "lora.json"))
    ident["lora.rank"] = int(json.loads(lora_json.read_text())["rank"]) if lora_json.exists() else 0
    return ident


def _recorded_identity(manifest: dict) -> dict[str, Any]:
    """The manifest's identity; a manifest from before model.preset and model.init_checkpoint were
    identity keys gets them from its latest run's recorded config."""
    ident = dict(manifest.get("identity") or {})
    last = ((manifest.get("runs") or [{}])[-1] or {}).get("config") or {}
    for key in ("model.preset", "model.init_checkpoint"):
        section, name = key.split(".")
        if key not in ident and name in (last.get(section) or {}):
            ident[key] = last[section][name]
    return ident


def _diff(old: dict, new: dict) -> dict[str, list]:
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if k in old and k in new and old[k] != new[k]}


def _show(value) -> str:
    """A value in a change line: plain names bare (gemma2_tiny), anything else as Python writes it."""
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    return repr(value)


def _lines(changes: dict[str, list]) -> str:
    return "\n".join(f"  {k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def check_identity(workdir: str, ident: dict, *, resuming: bool) -> None:
    """Raises WorkdirError if the workdir's checkpoints belong to another model, tokenizer or
    objective than `ident` (whatever train.allow_changes says: the arrays would not fit, or
    would mean something else). Compares the keys both have, so a partial identity
    (config_identity, before anything is read) can be checked first."""
    shape_bound = resuming or paths.exists(paths.join(workdir, "base"))
    if not shape_bound:
        return
    manifest = read_manifest(workdir)
    old_ident = _recorded_identity(manifest) if manifest else _legacy_identity(workdir)
    changed = _diff(old_ident, ident) if old_ident is not None else {}
    if changed:
        kinds = {"model": "model", "tokenizer": "tokenizer", "train": "training objective", "lora": "LoRA shape"}
        what = list(dict.fromkeys(kinds[k.split(".")[0].split(" ")[0]] for k in changed
                                  if k.split(".")[0].split(" ")[0] in kinds)) or ["model"]
        raise WorkdirError(
            f"{workdir} holds a run of another {' and '.join(what)} (workdir -> this run):\n"
            f"{_lines(changed)}\nIts checkpoints cannot continue under this config, and train.allow_changes does "
            "not apply to these. Nothing in the workdir was changed. Use a new --workdir for this run (or delete "
            "the old one to start over).")


def check(workdir: str, cfg, ident: dict, *, resuming: bool) -> dict:
    """Compares this run with the workdir's record; raises WorkdirError before anything is
    written if the change is refused. Returns the manifest to `record` once the run starts."""
    check_identity(workdir, ident, resuming=resuming)
    manifest = read_manifest(workdir)
    now_settings = settings(cfg)
    changes = {}
    if manifest is not None:
        changes = _diff(manifest.get("settings", {}), now_settings)
        if changes and resuming and not bool(cfg.train.allow_changes):
            raise WorkdirError(
                f"resuming {workdir} with changed training settings (workdir -> this run):\n{_lines(changes)}\n"
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
        if not paths.exists(self.workdir):
            create(self.workdir)
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
        try:
            f = open(path, "a+")  # noqa: SIM115 (held open for the run)
        except OSError as e:
            raise WorkdirError(f"--workdir={self.workdir}: cannot write its lock file: {_why(e)}") from None
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
