"""Cloud TPU VM launcher: create, setup, train, logs, stop, ssh, status, delete, run.

Every verb is a few `gcloud compute tpus ...` commands; `--dry_run` prints them (one per line,
shell-quoted, comments start with #) instead of running them. Only the standard library is
needed, so it runs wherever gcloud does.

  python launch/tpu_vm.py create --name=gemma --zone=us-west4-a --accelerator_type=v5litepod-8 --spot
  python launch/tpu_vm.py setup  --name=gemma --zone=us-west4-a     # this checkout -> every worker
  python launch/tpu_vm.py train  --name=gemma --zone=us-west4-a \\
      --config=configs/legal.py:2b --workdir=gs://BUCKET/legal_2b -- --config.train.steps=500
  python launch/tpu_vm.py logs   --name=gemma --zone=us-west4-a
  python launch/tpu_vm.py delete --name=gemma --zone=us-west4-a

Single- and multi-host slices take the same commands: setup and train run on every worker at once
(`--worker=all`). On a multi-host slice each worker starts the same trainer; the train command
points JAX_COORDINATOR_ADDRESS at worker 0 (read from the TPU metadata server), which makes the
trainer call `jax.distributed.initialize()`, and JAX reads the process count and index from the
same metadata. The trainer runs under setsid/nohup with its output in ~/gemma_jax_train.log, so a
dropped ssh connection does not stop it; `train` streams that log until the trainer exits and
returns its exit status, `logs` re-attaches, `stop` sends SIGTERM (the trainer saves, then exits).

`--env KEY=VALUE` / `--env_file=FILE` values never appear on a command line (local or gcloud's):
they are written to a mode-600 file, copied to each worker with `gcloud ... scp`, sourced by the
train script and deleted there before the trainer starts. Keys must be shell variable names.
A `--workdir` starting with ~ means the worker's home; a relative one is inside ~/gemma_jax, as
the trainer (started there) would resolve it; a local `--env_file` path may start with ~.

`run` = create, setup, train, and after a preemption (Spot VM or queued resource gone) delete,
re-create, set up and train again: the trainer resumes from the checkpoints in --workdir.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/gemma_jax"  # the checkout on each worker; configs' relative paths resolve here
REMOTE_VENV = "~/gemma_venv"
REMOTE_TARBALL = "gemma_jax_src.tar.gz"  # in the worker's home
LOG = "~/gemma_jax_train.log"
PIDFILE = "~/gemma_jax_train.pid"
REMOTE_ENV = "gemma_jax_train.env"  # --env values, in the worker's home (mode 600) until the trainer starts
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
COORDINATOR_PORT = 8476  # the port JAX itself uses for Cloud TPU coordinators
# GCE_METADATA_IP overrides the host, as in JAX (and lets the tests fake the server).
METADATA = "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes"
PACK_EXCLUDE = ("weights/", "workdir", "runs/", ".git/", "build/", "dist/")

# Runtime (software) versions per generation, from the Cloud TPU docs' table for JAX.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
                    "v3": "tpu-ubuntu2204-base", "v2": "tpu-ubuntu2204-base"}
_READY = {"READY", "ACTIVE"}


class LaunchError(Exception):
    """A bad flag combination or an unknown accelerator type; the message says what to change."""


# ----------------------------------------------------------------------------- topology


def parse_accelerator(accelerator_type: str) -> tuple[str, int]:
    """'v5litepod-8' -> ('v5litepod', 8)."""
    m = re.fullmatch(r"(v2|v3|v4|v5litepod|v5p|v6e)-(\d+)", accelerator_type or "")
    if not m:
        raise LaunchError(f"--accelerator_type={accelerator_type!r}: expected e.g. v5litepod-8, v4-8, "
                          f"v5litepod-32, v4-32, v5p-8, v6e-8 (generation-size)")
    return m.group(1), int(m.group(2))


def num_hosts(accelerator_type: str) -> int:
    """Worker VMs in a slice (1 = single host).

    The number after the dash counts TensorCores on v2/v3/v4/v5p (2 per chip, 4 chips = 8 cores per
    host) and chips on v5e/v6e (single-host VMs up to 8 chips; larger slices have 4 chips per host).
    """
    gen, n = parse_accelerator(accelerator_type)
    if gen in ("v5litepod", "v6e"):
        return 1 if n <= 8 else n // 4
    return max(1, n // 8)


def runtime_version(accelerator_type: str) -> str:
    """The default TPU software version for the accelerator's generation."""
    return RUNTIME_VERSIONS[parse_accelerator(accelerator_type)[0]]


# ----------------------------------------------------------------------------- remote scripts


def _q(s: str) -> str:
    """Shell-quotes s but leaves a leading ~/ for the remote shell to expand."""
    if s.startswith("~/"):
        return "~/" + shlex.quote(s[2:])
    return shlex.quote(s)


def _remote_path_arg(flag: str, path: str, relative_to: str | None = None) -> str:
    """`--flag=path` for the remote shell: ~ is the worker's $HOME (not left literal, as bash does
    after `=`), a relative path is made absolute under `relative_to` when given, URLs are kept."""
    if "://" not in path and relative_to and not path.startswith(("/", "~")):
        path = f"{relative_to}/{path}"
    if path == "~" or path.startswith("~/"):
        return shlex.quote(f"{flag}=") + '"$HOME"' + (shlex.quote(path[1:]) if path[1:] else "")
    return shlex.quote(f"{flag}={path}")


def local_path(path: str) -> str:
    """A local path with ~ expanded, made absolute (the rule of gemma_jax.paths.absolute; URLs unchanged)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def parse_env(entries: list[str], env_file: str = "") -> list[tuple[str, str]]:
    """(key, value) pairs from --env_file (first) and --env KEY=VALUE; keys must be shell names.

    Error messages name the key (or file and line), never the value: it may be a secret.
    """
    pairs = []
    if env_file:
        path = local_path(env_file)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise LaunchError(f"--env_file={env_file}: cannot read {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            key, sep, value = (part.strip() for part in line.partition("="))
            where = f"--env_file={env_file}, line {n}"
            if not sep:
                raise LaunchError(f"{where}: expected KEY=VALUE")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]  # one pair of surrounding quotes, as in .env files; no escapes
            pairs.append((_env_key(key, where), value))
    for e in entries:
        key, sep, value = e.partition("=")
        if not sep:
            raise LaunchError(f"--env={key!r}: expected KEY=VALUE")
        pairs.append((_env_key(key, "--env"), value))
    return pairs


def _env_key(key: str, where: str) -> str:
    if not ENV_KEY.fullmatch(key):
        raise LaunchError(f"{where}: {key!r} is not a valid environment variable name (letters, digits "
                          "and _, not starting with a digit), e.g. --env=HF_TOKEN=...")
    return key


def env_file_text(pairs: list[tuple[str, str]]) -> str:
    """The file the train script sources: one `export KEY='value'` line each, quoted for sh."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in pairs)


def setup_script(args) -> str:
    """Shell run on every worker: code in ~/gemma_jax, a Python 3.11 venv with the package, weights."""
    lines = ["set -e"]
    if args.git_url:
        lines += [f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} fetch --quiet origin; "
                  f"else git clone --quiet {shlex.quote(args.git_url)} {REMOTE_DIR}; fi",
                  f"git -C {REMOTE_DIR} checkout --quiet --force {shlex.quote(args.git_ref)}"]
    else:
        lines += [f"mkdir -p {REMOTE_DIR}", f"tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_DIR}"]
    # TPU VM images ship Python 3.10; uv fetches the 3.11 the package needs.
    lines += ["command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh",
              'export PATH="$HOME/.local/bin:$PATH"',
              f"[ -x {REMOTE_VENV}/bin/python ] || uv venv --python {shlex.quote(args.python)} {REMOTE_VENV}",
              f"uv pip install --python {REMOTE_VENV}/bin/python -e \"$HOME/gemma_jax[tpu]\" "
              + " ".join(shlex.quote(p) for p in args.packages.split())]
    for src in args.weights:
        lines += [f"mkdir -p {REMOTE_DIR}/weights",
                  f"gcloud storage cp -r {shlex.quote(src.rstrip('/'))} {REMOTE_DIR}/weights/"]
    if args.tfds_data:  # TFDS's default data_dir, where the full-size configs look
        lines += ["mkdir -p ~/tensorflow_datasets",
                  f"gcloud storage rsync -r {shlex.quote(args.tfds_data.rstrip('/'))} ~/tensorflow_datasets"]
    lines.append(f"{REMOTE_VENV}/bin/python -c 'import gemma_jax, jax, socket; "
                 f"print(socket.gethostname(), \"ready: jax\", jax.__version__)'")
    return "; ".join(lines)


def train_script(args, overrides: list[str]) -> str:
    """Shell run on every worker: start the trainer detached, then (unless --detach) follow its log."""
    train = [_q(f"{REMOTE_VENV}/bin/python"), "-m", "gemma_jax.train", _remote_path_arg("--config", args.config),
             _remote_path_arg("--workdir", args.workdir, relative_to=REMOTE_DIR),
             *(_q(a) for a in overrides)]
    env_file = f'"$HOME"/{REMOTE_ENV}'
    has_env = bool(getattr(args, "env_pairs", None))
    running = (f"echo \"gemma_jax.train is already running on $(hostname) (pid $(cat {PIDFILE})): use logs or "
               f"stop\" >&2; " + (f"rm -f {env_file}; " if has_env else "") + "exit 3")
    lines = [
        f"cd {REMOTE_DIR} || exit 1",
        # /proc/PID/cmdline, not kill -0: a stale pid file may name a reused pid.
        f"if grep -qs gemma_jax.train /proc/\"$(cat {PIDFILE} 2>/dev/null)\"/cmdline; then {running}; fi",
        # Multi-host slices list several workers; worker 0 hosts the jax.distributed coordinator.
        f"EP=$(curl -sf --max-time 10 -H Metadata-Flavor:Google {METADATA}/worker-network-endpoints || true)",
        f"case \"$EP\" in *,*) W0=${{EP%%,*}}; export JAX_COORDINATOR_ADDRESS=${{W0##*:}}:{COORDINATOR_PORT};; esac",
    ]
    if has_env:  # after the coordinator, so --env can still override it; deleted before the trainer runs
        lines += [f". {env_file} || exit 1", f"rm -f {env_file}"]
    lines += [
        f"touch {LOG}; START=$(stat -c %s {LOG})",
        " ".join(["setsid nohup", *train, f">> {LOG} 2>&1 < /dev/null & PID=$!"]),
        f"echo $PID > {PIDFILE}",
    ]
    if not args.detach:
        lines += [f"tail -c +$((START + 1)) -F --pid=$PID {LOG} 2>/dev/null", "wait $PID"]
    return "; ".join(lines)


# ----------------------------------------------------------------------------- gcloud commands


def _where(args) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _ssh(args, worker: str, command: str | None) -> list[str]:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}"]
    argv += args.ssh_flag
    if command is not None:
        argv.append(f"--command={command}")
    return argv


def create_command(args) -> list[str]:
    """tpu-vm create, or queued-resources create with --queued."""
    version = args.runtime_version or runtime_version(args.accelerator_type)
    common = [f"--accelerator-type={args.accelerator_type}", *_where(args)]
    if args.queued:
        if args.preemptible:
            raise LaunchError("queued resources have no --preemptible; use --spot")
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
                *common, f"--runtime-version={version}"]
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *common, f"--version={version}"]
    if args.spot and args.preemptible:
        raise LaunchError("--spot and --preemptible are alternatives; pick one (Spot is the newer, cheaper one)")
    if args.spot:
        argv.append("--spot")
    if args.preemptible:
        argv.append("--preemptible")
    # Read/write access to gs:// workdirs and data from every worker.
    argv.append("--scopes=https://www.googleapis.com/auth/cloud-platform")
    return argv


def state_command(args) -> list[str]:
    """Prints the VM's state (READY, PREEMPTED, ...) or the queued resource's (ACTIVE, SUSPENDED, ...)."""
    if args.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *_where(args),
                "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args), "--format=value(state)"]


def delete_command(args) -> list[str]:
    """Deletes the VM, or the queued resource together with its VM."""
    if args.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args),
                "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]


def setup_commands(args) -> list[list[str]]:
    """scp of the local tarball (unless --git_url) and the setup script on all workers."""
    cmds = []
    if not args.git_url:
        cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball_path(args.name),
                     f"{args.name}:{REMOTE_TARBALL}", *_where(args), "--worker=all", *args.ssh_flag])
    cmds.append(_ssh(args, "all", setup_script(args)))
    return cmds


def env_command(args, local_file: str) -> list[str]:
    """scp of the --env file to every worker's home (scp keeps its mode, 600)."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local_file, f"{args.name}:{REMOTE_ENV}", *_where(args),
            "--worker=all", *args.ssh_flag]


def train_command(args, overrides: list[str]) -> list[str]:
    """The trainer on all workers at once."""
    return _ssh(args, "all", train_script(args, overrides))


def tarball_path(name: str) -> str:
    """Where the local checkout is packed before the scp."""
    return os.path.join(tempfile.gettempdir(), f"gemma_jax-{name}.tar.gz")


def source_files(repo: str = REPO) -> list[str]:
    """Files to ship: git's tracked and untracked-but-not-ignored files, minus weights and run outputs."""
    try:
        out = subprocess.run(["git", "-C", repo, "ls-files", "-co", "--exclude-standard", "-z"],
                             check=True, capture_output=True, text=True).stdout
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [os.path.relpath(os.path.join(d, f), repo) for d, _, fs in os.walk(repo) for f in fs]
    return sorted(f for f in files if not f.startswith(PACK_EXCLUDE) and "__pycache__" not in f
                  and os.path.isfile(os.path.join(repo, f)))


def pack(path: str, repo: str = REPO) -> int:
    """Writes the checkout's source files to a .tar.gz; returns how many."""
    files = source_files(repo)
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(os.path.join(repo, f), arcname=f)
    return len(files)


# ----------------------------------------------------------------------------- running


class Gcloud:
    """Runs (or with dry_run prints) commands; `state` answers READY when dry."""

    def __init__(self, dry_run: bool, out=None, runner=subprocess.run):
        self.dry_run, self.out, self.runner = dry_run, out or sys.stdout, runner

    def say(self, text: str):
        print(text, file=self.out, flush=True)

    def run(self, argv: list[str]) -> int:
        if self.dry_run:
            self.say(shlex.join(argv))
            return 0
        self.say(f"+ {shlex.join(argv)[:300]}")
        return self.runner(argv).returncode

    def check(self, argv: list[str]):
        rc = self.run(argv)
        if rc:
            raise SystemExit(rc)

    def state(self, argv: list[str]) -> str:
        if self.dry_run:
            self.say(shlex.join(argv))
            return "READY"
        res = self.runner(argv, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else "NOT_FOUND"


def _check_workdir(args, g: Gcloud):
    """Multi-host slices need a workdir every worker sees (gs://); so does resuming on a new VM."""
    if args.workdir.startswith("gs://") or args.shared_workdir:
        return
    acc = args.accelerator_type
    if not acc and not g.dry_run:
        res = g.runner(["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args),
                        "--format=value(acceleratorType)"], capture_output=True, text=True)
        acc = res.stdout.strip().rsplit("/", 1)[-1] if res.returncode == 0 else ""
    if acc and num_hosts(acc) > 1:
        raise LaunchError(f"--workdir={args.workdir}: {acc} has {num_hosts(acc)} hosts, which all write "
                          "checkpoints to one directory; use a gs://BUCKET/... workdir (or --shared_workdir "
                          "for a file system mounted on every worker, e.g. Filestore)")
    g.say(f"# note: --workdir={args.workdir} is on the VM's disk; it is lost with the VM (no resume "
          "after preemption). Prefer gs://BUCKET/...")


def do_create(args, g: Gcloud):
    hosts = num_hosts(args.accelerator_type)
    g.say(f"# {args.accelerator_type}: {hosts} host{'s' * (hosts > 1)}"
          + (", queued resource" if args.queued else "") + (", spot" if args.spot else ""))
    g.check(create_command(args))
    if args.queued:  # the request waits in a queue; setup needs the VM
        g.say("# waiting for the queued resource to become ACTIVE (repeats the describe every 30 s)")
        while (state := g.state(state_command(args))) != "ACTIVE" and not g.dry_run:
            if state in ("FAILED", "SUSPENDED", "NOT_FOUND"):
                raise SystemExit(f"queued resource {args.name} is {state}")
            g.say(f"# {args.name}: {state}")
            time.sleep(30)


def do_setup(args, g: Gcloud):
    if not args.git_url:
        path = tarball_path(args.name)
        if g.dry_run:
            g.say(f"# pack: {len(source_files())} files of {REPO} -> {path}")
        else:
            g.say(f"# packed {pack(path)} files of {REPO} -> {path}")
    for cmd in setup_commands(args):
        g.check(cmd)


def send_env(args, g: Gcloud):
    """Copies the --env / --env_file values to the workers in a file, never on a command line."""
    if not args.env_pairs:
        return
    keys = ", ".join(k for k, _ in args.env_pairs)
    g.say(f"# env {keys}: values in a mode-600 file -> ~/{REMOTE_ENV} on every worker (sourced, then deleted)")
    if g.dry_run:
        g.check(env_command(args, "ENV_FILE"))
        return
    tmp = tempfile.mkdtemp(prefix="gemma_jax-env-")  # mode 700, so no other user sees the file either
    try:
        path = os.path.join(tmp, REMOTE_ENV)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(env_file_text(args.env_pairs))
        g.check(env_command(args, path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def do_train(args, g: Gcloud) -> int:
    _check_workdir(args, g)
    send_env(args, g)
    return g.run(train_command(args, args.overrides))


def do_run(args, g: Gcloud) -> int:
    """create -> setup -> train; re-create and resume after each preemption, up to --max_restarts."""
    _check_workdir(args, g)
    create = g.dry_run or g.state(state_command(args)) not in _READY
    for attempt in range(args.max_restarts + 1):
        if create:
            do_create(args, g)
        do_setup(args, g)
        send_env(args, g)
        rc = g.run(train_command(args, args.overrides))
        if rc == 0 or g.dry_run:
            break
        state = g.state(state_command(args))
        if state in _READY:  # the VM is fine, so the trainer itself failed: nothing to retry
            g.say(f"# trainer exited with {rc} on a {state} VM; see `logs`")
            return rc
        g.say(f"# {args.name} is {state} (preempted?): re-creating, attempt {attempt + 2}")
        g.run(delete_command(args))
        create = True
    else:
        return rc
    if args.delete_after:
        g.check(delete_command(args))
    return 0


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    """The CLI: one subcommand per verb."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-central2-b (v4)")
    common.add_argument("--project", default="", help="GCP project; default: gcloud's configured one")
    common.add_argument("--queued", action="store_true", help="a queued resource rather than a plain TPU VM")
    common.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run nothing")
    common.add_argument("--ssh_flag", action="append", default=[],
                        help="extra flag for gcloud ssh/scp, e.g. --ssh_flag=--internal-ip (repeatable)")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator_type", required=True, help="v5litepod-8, v4-8, v5litepod-32, v4-32, ...")
    create.add_argument("--runtime_version", default="", help="default: the JAX image for the generation")
    create.add_argument("--spot", action="store_true", help="Spot VM: cheaper, can be preempted")
    create.add_argument("--preemptible", action="store_true", help="preemptible VM (older than Spot)")

    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--git_url", default="", help="clone this instead of copying the local checkout")
    setup.add_argument("--git_ref", default="origin/HEAD", help="commit, tag or origin/BRANCH (with --git_url)")
    setup.add_argument("--python", default="3.11", help="Python version of the venv on the workers")
    setup.add_argument("--packages", default="gcsfs tensorflow-datasets",
                       help="extra pip packages (gcsfs: gs:// paths; tensorflow-datasets: tfds: data)")
    setup.add_argument("--weights", action="append", default=[],
                       help="gs:// folder copied to ~/gemma_jax/weights/ on every worker (repeatable)")
    setup.add_argument("--tfds_data", default="",
                       help="gs:// copy of a prepared tensorflow_datasets folder, synced to ~/tensorflow_datasets")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--config", required=True, help="e.g. configs/legal.py:2b (relative to the checkout)")
    train.add_argument("--workdir", required=True, help="gs://BUCKET/RUN (required on multi-host slices)")
    train.add_argument("--env", action="append", default=[],
                       help="KEY=VALUE for the trainer (repeatable); sent in a file, never on a command line")
    train.add_argument("--env_file", default="",
                       help="local file of KEY=VALUE lines for the trainer (keeps secrets out of shell history)")
    train.add_argument("--detach", action="store_true", help="start and return; follow with `logs`")
    train.add_argument("--shared_workdir", action="store_true",
                       help="--workdir is a non-gs:// path every worker mounts (NFS/Filestore)")

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Trainer overrides go after --, e.g. -- --config.train.steps=100")
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("create", parents=[common, create], help="create the TPU VM / queued resource")
    sub.add_parser("setup", parents=[common, setup], help="install the package on every worker")
    tr = sub.add_parser("train", parents=[common, train], help="run the trainer on every worker")
    tr.add_argument("--accelerator_type", default="", help="only to check the workdir (asked from gcloud if unset)")
    lg = sub.add_parser("logs", parents=[common], help="follow the trainer's log")
    lg.add_argument("--worker", default="0", help="worker index, or all")
    sub.add_parser("stop", parents=[common], help="SIGTERM the trainer on every worker (it saves, then exits)")
    sh = sub.add_parser("ssh", parents=[common], help="ssh to a worker; a command may follow --")
    sh.add_argument("--worker", default="0", help="worker index, or all")
    sub.add_parser("status", parents=[common], help="print the VM / queued resource state")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM / queued resource")
    run = sub.add_parser("run", parents=[common, create, setup, train],
                         help="create + setup + train, re-creating after preemptions")
    run.add_argument("--max_restarts", type=int, default=10, help="re-creations after preemption")
    run.add_argument("--delete_after", action="store_true", help="delete the VM when training finished")
    return p


def main(argv: list[str] | None = None, *, out=None, runner=subprocess.run) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    args.overrides = rest
    g = Gcloud(args.dry_run, out=out, runner=runner)
    try:
        args.env_pairs = parse_env(getattr(args, "env", []), getattr(args, "env_file", ""))
        if args.verb == "create":
            do_create(args, g)
        elif args.verb == "setup":
            do_setup(args, g)
        elif args.verb == "train":
            return do_train(args, g)
        elif args.verb == "logs":
            return g.run(_ssh(args, args.worker, f"tail -n 200 -F {LOG}"))
        elif args.verb == "stop":
            return g.run(_ssh(args, "all", f"kill -TERM \"$(cat {PIDFILE})\" 2>/dev/null && echo \"SIGTERM sent "
                                           f"on $(hostname)\" || echo \"no trainer running on $(hostname)\""))
        elif args.verb == "ssh":
            return g.run(_ssh(args, args.worker, shlex.join(rest) if rest else None))
        elif args.verb == "status":
            g.say(g.state(state_command(args)))
        elif args.verb == "delete":
            return g.run(delete_command(args))
        elif args.verb == "run":
            return do_run(args, g)
    except LaunchError as e:
        print(f"tpu_vm.py {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
