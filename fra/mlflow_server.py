"""Run a real ``mlflow server`` as a subprocess: start, wait for ``/health``, stop.

Used by tests and by pipelines with ``tracking.server: true``. The server gets its own process
group, so stopping it also stops the uvicorn workers and job runners it spawns. Start-up to a
healthy ``/health`` takes about 12 s on a 2-core machine (RAY_NOTES §5).

The server binds to one interface, 127.0.0.1 by default. Binding to every interface (0.0.0.0 or
::) is refused unless ``allow_all_interfaces=True``: on a cluster, bind to the node's private
address and list the names clients use in ``allowed_hosts`` (see ``cluster.yaml``).
"""
from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fra.errors import FraError

log = logging.getLogger(__name__)

ALL_INTERFACES = ("0.0.0.0", "::", "")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class MlflowServer:
    """One ``mlflow server`` process.

    Args:
        backend_store_uri: e.g. ``sqlite:////abs/mlflow.db``.
        artifacts_destination: where proxied artifacts go (a local path or ``s3://...``).
        host: interface to bind; 127.0.0.1 unless clients come from other machines.
        port: 0 = pick a free one.
        workers: uvicorn workers.
        allowed_hosts: ``--allowed-hosts`` (Host headers accepted); None = MLflow's default
            (localhost and private addresses).
        log_path: server stdout/stderr; default ``<artifacts_destination>/../mlflow-server.log``
            for a local destination, else a file in the working directory.
        job_execution: MLflow's GenAI job runner (7 huey consumer processes, used for LLM
            judges and trace archival); off by default, fra needs only tracking and the registry.
    """

    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int = 0
    workers: int = 1
    allowed_hosts: list[str] | None = None
    log_path: Path | None = None
    allow_all_interfaces: bool = False
    job_execution: bool = False
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.port),
               "--workers", str(self.workers), "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", self.artifacts_destination]
        if self.allowed_hosts:
            cmd += ["--allowed-hosts", ",".join(self.allowed_hosts)]
        return cmd

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        """Start the process and block until ``/health`` answers 200.

        Raises:
            FraError: a public bind without ``allow_all_interfaces``, the process exited, or it
                did not become healthy in ``timeout_s`` (the message holds the log tail).
        """
        if self.host in ALL_INTERFACES and not self.allow_all_interfaces:
            raise FraError(f"refusing to bind the MLflow server to all interfaces ({self.host!r}); bind to "
                           "127.0.0.1 or a private address, or pass allow_all_interfaces=True")
        if self.process is not None:
            return self
        auto_port = not self.port
        if "://" not in self.artifacts_destination:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            local = "://" not in self.artifacts_destination
            self.log_path = (Path(self.artifacts_destination).parent if local else Path.cwd()) / "mlflow-server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A port picked by free_port() can be taken by another process before the server binds it
        # (Ray grabs random ports on shared machines); then the server exits and we try another.
        for attempt in range(3 if auto_port else 1):
            self.port = free_port(self.host) if auto_port else self.port
            log.info("starting MLflow server at %s (log %s)", self.url, self.log_path)
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(self.job_execution).lower()}
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                self._wait_healthy(timeout_s)
                return self
            except FraError as exc:
                self.stop()
                if not (auto_port and "address already in use" in str(exc).lower()):
                    raise
                log.warning("port %d was taken; retrying on another (%d/2)", self.port, attempt + 1)
            except BaseException:
                self.stop()
                raise
        raise FraError(f"MLflow server could not bind a free port on {self.host}")

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FraError(f"MLflow server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200 and resp.read(16).strip() == b"OK":
                        log.info("MLflow server healthy at %s", self.url)
                        return
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                pass  # not listening yet, or another service answered on a port the server lost
            time.sleep(0.5)
        raise FraError(f"MLflow server at {self.url} not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``timeout_s``."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("MLflow server %d ignored %s", proc.pid, sig.name)
        # Children (uvicorn workers) may outlive the parent briefly; clear the whole group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.info("MLflow server at %s stopped", self.url)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def local_server(root: str | Path, host: str = "127.0.0.1", port: int = 0, workers: int = 1) -> MlflowServer:
    """A server with its sqlite database and artifacts under ``root`` (not started yet)."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return MlflowServer(backend_store_uri=f"sqlite:///{root}/mlflow.db", artifacts_destination=str(root / "artifacts"),
                        host=host, port=port, workers=workers, log_path=root / "mlflow-server.log")
