"""Test servers on 127.0.0.1: a free port, and a real ``mlflow server`` (MLflow, the browser test)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(tmp: Path, timeout: float = 180):
    """A real ``mlflow server`` on a free port of 127.0.0.1, its store and artifacts under
    ``tmp`` (log: ``tmp/server.log``); yields ``(uri, port)`` once ``/health`` answers and
    ends its process group on exit."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: faster start
    log = tmp / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination",
         str(tmp / "artifacts"), "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not answer /health within {timeout} s") from None
                time.sleep(0.3)
        yield uri, port
    finally:  # the server runs uvicorn as a child: end the process group we started
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
