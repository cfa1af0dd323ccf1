"""A real, small Ray cluster on this machine, shaped like cluster.yaml's: for the cluster-shaped tests.

- the head: ``ray start --head --num-cpus=0`` (it runs job drivers, nothing trains there), with
  token authentication as cluster.yaml sets it up (``RAY_AUTH_MODE=token`` and one token file
  shipped to every node);
- one worker node: ``ray start --address=...`` as its own raylet with its own temp dir, started
  where the machine allows in its own mount namespace with a private, empty ``/tmp``: it cannot
  read the test's files or the head's session directory, so a local path leaking from the driver
  to a worker fails here as it would on a cloud node;
- S3 and MLflow come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...,
  ``MLFLOW_TRACKING_URI``); the head's home holds a ``~/fra.env`` with the storage and tracking
  locations and a ``~/.profile`` that puts the venv on ``PATH`` and sources it, as cluster.yaml's
  setup commands write them, so ``bash -lc '... $FRA_STORAGE_PATH ...'`` in a job works as there;
- jobs go through ``ray job submit --working-dir .`` against the head's dashboard, as
  docs/cloud.md says.

Every process of the cluster carries a marker variable in its environment, and teardown stops
exactly those processes (never a machine-wide ``ray stop``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, fra, mlflow
MARKER = "FRA_CLUSTER_TEST_ID"
# What docs/cloud.md passes to `ray job submit` (the runtime env of the job).
RUNTIME_ENV = {"excludes": [".venv", ".git", "runs", "mlruns", "*.egg-info", ".pytest_cache", "__pycache__"]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_tmp_supported() -> bool:
    """Whether this machine lets us start a process tree with its own, empty /tmp (root + unshare)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /tmp && test -z \"$(ls -A /tmp)\""],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


# The worker node's start script: read the token while the host's files are visible, hide /tmp
# behind an empty tmpfs (keeping the checkout when it lives under /tmp, as a CI clone may), give
# the node its own token file, then become the raylet.
WORKER_SCRIPT = r"""
set -e
tok=$(cat "$FRA_TOKEN_SRC")
keep=""
case "$FRA_REPO" in /tmp/*) keep=/run/fra-keep-$$; mkdir -p "$keep"; mount --bind "$FRA_REPO" "$keep";; esac
mount -t tmpfs -o size=4g tmpfs /tmp
if [ -n "$keep" ]; then mkdir -p "$FRA_REPO"; mount --move "$keep" "$FRA_REPO"; fi
mkdir -p /tmp/.ray && printf %s "$tok" > /tmp/.ray/auth_token && chmod 600 /tmp/.ray/auth_token
export RAY_AUTH_TOKEN_PATH=/tmp/.ray/auth_token FRA_CACHE_DIR=/tmp/fra-cache HOME=/tmp/home
mkdir -p "$HOME"
unset FRA_TOKEN_SRC
exec "$@"
"""


@dataclass
class RayCluster:
    """Head + one worker node (module docstring). ``env`` is merged into every process's environment;
    ``fra_env`` is also written to the head's ``~/fra.env``."""

    root: Path
    env: dict
    fra_env: dict = field(default_factory=dict)
    worker_cpus: int = 4
    private_tmp: bool = True
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    procs: list = field(default_factory=list)
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def base_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
        env.update(self.env)
        env.update(self.fra_env)
        env.update({MARKER: self.run_id, "HOME": str(self.root / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONDONTWRITEBYTECODE": "1"})
        env.pop("PYTHONPATH", None)
        return env

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    def start(self, timeout_s: float = 120.0) -> RayCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        # The token is made once and every node gets the same file (cluster.yaml: file_mounts).
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        exports = {**self.fra_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}
        (home / "fra.env").write_text("".join(f"export {k}={v}\n" for k, v in exports.items()))
        (home / ".profile").write_text(f'export PATH="{BIN}:$PATH"\n[ -f ~/fra.env ] && . ~/fra.env  # fra-cluster-env\n')
        # A short temp dir: Ray's socket paths must fit in 107 bytes.
        self.head_tmp = Path(tempfile.mkdtemp(prefix="fra-rc-", dir="/tmp"))
        head = ["ray", "start", "--head", "--block", "--num-cpus=0", f"--port={self.gcs_port}",
                "--node-ip-address=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={self.head_tmp}",
                f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--object-store-memory={200 * 2**20}", "--disable-usage-stats"]
        env = self.base_env()
        env["FRA_CACHE_DIR"] = str(self.root / "head-cache")
        self._spawn(head, env, self.root / "head.log")
        self._wait(lambda: self._nodes() >= 1, timeout_s, "the head node")
        worker = ["ray", "start", "--block", f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                  "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
                  f"--object-store-memory={400 * 2**20}", "--disable-usage-stats"]
        wenv = self.base_env()
        if self.private_tmp:
            wenv.update(FRA_TOKEN_SRC=str(self.token_path), FRA_REPO=str(REPO))
            wenv.pop("RAY_AUTH_TOKEN_PATH")
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", WORKER_SCRIPT, "fra-worker", *worker]
        else:
            wenv["FRA_CACHE_DIR"] = str(self.root / "worker-cache")
            cmd = [*worker, f"--temp-dir={self.head_tmp}-worker"]
        self._spawn(cmd, wenv, self.root / "worker.log")
        self._wait(lambda: self._nodes() >= 2, timeout_s, "the worker node")
        return self

    def _spawn(self, cmd: list[str], env: dict, log: Path) -> None:
        fh = open(log, "ab")
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=self.root,
                                           start_new_session=True))

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what} exited ({dead[0].args[:3]}...): see {self.root}/*.log\n{self.logs()}")
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{what} did not come up within {timeout_s:.0f} s\n{self.logs()}")

    def api(self, path: str, data: bytes | None = None) -> dict:
        req = urllib.request.Request(f"{self.dashboard}{path}", data=data,
                                     headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def _nodes(self) -> int:
        nodes = self.api("/nodes?view=summary")["data"]["summary"]
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def submit(self, workdir: Path, entrypoint: list[str], timeout_s: float = 900.0,
               extra_env: dict | None = None) -> tuple[int, str]:
        """``ray job submit --working-dir . -- <entrypoint>`` from ``workdir``; (exit code, output)."""
        cmd = ["ray", "job", "submit", f"--address={self.dashboard}", "--working-dir", ".",
               "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", *entrypoint]
        env = {**self.base_env(), **(extra_env or {})}
        try:
            proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            return 124, f"timed out after {timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
        return proc.returncode, proc.stdout + proc.stderr

    def logs(self, lines: int = 40) -> str:
        out = []
        for name in ("head.log", "worker.log"):
            p = self.root / name
            if p.is_file():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def processes(self) -> list[int]:
        """Pids of every live process carrying this cluster's marker (raylets, workers, drivers)."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if f"{MARKER}={self.run_id}".encode() in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to every process group, SIGKILL to what is left after ``timeout_s``. Measured
        2026-12-07: after a SIGTERM the head's GCS and both ``ray start --block`` processes take 31-33 s
        to go, the rest goes in 1-11 s; nothing of the cluster is kept (its jobs' results are in S3 and
        MLflow), so the test does not wait for Ray's graceful shutdown."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + timeout_s
        while time.time() < deadline and (any(p.poll() is None for p in self.procs) or self.processes()):
            time.sleep(0.5)
        for pid in self.processes():  # anything that left the process groups (drivers, workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(getattr(self, "head_tmp", ""), ignore_errors=True) if getattr(self, "head_tmp", None) else None


def job_workdir(dest: Path) -> Path:
    """A copy of this checkout as a user's working directory (what `ray job submit --working-dir .` packs)."""
    ignore = shutil.ignore_patterns(*RUNTIME_ENV["excludes"], "*.pyc")
    for name in ("fra", "pipelines", "datasets", "tune_configs", "pyproject.toml", "README.md"):
        src = REPO / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))
    return dest
