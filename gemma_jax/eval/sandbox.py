"""Runs an untrusted generated program against its assert statements, away from the evaluator.

Three processes, so that nothing the program does decides its own verdict or outlives it:

  evaluator (this module, in your process)
    -> supervisor: `python -I sandbox.py --supervise`, a Linux child subreaper (PR_SET_CHILD_SUBREAPER),
       so every process the program starts, even a double-forked setsid daemon, stays its descendant
      -> harness: `python -I sandbox.py --harness FD`, the program and then the asserts, in one
         interpreter, under resource limits, in a clean environment and a private working directory

What it does:
- Environment: only PATH, HOME and TMPDIR (both the private directory), LANG and single-thread
  settings for numeric libraries; nothing of yours is inherited (no tokens, no keys).
- A fresh directory (mode 700) is the working directory and HOME; it is deleted afterwards.
- Limits (resource.setrlimit): CPU seconds, address space, file size, open files, no core dumps,
  and (for a non-root user) the number of processes. A wall-clock timeout on top.
- No survivors: when the harness exits or times out, the supervisor SIGKILLs its process group,
  then every process left in its subtree (orphans are re-parented to it) until it has no child.
- Verdict: the supervisor sends a random token on the harness's stdin; the harness reads it
  (before any program code runs), compiles program and asserts separately, runs the program,
  then the asserts, and only then writes the token to a pipe. A pass is that exact token plus exit
  status 0. Printing anything, `sys.exit(0)`, `os._exit(0)`, exceptions, patched builtins
  (the harness keeps its own references to exec/os.write) or an assert that fails: all fail.

What it does not do: it is not a sandbox. The program runs as your user with your file system,
network and processes: it can read your files (~/.cache/huggingface/token, cloud credentials,
/proc/<pid>/environ of your other processes), write anywhere you can, and kill the supervisor
(then its orphans escape, and the run counts as failed). A program written to attack this harness
can still forge a pass by reading the token from the harness's memory (frame introspection, gc,
sys.settrace, /proc/self/mem) or return objects whose __eq__ is always true. Evaluate untrusted
models in a container or VM without credentials.

Run as a script only by this module; it imports nothing from gemma_jax (the harness must not).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

_PR_SET_CHILD_SUBREAPER = 36
_GRACE_S = 30.0  # on top of the timeout, for the supervisor's start and clean-up


# ----------------------------------------------------------------------------- evaluator side


def clean_env(home: str) -> dict[str, str]:
    """The whole environment the program sees: nothing inherited but the library path python may need."""
    env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
           # one thread each: limits and timeouts then mean the same on a 2-core and a 200-core host
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if "LD_LIBRARY_PATH" in os.environ:  # a python built with a shared libpython may need it to start
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def run_tests(program: str, tests: Sequence[str], *, timeout: float = 10.0, memory_mb: int = 2048,
              cpu_seconds: int | None = None, file_size_mb: int = 64, open_files: int = 256,
              max_processes: int = 64) -> str:
    """'passed', 'failed' or 'timeout' for `program` followed by the assert strings `tests`.

    `cpu_seconds` defaults to the timeout rounded up plus one; `max_processes` counts processes
    and threads started by the program (enforced for non-root users only).
    """
    job = {"program": program, "tests": "\n".join(tests) + "\n", "timeout": float(timeout),
           "limits": {"cpu_seconds": int(cpu_seconds or math.ceil(timeout) + 1),
                      "memory_bytes": int(memory_mb) << 20, "file_size_bytes": int(file_size_mb) << 20,
                      "open_files": int(open_files), "max_processes": int(max_processes)}}
    workdir = tempfile.mkdtemp(prefix="gemma_jax_code_")  # mode 700
    try:
        job["workdir"] = workdir
        proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--supervise"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                cwd=workdir, env=clean_env(workdir), start_new_session=True)
        try:
            out, _ = proc.communicate(json.dumps(job).encode(), timeout=timeout + _GRACE_S)
        except subprocess.TimeoutExpired:  # the supervisor itself hung: should not happen
            _killpg(proc.pid)
            proc.kill()
            proc.wait()
            return "timeout"
        # Exactly one line from a supervisor that exited normally: the program can write into this
        # pipe through /proc/<supervisor>/fd/1, but not also make the supervisor print nothing.
        verdict = out.decode("ascii", "replace")[:-1]
        ok = proc.returncode == 0 and out.endswith(b"\n") and verdict in ("passed", "failed", "timeout")
        return verdict if ok else "failed"
    finally:
        _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    """rmtree, after giving back write access to directories the program made unreadable (chmod 000)."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            try:  # O_NOFOLLOW: a symlink the program left must not point the chmod elsewhere
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.fchmod(fd, stat.S_IRWXU)
            except OSError:
                pass
            finally:
                os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- supervisor


def _become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux >= 3.4)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, read from /proc (the /proc/PID/task/TID/children file is optional)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ')'
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def _user_tasks(uid: int) -> int:
    """Processes and threads of `uid` now: RLIMIT_NPROC counts all of them, not just the program's."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                total += int(status["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _limit_setter(limits: dict):
    """preexec_fn for the harness: applied in the forked child just before it runs python."""
    import resource

    nproc = None
    if os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC") and os.path.isdir("/proc"):
        nproc = _user_tasks(os.getuid()) + limits["max_processes"]  # root ignores RLIMIT_NPROC

    def apply():
        pairs = [(resource.RLIMIT_CPU, limits["cpu_seconds"]), (resource.RLIMIT_FSIZE, limits["file_size_bytes"]),
                 (resource.RLIMIT_NOFILE, limits["open_files"]), (resource.RLIMIT_CORE, 0)]
        if hasattr(resource, "RLIMIT_AS"):
            pairs.append((resource.RLIMIT_AS, limits["memory_bytes"]))
        if nproc is not None:
            pairs.append((resource.RLIMIT_NPROC, nproc))
        for what, value in pairs:
            _, hard = resource.getrlimit(what)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(what, (value, value))
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return apply


def _reap_all(me: int, patience_s: float = 10.0) -> None:
    """SIGKILL every descendant until none is left; each kill re-parents the victim's children to us."""
    deadline = time.monotonic() + patience_s  # a process stuck in the kernel (state D) cannot die yet
    while time.monotonic() < deadline:
        for pid in _children(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


def _supervise() -> None:
    """Reads the job from stdin, runs the harness, prints the verdict."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # only SIGKILL stops the clean-up
        signal.signal(sig, signal.SIG_IGN)
    job = json.loads(sys.stdin.buffer.read())
    _become_subreaper()
    token = secrets.token_hex(32).encode()
    read_fd, write_fd = os.pipe()
    harness = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--harness", str(write_fd)],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=job["workdir"], env=clean_env(job["workdir"]), pass_fds=(write_fd,),
                               start_new_session=True, preexec_fn=_limit_setter(job["limits"]))
    os.close(write_fd)
    verdict = "failed"
    try:
        try:
            payload = {"token": token.decode(), "program": job["program"], "tests": job["tests"],
                       "path": os.path.join(job["workdir"], "program.py")}
            harness.stdin.write(json.dumps(payload).encode())
            harness.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            rc = harness.wait(timeout=job["timeout"])
        except subprocess.TimeoutExpired:
            verdict, rc = "timeout", None
        if rc == 0:
            os.set_blocking(read_fd, False)
            try:  # whatever the harness (or anything else holding the pipe) wrote before now
                written = os.read(read_fd, 4096)
            except BlockingIOError:
                written = b""
            verdict = "passed" if written == token else "failed"
    finally:
        _killpg(harness.pid)
        harness.kill()
        harness.wait()
        _reap_all(os.getpid())
    sys.stdout.write(verdict + "\n")


# ----------------------------------------------------------------------------- harness


def _harness(verdict_fd: int) -> None:
    """Program, then asserts, then the token; the program runs in its own globals as __main__.

    Everything used after the program starts is a local bound beforehand, so patching builtins or
    `os` cannot skip the asserts or write the token.
    """
    _exec, _write, _exit = exec, os.write, os._exit
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again: the job (and token) can no longer be read there
    job = json.loads(b"".join(chunks))
    token, path = job["token"].encode(), job["path"]
    with open(path, "w", encoding="utf-8") as f:  # for tracebacks and inspect.getsource
        f.write(job["program"])
    program = compile(job["program"], path, "exec")
    tests = compile(job["tests"], "<tests>", "exec")
    del chunks, chunk, job, f
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    _exec(program, namespace)
    _exec(tests, namespace)
    _write(verdict_fd, token)
    _exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--supervise"]:
        _supervise()
    elif sys.argv[1:2] == ["--harness"]:
        _harness(int(sys.argv[2]))
    else:
        sys.exit("sandbox.py is run by gemma_jax.eval.sandbox.run_tests, not by hand")
