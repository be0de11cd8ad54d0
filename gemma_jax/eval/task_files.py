"""lm_eval task inputs checked before a model loads: --limit, local task files, their datasets.

A task file under --include_path that lm_eval's task index would skip (malformed YAML, a missing
include, no task or group name) is reported with its parse error, file and line when a requested
task seems to live in it; a local task's data_files that are missing or empty, or lack the
task's splits, are reported by file. lm_eval is imported only for its YAML reader, when task
files are read, so these checks cost no task index (lm_eval's takes ~15 s to build).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

from gemma_jax.errors import UserError


def check_limit(limit) -> None:
    """--limit: None, or a number > 0 (examples per task; below 1, a fraction of each task)."""
    if limit is not None and not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0):
        shown = f"{limit:g}" if isinstance(limit, float) else limit
        raise UserError(f"--limit={shown}: must be a number > 0 (examples per task, or a fraction of each task "
                        "below 1); leave it out for every example")


def _yaml_problem(path: str, err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is not None:  # a YAML syntax error: where, and what
        what = " ".join(x for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
        return f"{path}:{mark.line + 1}:{mark.column + 1}: malformed YAML: {what or err}"
    return f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def local_tasks(include_path: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """The task files under include_path read as lm_eval reads them: ({task or group name:
    config}, [(file, problem)] for files it would skip: malformed YAML, no task or group key)."""
    try:  # lm_eval's own reader (includes, !function tags), as its task index uses it
        from lm_eval.tasks._yaml_loader import load_yaml  # pylint: disable=g-import-not-at-top
    except ImportError:  # another lm_eval version: plain YAML, !function tags kept as strings
        import yaml  # pylint: disable=g-import-not-at-top

        class _Loader(yaml.SafeLoader):
            pass

        _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))

        def load_yaml(path, **_):
            with open(path, "rb") as f:
                cfg = yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader)
            if not isinstance(cfg, dict):
                raise ValueError(f"expected a YAML mapping, got {type(cfg).__name__}")
            return cfg

    configs, problems = {}, []
    for path in sorted(glob.glob(os.path.join(include_path, "**", "*.yaml"), recursive=True)):
        try:
            cfg = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as err:  # noqa: BLE001  yaml errors, a missing include, a non-mapping document
            problems.append((path, _yaml_problem(path, err)))
            continue
        name = cfg.get("group", cfg.get("task"))
        if not isinstance(name, str) or not name:
            problems.append((path, f"{path}: has no 'task:' (or 'group:') name"))
            continue
        configs.setdefault(name, dict(cfg, _path=path))
    return configs, problems


def _names_in(path: str) -> set[str]:
    """The names a task file that does not parse seems to define (its 'task:'/'group:' lines, its stem)."""
    names = {os.path.splitext(os.path.basename(path))[0]}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = re.match(r"\s*(task|group)\s*:\s*['\"]?([^'\"#\s]+)", line)
                if m:
                    names.add(m.group(2))
    except OSError:
        pass
    return names


def _data_problems(name: str, cfg: dict) -> list[str]:
    """Local dataset files of a task config that are missing or empty (found before a model loads)."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        path = cfg.get("dataset_path")
        local = isinstance(path, str) and (path.startswith(("/", "./", "../", "~")) or os.path.splitext(path)[1])
        files = {"": path} if local else {}
    elif not isinstance(files, dict):
        files = {"": files}
    out, where = [], cfg.get("_path", "")
    for split, fs in files.items():
        for f in fs if isinstance(fs, list) else [fs]:
            if not isinstance(f, str) or "://" in f:
                continue
            f = os.path.expanduser(f)
            if not os.path.isabs(f) and not glob.glob(f):  # datasets reads it from the cwd; else beside the YAML
                beside = os.path.join(os.path.dirname(where), f)
                f = beside if glob.glob(beside) else f
            found = sorted(glob.glob(f)) if any(c in f for c in "*?[") else [f]
            if not found or not all(os.path.exists(x) for x in found):
                out.append(f"task {name} ({where}): dataset file {f} does not exist")
            elif all(os.path.isfile(x) and not _has_content(x) for x in found):
                out.append(f"task {name} ({where}): dataset file {f} is empty")
    splits = {cfg.get(k) for k in ("test_split", "validation_split", "training_split", "fewshot_split")} - {None}
    if files and "" not in files and splits - set(files):
        out.append(f"task {name} ({where}): split(s) {sorted(splits - set(files))} not among its data_files "
                   f"{sorted(files)}")
    return out


def _has_content(path: str) -> bool:
    """Not blank, and (a small JSON file) not an empty array or object."""
    if os.path.getsize(path) < 64 and path.endswith(".json"):
        try:
            with open(path, "rb") as f:
                return bool(json.loads(f.read() or b"null"))
        except ValueError:
            return True  # unreadable: the dataset loader will say why
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 16)
            if not block:
                return False
            if block.strip():
                return True


def check_tasks(tasks, include_path: str | None = None) -> list[str]:
    """What can be checked of the tasks before a model loads: the include path, the task files
    that would be read for them (a malformed one named with its parse error, file and line), and
    their local dataset files (missing or empty); raises UserError. Returns the task names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks: name at least one lm_eval task or group")
    if include_path is None:
        return list(tasks)
    include_path = str(include_path)
    if not os.path.isdir(include_path):
        raise UserError(f"--include_path={include_path}: no such directory")
    configs, problems = local_tasks(include_path)
    for path, problem in problems:
        if set(tasks) & _names_in(path):
            raise UserError(f"task file {problem}")
    todo, seen, errors = [t for t in tasks if t in configs], set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        cfg = configs[name]
        if "group" in cfg:
            members = cfg.get("task") or []
            todo += [m for m in (members if isinstance(members, list) else [members]) if isinstance(m, str)
                     and m in configs]
        else:
            errors += _data_problems(name, cfg)
    if errors:
        raise UserError("; ".join(errors))
    return list(tasks)
