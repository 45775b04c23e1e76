"""OpenAI-compatible HTTP engine: an in-cluster vLLM/SGLang server, llama.cpp's server, or a hosted
reasoning model (e.g. DeepSeek-R1) behind the OpenAI chat or completions API.

What it does for each prompt:

- **API**: ``api="chat"`` posts ``/chat/completions`` with the one template's system + user messages
  (the server applies its own chat template); ``api="completions"`` posts ``/completions`` with the
  prompt rendered here by ``thinkforge.templates.render_prompt`` (pass ``tokenizer`` so its chat
  template is used; without one the plain "Problem:/Solution:" layout is sent). ``endpoint`` is the
  base URL (``http://vllm:8000/v1``); a bare ``http://host:port`` gets ``/v1`` appended.
- **n samples**: one request asks for ``n`` choices. A server that returns fewer (llama.cpp ignores
  ``n``) is detected on the first answer: the missing samples are requested one by one, each with its
  own seed, and every later prompt is fanned out the same way. ``fan_out=True`` fans out from the start
  (servers that reject ``n > 1``).
- **reasoning**: ``reasoning_content`` (or ``reasoning``) of a chat answer is kept as
  ``Completion.reasoning``; the generate stage wraps it in ``<think>`` tags.
- **streaming** (``stream=True``): the request asks for server-sent events (``"stream": true``, with
  ``stream_options.include_usage`` for exact token counts) and the answer is put together from the
  deltas (``content``, ``reasoning_content``/``reasoning``, ``text``, per choice ``index``). A streamed
  request has no overall deadline, since a 32K-token reasoning trace takes many minutes and a
  deadline would drop exactly the longest traces (biasing SFT towards short ones); instead it fails when
  ``stream_idle_timeout_s`` pass without a data event (connecting and the headers count too; the
  servers' ``: ping`` keep-alive comments do not). A stream that ends before ``[DONE]`` with a choice
  unfinished, or that carries an ``error`` event, is a retryable failure. A server that answers a
  streamed request with one JSON body is read as usual (each read bounded by the idle timeout).
  llama-cpp-python's server must run with ``--interrupt_requests False`` for concurrent streams: by
  default a new request ends the stream in progress with an empty "stop" answer.
- **limits**: at most ``concurrency`` requests in flight (a thread pool); without streaming, a hard
  per-request deadline of ``request_timeout_s`` (connect, headers and every read count against it, so a
  server that trickles bytes is cut off too); a response body (or stream) over ``max_response_bytes`` is
  abandoned mid-stream.
- **retries**: HTTP 408/409/425/429 and 5xx, timeouts, connection errors and unparseable 200 answers
  are retried up to ``max_retries`` times with exponential backoff and jitter (``Retry-After`` is
  honoured, capped at ``max_backoff_s``). 401/403/404 stop the whole run at once (a wrong key, model or
  URL fails every request the same way). Anything else, and a request that is still failing after its
  retries, becomes failed samples: ``Completion(finish_reason="error", error=...)``, written as rollout
  records so they are counted and dropped by the filter (reason ``engine_error``), never trained on.
- **metrics** (a ``StageMetrics``): ``generate_requests_total`` per attempt,
  ``generate_http_errors_total{code}`` per failed attempt and ``generate_http_retries_total{code}`` per
  retry, where code is the HTTP status or ``timeout``, ``connection``, ``bad_response``, ``too_large``,
  ``stream_error``.
- **API key**: ``THINKFORGE_TEACHER_API_KEY``, or the file named by ``THINKFORGE_TEACHER_API_KEY_FILE``
  (a mounted Kubernetes secret). It is sent as ``Authorization: Bearer``, is not part of ``repr()``,
  and is masked in every message this module logs, raises or stores (a key read from a file is also
  registered with ``thinkforge.progress.add_secret``, so every log line of the process masks it, as
  it masks secrets held in the environment).
- **key allowlist**: the key goes only to allowed hosts; the engine refuses, before any request, to
  start with a key and an endpoint outside them (``EngineError`` naming the endpoint, the host and
  ``cluster.teacher_hosts``). The list is ``allowed_hosts``, else ``THINKFORGE_TEACHER_HOSTS``
  (comma-separated), which the compiled pipeline sets on the generate and evaluate pods as a constant:
  ``cluster.teacher_hosts``, or when that is empty the compiled recipe's own endpoints, so a run
  parameter that points ``generate.endpoint`` elsewhere cannot take the key with it. Entries match
  exactly: ``host:port`` means https (or http to a loopback host), ``http://host:port`` plain http to
  that host; an endpoint with credentials in it is refused outright. An empty list allows loopback
  only. With no list at all the key goes, outside a pod (a local run), to a loopback or an https
  endpoint, never in clear text over a network; in a pod, to loopback only. Without a key nothing is checked. Redirects are never
  followed: a 3xx answer stops the run (``EngineError``), so the key never reaches the URL it names.
- **token counts**: exact from ``usage.completion_tokens`` when a request returns one choice; with
  several choices, counted with ``tokenizer`` when given, else ``usage`` split by character length
  (when the server sends no usage: the number of text chunks of a streamed choice, else ~4 characters
  per token).
- **proxies**: ``HTTP(S)_PROXY``/``NO_PROXY`` are honoured (no proxy authentication).

Connections are kept alive per worker thread.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from thinkforge.config import key_allowed, teacher_host
from thinkforge.engines.base import Completion, SamplingParams, failed, stable_seed
from thinkforge.progress import add_secret
from thinkforge.templates import messages, render_prompt

log = logging.getLogger("thinkforge.engines.openai")

ENV_API_KEY = "THINKFORGE_TEACHER_API_KEY"
ENV_API_KEY_FILE = "THINKFORGE_TEACHER_API_KEY_FILE"
ENV_KEY_HOSTS = "THINKFORGE_TEACHER_HOSTS"  # the key allowlist, set on task pods when the pipeline compiles
KEY_HOSTS_FIELD = "cluster.teacher_hosts"
APIS = ("chat", "completions")
RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
FATAL_STATUS = frozenset({401, 403, 404})
_READ = 65536


def _read1(resp: http.client.HTTPResponse) -> bytes:
    """What has arrived, up to _READ bytes (read1 does not wait to fill the block)."""
    return resp.read1(_READ) if hasattr(resp, "read1") else resp.read(_READ)


_MASK = "***"


class EngineError(RuntimeError):
    """The endpoint cannot serve this run at all (bad key, unknown model, wrong URL, bad settings)."""


class _Fault(Exception):
    """One failed attempt: `code` labels the metric; retryable faults are tried again."""

    def __init__(self, code: str, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Request:
    prompt: int  # index into the problems of this call
    first: int  # first sample slot this request fills
    count: int  # samples asked for (the request's n)
    seed: int


def read_api_key(env: dict[str, str] | None = None) -> str:
    """The teacher API key from the environment, or from the file a Kubernetes secret mounts; "" if none."""
    env = os.environ if env is None else env
    key = env.get(ENV_API_KEY, "").strip()
    if key:
        return key
    path = env.get(ENV_API_KEY_FILE, "").strip()
    if not path:
        return ""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise EngineError(f"{ENV_API_KEY_FILE}={path}: cannot read the API key file ({e.strerror})") from None
    if not key:
        raise EngineError(f"{ENV_API_KEY_FILE}={path}: the API key file is empty")
    add_secret(key)  # the environment holds only the path: mask the value in every log line too
    return key


def key_hosts(env: dict[str, str] | None = None) -> list[str] | None:
    """The key allowlist of this process: THINKFORGE_TEACHER_HOSTS (normalized), or None when unset."""
    env = os.environ if env is None else env
    if ENV_KEY_HOSTS not in env:
        return None
    try:
        return [teacher_host(h) for h in env[ENV_KEY_HOSTS].split(",") if h.strip()]
    except ValueError as e:
        raise EngineError(f"{ENV_KEY_HOSTS}: {e}") from None


def _base_url(endpoint: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path) of an endpoint; a bare host gets /v1."""
    if not endpoint:
        raise EngineError("engine 'openai' needs generate.endpoint: the base URL of an OpenAI-compatible "
                          "server, e.g. http://vllm.teacher.svc:8000/v1")
    u = urlsplit(endpoint)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise EngineError(f"generate.endpoint {endpoint!r}: expected an http(s):// URL such as http://host:8000/v1")
    if u.username or u.password:
        raise EngineError("generate.endpoint must not carry credentials; set "
                          f"{ENV_API_KEY} or {ENV_API_KEY_FILE} instead")
    port = u.port or (443 if u.scheme == "https" else 80)
    path = u.path.rstrip("/") or "/v1"
    return u.scheme, u.hostname, port, path


class OpenAIEngine:
    """Samples from an OpenAI-compatible server; see the module docstring for the contract."""

    def __init__(self, endpoint: str, model: str, template: Any, *, api: str = "chat", concurrency: int = 8,
                 request_timeout_s: float = 600.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, max_response_bytes: int = 16 << 20, fan_out: bool = False,
                 tokenizer: Any = None, metrics: Any = None, api_key: str | None = None, seed: int = 0,
                 extra_body: dict[str, Any] | None = None, stream: bool = False,
                 stream_idle_timeout_s: float = 300.0, allowed_hosts: list[str] | None = None):
        if api not in APIS:
            raise EngineError(f"api {api!r}: expected one of {', '.join(APIS)}")
        for name, value, low in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0),
                                 ("max_response_bytes", max_response_bytes, 1024)):
            if value < low:
                raise EngineError(f"{name} must be >= {low}, got {value}")
        if request_timeout_s <= 0:
            raise EngineError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if stream_idle_timeout_s <= 0:
            raise EngineError(f"stream_idle_timeout_s must be > 0, got {stream_idle_timeout_s}")
        self.scheme, self.host, self.port, self.base_path = _base_url(endpoint)
        if not model:
            raise EngineError("engine 'openai' needs generate.endpoint_model: the model name the server serves "
                              "(vLLM: --served-model-name)")
        self.endpoint = endpoint
        self.model = model
        self.template = template
        self.api = api
        self.concurrency = concurrency
        self.request_timeout_s = float(request_timeout_s)
        self.stream = bool(stream)
        self.stream_idle_timeout_s = float(stream_idle_timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_response_bytes = max_response_bytes
        self.fan_out = fan_out
        self.metrics = metrics
        self.seed = seed
        self.extra_body = dict(extra_body or {})
        self._tokenizer_spec = tokenizer if isinstance(tokenizer, str) else None
        self._tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self._tokenizer_lock = threading.Lock()  # the request threads load it once, not each at once
        self.__key = read_api_key() if api_key is None else api_key
        if self.__key:
            self._check_key_host(allowed_hosts)
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._warned: set[str] = set()
        self._proxy = self._find_proxy()
        self._rng = random.Random()  # jitter only; never affects what is sampled
        self._pool: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:  # never the key
        return (f"OpenAIEngine(endpoint={self.endpoint!r}, model={self.model!r}, api={self.api!r}, "
                f"concurrency={self.concurrency}, stream={self.stream}, key={'set' if self.__key else 'none'})")

    def _check_key_host(self, allowed_hosts: list[str] | None) -> None:
        """Refuse to start with a key and an endpoint off the key allowlist (before any request)."""
        try:
            allowed = key_hosts() if allowed_hosts is None else [teacher_host(h) for h in allowed_hosts]
        except ValueError as e:
            raise EngineError(f"{KEY_HOSTS_FIELD}: {e}") from None
        in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if key_allowed(self.scheme, self.host, self.port, allowed, in_pod=in_pod):
            return
        where = f"{self.scheme}://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"
        if allowed is None and not in_pod:
            rule = ("no allowlist is set, so the key goes only to https or loopback endpoints; list the host in "
                    f"{ENV_KEY_HOSTS} (e.g. http://host:port) to send it over plain http")
        else:
            shown = ", ".join(allowed or ()) or "empty: loopback only"
            rule = (f"it is not on the key allowlist {KEY_HOSTS_FIELD} [{shown}], fixed when the pipeline was "
                    "compiled (a run parameter cannot widen it): add the host to cluster.teacher_hosts (chart: "
                    "teacher.allowedHosts) and upload a new pipeline version, or run this endpoint without a key")
        raise EngineError(f"generate.endpoint/evaluate.endpoint {self._scrub(self.endpoint)!r}: refusing to send the "
                          f"teacher API key to {where}: {rule}")

    # -- public ---------------------------------------------------------------------------------

    def generate(self, problems: list[str], params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> list[list[Completion]]:
        n = params.n
        slots: list[list[Completion | None]] = [[None] * n for _ in problems]
        missing = [n] * len(problems)

        def one_by_one(p: int, ks: range) -> list[_Request]:  # one sample per request, each its own seed
            return [_Request(p, k, 1, stable_seed(params.seed, problems[p], k)) for k in ks]

        queue: deque[_Request] = deque()
        for p, text in enumerate(problems):
            if self.fan_out:
                queue.extend(one_by_one(p, range(n)))
            else:
                queue.append(_Request(p, 0, n, stable_seed(params.seed, text, 0)))
        pool = self._get_pool()
        inflight: dict[Future, _Request] = {}
        try:
            def fill() -> None:
                while queue and len(inflight) < self.concurrency:
                    req = queue.popleft()
                    if self.fan_out and req.count > 1:  # learned meanwhile that the server ignores n
                        queue.extendleft(reversed(one_by_one(req.prompt, range(req.first, req.first + req.count))))
                        continue
                    inflight[pool.submit(self._request, problems[req.prompt], req, params)] = req

            fill()
            while inflight:
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    req = inflight.pop(fut)
                    comps = fut.result()  # EngineError propagates: the run cannot go on
                    comps = comps[: req.count]
                    for k, c in enumerate(comps):
                        slots[req.prompt][req.first + k] = c
                    if len(comps) < req.count:
                        # The server answered with fewer choices than asked: it ignores `n`.
                        if not self.fan_out:
                            log.info("endpoint returned %d of %d choices: requesting samples one by one",
                                     len(comps), req.count)
                        self.fan_out = True
                        queue.extend(one_by_one(req.prompt, range(req.first + len(comps), req.first + req.count)))
                    missing[req.prompt] -= len(comps)
                    if missing[req.prompt] == 0 and progress is not None:
                        progress(1)
                fill()
        finally:
            if inflight:  # an error stopped the run: let the requests in flight end (each has a deadline)
                wait(list(inflight))
        return [[c if c is not None else failed("no sample") for c in row] for row in slots]

    def _get_pool(self) -> ThreadPoolExecutor:
        # One pool for the engine's life: its threads keep their connections alive between calls.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-engine")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    # -- one request with retries -----------------------------------------------------------------

    def _body(self, problem: str, req: _Request, params: SamplingParams) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "n": req.count,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "seed": req.seed,
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.api == "chat":
            body["messages"] = messages(problem, self.template)
        else:
            body["prompt"] = render_prompt(self._get_tokenizer(), problem, self.template)
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _request(self, problem: str, req: _Request, params: SamplingParams) -> list[Completion]:
        body = self._body(problem, req, params)
        attempt = 0
        while True:
            self._metric("generate_requests_total")
            try:
                data = self._post(body)
                return self._parse(data, req.count)
            except _Fault as f:
                self._metric("generate_http_errors_total", code=f.code)
                if not f.retryable or attempt >= self.max_retries:
                    why = f"{f.code}: {f.message}" + (f" (after {attempt} retries)" if attempt else "")
                    self._warn_once(f"fail-{f.code}", "endpoint request failed, %s samples lost: %s", req.count, why)
                    return [failed(self._scrub(why)) for _ in range(req.count)]
                attempt += 1
                self._metric("generate_http_retries_total", code=f.code)
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                delay = delay / 2 + self._rng.uniform(0, delay / 2)  # equal jitter
                if f.retry_after is not None:
                    delay = max(delay, min(f.retry_after, self.max_backoff_s))
                log.debug("retry %d/%d in %.2fs after %s", attempt, self.max_retries, delay, f.code)
                time.sleep(delay)

    # -- HTTP -------------------------------------------------------------------------------------

    def _find_proxy(self) -> tuple[str, int] | None:
        if self.host in ("localhost", "::1") or self.host.startswith("127."):
            return None
        try:
            if urllib.request.proxy_bypass(self.host):
                return None
        except Exception:  # noqa: BLE001
            pass
        url = urllib.request.getproxies().get(self.scheme)
        if not url:
            return None
        u = urlsplit(url if "://" in url else f"http://{url}")
        return (u.hostname, u.port or 80) if u.hostname else None

    def _new_conn(self, timeout: float) -> http.client.HTTPConnection:
        target = self._proxy or (self.host, self.port)
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                target[0], target[1], timeout=timeout, context=ssl.create_default_context())
            if self._proxy:
                conn.set_tunnel(self.host, self.port)
        else:
            conn = http.client.HTTPConnection(target[0], target[1], timeout=timeout)
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _path(self) -> str:
        path = f"{self.base_path}/{'chat/completions' if self.api == 'chat' else 'completions'}"
        if self._proxy and self.scheme == "http":  # a plain HTTP proxy takes the absolute URL
            return f"http://{self.host}:{self.port}{path}"
        return path

    def _post(self, body: bytes) -> dict[str, Any]:
        stream = self.stream
        # Streamed: no overall deadline, but every wait (connect, headers, data) is bounded by the idle timeout.
        deadline = None if stream else time.monotonic() + self.request_timeout_s

        def budget() -> float:
            return self.stream_idle_timeout_s if deadline is None else self._remaining(deadline)

        headers = {"Content-Type": "application/json",
                   "Accept": "text/event-stream, application/json" if stream else "application/json",
                   "User-Agent": "thinkforge"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        for fresh_try in (False, True):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None and not fresh_try
            started = False
            try:
                if not reused:
                    self._drop_conn()
                    conn = self._new_conn(budget())
                    self._local.conn = conn
                elif conn.sock is not None:
                    conn.sock.settimeout(budget())
                conn.request("POST", self._path(), body=body, headers=headers)
                sock = conn.sock
                if sock is not None:
                    sock.settimeout(budget())
                resp = conn.getresponse()
                started = True
                ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
                if stream and resp.status == 200 and ctype == "text/event-stream":
                    data = self._read_events(resp, sock)
                    if resp.will_close:
                        self._drop_conn()
                    return data
                raw = self._read_body(resp, sock, budget)
                if resp.will_close:
                    self._drop_conn()
                return self._decode(resp.status, raw, resp)
            except _Fault:
                self._drop_conn()
                raise
            except (socket.timeout, TimeoutError):
                self._drop_conn()
                why = (f"no data for {self.stream_idle_timeout_s:g} s (stream_idle_timeout_s)" if stream
                       else f"no complete answer within {self.request_timeout_s:g} s")
                raise _Fault("timeout", why, True) from None
            except (http.client.HTTPException, OSError) as e:
                self._drop_conn()
                # A kept-alive connection the server closed while idle: try once more on a fresh one.
                if reused and not started and isinstance(
                        e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    continue
                raise _Fault("connection", f"{type(e).__name__}: {self._scrub(str(e))[:200]}", True) from None
        raise AssertionError("unreachable")

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline")
        return left

    def _read_body(self, resp: http.client.HTTPResponse, sock: Any, budget: Callable[[], float]) -> bytes:
        cap = self.max_response_bytes
        length = resp.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > cap:
            raise _Fault("too_large", f"response of {int(length)} bytes exceeds max_response_bytes={cap}", False)
        chunks = list(self._blocks(resp, sock, budget, "response"))  # budget() raises once a deadline passed
        total = sum(map(len, chunks))
        if getattr(resp, "length", None):  # Content-Length promised more than arrived
            raise _Fault("connection", f"answer cut off after {total} bytes ({resp.length} missing)", True)
        resp.close()  # read1 leaves a fully read response open; the kept-alive connection needs it closed
        return b"".join(chunks)

    def _blocks(self, resp: http.client.HTTPResponse, sock: Any, left: Callable[[], float], what: str) -> Iterator[bytes]:
        """The response's blocks as they arrive, each read within the seconds `left()` gives (it raises
        socket.timeout when none are left); abandoned once past max_response_bytes."""
        cap, total = self.max_response_bytes, 0
        while True:
            wait = left()
            if sock is not None:
                sock.settimeout(wait)
            block = _read1(resp)
            if not block:
                return
            total += len(block)
            if total > cap:
                raise _Fault("too_large", f"{what} exceeds max_response_bytes={cap}; abandoned mid-stream", False)
            yield block

    def _read_events(self, resp: http.client.HTTPResponse, sock: Any) -> dict[str, Any]:
        """A server-sent-event stream of completion chunks, put together into one non-streamed answer
        (the shape `_parse` reads). Fails when `stream_idle_timeout_s` pass without a data event."""
        idle = self.stream_idle_timeout_s
        choices: dict[int, dict[str, Any]] = {}
        usage: dict[str, Any] | None = None
        pending = b""
        data: list[bytes] = []
        total = 0
        last_data = time.monotonic()
        done = False

        def left() -> float:  # the idle budget: only data events count as progress
            wait = idle - (time.monotonic() - last_data)
            if wait <= 0:
                raise socket.timeout("idle")
            return wait

        for block in self._blocks(resp, sock, left, "stream"):
            total += len(block)
            pending += block
            while not done:
                nl = pending.find(b"\n")
                if nl < 0:
                    break
                line, pending = pending[:nl].rstrip(b"\r"), pending[nl + 1:]
                if line.startswith(b":"):  # a comment: keep-alive pings are not progress
                    continue
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                    continue
                if line or not data:  # other fields (event:, id:, retry:), or a blank line between events
                    continue
                payload, data = b"\n".join(data), []
                last_data = time.monotonic()
                if payload.strip() == b"[DONE]":
                    done = True
                else:
                    usage = self._stream_event(payload, choices) or usage
            if done:
                break
        if done:  # read the rest of the response (the chunked terminator) so the connection can be reused
            try:
                if sock is not None:
                    sock.settimeout(min(idle, 5.0))
                while _read1(resp):
                    pass
            except (OSError, http.client.HTTPException):
                self._drop_conn()  # the server kept the answer open after [DONE]: do not reuse this connection
        elif not choices or any(c["finish"] is None for c in choices.values()):
            raise _Fault("connection", f"stream ended before [DONE] after {total} bytes", True)
        resp.close()
        out = []
        for i in sorted(choices):
            c = choices[i]
            if self.api == "chat":
                out.append({"index": i, "finish_reason": c["finish"], "_deltas": c["deltas"],
                            "message": {"role": "assistant", "content": "".join(c["text"]),
                                        "reasoning_content": "".join(c["reasoning"])}})
            else:
                out.append({"index": i, "text": "".join(c["text"]), "finish_reason": c["finish"],
                            "_deltas": c["deltas"]})
        return {"choices": out, "usage": usage or {}}

    def _stream_event(self, payload: bytes, choices: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        """Add one chunk's deltas to `choices`; return its usage, if it carries one."""
        try:
            ev = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Fault("bad_response", f"unparseable stream event ({len(payload)} bytes): {e}", True) from None
        if not isinstance(ev, dict):
            raise _Fault("bad_response", f"expected a JSON object in the stream, got {type(ev).__name__}", True)
        if "error" in ev or ev.get("object") == "error":
            err = ev.get("error", ev)
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise _Fault("stream_error", f"error event mid-stream: {self._scrub(str(msg))[:300]}", True)
        for ch in ev.get("choices") or ():
            if not isinstance(ch, dict):
                raise _Fault("bad_response", "stream event has malformed choices", True)
            idx = ch.get("index", 0) if isinstance(ch.get("index"), int) else 0
            slot = choices.setdefault(idx, {"text": [], "reasoning": [], "finish": None, "deltas": 0})
            if self.api == "chat":
                delta = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
                content, reasoning = delta.get("content"), delta.get("reasoning_content") or delta.get("reasoning")
            else:
                content, reasoning = ch.get("text"), None
            if isinstance(content, str):
                slot["text"].append(content)
            if isinstance(reasoning, str):
                slot["reasoning"].append(reasoning)
            slot["deltas"] += bool(content or reasoning)
            if ch.get("finish_reason") is not None:
                slot["finish"] = ch["finish_reason"]
        usage = ev.get("usage")
        return usage if isinstance(usage, dict) else None

    def _decode(self, status: int, raw: bytes, resp: http.client.HTTPResponse) -> dict[str, Any]:
        if status == 200:
            try:
                data = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Fault("bad_response", f"unparseable JSON answer ({len(raw)} bytes): {e}", True) from None
            if not isinstance(data, dict):
                raise _Fault("bad_response", f"expected a JSON object, got {type(data).__name__}", True)
            return data
        message = self._server_message(raw)
        code = str(status)
        if 300 <= status < 400:  # never followed: the key must not go to the URL a server names
            try:
                loc = urlsplit(resp.getheader("Location") or "")
                to = f" to {loc.scheme}://{loc.hostname}:{loc.port or ''}".rstrip(":") if loc.hostname else ""
            except ValueError:
                to = ""
            raise EngineError(f"endpoint {self._scrub(self.endpoint)} answered HTTP {status}, a redirect"
                              f"{self._scrub(to)}: redirects are not followed (the teacher API key would go with "
                              "it); set generate.endpoint to the server's own URL")
        if status in FATAL_STATUS:
            hint = {401: f"check {ENV_API_KEY} / {ENV_API_KEY_FILE}",
                    403: f"check {ENV_API_KEY} / {ENV_API_KEY_FILE} and the key's permissions",
                    404: f"check generate.endpoint (base URL, usually ending in /v1) and "
                         f"generate.endpoint_model ({self.model!r})"}[status]
            raise EngineError(f"endpoint {self.endpoint} answered HTTP {status}: {message} ({hint})")
        retryable = status in RETRY_STATUS or 500 <= status < 600
        after = _retry_after(resp.getheader("Retry-After")) if retryable else None
        raise _Fault(code, f"HTTP {status}: {message}", retryable, after)

    def _server_message(self, raw: bytes) -> str:
        text = raw[:4096].decode("utf-8", "replace")
        try:
            data = json.loads(text)
            err = data.get("error", data) if isinstance(data, dict) else data
            if isinstance(err, dict):
                text = str(err.get("message") or err)
            else:
                text = str(err)
        except (json.JSONDecodeError, AttributeError):
            pass
        return self._scrub(" ".join(text.split()))[:300] or "(empty body)"

    # -- answers ------------------------------------------------------------------------------

    def _parse(self, data: dict[str, Any], want: int) -> list[Completion]:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _Fault("bad_response", "answer has no choices", True)
        if not all(isinstance(c, dict) for c in choices):
            raise _Fault("bad_response", "answer has malformed choices", True)
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)[:want]
        parsed: list[tuple[str, str, str] | None] = []
        for ch in choices:
            if self.api == "chat":
                msg = ch.get("message")
                text = msg.get("content") if isinstance(msg, dict) else None
                reasoning = (msg.get("reasoning_content") or msg.get("reasoning") or "") if isinstance(msg, dict) else ""
                text = "" if text is None and isinstance(msg, dict) and reasoning else text
            else:
                text, reasoning = ch.get("text"), ""
            if not isinstance(text, str) or not isinstance(reasoning, str):
                parsed.append(None)
                continue
            parsed.append((text, reasoning, _finish(ch.get("finish_reason"))))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        total = usage.get("completion_tokens")
        total = total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None
        lengths = [len(p[0]) + len(p[1]) if p else 0 for p in parsed]
        out = []
        for i, p in enumerate(parsed):
            if p is None:
                out.append(failed("bad_response: malformed choice"))
                continue
            text, reasoning, finish = p
            if finish == "error":
                out.append(Completion(text=text, num_tokens=0, finish_reason="error", reasoning=reasoning,
                                      error=f"finish_reason {choices[i].get('finish_reason')!r}"))
                continue
            deltas = choices[i].get("_deltas")  # streamed: chunks that carried text (~ one token each)
            out.append(Completion(text=text, num_tokens=self._count(text, reasoning, total, lengths, i, len(parsed),
                                                                    deltas if isinstance(deltas, int) else None),
                                  finish_reason=finish, reasoning=reasoning))
        return out

    def _count(self, text: str, reasoning: str, total: int | None, lengths: list[int], i: int, k: int,
               deltas: int | None = None) -> int:
        if total is not None and k == 1:
            return total
        tok = self._get_tokenizer()
        if tok is not None:
            return len(tok.encode(reasoning + text, add_special_tokens=False))
        if total is not None and sum(lengths):
            return round(total * lengths[i] / sum(lengths))
        if deltas:  # a stream without usage: servers send about one token per chunk
            return deltas
        return max(1, round((len(text) + len(reasoning)) / 4)) if (text or reasoning) else 0

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None and self._tokenizer_spec:
            # Request threads ask for it together; two loading at once raced in transformers' lazy imports
            # ("cannot import name 'AutoTokenizer'"), seen with concurrency 2 against a vLLM server.
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    from thinkforge.models import load_tokenizer

                    self._tokenizer = load_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    # -- helpers ----------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self.__key and self.__key in text:
            text = text.replace(self.__key, _MASK)
        return text

    def _metric(self, name: str, **labels: Any) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, **labels)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            log.debug(msg, *args)
        else:
            self._warned.add(key)
            log.warning(msg, *args)


def _finish(reason: Any) -> str:
    """Map a server's finish_reason onto stop / length / error."""
    if reason == "length":
        return "length"
    if reason in (None, "stop", "eos", "eos_token", "end_turn", "stop_sequence"):
        return "stop"
    return "error"  # content_filter, abort, tool_calls, ...: not a usable chain of thought


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None
