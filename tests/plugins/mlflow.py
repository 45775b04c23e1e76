"""Pytest plugin: a real MLflow tracking server on loopback, for the whole session.

Fixture ``mlflow_server``: ``mlflow server`` on a free 127.0.0.1 port with a SQLite backend store and a
local artifact root in a temporary directory; ``.url``, ``.client()`` (an ``MlflowClient`` on it) and
``.log_tail()``.

The server runs from its own virtual environment, ``.venv-mlflow`` (the Makefile's ``.venv/.test-deps``
creates it): the full ``mlflow`` package pins pyarrow below the version ``datasets`` brought into
``.venv``, so only ``mlflow-skinny`` (the client the Trainer's MLflow callback uses) lives in ``.venv``.
``THINKFORGE_MLFLOW_BIN`` points at another ``mlflow`` executable. Without one the tests that use it are
skipped, unless ``THINKFORGE_REQUIRE_SERVICES=1`` (or ``CI=true``, where tests/conftest.py fails any skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = ("create it with `make .venv/.test-deps` (python3 -m venv .venv-mlflow && "
                ".venv-mlflow/bin/pip install mlflow==3.17.2)")


def mlflow_bin() -> str | None:
    explicit = os.environ.get("THINKFORGE_MLFLOW_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    own = ROOT / ".venv-mlflow" / "bin" / "mlflow"
    return str(own) if os.access(own, os.X_OK) else None


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log_path: Path
    artifact_root: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not ready after {timeout:.0f} s:\n{self.log_tail()}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    binary = mlflow_bin()
    if binary is None:
        msg = f"no mlflow server executable (.venv-mlflow/bin/mlflow or THINKFORGE_MLFLOW_BIN): {INSTALL_HINT}"
        if os.environ.get("THINKFORGE_REQUIRE_SERVICES", "") == "1":
            pytest.fail(msg + " (THINKFORGE_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(msg)
    work = tmp_path_factory.mktemp("mlflow")
    artifacts = work / "artifacts"
    artifacts.mkdir()
    port = free_port()
    log_path = work / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--default-artifact-root", str(artifacts)],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, log_path, artifacts)
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its uvicorn/gunicorn workers (its own session)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        shutil.rmtree(work / "artifacts", ignore_errors=True)
