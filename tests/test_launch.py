"""Launchers: the TPU VM launcher's gcloud commands (dry run), its worker scripts run locally, SLURM."""

from __future__ import annotations

import http.server
import importlib.util
import io
import os
import shlex
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "tpu_vm.py"
SLURM = REPO / "launch" / "slurm.sh"
WHERE = ["--zone=us-west4-a", "--project=my-proj"]
SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"


def _load():
    spec = importlib.util.spec_from_file_location("tpu_vm", LAUNCHER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tpu_vm = _load()


def dry(*argv: str) -> list[list[str]]:
    """Runs the launcher with --dry_run in-process; the printed commands as argv lists (comments dropped)."""
    out = io.StringIO()
    rc = tpu_vm.main([argv[0], "--name=gemma", *WHERE, "--dry_run", *argv[1:]], out=out)
    assert rc == 0, out.getvalue()
    return [shlex.split(line) for line in out.getvalue().splitlines() if line and not line.startswith("#")]


def cli(*argv: str) -> subprocess.CompletedProcess:
    """The launcher as a user runs it."""
    return subprocess.run([sys.executable, str(LAUNCHER), *argv], capture_output=True, text=True, timeout=60)


def script_of(argv: list[str]) -> str:
    """The remote shell of a `gcloud ... ssh --command=...` argv."""
    assert argv[-1].startswith("--command="), argv
    return argv[-1][len("--command="):]


def all_workers_script(argv: list[str]) -> str:
    """The shell of a `gcloud ... ssh --worker=all --command=...` argv, checked to parse."""
    assert argv[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gemma", *WHERE, "--worker=all"]
    script = script_of(argv)
    bash_ok(script)
    return script


def bash_ok(script: str):
    res = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + "\n" + script


# ----------------------------------------------------------------------------- dry-run commands


@pytest.mark.parametrize("accelerator,hosts", [("v5litepod-8", 1), ("v4-8", 1), ("v5litepod-32", 8),
                                               ("v4-32", 4), ("v5p-8", 1), ("v6e-16", 4), ("v5litepod-4", 1)])
def test_hosts_per_slice(accelerator, hosts):
    assert tpu_vm.num_hosts(accelerator) == hosts


def test_single_host_v5e_commands():
    """v5litepod-8: create, setup (scp + install on --worker=all), train on --worker=all, delete."""
    [create] = dry("create", "--accelerator_type=v5litepod-8", "--spot")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "gemma", "--accelerator-type=v5litepod-8",
                      *WHERE, "--version=v2-alpha-tpuv5-lite", "--spot", SCOPES]

    scp, setup = dry("setup")
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tpu_vm.tarball_path("gemma"),
                   "gemma:gemma_jax_src.tar.gz", *WHERE, "--worker=all"]
    script = all_workers_script(setup)
    assert "tar -xzf ~/gemma_jax_src.tar.gz -C ~/gemma_jax" in script
    assert 'uv pip install --python ~/gemma_venv/bin/python -e "$HOME/gemma_jax[tpu]" gcsfs' in script

    [train] = dry("train", "--config=configs/legal.py:2b", "--workdir=gs://bkt/legal 2b",
                  "--", "--config.train.steps=100", "--config.data.eval=")
    script = all_workers_script(train)
    assert ("setsid nohup ~/gemma_venv/bin/python -m gemma_jax.train --config=configs/legal.py:2b "
            "'--workdir=gs://bkt/legal 2b' --config.train.steps=100 --config.data.eval= "
            ">> ~/gemma_jax_train.log") in script
    assert script.startswith("cd ~/gemma_jax || exit 1;")
    assert "tail -c +$((START + 1)) -F --pid=$PID ~/gemma_jax_train.log" in script  # logs streamed

    [delete] = dry("delete")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "gemma", *WHERE, "--quiet"]


def test_multi_host_v4_32_commands():
    """v4-32 (4 hosts) as a queued Spot resource: same setup/train on all workers, gs:// workdir."""
    create, describe = dry("create", "--accelerator_type=v4-32", "--queued", "--spot")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "gemma", "--node-id=gemma",
                      "--accelerator-type=v4-32", *WHERE, "--runtime-version=tpu-ubuntu2204-base", "--spot", SCOPES]
    assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "gemma", *WHERE,
                        "--format=value(state.state)"]

    # With --git_url nothing is copied from here: the one command is the ssh on all workers.
    [setup] = dry("setup", "--git_url=https://github.com/me/gemma_jax.git", "--git_ref=v0.1",
                  "--weights=gs://bkt/gemma2-2b-it/", "--tfds_data=gs://bkt/tensorflow_datasets")
    script = all_workers_script(setup)
    assert "git clone --quiet https://github.com/me/gemma_jax.git ~/gemma_jax" in script
    assert "git -C ~/gemma_jax checkout --quiet --force v0.1" in script
    assert "gcloud storage cp -r gs://bkt/gemma2-2b-it ~/gemma_jax/weights/" in script
    assert "gcloud storage rsync -r gs://bkt/tensorflow_datasets ~/tensorflow_datasets" in script


def test_multi_host_train_same_command_and_coordinator():
    scp, train = dry("train", "--accelerator_type=v4-32", "--config=configs/legal.py:9b",
                     "--workdir=gs://bkt/legal_9b", "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true")
    script = all_workers_script(train)
    assert "export JAX_COORDINATOR_ADDRESS=${W0##*:}:8476" in script
    # --env goes in a file copied to every worker and sourced there, after the coordinator line.
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "ENV_FILE", "gemma:gemma_jax_train.env", *WHERE,
                   "--worker=all"]
    assert '. "$HOME"/gemma_jax_train.env || exit 1; rm -f "$HOME"/gemma_jax_train.env' in script
    assert script.index("JAX_COORDINATOR_ADDRESS") < script.index('. "$HOME"/gemma_jax_train.env')
    assert "xla_tpu_enable_async_all_gather" not in script
    assert "-m gemma_jax.train --config=configs/legal.py:9b --workdir=gs://bkt/legal_9b >>" in script


def test_queued_delete_stop_logs_ssh():
    assert dry("delete", "--queued") == [["gcloud", "compute", "tpus", "queued-resources", "delete", "gemma",
                                           *WHERE, "--force", "--quiet"]]
    [logs] = dry("logs")
    assert logs == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gemma", *WHERE, "--worker=0",
                    "--command=tail -n 200 -F ~/gemma_jax_train.log"]
    [stop] = dry("stop")
    assert 'kill -TERM "$(cat ~/gemma_jax_train.pid)"' in all_workers_script(stop)
    assert dry("ssh", "--worker=2", "--ssh_flag=--internal-ip", "--", "nvidia-smi", "-L") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gemma", *WHERE, "--worker=2", "--internal-ip",
         "--command=nvidia-smi -L"]]


def test_shared_workdir_allows_a_mounted_path_on_multi_host():
    [train] = dry("train", "--accelerator_type=v4-32", "--config=c", "--workdir=/mnt/nfs/run", "--shared_workdir")
    assert "--workdir=/mnt/nfs/run" in script_of(train)


def test_run_dry_prints_create_setup_train():
    cmds = dry("run", "--accelerator_type=v5litepod-8", "--config=configs/legal.py:2b",
               "--workdir=gs://bkt/w", "--delete_after")
    verbs = [c[3:5] for c in cmds]
    assert verbs == [["tpu-vm", "create"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
                     ["tpu-vm", "delete"]]


def test_cli_dry_run_prints_commands():
    res = cli("create", "--name=gemma", *WHERE, "--accelerator_type=v4-8", "--dry_run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == shlex.join(
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "gemma", "--accelerator-type=v4-8", *WHERE,
         "--version=tpu-ubuntu2204-base", SCOPES])


@pytest.mark.parametrize("argv,message", [
    (["create", "--name=g", "--accelerator_type=v4-8"], "--zone"),
    (["create", "--zone=z", "--accelerator_type=v4-8"], "--name"),
    (["create", "--name=g", "--zone=z"], "--accelerator_type"),
    (["train", "--name=g", "--zone=z", "--workdir=gs://b/w"], "--config"),
    (["train", "--name=g", "--zone=z", "--config=c"], "--workdir"),
    (["create", "--name=g", "--zone=z", "--accelerator_type=v9-8"], "expected e.g. v5litepod-8"),
    (["create", "--name=g", "--zone=z", "--accelerator_type=v4-8", "--spot", "--preemptible"], "pick one"),
    (["create", "--name=g", "--zone=z", "--accelerator_type=v4-8", "--queued", "--preemptible"], "use --spot"),
    (["train", "--name=g", "--zone=z", "--config=c", "--workdir=/tmp/w", "--accelerator_type=v4-32"], "gs://"),
    (["train", "--name=g", "--zone=z", "--config=c", "--workdir=gs://b/w", "--env=NOVALUE"], "KEY=VALUE"),
    (["run", "--name=g", "--zone=z", "--accelerator_type=v5litepod-32", "--config=c", "--workdir=w"], "8 hosts"),
    (["launch"], "invalid choice"),
])
def test_errors_name_the_flag(argv, message):
    res = cli(*argv, "--dry_run")
    assert res.returncode == 2, res.stdout
    assert message in res.stderr, res.stderr
    assert "gcloud" not in res.stdout


def test_pack_ships_sources_and_data_not_weights(tmp_path):
    files = tpu_vm.source_files()
    assert {"gemma_jax/train/loop.py", "configs/legal.py", "data/tokenizer.model", "launch/tpu_vm.py",
            "setup.py"} <= set(files)
    assert not [f for f in files if f.startswith(("weights/", ".git/")) or "__pycache__" in f]
    path = tmp_path / "src.tar.gz"
    assert tpu_vm.pack(str(path)) == len(files)
    with tarfile.open(path) as tar:
        assert "gemma_jax/train/loop.py" in tar.getnames()


# ----------------------------------------------------------------------------- the worker scripts, locally


class _Metadata(http.server.BaseHTTPRequestHandler):
    endpoints = b""

    def do_GET(self):  # noqa: N802
        ok = self.path.endswith("/worker-network-endpoints") and self.headers.get("Metadata-Flavor") == "Google"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(self.endpoints if ok else b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_worker(tmp_path):
    """A HOME with ~/gemma_jax and a fake ~/gemma_venv/bin/python, and a fake metadata server."""
    home = tmp_path / "home"
    (home / "gemma_jax").mkdir(parents=True)
    (home / "gemma_venv" / "bin").mkdir(parents=True)
    python = home / "gemma_venv" / "bin" / "python"
    python.write_text("#!/bin/bash\n"
                      "echo \"trainer args: $*\"\n"
                      "echo \"coordinator: ${JAX_COORDINATOR_ADDRESS:-none} extra: ${EXTRA:-none} cwd: $PWD\"\n"
                      "echo \"token: ${HF_TOKEN:-none}\"\n"
                      "sleep \"${FAKE_SECONDS:-0}\"\n"
                      "exit \"${FAKE_RC:-0}\"\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, HOME=str(home), GCE_METADATA_IP=f"127.0.0.1:{server.server_port}")
    yield SimpleNamespace(home=home, env=env)
    server.shutdown()


def _train_script(*extra: str) -> str:
    *_, train = dry("train", "--config=configs/legal.py:2b", "--workdir=gs://b/w", *extra, "--",
                    "--config.train.steps=7")
    return script_of(train)


def test_train_script_streams_log_returns_status_and_finds_coordinator(fake_worker):
    """The train script as a worker runs it: multi-host metadata -> coordinator; exit status passes through."""
    _Metadata.endpoints = b"t1v-n-0:0:10.1.2.3,t1v-n-1:1:10.1.2.4"
    env = dict(fake_worker.env, FAKE_RC="7")
    (fake_worker.home / "gemma_jax_train.env").write_text(tpu_vm.env_file_text([("EXTRA", "yes")]))  # as scp does
    res = subprocess.run(["bash", "-c", _train_script("--env=EXTRA=yes")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 7, res.stderr
    assert ("trainer args: -m gemma_jax.train --config=configs/legal.py:2b --workdir=gs://b/w "
            "--config.train.steps=7") in res.stdout
    assert f"coordinator: 10.1.2.3:8476 extra: yes cwd: {fake_worker.home / 'gemma_jax'}" in res.stdout
    assert "trainer args" in (fake_worker.home / "gemma_jax_train.log").read_text()

    # Single host (one endpoint): no coordinator, the trainer runs as one process.
    _Metadata.endpoints = b"t1v-n-0:0:10.1.2.3"
    res = subprocess.run(["bash", "-c", _train_script()], env=fake_worker.env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "coordinator: none" in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("trainer args") == 1, "the log of the earlier run was streamed again"


def test_train_script_refuses_a_second_trainer_and_detach_returns(fake_worker):
    env = dict(fake_worker.env, FAKE_SECONDS="30")
    t0 = time.time()
    res = subprocess.run(["bash", "-c", _train_script("--detach")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and time.time() - t0 < 10, res.stderr
    pid = int((fake_worker.home / "gemma_jax_train.pid").read_text())
    try:
        res = subprocess.run(["bash", "-c", _train_script()], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 3 and "already running" in res.stderr, res.stdout + res.stderr
    finally:
        os.kill(pid, 15)


def test_run_recreates_after_preemption_and_resumes():
    """`run`: train fails and the VM is PREEMPTED -> delete, create, setup, train again; then delete."""
    states = iter(["NOT_FOUND", "PREEMPTED", "READY"])
    train_rcs = iter([255, 0])
    calls = []

    def runner(argv, capture_output=False, text=False):
        calls.append(argv[3:5])
        if argv[4] == "describe":
            return SimpleNamespace(returncode=0, stdout=next(states) + "\n")
        rc = next(train_rcs) if argv[4] == "ssh" and "gemma_jax.train" in argv[-1] else 0
        return SimpleNamespace(returncode=rc, stdout="")

    out = io.StringIO()
    rc = tpu_vm.main(["run", "--name=gemma", *WHERE, "--accelerator_type=v4-8", "--config=c",
                      "--workdir=gs://b/w", "--git_url=https://x/y.git", "--delete_after"], out=out, runner=runner)
    assert rc == 0, out.getvalue()
    assert calls == [["tpu-vm", "describe"], ["tpu-vm", "create"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
                     ["tpu-vm", "describe"], ["tpu-vm", "delete"],
                     ["tpu-vm", "create"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "delete"]]
    assert "PREEMPTED (preempted?): re-creating" in out.getvalue()


def test_run_stops_when_the_trainer_fails_on_a_healthy_vm():
    states = iter(["READY", "READY"])

    def runner(argv, capture_output=False, text=False):
        if argv[4] == "describe":
            return SimpleNamespace(returncode=0, stdout=next(states))
        return SimpleNamespace(returncode=1 if "gemma_jax.train" in argv[-1] else 0, stdout="")

    out = io.StringIO()
    rc = tpu_vm.main(["run", "--name=gemma", *WHERE, "--accelerator_type=v4-8", "--config=c",
                      "--workdir=gs://b/w", "--git_url=https://x/y.git"], out=out, runner=runner)
    assert rc == 1
    assert "trainer exited with 1 on a READY VM" in out.getvalue()


# ----------------------------------------------------------------------------- --env: keys checked, values off argv

SECRET = "s3cr3t 'quoted' $(touch pwned) \"dq\" `touch pwned2` ; echo leak"


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "", "A;touch /tmp/pwned", "$(id)", "A.B", "Ä"])
def test_env_keys_must_be_shell_names(key):
    res = cli("train", "--name=g", "--zone=z", "--config=c", "--workdir=gs://b/w", f"--env={key}=s3cr3t", "--dry_run")
    assert res.returncode == 2, res.stdout
    assert f"{key!r} is not a valid environment variable name" in res.stderr, res.stderr
    assert "s3cr3t" not in res.stderr + res.stdout  # the value may be a secret: never echoed
    assert "gcloud" not in res.stdout


def _fake_gcloud(fake_worker, calls):
    """A runner that records every argv, 'copies' scp'd env files into the fake worker's home (keeping
    the mode, as scp does) and runs ssh --command scripts there with bash."""
    def runner(argv, capture_output=False, text=False):
        calls.append(list(argv))
        if argv[4] == "scp" and argv[6].endswith(":gemma_jax_train.env"):
            src = Path(argv[5])
            assert stat.S_IMODE(src.stat().st_mode) == 0o600
            dst = fake_worker.home / "gemma_jax_train.env"
            dst.write_bytes(src.read_bytes())
            dst.chmod(stat.S_IMODE(src.stat().st_mode))
            return SimpleNamespace(returncode=0, stdout="")
        if argv[4] == "ssh":
            res = subprocess.run(["bash", "-c", script_of(argv)], env=fake_worker.env, capture_output=True, text=True,
                                 timeout=60)
            calls[-1].append(res)
            return res
        return SimpleNamespace(returncode=0, stdout="")
    return runner


def test_env_values_never_reach_a_command_line_and_the_trainer_gets_them(fake_worker, tmp_path, monkeypatch):
    _Metadata.endpoints = b"t1v-n-0:0:10.1.2.3"
    monkeypatch.setenv("HOME", str(tmp_path))  # --env_file=~/... is expanded locally
    (tmp_path / "train.env").write_text("# tokens\n\nexport HF_TOKEN='hf_s3cr3t_token'\n")
    calls, out = [], io.StringIO()
    rc = tpu_vm.main(["train", "--name=gemma", *WHERE, "--config=configs/legal.py:2b", "--workdir=gs://b/w",
                      f"--env=EXTRA={SECRET}", "--env_file=~/train.env"], out=out, runner=_fake_gcloud(fake_worker, calls))
    assert rc == 0, out.getvalue()
    assert [c[4] for c in calls] == ["scp", "ssh"]
    argv_text = "\n".join(str(a) for c in calls for a in c[:-1] if isinstance(a, str)) + out.getvalue()
    for secret in ("s3cr3t", "hf_s3cr3t_token"):
        assert secret not in argv_text
    trainer = calls[1][-1]
    assert f"extra: {SECRET} cwd:" in trainer.stdout, trainer.stdout + trainer.stderr
    assert "token: hf_s3cr3t_token" in trainer.stdout
    assert not list(fake_worker.home.rglob("pwned*")), "a value was run as shell code"
    assert not (fake_worker.home / "gemma_jax_train.env").exists(), "the worker kept the env file"
    assert not Path(calls[0][5]).exists(), "the local env file was left behind"


def test_env_file_format_and_errors(tmp_path):
    f = tmp_path / "x.env"
    f.write_text("A=1\n# c\nB-1=no\n")
    with pytest.raises(tpu_vm.LaunchError, match=r"x.env, line 3: 'B-1' is not a valid"):
        tpu_vm.parse_env([], str(f))
    f.write_text("A=1\n\n  # comment\nexport C = \"two words\"\nD=a=b\nE='x'\n")
    assert tpu_vm.parse_env(["A=override"], str(f)) == [("A", "1"), ("C", "two words"), ("D", "a=b"), ("E", "x"),
                                                         ("A", "override")]
    f.write_text("A=1\nNOVALUE\n")
    with pytest.raises(tpu_vm.LaunchError, match=r"x.env, line 2: expected KEY=VALUE"):
        tpu_vm.parse_env([], str(f))
    with pytest.raises(tpu_vm.LaunchError, match="cannot read"):
        tpu_vm.parse_env([], str(tmp_path / "missing.env"))


def test_workdir_tilde_and_relative_paths_resolve_on_the_worker(fake_worker):
    """bash leaves ~ after `=`; the launcher hands the trainer the worker's $HOME, and a relative
    workdir the checkout it runs in, so every path of the run is one absolute directory."""
    _Metadata.endpoints = b"t1v-n-0:0:10.1.2.3"
    for workdir, expected in [("~/runs/x", fake_worker.home / "runs" / "x"),
                              ("runs/y", fake_worker.home / "gemma_jax" / "runs" / "y"),
                              ("gs://b/w", "gs://b/w"), ("/abs/w", "/abs/w")]:
        [train] = dry("train", "--config=~/my config.py", f"--workdir={workdir}", "--accelerator_type=v4-8")
        res = subprocess.run(["bash", "-c", script_of(train)], env=fake_worker.env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        assert (f"trainer args: -m gemma_jax.train --config={fake_worker.home}/my config.py "
                f"--workdir={expected}\n") in res.stdout, res.stdout


# ----------------------------------------------------------------------------- SLURM


def test_slurm_script_is_valid_bash_with_srun_line():
    text = SLURM.read_text()
    res = subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert text.startswith("#!/bin/bash\n")
    assert '\nsrun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" -m gemma_jax.train "$@"\n' in text
    for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@300", "--requeue"):
        assert f"#SBATCH {directive}\n" in text


def test_slurm_script_runs_srun_with_the_arguments(tmp_path):
    """With a fake srun and python: arguments pass through, cwd is the submit dir, per-node sees all GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    # Drops srun's own options, then runs the task command once, as a one-task step would.
    srun.write_text("#!/bin/bash\necho \"srun $*\"\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    python = bin_dir / "fakepython"
    python.write_text("#!/bin/bash\necho \"python $* in $PWD devices ${JAX_LOCAL_DEVICE_IDS:-unset}\"\n")
    for f in (srun, python):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    submit = tmp_path / "repo"
    submit.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON="fakepython", SLURM_SUBMIT_DIR=str(submit),
               SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4")
    args = ["--config=configs/legal.py:9b", "--workdir=/shared/run 1", "--config.train.steps=10"]
    res = subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ("srun --kill-on-bad-exit=1 --cpu-bind=none fakepython -m gemma_jax.train "
            "--config=configs/legal.py:9b --workdir=/shared/run 1 --config.train.steps=10") in res.stdout
    assert (f"python -m gemma_jax.train --config=configs/legal.py:9b --workdir=/shared/run 1 "
            f"--config.train.steps=10 in {submit} devices 0,1,2,3") in res.stdout

    env["SLURM_NTASKS_PER_NODE"] = "4"  # one process per GPU: JAX picks the GPU from SLURM_LOCALID
    res = subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "devices unset" in res.stdout, res.stdout + res.stderr

    res = subprocess.run(["bash", str(SLURM)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: sbatch" in res.stderr

    # GEMMA_JAX_DIR and PYTHON given as "~/..." (quoted, so unexpanded) mean the home directory.
    home = tmp_path / "home"
    (home / "checkout").mkdir(parents=True)
    (home / "bin").mkdir()
    (home / "bin" / "py").write_bytes(python.read_bytes())
    (home / "bin" / "py").chmod(0o755)
    env.update(HOME=str(home), GEMMA_JAX_DIR="~/checkout", PYTHON="~/bin/py")
    res = subprocess.run(["bash", str(SLURM), *args], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"--config.train.steps=10 in {home / 'checkout'} devices" in res.stdout, res.stdout
