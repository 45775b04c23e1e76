"""The one object-storage service of thinkforge (MinIO or any S3, through the `minio` client).

Keys and prefixes
    Keys are plain object names inside one bucket (``runs/my-run/checkpoints/checkpoint-4/model.safetensors``).
    A *prefix* names a "directory" of objects; it is always matched with a trailing ``/`` so that
    ``checkpoint-1`` never matches ``checkpoint-10``. Build keys from run ids and user strings with
    :func:`safe_key` (or :meth:`ObjectStore.run_prefix`): each part becomes exactly one path segment,
    so a run named ``../../etc`` stays inside its prefix. Every method also refuses keys with ``..``
    or ``.`` segments, a leading ``/``, backslashes or control characters (``ValueError``).

Directories and completion
    :meth:`ObjectStore.upload_dir` writes every file, then ``<prefix>/_MANIFEST.json`` (sizes and
    sha256 of every file) LAST: the manifest is the completion marker. A prefix without it is an
    incomplete upload (a killed writer) and :meth:`ObjectStore.download_dir` refuses it. Downloads
    verify every sha256 and land in a temporary sibling directory that is renamed into place only
    when complete, so a half download never looks complete either. Deleting a prefix removes the
    manifest first for the same reason. Symbolic links inside a directory being uploaded are refused
    (``ValueError`` naming the link), never followed: a link to a file outside the directory (a mounted
    Secret, ``/etc``) must not end up in the bucket.

Local disk full
    A local write that fails for lack of space or a file-size limit (``ENOSPC``, ``EFBIG``, ``EDQUOT``)
    raises :class:`DiskWriteError`, an ``OSError`` with that errno that names the file, is not retried,
    and leaves nothing behind that looks complete (the partial download is removed).

Faults
    Connection errors, timeouts, HTTP 5xx/429 and S3 ``SlowDown``-style codes are retried with
    exponential backoff and jitter (``retries`` attempts in all, default 5); then a
    :class:`StorageError` names the operation, the endpoint and the bucket/key. Credentials are
    never logged and never appear in exceptions or ``repr``.

Refused credentials
    Authentication and authorization failures are not retried. Credentials the endpoint refuses
    (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``ExpiredToken``, ``InvalidToken``) raise
    :class:`CredentialsError`; valid credentials whose policy does not allow the request on that
    bucket/key (``AccessDenied``) raise :class:`PermissionDenied`. Both name the operation, the
    endpoint, the bucket/key, the S3 error code and which setting to check, never a secret or token.
    An answer to a ``HEAD`` request (stat, exists, bucket exists) has no body, so its status alone
    would say "AccessDenied"/"BadRequest" for any of them: the code is then asked for again with a
    GET of the same permission. A write refused part-way (an upload_dir, a checkpoint) leaves no
    manifest, so nothing looks complete.

Credentials come only from the environment: ``THINKFORGE_S3_ACCESS_KEY``/``THINKFORGE_S3_SECRET_KEY``,
else ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (none: anonymous requests); temporary (STS)
credentials add their session token as ``THINKFORGE_S3_SESSION_TOKEN``, else ``AWS_SESSION_TOKEN``.
``THINKFORGE_S3_ENDPOINT`` and ``THINKFORGE_S3_SECURE`` override the recipe's endpoint/TLS setting
(and serve ``s3://``/``minio://`` URIs); ``THINKFORGE_S3_RETRIES``/``THINKFORGE_S3_BACKOFF`` tune retries.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import http.client
import io
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import quote

if TYPE_CHECKING:  # pragma: no cover
    from minio import Minio

    from thinkforge.config import StorageConfig

log = logging.getLogger("thinkforge.storage")

MANIFEST = "_MANIFEST.json"
MANIFEST_VERSION = 1
URI_SCHEMES = ("s3://", "minio://")
ENV_ENDPOINT = "THINKFORGE_S3_ENDPOINT"
ENV_SECURE = "THINKFORGE_S3_SECURE"
ENV_ACCESS = ("THINKFORGE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
ENV_SECRET = ("THINKFORGE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
ENV_SESSION = ("THINKFORGE_S3_SESSION_TOKEN", "AWS_SESSION_TOKEN")
ENV_RETRIES = "THINKFORGE_S3_RETRIES"
ENV_BACKOFF = "THINKFORGE_S3_BACKOFF"

# S3 error codes worth another try (throttling and transient server trouble).
RETRYABLE_CODES = frozenset(
    {"SlowDown", "SlowDownRead", "SlowDownWrite", "Throttling", "ThrottlingException", "RequestLimitExceeded",
     "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed", "XMinioServerNotInitialized"}
)
_HASH_CHUNK = 1 << 20
T = TypeVar("T")


class StorageError(RuntimeError):
    """An object-storage operation failed (after retries where the failure was transient)."""


class NotFound(StorageError, KeyError):
    """The object or complete prefix does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class IncompleteError(StorageError):
    """A prefix has no completion marker (an upload that never finished)."""


class ChecksumError(StorageError):
    """A downloaded file does not match the size/sha256 recorded in the manifest."""


class CredentialsError(StorageError):
    """The endpoint refused the credentials themselves: an unknown access key, a secret that does not
    match it, an expired or invalid session token (see :data:`CREDENTIAL_CODES`). Not retried."""


class PermissionDenied(StorageError):
    """The credentials are valid, but their policy does not allow this request on this bucket/key
    (S3 ``AccessDenied``). Not retried."""


#: S3 error codes of refused credentials -> what to check (names of settings, never their values)
CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the endpoint knows no such access key: check THINKFORGE_S3_ACCESS_KEY "
                          "(or AWS_ACCESS_KEY_ID) and that it belongs to this endpoint",
    "SignatureDoesNotMatch": "the secret key does not belong to the access key: check THINKFORGE_S3_SECRET_KEY "
                             "(or AWS_SECRET_ACCESS_KEY)",
    "ExpiredToken": "the temporary credentials have expired: renew the access key, secret key and session token "
                    "(THINKFORGE_S3_SESSION_TOKEN or AWS_SESSION_TOKEN)",
    "TokenRefreshRequired": "the temporary credentials must be renewed: renew the access key, secret key and "
                            "session token (THINKFORGE_S3_SESSION_TOKEN or AWS_SESSION_TOKEN)",
    "InvalidToken": "the session token is malformed or not the one issued with this access key: check "
                    "THINKFORGE_S3_SESSION_TOKEN (or AWS_SESSION_TOKEN)",
}
#: S3 error codes of a request the credentials' policy does not allow
DENIED_CODES = {
    "AccessDenied": "the credentials are valid but their IAM or bucket policy does not allow this request on "
                    "this bucket/key",
}


#: errnos of a local disk that is full or a file over a size limit: not retried, the file is named
DISK_ERRNOS = frozenset(e for e in (getattr(errno, n, None) for n in ("ENOSPC", "EFBIG", "EDQUOT")) if e)


class DiskWriteError(OSError):
    """A local write failed for lack of space or a file-size limit; names the file and what was written."""

    def __init__(self, code: int, path: str | os.PathLike[str], detail: str = "") -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.detail = detail

    def __reduce__(self) -> Any:  # picklable (a worker process may raise it)
        return (type(self), (self.errno, self.filename, self.detail))

    def __str__(self) -> str:
        text = f"[Errno {self.errno}] {self.strerror}: {self.filename}"
        return f"{text} ({self.detail})" if self.detail else text


def disk_error(exc: BaseException, path: str | os.PathLike[str], detail: str = "") -> BaseException:
    """``exc`` as a :class:`DiskWriteError` naming ``path`` when it is a disk-full/file-too-large error
    (an ``OSError`` with such an errno); any other exception comes back unchanged."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code in DISK_ERRNOS:
        if isinstance(exc, DiskWriteError):
            return exc
        return DiskWriteError(code, path, detail)
    return exc


def raise_for_disk(exc: BaseException, path: str | os.PathLike[str], detail: str = "") -> None:
    """Raise :class:`DiskWriteError` naming ``path`` (from ``exc``) when ``exc`` is a disk-full/file-too-large
    error; otherwise return, for the caller to re-raise ``exc`` itself."""
    err = disk_error(exc, path, detail)
    if err is not exc:
        raise err from exc
    if isinstance(exc, DiskWriteError):
        raise exc


def upload_files(local_dir: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """Every regular file under ``local_dir`` as (path, relative posix path), sorted; a root-level
    ``_MANIFEST.json`` (from a download) is left out. A symbolic link anywhere inside (to a file or a
    directory) raises ``ValueError`` naming it: links are refused, never followed. ``local_dir`` itself
    may be a link (a mounted artifact path)."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"upload: no such directory {src}")
    out: list[tuple[Path, str]] = []
    for top, dirs, names in os.walk(src, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(top) / name
            if path.is_symlink():
                raise ValueError(f"upload: {path} is a symbolic link; links inside a directory being uploaded are "
                                 "refused, not followed (copy the file in instead)")
        for name in names:
            path = Path(top) / name
            rel = path.relative_to(src).as_posix()
            if path.is_file() and rel != MANIFEST:
                out.append((path, rel))
    return sorted(out, key=lambda t: t[1])


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``, replacing what was there (renames only)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------- keys


def _encode_segment(seg: str) -> str:
    seg = unicodedata.normalize("NFC", seg)
    # Keep a conservative, readable set; percent-encode the rest (%, /, \, controls, spaces, non-ASCII).
    # Encoding `%` keeps the mapping one-to-one, so two different names never share a key.
    out = quote(seg, safe="-_.~=+@,:!()")
    if out in ("", ".", ".."):
        out = out.replace(".", "%2E")
    return out


def safe_key(*parts: str | int) -> str:
    """Join untrusted parts into an object key where every part is exactly one path segment.

    ``/`` and ``\\`` inside a part are percent-encoded (a part cannot add levels, so run ``a/b`` cannot
    reach into run ``a``), ``.``/``..`` become ``%2E``/``%2E%2E``, control characters, spaces, ``%``
    and non-ASCII are percent-encoded. Empty parts raise ``ValueError`` (an empty run name would
    otherwise share its parent's prefix).

    >>> safe_key("runs", "../../etc", "ckpt")
    'runs/%2E%2E%2F%2E%2E%2Fetc/ckpt'
    """
    segs = []
    for i, part in enumerate(parts):
        text = str(part)
        if text == "":
            raise ValueError(f"safe_key: part {i} is empty")
        segs.append(_encode_segment(text))
    key = "/".join(segs)
    if not key:
        raise ValueError("safe_key: no parts")
    if len(key.encode()) > 1024:
        raise ValueError(f"safe_key: key longer than 1024 bytes ({len(key.encode())})")
    return key


def split_prefix(prefix: str) -> list[str]:
    """Segments of a trusted, possibly nested prefix such as ``team/runs`` (each sanitized, empties dropped)."""
    return [p for p in prefix.replace("\\", "/").split("/") if p.strip()]


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Validate a key/prefix for use against the store; returns it without a trailing ``/``."""
    if not isinstance(key, str):
        raise TypeError(f"object key must be str, got {type(key).__name__}")
    k = key[:-1] if key.endswith("/") else key
    if not k:
        if allow_empty:
            return ""
        raise ValueError("empty object key")
    bad = None
    if k.startswith("/"):
        bad = "leading '/'"
    elif "\\" in k:
        bad = "backslash"
    elif any(ord(c) < 32 or ord(c) == 127 for c in k):
        bad = "control character"
    elif any(seg in ("", ".", "..") for seg in k.split("/")):
        bad = "empty, '.' or '..' segment"
    if bad:
        raise ValueError(f"unsafe object key {k!r}: {bad} (build keys with thinkforge.storage.safe_key)")
    if len(k.encode()) > 1024:
        raise ValueError(f"object key longer than 1024 bytes: {k[:60]!r}...")
    return k


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` or ``minio://bucket/key`` -> (bucket, key); the key may be empty."""
    for scheme in URI_SCHEMES:
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            bucket, _, key = rest.partition("/")
            if not bucket:
                raise ValueError(f"{uri}: no bucket in URI (expected {scheme}bucket/key)")
            return bucket, check_key(key, allow_empty=True) if key else ""
    raise ValueError(f"{uri}: not an object-storage URI (expected s3://bucket/key or minio://bucket/key)")


# ------------------------------------------------------------------------------------------ retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: sleep ``uniform(0.5, 1) * min(max_delay, base_delay * 2**i)``."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * (2**attempt)) * random.uniform(0.5, 1.0)


def is_retryable(exc: BaseException) -> bool:
    """Whether an error from the minio client / the network is transient."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return exc.code in RETRYABLE_CODES or status >= 500 or status == 429
    if isinstance(exc, ServerError):
        return exc.status_code >= 500 or exc.status_code == 429
    if isinstance(exc, InvalidResponseError):  # non-XML answer, e.g. a proxy's 502/503 page
        code = getattr(exc, "_code", 0) or 0
        return code >= 500 or code == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # local file problems
    # Network trouble only: a plain OSError (disk full, permissions) is not retried.
    return isinstance(
        exc, (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError, socket.gaierror)
    )


def _describe(exc: BaseException) -> str:
    from minio.error import S3Error

    if isinstance(exc, S3Error):
        return f"S3 error {exc.code}: {exc.message}"
    text = str(exc)
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _env_first(names: tuple[str, ...]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{ENV_SECURE}={text!r}: expected true/false")


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept ``host:port`` or ``http(s)://host:port[/]``; a scheme decides TLS."""
    ep = endpoint.strip()
    if ep.startswith("https://"):
        ep, secure = ep[len("https://"):], True
    elif ep.startswith("http://"):
        ep, secure = ep[len("http://"):], False
    return ep.rstrip("/"), secure


# -------------------------------------------------------------------------------------- the service


class ObjectStore:
    """One bucket on one MinIO/S3 endpoint. Thread-safe; methods retry transient failures.

    Build it with :meth:`from_config` or :meth:`from_uri`; the constructor takes explicit
    credentials (tests, or callers holding a secret from a mount).
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        secure: bool = True,
        region: str | None = None,
        prefix: str = "",
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        workers: int = 4,
        part_size: int = 0,
        cert_check: bool = True,
    ) -> None:
        if not endpoint:
            raise StorageError("no object-storage endpoint configured (storage.endpoint or THINKFORGE_S3_ENDPOINT)")
        if not bucket:
            raise StorageError(f"no bucket configured for endpoint {endpoint}")
        if retries < 1:
            raise ValueError("retries must be >= 1 (it counts attempts in all)")
        from minio.helpers import check_bucket_name

        try:
            check_bucket_name(bucket)
        except ValueError:
            raise ValueError(f"invalid bucket name {bucket!r} (3-63 chars: lowercase letters, digits, '.', '-')") from None
        self.endpoint, self.secure = _split_endpoint(endpoint, secure)
        self.bucket = bucket
        self.region = region or None
        self.prefix = "/".join(split_prefix(prefix))
        self.retry = RetryPolicy(attempts=retries, base_delay=backoff, max_delay=max_backoff)
        self.workers = max(1, workers)
        self.part_size = part_size
        self._client = self._make_client(
            access_key, secret_key, session_token, connect_timeout, read_timeout, cert_check
        )

    def _make_client(
        self,
        access_key: str | None,
        secret_key: str | None,
        session_token: str | None,
        connect_timeout: float,
        read_timeout: float,
        cert_check: bool,
    ) -> Minio:
        import certifi
        import urllib3
        from minio import Minio

        # Our own retry loop owns retries: urllib3's are off so each attempt is one request and
        # the backoff/jitter/limit are ours. The pool is sized for workers x minio's 3 part threads.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=max(10, self.workers * 4),
            cert_reqs="CERT_REQUIRED" if cert_check else "CERT_NONE",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=False,
        )
        return Minio(
            self.endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            session_token=session_token or None,
            secure=self.secure,
            region=self.region,
            http_client=http,
        )

    # ---------------------------------------------------------------------------- constructors

    @classmethod
    def from_config(cls, cfg: StorageConfig, **kwargs: Any) -> ObjectStore:
        """A store for ``cfg.bucket`` at ``cfg.endpoint`` (``THINKFORGE_S3_ENDPOINT``/``_SECURE`` override it)."""
        endpoint = os.environ.get(ENV_ENDPOINT) or cfg.endpoint
        secure = cfg.secure
        if os.environ.get(ENV_SECURE) is not None:
            secure = _parse_bool(os.environ[ENV_SECURE])
        kwargs.setdefault("prefix", cfg.prefix)
        return cls(endpoint, cfg.bucket, secure=secure, region=cfg.region or None, **_env_credentials(),
                   **_env_tuning(kwargs))

    @classmethod
    def from_config_or_none(cls, cfg: StorageConfig, **kwargs: Any) -> ObjectStore | None:
        """Like :meth:`from_config`, but None when no endpoint is configured (local-only runs)."""
        if not (os.environ.get(ENV_ENDPOINT) or cfg.endpoint):
            return None
        return cls.from_config(cfg, **kwargs)

    @classmethod
    def from_uri(cls, uri: str, cfg: StorageConfig | None = None, **kwargs: Any) -> tuple[ObjectStore, str]:
        """``s3://bucket/key`` -> (store for that bucket, key). The endpoint comes from
        ``THINKFORGE_S3_ENDPOINT`` or ``cfg.endpoint``; TLS from ``THINKFORGE_S3_SECURE`` or ``cfg.secure``."""
        bucket, key = parse_uri(uri)
        endpoint = os.environ.get(ENV_ENDPOINT) or (cfg.endpoint if cfg else "")
        if not endpoint:
            raise StorageError(f"{uri}: no endpoint: set {ENV_ENDPOINT} (host:port) or storage.endpoint")
        secure = cfg.secure if cfg else True
        if os.environ.get(ENV_SECURE) is not None:
            secure = _parse_bool(os.environ[ENV_SECURE])
        region = (cfg.region or None) if cfg else None
        return cls(endpoint, bucket, secure=secure, region=region, **_env_credentials(), **_env_tuning(kwargs)), key

    def __repr__(self) -> str:  # never the credentials
        scheme = "https" if getattr(self, "secure", True) else "http"
        return f"ObjectStore({scheme}://{getattr(self, 'endpoint', '?')}/{getattr(self, 'bucket', '?')})"

    def where(self, key: str = "") -> str:
        """``endpoint/bucket/key`` for messages."""
        return f"{self.endpoint}/{self.bucket}/{key}" if key else f"{self.endpoint}/{self.bucket}"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def run_prefix(self, run_name: str, *parts: str | int) -> str:
        """``<config prefix>/<run name>/<parts...>``, the run name and parts sanitized as single segments."""
        return "/".join([*(_encode_segment(s) for s in split_prefix(self.prefix)), safe_key(run_name, *parts)])

    # ------------------------------------------------------------------------------- retry core

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one client operation with retries; errors become StorageError naming endpoint and key."""
        from minio.error import S3Error

        attempts = self.retry.attempts
        for attempt in range(attempts):
            try:
                return fn()
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    raise NotFound(f"{what}: no object {self.where(key)}") from None
                if e.code == "NoSuchBucket":
                    raise NotFound(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint}") from None
                if e.code in CREDENTIAL_CODES:
                    raise CredentialsError(
                        f"{what} {self.where(key)} failed: S3 error {e.code}: {e.message} ({CREDENTIAL_CODES[e.code]})"
                    ) from e
                if e.code in DENIED_CODES:
                    raise PermissionDenied(
                        f"{what} {self.where(key)} failed: S3 error {e.code}: {e.message} ({DENIED_CODES[e.code]})"
                    ) from e
                err: BaseException = e
            except (StorageError, ValueError, TypeError, DiskWriteError):
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                err = e
            if not is_retryable(err):
                raise StorageError(f"{what} {self.where(key)} failed: {_describe(err)}") from err
            if attempt + 1 < attempts:
                d = self.retry.delay(attempt)
                log.warning(
                    "storage: %s %s failed (%s); retry %d/%d in %.2fs",
                    what, self.where(key), _describe(err), attempt + 1, attempts - 1, d,
                )
                time.sleep(d)
        raise StorageError(
            f"{what} {self.where(key)} failed after {attempts} attempts "
            f"(endpoint {self.endpoint} unreachable or failing): {_describe(err)}"
        ) from err

    # ------------------------------------------------------------------------ HEAD answers

    @staticmethod
    def _explain_head(err: Exception, probe: Callable[[], Any]) -> Exception:
        """The real S3 error behind a HEAD request's bodiless 403/400 (minio can only name it
        ``AccessDenied``/``BadRequest`` from the status: an unknown key, a wrong secret and an expired
        token look alike): ``probe`` (a GET needing the same permission) is sent, and its error is
        returned when it names credentials, a denial or a transient fault (a skewed clock is a 403
        too); otherwise ``err`` itself."""
        from minio.error import S3Error

        if not isinstance(err, S3Error) or err.code not in ("AccessDenied", "BadRequest"):
            return err
        if getattr(err.response, "data", None):  # a body: the code is the server's own
            return err
        try:
            probe()
        except S3Error as e:
            if e.code in CREDENTIAL_CODES or e.code in DENIED_CODES or e.code in RETRYABLE_CODES:
                return e
        except Exception:  # noqa: BLE001 - the probe only explains; the HEAD's error stands
            pass
        return err

    def _stat_object(self, key: str) -> Any:
        from minio.error import S3Error

        def probe() -> None:
            resp = self._client.get_object(self.bucket, key, offset=0, length=1)
            resp.close()
            resp.release_conn()

        try:
            return self._client.stat_object(self.bucket, key)
        except S3Error as e:
            raise self._explain_head(e, probe) from None

    def _bucket_exists(self) -> bool:
        from minio.error import S3Error

        def probe() -> None:  # ListBucket, the permission HEAD bucket needs
            for _ in self._client.list_objects(self.bucket, prefix="thinkforge-auth-probe/"):
                break

        try:
            return self._client.bucket_exists(self.bucket)
        except S3Error as e:
            raise self._explain_head(e, probe) from None

    # -------------------------------------------------------------------------------- buckets

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (idempotent, safe against a concurrent creator)."""
        from minio.error import S3Error

        def go() -> None:
            if self._bucket_exists():
                return
            try:
                self._client.make_bucket(self.bucket, location=self.region)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("ensure bucket", "", go)

    # -------------------------------------------------------------------------------- objects

    def upload_file(self, local: str | os.PathLike[str], key: str, content_type: str = "application/octet-stream") -> None:
        """Upload one file (multipart for large files, by the client). Replaces the object atomically."""
        key = check_key(key)
        path = Path(local)
        if not path.is_file():
            raise FileNotFoundError(f"upload: no such file {path}")
        self._call(
            "upload", key,
            lambda: self._client.fput_object(self.bucket, key, str(path), content_type=content_type,
                                             part_size=self.part_size),
        )

    def download_file(self, key: str, local: str | os.PathLike[str]) -> Path:
        """Download one object to ``local`` (via a temporary file renamed into place)."""
        key = check_key(key)
        dest = Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        def go() -> None:
            try:
                self._client.fget_object(self.bucket, key, str(tmp), tmp_file_path=str(tmp) + ".minio")
            except OSError as e:
                raise_for_disk(e, dest, f"download of {self.where(key)}; nothing kept")
                raise

        try:
            self._call("download", key, go)
            os.replace(tmp, dest)
        finally:
            for p in (tmp, Path(str(tmp) + ".minio")):
                p.unlink(missing_ok=True)
        return dest

    def _download_hashed(self, key: str, out: Path) -> tuple[int, str]:
        """Stream one object to ``out``, hashing as it arrives: one pass over the bytes, not two."""
        key = check_key(key)
        out.parent.mkdir(parents=True, exist_ok=True)

        def go() -> tuple[int, str]:
            h, size = hashlib.sha256(), 0
            resp = self._client.get_object(self.bucket, key)
            try:
                with open(out, "wb") as fh:
                    for chunk in resp.stream(_HASH_CHUNK):
                        h.update(chunk)
                        try:
                            fh.write(chunk)
                        except OSError as e:
                            raise_for_disk(e, out, f"download of {self.where(key)}")
                            raise
                        size += len(chunk)
            except OSError as e:  # the open, or the close (flush) of the last bytes
                raise_for_disk(e, out, f"download of {self.where(key)}")
                raise
            finally:
                resp.close()
                resp.release_conn()
            return size, h.hexdigest()

        return self._call("download", key, go)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        key = check_key(key)
        self._call(
            "put", key,
            lambda: self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type),
        )

    def get_bytes(self, key: str) -> bytes:
        key = check_key(key)

        def go() -> bytes:
            resp = self._client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call("get", key, go)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode(), content_type="application/json")

    def get_json(self, key: str) -> Any:
        """The JSON object at ``key``; :class:`NotFound` when missing."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"get json {self.where(key)}: not valid JSON ({e})") from None

    def exists(self, key: str) -> bool:
        key = check_key(key)
        try:
            self._call("stat", key, lambda: self._stat_object(key))
        except NotFound:
            return False
        return True

    def stat(self, key: str) -> Any:
        key = check_key(key)
        return self._call("stat", key, lambda: self._stat_object(key))

    def list_keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix/`` (recursive, sorted)."""
        p = check_key(prefix, allow_empty=True)
        p = p + "/" if p else ""
        return sorted(
            self._call("list", p, lambda: [o.object_name for o in self._client.list_objects(self.bucket, p, recursive=True)])
        )

    def describe(self, key: str) -> list[dict[str, Any]]:
        """``[{key, etag, version_id, size}]`` of the object ``key``, or of every object under ``key/``
        (sorted); empty when there is neither."""
        key = check_key(key)

        def row(o: Any) -> dict[str, Any]:
            return {"key": o.object_name, "etag": o.etag, "version_id": o.version_id or "", "size": o.size}

        try:
            return [row(self.stat(key))]
        except NotFound:
            pass
        p = key + "/"
        objs = self._call("list", p, lambda: list(self._client.list_objects(self.bucket, p, recursive=True)))
        return sorted((row(o) for o in objs), key=lambda r: r["key"])

    def list_prefixes(self, prefix: str) -> list[str]:
        """Immediate child prefixes of ``prefix`` (full keys, no trailing ``/``, sorted).

        ``list_prefixes("runs/a/checkpoints")`` -> ``["runs/a/checkpoints/checkpoint-2", ...]``.
        """
        p = check_key(prefix, allow_empty=True)
        p = p + "/" if p else ""

        def go() -> list[str]:
            return [o.object_name.rstrip("/") for o in self._client.list_objects(self.bucket, p, recursive=False)
                    if o.is_dir]

        return sorted(self._call("list", p, go))

    def delete_key(self, key: str) -> None:
        key = check_key(key)
        self._call("delete", key, lambda: self._client.remove_object(self.bucket, key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix/``; the manifest goes first, so a half-deleted prefix is
        never complete. Returns the number of objects deleted."""
        from minio.deleteobjects import DeleteObject

        p = check_key(prefix)
        manifest = f"{p}/{MANIFEST}"
        had_manifest = self.exists(manifest)
        if had_manifest:
            self.delete_key(manifest)
        keys = [k for k in self.list_keys(p) if k != manifest]
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]

            def go(batch: list[str] = batch) -> None:
                errors = list(self._client.remove_objects(self.bucket, (DeleteObject(k) for k in batch)))
                if errors:
                    raise StorageError(
                        f"delete under {self.where(p)}: {len(errors)} objects not deleted (first: "
                        f"{errors[0].name}: {errors[0].code})"
                    )

            self._call("delete", p, go)
        return len(keys) + int(had_manifest)

    # ---------------------------------------------------------------------------- directories

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> dict[str, Any]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>`` (a small thread pool),
        then ``prefix/_MANIFEST.json`` LAST. Returns the manifest.

        An existing manifest at ``prefix`` is removed first, so while the prefix is rewritten it does
        not look complete. A symbolic link inside ``local_dir`` is refused (``ValueError`` naming it,
        before anything is written), never followed; a local ``_MANIFEST.json`` (from a download) is skipped.
        """
        p = check_key(prefix)
        listed = upload_files(local_dir)
        files = [f for f, _ in listed]
        rels = [r for _, r in listed]
        for rel in rels:
            check_key(f"{p}/{rel}")  # local names with control chars etc. fail before anything is written
        manifest_key = f"{p}/{MANIFEST}"
        self.delete_key(manifest_key)  # S3 deletes of a missing key succeed

        entries: dict[str, dict[str, Any]] = {}
        lock = threading.Lock()

        def one(path: Path, rel: str) -> None:
            size = path.stat().st_size
            digest = _sha256_file(path)
            self.upload_file(path, f"{p}/{rel}")
            with lock:
                entries[rel] = {"size": size, "sha256": digest}

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(files)))) as pool:
            futures = [pool.submit(one, f, r) for f, r in zip(files, rels)]
            done, _ = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()  # type: ignore[misc]
        manifest = {
            "version": MANIFEST_VERSION,
            "created": time.time(),
            "files": dict(sorted(entries.items())),
            "total_bytes": sum(e["size"] for e in entries.values()),
        }
        self.put_json(manifest_key, manifest)
        log.info("storage: uploaded %d files (%d bytes) to %s in %.1fs", len(entries), manifest["total_bytes"],
                 self.where(p), time.monotonic() - t0)
        return manifest

    def is_complete(self, prefix: str) -> bool:
        """Whether ``prefix`` holds a finished :meth:`upload_dir` (its manifest exists)."""
        return self.exists(f"{check_key(prefix)}/{MANIFEST}")

    def manifest(self, prefix: str) -> dict[str, Any]:
        p = check_key(prefix)
        try:
            m = self.get_json(f"{p}/{MANIFEST}")
        except NotFound:
            raise IncompleteError(
                f"{self.where(p)}: no {MANIFEST} (incomplete or interrupted upload); refusing to use it"
            ) from None
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            raise StorageError(f"{self.where(p)}/{MANIFEST}: malformed manifest")
        return m

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> Path:
        """Download a complete prefix into ``local_dir`` (replaced if it exists) and verify every file.

        Refuses a prefix without a manifest (:class:`IncompleteError`); a size or sha256 mismatch raises
        :class:`ChecksumError`. Files land in a temporary sibling directory that is renamed into place
        only when everything verified; the local copy also gets the manifest.
        """
        p = check_key(prefix)
        m = self.manifest(p)
        dest = Path(local_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            items = list(m["files"].items())
            for rel, _ in items:
                check_key(f"{p}/{rel}")
                if (tmp / rel).resolve().is_relative_to(tmp.resolve()) is False:
                    raise StorageError(f"{self.where(p)}: manifest entry {rel!r} escapes the directory")

            def one(rel: str, meta: dict[str, Any]) -> None:
                size, digest = self._download_hashed(f"{p}/{rel}", tmp / rel)
                if size != meta.get("size"):
                    raise ChecksumError(f"{self.where(p)}/{rel}: size {size} != manifest {meta.get('size')}")
                if digest != meta.get("sha256"):
                    raise ChecksumError(f"{self.where(p)}/{rel}: sha256 {digest[:16]}... != manifest "
                                        f"{str(meta.get('sha256'))[:16]}... (corrupt object)")

            with cf.ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(items)))) as pool:
                futures = [pool.submit(one, rel, meta) for rel, meta in items]
                for f in cf.as_completed(futures):
                    if f.exception() is not None:
                        for g in futures:
                            g.cancel()
                        raise f.exception()  # type: ignore[misc]
            try:
                (tmp / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))
            except OSError as e:
                raise_for_disk(e, tmp / MANIFEST, f"download of {self.where(p)}")
                raise
            replace_dir(tmp, dest)
        except DiskWriteError as e:
            raise DiskWriteError(e.errno, e.filename, f"{e.detail}; downloading into {dest}, the partial copy "
                                                      "was removed and nothing there looks complete") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _env_tuning(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``THINKFORGE_S3_RETRIES`` (attempts) and ``THINKFORGE_S3_BACKOFF`` (base delay, s) as defaults."""
    if os.environ.get(ENV_RETRIES):
        kwargs.setdefault("retries", int(os.environ[ENV_RETRIES]))
    if os.environ.get(ENV_BACKOFF):
        kwargs.setdefault("backoff", float(os.environ[ENV_BACKOFF]))
    return kwargs


def _env_credentials() -> dict[str, str | None]:
    return {
        "access_key": _env_first(ENV_ACCESS),
        "secret_key": _env_first(ENV_SECRET),
        "session_token": _env_first(ENV_SESSION),
    }


def local_is_complete(local_dir: str | os.PathLike[str]) -> bool:
    """Whether a local directory is a verified download (holds the manifest and every listed file
    with its recorded size)."""
    d = Path(local_dir)
    try:
        m = json.loads((d / MANIFEST).read_text())
        return all((d / rel).is_file() and (d / rel).stat().st_size == meta["size"] for rel, meta in m["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cache_root() -> Path:
    env = os.environ.get("THINKFORGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "thinkforge"


def download_to_cache(uri: str, cfg: StorageConfig | None = None) -> Path:
    """A local copy of ``s3://bucket/key`` (a file) or of a complete prefix (a directory), cached under
    ``$THINKFORGE_CACHE/s3/<bucket>/<key>`` (default ``~/.cache/thinkforge``).

    A cached file is reused while the remote ETag is unchanged; a cached directory is reused while its
    manifest is unchanged. If the endpoint is unreachable but a complete cached copy exists, that copy is
    used (with a warning). Refused credentials and denied requests (:class:`CredentialsError`,
    :class:`PermissionDenied`) raise even then: they are no outage, and a revoked permission is not
    to be bypassed through the cache.
    """
    store, key = ObjectStore.from_uri(uri, cfg)
    if not key:
        raise ValueError(f"{uri}: no key (expected s3://bucket/key)")
    dest = cache_root() / "s3" / _encode_segment(store.bucket) / Path(*key.split("/"))
    meta_file = dest.with_name(f".{dest.name}.meta.json")

    def cached_meta() -> dict[str, Any]:
        try:
            return json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return {}

    try:
        try:
            st = store.stat(key)
            is_file = True
        except NotFound:
            is_file = False
        if is_file:
            etag = st.etag
            if dest.is_file() and cached_meta().get("etag") == etag:
                return dest
            store.download_file(key, dest)
            meta_file.write_text(json.dumps({"etag": etag, "uri": uri}))
            return dest
        m = store.manifest(key)  # IncompleteError/NotFound when the prefix is not a finished directory
        if dest.is_dir() and local_is_complete(dest):
            local_m = json.loads((dest / MANIFEST).read_text())
            if local_m.get("files") == m.get("files"):
                return dest
        return store.download_dir(key, dest)
    except IncompleteError:
        if store.list_keys(key):
            raise
        raise NotFound(f"{uri}: no such object or directory at {store.endpoint}") from None
    except StorageError as e:
        if isinstance(e, (NotFound, CredentialsError, PermissionDenied)):
            raise
        if (dest.is_file() and cached_meta()) or (dest.is_dir() and local_is_complete(dest)):
            log.warning("storage: %s unreachable (%s); using the cached copy %s", uri, e, dest)
            return dest
        raise
