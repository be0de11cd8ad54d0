"""Code evaluation runs generated programs apart: a verdict they cannot forge, no inherited
secrets, a private directory, resource limits, and no process left behind."""

from __future__ import annotations

import json
import os
import time

from gemma_jax.eval import metrics, sandbox

ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
WRONG_ADD = "def add(a, b):\n    return 0\n"


def test_a_correct_program_passes_and_a_failing_assert_fails():
    assert sandbox.run_tests("def add(a, b):\n    return a + b", ADD_TESTS) == "passed"
    assert sandbox.run_tests("def add(a, b):\n    return a + b", ["assert add(2, 2) == 5"]) == "failed"
    assert sandbox.run_tests(WRONG_ADD, ADD_TESTS) == "failed"
    assert sandbox.run_tests("def add(a, b) return a", ADD_TESTS) == "failed"  # syntax error
    assert sandbox.run_tests("def add(a, b):\n    return a + b", ["assert add(2, 3) =="]) == "failed"
    # `if __name__ == "__main__":` blocks run, as when the program is run as a script.
    assert sandbox.run_tests("if __name__ == '__main__':\n    X = 1", ["assert X == 1"]) == "passed"


FORGERIES = {
    # The case: the old harness appended `print(<marker>)` to the program's own file.
    "marker from own file, then os._exit(0)": WRONG_ADD + (
        "import os, re\n"
        "for word in re.findall(r'[0-9a-f]{16,}', open(__file__).read()):\n"
        "    print(word, flush=True)\n"
        "os._exit(0)\n"),
    "print pass words, then os._exit(0)": WRONG_ADD + "import os\nprint('passed\\nok\\nPASS', flush=True)\nos._exit(0)\n",
    "sys.exit(0)": WRONG_ADD + "import sys\nsys.exit(0)\n",
    "raise SystemExit(0)": WRONG_ADD + "raise SystemExit(0)\n",
    "patched exec, os.write, os._exit, AssertionError": WRONG_ADD + (
        "import builtins, os\n"
        "builtins.exec = lambda *a, **k: None\n"
        "builtins.AssertionError = type('Nothing', (Exception,), {})\n"
        "os.write = lambda fd, data: len(data)\n"
        "os._exit = lambda code: None\n"),
    "write to every fd, then os._exit(0)": WRONG_ADD + (
        "import os\n"
        "for fd in range(1, 256):\n"
        "    try:\n"
        "        os.write(fd, b'passed\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"),
    "write 'passed' into the supervisor's stdout": WRONG_ADD + (
        "import os\n"
        "try:\n"
        "    with open(f'/proc/{os.getppid()}/fd/1', 'w') as f:\n"
        "        f.write('passed\\n')\n"
        "except OSError:\n"
        "    pass\n"),
    "swallow assert errors with an excepthook": WRONG_ADD + "import sys\nsys.excepthook = lambda *a: None\n",
}


def test_a_program_cannot_forge_a_pass():
    names = list(FORGERIES)
    out = metrics.code_pass_rate([FORGERIES[n] for n in names], [ADD_TESTS] * len(names), timeout=10)
    assert dict(zip(names, out["results"])) == {n: "failed" for n in names}
    assert out["pass_rate"] == 0


def test_a_planted_secret_is_not_inherited(monkeypatch):
    monkeypatch.setenv("GEMMA_JAX_TEST_SECRET", "hunter2-s3cr3t")
    program = ("import os\n"
               "SEEN = os.environ.get('GEMMA_JAX_TEST_SECRET')\n"
               "OWN = open('/proc/self/environ', 'rb').read()\n"
               "PARENT = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n")
    absent = ["assert SEEN is None", "assert b's3cr3t' not in OWN", "assert b's3cr3t' not in PARENT",
              "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'OMP_NUM_THREADS', "
              "'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'LD_LIBRARY_PATH'}"]
    present = ["assert SEEN == 'hunter2-s3cr3t'"]
    out = metrics.code_pass_rate([program, program], [absent, present])
    assert out["results"] == ["passed", "failed"]


def test_cwd_and_home_are_a_private_directory_removed_afterwards(tmp_path, monkeypatch):
    here = tmp_path / "evaluator_cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    report = tmp_path / "report.json"
    program = ("import json, os, stat, tempfile\n"
               "open('stray.txt', 'w').write('x')\n"
               "os.makedirs('locked/inner')\n"
               "open('locked/inner/f', 'w').write('x')\n"
               "os.chmod('locked', 0)\n"
               f"json.dump({{'cwd': os.getcwd(), 'home': os.path.expanduser('~'), 'tmp': tempfile.gettempdir(),"
               f" 'mode': stat.S_IMODE(os.stat('.').st_mode)}}, open({str(report)!r}, 'w'))\n")
    tests = [f"assert os.getcwd() != {str(here)!r}", "assert os.path.expanduser('~') == os.getcwd()"]
    assert sandbox.run_tests(program, tests) == "passed"
    seen = json.loads(report.read_text())
    assert seen["home"] == seen["cwd"] == seen["tmp"] and seen["mode"] == 0o700
    assert not os.path.exists(seen["cwd"]), "the private directory was not removed"
    assert list(here.iterdir()) == []


def _gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _daemon(pidfile, then: str) -> str:
    """A program that double-forks a setsid daemon (sleeping a minute), waits for its pid file, then `then`."""
    return ("import os, time\n"
            f"PIDFILE = {str(pidfile)!r}\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        open(PIDFILE + '.tmp', 'w').write(str(os.getpid()))\n"
            "        os.rename(PIDFILE + '.tmp', PIDFILE)\n"
            "        time.sleep(60)\n"
            "    os._exit(0)\n"
            "for _ in range(1000):\n"
            "    if os.path.exists(PIDFILE):\n"
            "        break\n"
            "    time.sleep(0.01)\n"
            "def add(a, b):\n"
            "    return a + b\n" + then)


def test_no_process_survives_the_evaluation(tmp_path):
    """A setsid daemon escapes a process-group kill; the supervisor, a subreaper, kills it anyway,
    after a pass as after a timeout. A child of a still-living child goes as well."""
    pidfiles = [tmp_path / "passed.pid", tmp_path / "timeout.pid", tmp_path / "child.pid"]
    programs = [_daemon(pidfiles[0], ""), _daemon(pidfiles[1], "while True:\n    pass\n"),
                ("import os, signal, time\n"
                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "if os.fork() == 0:\n"
                 f"    open({str(pidfiles[2])!r}, 'w').write(str(os.getpid()))\n"
                 "    time.sleep(60)\n"
                 f"while not os.path.exists({str(pidfiles[2])!r}):\n"
                 "    time.sleep(0.01)\n"
                 "def add(a, b):\n    return a + b\n")]
    pids = []
    try:
        out = metrics.code_pass_rate(programs, [ADD_TESTS] * 3, timeout=3)
        assert out["results"] == ["passed", "timeout", "passed"]
        pids = [int(p.read_text()) for p in pidfiles]
        assert [_gone(pid) for pid in pids] == [True, True, True]
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_resource_limits_stop_runaways():
    # Address space: one allocation beyond the limit fails at once (a MemoryError, not a swap storm).
    assert sandbox.run_tests("x = bytearray(512 << 20)", ["assert x"], memory_mb=256) == "failed"
    assert sandbox.run_tests("x = bytearray(1 << 20)", ["assert x"], memory_mb=256) == "passed"
    # The limits are really set, and the program cannot raise them again.
    checks = ["import resource",
              "assert resource.getrlimit(resource.RLIMIT_AS) == (256 << 20, 256 << 20)",
              "assert resource.getrlimit(resource.RLIMIT_FSIZE) == (1 << 20, 1 << 20)",
              "assert resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64)",
              "assert resource.getrlimit(resource.RLIMIT_CPU) == (4, 4)",
              "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)"]
    raise_again = ["import resource", "resource.setrlimit(resource.RLIMIT_AS, (1 << 40, 1 << 40))"]
    limits = dict(memory_mb=256, file_size_mb=1, open_files=64, timeout=3)
    assert sandbox.run_tests("", checks, **limits) == "passed"
    assert sandbox.run_tests("", raise_again, **limits) == "failed"
    # File size: writing past RLIMIT_FSIZE stops the program.
    write = "open('big', 'wb').write(b'x' * ({n} << 10))"
    assert sandbox.run_tests(write.format(n=2048), ["assert True"], **limits) == "failed"
    assert sandbox.run_tests(write.format(n=512), ["assert True"], **limits) == "passed"
    # CPU seconds: a busy loop dies of SIGXCPU long before its generous wall-clock timeout.
    start = time.perf_counter()
    assert sandbox.run_tests("while True:\n    pass", ["assert True"], cpu_seconds=1, timeout=60) == "failed"
    assert time.perf_counter() - start < 20


def test_timeout_counts_as_failed():
    out = metrics.code_pass_rate(["import time\ntime.sleep(30)\ndef add(a, b):\n    return a + b"], [ADD_TESTS],
                                 timeout=1)
    assert out["results"] == ["timeout"] and out["failed"] == 1 and out["pass_rate"] == 0
