"""Pytest plugin: a real Pushgateway and Prometheus on loopback, for the whole session.

Fixtures:
- ``pushgateway``: ``/usr/bin/prometheus-pushgateway`` on a free 127.0.0.1 port; ``.url``.
- ``prometheus``: ``/usr/bin/prometheus`` scraping that Pushgateway every second with
  ``honor_labels: true``; ``.url``, ``.query(expr)`` and ``.wait_for(expr, ...)``.

Both need Debian's packages (``bash scripts/install-test-services.sh``; ``.ci/run`` runs it).
Without the binaries the tests that use them are skipped, unless ``THINKFORGE_REQUIRE_SERVICES=1``
(set it in CI), which turns the skip into a failure. ``THINKFORGE_PROMETHEUS_BIN`` and
``THINKFORGE_PUSHGATEWAY_BIN`` point at other binaries.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS_BIN = os.environ.get("THINKFORGE_PROMETHEUS_BIN", "/usr/bin/prometheus")
PUSHGATEWAY_BIN = os.environ.get("THINKFORGE_PUSHGATEWAY_BIN", "/usr/bin/prometheus-pushgateway")
INSTALL_HINT = "install them with `bash scripts/install-test-services.sh` (Debian packages prometheus, prometheus-pushgateway)"
SCRAPE_INTERVAL = "1s"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(binary: str) -> None:
    if os.access(binary, os.X_OK):
        return
    msg = f"{binary} not found: {INSTALL_HINT}"
    if os.environ.get("THINKFORGE_REQUIRE_SERVICES", "") == "1":
        pytest.fail(msg + " (THINKFORGE_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(msg)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    workdir: Path

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = http_get(self.url + path, timeout=1.0)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {self.url}{path} after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class Pushgateway(Service):
    def groups(self) -> dict[str, Any]:
        _, body = http_get(self.url + "/api/v1/metrics")
        return json.loads(body)

    def text(self) -> str:
        return http_get(self.url + "/metrics")[1].decode()


@dataclass
class Prometheus(Service):
    pushgateway_url: str = ""
    last: Any = field(default=None, repr=False)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query through the HTTP API; returns ``data.result`` (a vector's samples)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed ({status}): {doc.get('error', body[:300])}")
        return doc["data"]["result"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Query ``expr`` until ``predicate(result)`` holds; fail with the last result otherwise."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} did not match within {timeout:.0f}s; last result: {result}")
            time.sleep(interval)

    @staticmethod
    def values(result: list[dict[str, Any]], key: str | None = None) -> dict[Any, float]:
        """``{label value (of key) or frozenset(labels): float}`` of a vector result."""
        out: dict[Any, float] = {}
        for s in result:
            k = s["metric"].get(key) if key else frozenset(s["metric"].items())
            out[k] = float(s["value"][1])
        return out


def _start(name: str, argv: list[str], workdir: Path, url: str, ready_path: str, cls: type = Service, **kw: Any) -> Any:
    log_path = workdir / f"{name}.log"
    logf = open(log_path, "wb")  # noqa: SIM115 - closed when the process ends (inherited fd)
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    logf.close()
    svc = cls(name=name, url=url, proc=proc, log_path=log_path, workdir=workdir, **kw)
    try:
        svc.wait_ready(ready_path)
    except Exception:
        svc.stop()
        raise
    return svc


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushgateway]:
    _need(PUSHGATEWAY_BIN)
    workdir = tmp_path_factory.mktemp("pushgateway")
    port = free_port()
    svc = _start(
        "pushgateway",
        [PUSHGATEWAY_BIN, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        workdir,
        f"http://127.0.0.1:{port}",
        "/-/ready",
        cls=Pushgateway,
    )
    try:
        yield svc
    finally:
        svc.stop()


PROMETHEUS_CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    scrape_interval: {interval}
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture(scope="session")
def prometheus(pushgateway: Pushgateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    _need(PROMETHEUS_BIN)
    workdir = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlparse(pushgateway.url).netloc
    cfg = workdir / "prometheus.yml"
    cfg.write_text(PROMETHEUS_CONFIG.format(interval=SCRAPE_INTERVAL, target=target))
    port = free_port()
    svc = _start(
        "prometheus",
        [
            PROMETHEUS_BIN,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        workdir,
        f"http://127.0.0.1:{port}",
        "/-/ready",
        cls=Prometheus,
        pushgateway_url=pushgateway.url,
    )
    try:
        # Prometheus hands new targets to the scraper in batches (~5 s); wait here, once, so tests
        # only wait for their own series.
        svc.wait_for('up{job="pushgateway"} == 1', timeout=30, interval=0.2)
    except Exception:
        svc.stop()
        raise
    try:
        yield svc
    finally:
        svc.stop()
