"""S3 fixtures: a real S3 server on loopback (moto's threaded server) that checks signatures, and a
fault-injecting TCP proxy.

``s3_server`` (session) starts ``moto.server.ThreadedMotoServer`` on a free 127.0.0.1 port. It is a
real HTTP server speaking the S3 REST API (the `minio` client talks to it over a socket: multipart,
listing, deletes), not an in-process mock, and its **authentication is on**: every request must be
signed (SigV4) with an access key of one of its IAM users, and is authorized against that user's IAM
policies. Setup (while the server still takes unsigned requests, moto's ``INITIAL_NO_AUTH_ACTION_COUNT``
being infinite) creates an IAM user with an S3/IAM/STS allow-all policy, its access key and an
assumable role through moto's IAM API (boto3); then ``/moto-api/reset-auth`` sets the no-auth count to 0.
The fixture's ``access_key``/``secret_key`` are that user's real keys: a wrong secret is refused
(``SignatureDoesNotMatch``), an unknown key too (``InvalidAccessKeyId``). Nothing global is set (no
``AWS_*`` environment variables); callers get the endpoint and credentials from the fixture.

What moto emulates, and what the fixture adds (moto 5.2):

- SigV4 signatures (header-signed requests, as `minio` sends them), access keys of IAM users and of
  STS ``AssumeRole`` sessions (access key + secret + session token; a token that is not the session's
  gives ``InvalidToken``), and IAM identity policies (user inline policies, role policies) with
  ``Allow``/``Deny``, actions and resource wildcards such as ``arn:aws:s3:::*/denied/*``.
- Not emulated: bucket policies and ACLs in the authorization, session policies passed to AssumeRole,
  the credentials ``GetSessionToken`` returns (they are not usable against the server), clock skew,
  and **expiry of STS credentials**: moto records ``Expiration`` but never checks it. The fixture adds
  that check (``_enforce_sts_expiry``): a request signed with AssumeRole credentials past their
  expiration gets ``400 ExpiredToken``, "The provided token has expired.", as AWS S3 answers.
- moto logs every request's headers (session tokens included) at DEBUG under ``moto.*`` in this
  process: those loggers are held at INFO, so a test's caplog sees the client's records only.

``S3Server.add_user`` creates another IAM user (optionally denied actions on some resources),
``add_key`` registers chosen key strings as a user's access key (credentials that come from elsewhere
and must sign for real: a rendered chart's S3 Secret, a test's dummy secrets; unregistered keys are
refused), ``assume_role`` hands out STS temporary credentials; ``store(credentials=...)`` is an
ObjectStore with any of them.

``object_store`` (function) is an :class:`thinkforge.storage.ObjectStore` on a fresh, empty bucket
with short retry backoff; the bucket is emptied and removed afterwards.

``FlakyProxy`` (and the ``flaky_proxy`` factory fixture) sits between a client and the server and
injects network faults at the socket level: refuse (accept then reset) the next N connections,
answer the next N requests with an HTTP 503 ``SlowDown`` error, or sever every open connection
once a given number of request bytes has passed (a server that dies mid-upload).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

ACCOUNT_ID = "123456789012"  # moto's default account: every user, bucket and role lives in it
ADMIN_USER = "thinkforge-tests"
ROLE_NAME = "thinkforge-tests-role"
REGION = "us-east-1"


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


ALLOW_ALL = {"Effect": "Allow", "Action": ["s3:*", "iam:*", "sts:*"], "Resource": "*"}
ALLOW_S3 = {"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}


def free_port() -> int:
    """A loopback port with nothing listening on it (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Credentials:
    """An access key (IAM user or STS session) of the fixture server; the secret and token stay out of repr."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    user: str = ""

    def env(self) -> dict[str, str]:
        env = {"THINKFORGE_S3_ACCESS_KEY": self.access_key, "THINKFORGE_S3_SECRET_KEY": self.secret_key}
        if self.session_token:
            env["THINKFORGE_S3_SESSION_TOKEN"] = self.session_token
        return env

    def secrets(self) -> list[str]:
        """What must never appear in a message, a log record or an object."""
        return [s for s in (self.secret_key, self.session_token) if s]


@dataclass
class S3Server:
    """A running moto S3 server with authentication on (see the module docstring)."""

    host: str
    port: int
    server: Any = field(repr=False)
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    role_arn: str = ""

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.access_key, self.secret_key, user=ADMIN_USER)

    def env(self) -> dict[str, str]:
        """Environment for a child process (or monkeypatch) that reaches this server via from_config/from_uri."""
        return {
            "THINKFORGE_S3_ENDPOINT": self.endpoint,
            "THINKFORGE_S3_SECURE": "false",
            "THINKFORGE_S3_ACCESS_KEY": self.access_key,
            "THINKFORGE_S3_SECRET_KEY": self.secret_key,
        }

    @contextlib.contextmanager
    def environment(self, **extra: str) -> Iterator[None]:
        """This server's env() (and `extra`) set in os.environ for a block, then restored: for a module
        fixture whose stages run in the test process and reach the server through from_config."""
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**self.env(), **extra}.items():
                mp.setenv(key, value)
            yield

    def storage_config(self, bucket: str | None = None, prefix: str = "runs") -> Any:
        from thinkforge.config import StorageConfig

        return StorageConfig(endpoint=self.endpoint, secure=False, bucket=bucket or new_bucket_name(), prefix=prefix)

    def store(self, bucket: str | None = None, *, endpoint: str | None = None, create: bool = True,
              retries: int = 4, backoff: float = 0.02, credentials: Credentials | None = None, **kwargs: Any) -> Any:
        """An ObjectStore on ``bucket`` (a fresh name by default), created unless ``create=False``, signed
        with the fixture's keys or ``credentials``. ``endpoint`` lets a test route through a proxy to this server."""
        from thinkforge.storage import ObjectStore

        c = credentials or self.credentials
        store = ObjectStore(
            endpoint or self.endpoint, bucket or new_bucket_name(), access_key=c.access_key,
            secret_key=c.secret_key, session_token=c.session_token, secure=False, retries=retries,
            backoff=backoff, max_backoff=0.2, **kwargs,
        )
        if create:
            store.ensure_bucket()
        return store

    def minio(self) -> Any:
        """A raw minio client (to tamper with objects behind the ObjectStore's back)."""
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)

    def boto(self, service: str, credentials: Credentials | None = None) -> Any:
        """A boto3 client of this server (``iam``, ``sts``, ``s3``), signed with the fixture's keys."""
        import boto3
        from botocore.config import Config

        c = credentials or self.credentials
        return boto3.client(service, endpoint_url=self.url, region_name=REGION, aws_access_key_id=c.access_key,
                            aws_secret_access_key=c.secret_key, aws_session_token=c.session_token,
                            config=Config(parameter_validation=False, retries={"max_attempts": 1}))

    def add_user(self, name: str | None = None, *, deny: dict[str, list[str]] | None = None) -> Credentials:
        """A new IAM user allowed all of S3, except ``deny``: ``{action: [resource ARN patterns]}``,
        e.g. ``{"s3:PutObject": ["arn:aws:s3:::*/denied/*"]}`` (an explicit Deny wins over the Allow)."""
        iam = self.boto("iam")
        name = name or f"tf-user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        stmts: list[dict[str, Any]] = [ALLOW_S3]
        for action, resources in (deny or {}).items():
            stmts.append({"Effect": "Deny", "Action": [action], "Resource": list(resources)})
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=policy(*stmts))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"], user=name)

    def add_key(self, access_key: str, secret_key: str) -> Credentials:
        """Make the chosen strings a valid access key (a new user allowed all of S3): for tests whose
        dummy secrets must really sign requests. IAM cannot choose a key, so the key it creates is renamed
        in moto's in-process IAM backend."""
        from moto.iam.models import iam_backends

        made = self.add_user()
        backend = iam_backends[ACCOUNT_ID]["aws"]
        key = backend.access_keys.pop(made.access_key)
        key.access_key_id, key.secret_access_key = access_key, secret_key
        backend.access_keys[access_key] = key
        return Credentials(access_key, secret_key, user=made.user)

    def assume_role(self, duration_s: int = 900) -> Credentials:
        """STS temporary credentials (AssumeRole on a role allowed all of S3) valid for ``duration_s``
        seconds; below AWS's 900 s minimum too (the fixture's client does not validate), so a test can
        let them expire."""
        c = self.boto("sts").assume_role(RoleArn=self.role_arn, RoleSessionName=f"tf-{uuid.uuid4().hex[:8]}",
                                         DurationSeconds=duration_s)["Credentials"]
        return Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], user=ROLE_NAME)

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


def _set_no_auth_count(url: str, count: float) -> str:
    """moto's ``/moto-api/reset-auth``: the next ``count`` requests go unchecked (inf: auth off, 0: on).
    Returns the previous count."""
    import requests

    resp = requests.post(f"{url}/moto-api/reset-auth", data=str(count).encode(), timeout=10)
    resp.raise_for_status()
    return resp.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


def _enforce_sts_expiry() -> Any:
    """Make the in-process moto answer ``400 ExpiredToken`` to S3 requests signed with AssumeRole
    credentials past their expiration (moto records it, never checks it). Returns the undo function."""
    from moto.core.utils import utcnow
    from moto.iam import access_control as ac
    from moto.s3.exceptions import S3ClientError
    from moto.sts.models import sts_backends

    class ExpiredTokenError(S3ClientError):
        code = "ExpiredToken"

        def __init__(self) -> None:
            super().__init__("ExpiredToken", "The provided token has expired.")

    real_create, real_raise = ac.create_access_key, ac.S3IAMRequest._raise_invalid_access_key

    def create_access_key(account_id: str, partition: str, access_key_id: str, headers: dict[str, str]) -> Any:
        key = real_create(account_id=account_id, partition=partition, access_key_id=access_key_id, headers=headers)
        if isinstance(key, ac.AssumedRoleAccessKey):
            for role in sts_backends[account_id][partition].assumed_roles:
                if role.access_key_id == access_key_id and role.expiration <= utcnow():
                    raise ac.CreateAccessKeyFailure(reason="ExpiredToken")
        return key

    def raise_invalid_access_key(self: Any, reason: str) -> None:
        if reason == "ExpiredToken":
            raise ExpiredTokenError()
        real_raise(self, reason)

    ac.create_access_key = create_access_key
    ac.S3IAMRequest._raise_invalid_access_key = raise_invalid_access_key

    def undo() -> None:
        ac.create_access_key = real_create
        ac.S3IAMRequest._raise_invalid_access_key = real_raise

    return undo


def start_auth_server() -> S3Server:
    """A moto server with an IAM user, its key and a role set up, then authentication switched on."""
    server = start_moto(0)
    host, port = server.get_host_and_port()
    s3 = S3Server(host=host, port=port, server=server)
    logging.getLogger("moto").setLevel(logging.INFO)  # its DEBUG records carry request headers (tokens)
    try:
        _set_no_auth_count(s3.url, float("inf"))  # setup: the server takes unsigned/unknown-key requests
        setup = Credentials("setup", "setup")
        iam = s3.boto("iam", setup)
        iam.create_user(UserName=ADMIN_USER)
        iam.put_user_policy(UserName=ADMIN_USER, PolicyName="all", PolicyDocument=policy(ALLOW_ALL))
        key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
        s3.access_key, s3.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        trust = {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:user/{ADMIN_USER}"},
                 "Action": "sts:AssumeRole"}
        s3.role_arn = iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=policy(trust))["Role"]["Arn"]
        iam.put_role_policy(RoleName=ROLE_NAME, PolicyName="s3", PolicyDocument=policy(ALLOW_S3))
        _set_no_auth_count(s3.url, 0)  # from here on every request is authenticated and authorized
    except BaseException:
        server.stop()
        raise
    return s3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on a free loopback port for the whole session, authentication on."""
    pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests")
    undo = _enforce_sts_expiry()
    s3 = start_auth_server()
    try:
        yield s3
    finally:
        try:
            _set_no_auth_count(s3.url, float("inf"))
        except Exception:  # noqa: BLE001 - the server goes away next
            pass
        s3.server.stop()
        undo()


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
