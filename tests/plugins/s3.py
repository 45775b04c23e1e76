"""S3 fixtures: a real S3 server on loopback (moto's threaded server) and a fault-injecting TCP proxy.

``s3_server`` (session) starts ``moto.server.ThreadedMotoServer`` on a free 127.0.0.1 port. It is a
real HTTP server speaking the S3 REST API (the `minio` client talks to it over a socket: multipart,
listing, deletes), not an in-process mock. **It does not check signatures**: any access/secret key is
accepted, so tests here prove protocol behaviour, not authentication. Nothing global is set (no
``AWS_*`` environment variables); callers get the endpoint and dummy credentials from the fixture.

``object_store`` (function) is an :class:`thinkforge.storage.ObjectStore` on a fresh, empty bucket
with short retry backoff; the bucket is emptied and removed afterwards.

``FlakyProxy`` (and the ``flaky_proxy`` factory fixture) sits between a client and the server and
injects network faults at the socket level: refuse (accept then reset) the next N connections,
answer the next N requests with an HTTP 503 ``SlowDown`` error, or sever every open connection
once a given number of request bytes has passed (a server that dies mid-upload).
"""

from __future__ import annotations

import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

ACCESS_KEY = "thinkforge-test-access"
SECRET_KEY = "thinkforge-test-secret-0123456789"  # tests grep logs/errors for this exact string


def free_port() -> int:
    """A loopback port with nothing listening on it (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto S3 server (see the module docstring: signatures are not checked)."""

    host: str
    port: int
    server: Any = field(repr=False)
    access_key: str = ACCESS_KEY
    secret_key: str = field(default=SECRET_KEY, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for a child process (or monkeypatch) that reaches this server via from_config/from_uri."""
        return {
            "THINKFORGE_S3_ENDPOINT": self.endpoint,
            "THINKFORGE_S3_SECURE": "false",
            "THINKFORGE_S3_ACCESS_KEY": self.access_key,
            "THINKFORGE_S3_SECRET_KEY": self.secret_key,
        }

    def storage_config(self, bucket: str | None = None, prefix: str = "runs") -> Any:
        from thinkforge.config import StorageConfig

        return StorageConfig(endpoint=self.endpoint, secure=False, bucket=bucket or new_bucket_name(), prefix=prefix)

    def store(self, bucket: str | None = None, *, endpoint: str | None = None, create: bool = True,
              retries: int = 4, backoff: float = 0.02, **kwargs: Any) -> Any:
        """An ObjectStore on ``bucket`` (a fresh name by default), created unless ``create=False``.
        ``endpoint`` lets a test route through a proxy to this server."""
        from thinkforge.storage import ObjectStore

        store = ObjectStore(
            endpoint or self.endpoint, bucket or new_bucket_name(), access_key=self.access_key,
            secret_key=self.secret_key, secure=False, retries=retries, backoff=backoff, max_backoff=0.2, **kwargs,
        )
        if create:
            store.ensure_bucket()
        return store

    def minio(self) -> Any:
        """A raw minio client (to tamper with objects behind the ObjectStore's back)."""
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)

    def drop_bucket(self, bucket: str) -> None:
        from minio.deleteobjects import DeleteObject

        client = self.minio()
        try:
            objs = [DeleteObject(o.object_name) for o in client.list_objects(bucket, recursive=True)]
            for _ in client.remove_objects(bucket, objs):
                pass
            client.remove_bucket(bucket)
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def new_bucket_name() -> str:
    return f"tf-{uuid.uuid4().hex[:20]}"


def start_moto(port: int = 0) -> Any:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on a free loopback port for the whole session (no signature checks)."""
    pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    server = start_moto(0)
    host, port = server.get_host_and_port()
    try:
        yield S3Server(host=host, port=port, server=server)
    finally:
        server.stop()


@pytest.fixture
def object_store(s3_server: S3Server) -> Iterator[Any]:
    """An ObjectStore on a fresh empty bucket (short backoff); removed after the test."""
    store = s3_server.store()
    try:
        yield store
    finally:
        s3_server.drop_bucket(store.bucket)


# ------------------------------------------------------------------------------- fault injection

_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>flaky</RequestId></Error>"
)


class FlakyProxy:
    """A loopback TCP proxy in front of ``upstream`` (host, port) that injects faults on command.

    - ``refuse(n)``: the next ``n`` connections are accepted and reset at once (server down).
    - ``slowdown(n)``: the next ``n`` connections get one ``HTTP 503 SlowDown`` answer and are closed.
    - ``cut_after(nbytes, refuse=n)``: once ``nbytes`` request bytes have been forwarded in total, every
      open connection is severed and the next ``n`` connections are refused (a server dying mid-upload).

    Counters ``connections``, ``refused``, ``slowed``, ``cuts`` and ``bytes_up`` tell what happened.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._lock = threading.Lock()
        self._refuse = 0
        self._slowdown = 0
        self._cut_at: int | None = None
        self._cut_refuse = 0
        self._open: set[socket.socket] = set()
        self.connections = self.refused = self.slowed = self.cuts = self.bytes_up = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="flaky-proxy")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def refuse(self, n: int) -> None:
        with self._lock:
            self._refuse += n

    def slowdown(self, n: int) -> None:
        with self._lock:
            self._slowdown += n

    def cut_after(self, nbytes: int, refuse: int = 0) -> None:
        with self._lock:
            self._cut_at = self.bytes_up + nbytes
            self._cut_refuse = refuse

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        self._sever_all()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:  # SO_LINGER 0: close sends RST, like a crashed peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _sever_all(self) -> None:
        with self._lock:
            socks = list(self._open)
            self._open.clear()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._reset(s)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                if self._refuse > 0:
                    self._refuse -= 1
                    self.refused += 1
                    action = "refuse"
                elif self._slowdown > 0:
                    self._slowdown -= 1
                    self.slowed += 1
                    action = "slowdown"
                else:
                    action = "forward"
            if action == "refuse":
                self._reset(client)
            elif action == "slowdown":
                threading.Thread(target=self._answer_slowdown, args=(client,), daemon=True).start()
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _answer_slowdown(self, client: socket.socket) -> None:
        try:
            client.settimeout(5)
            buf = b""
            while b"\r\n\r\n" not in buf:  # read the request head; the body (if any) is ignored
                chunk = client.recv(65536)
                if not chunk:
                    break
                buf += chunk
            head = (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                b"Content-Length: " + str(len(_SLOWDOWN_BODY)).encode() + b"\r\nConnection: close\r\n\r\n"
            )
            client.sendall(head + _SLOWDOWN_BODY)
        except OSError:
            pass
        finally:
            try:
                client.close()
            except OSError:
                pass

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        self._pump(upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                cut = False
                if upward:
                    with self._lock:
                        self.bytes_up += len(data)
                        if self._cut_at is not None and self.bytes_up >= self._cut_at:
                            self._cut_at = None
                            self._refuse += self._cut_refuse
                            self.cuts += 1
                            cut = True
                if cut:
                    self._sever_all()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def flaky_proxy(s3_server: S3Server) -> Iterator[Any]:
    """Factory: ``flaky_proxy()`` -> a FlakyProxy in front of the session S3 server (closed after the test)."""
    proxies: list[FlakyProxy] = []

    def make() -> FlakyProxy:
        p = FlakyProxy((s3_server.host, s3_server.port))
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


def kill_at_first_checkpoint(argv: list[str], env: dict[str, str], log_path: Path, store: Any, prefix: str,
                             settle: float = 0.0) -> int:
    """Run `argv` (a training child) with output to `log_path`, SIGKILL it as soon as a complete remote
    checkpoint exists under `prefix` (after `settle` seconds), and return the newest complete step."""
    import signal
    import subprocess
    import time

    from thinkforge.checkpoints import latest_complete

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while latest_complete(store, prefix) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint before exit/timeout:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            time.sleep(settle)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    assert "FINISHED" not in log_path.read_text()
    latest = latest_complete(store, prefix)
    assert latest is not None
    return latest[0]
