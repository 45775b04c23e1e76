"""Security: the teacher API key goes only to hosts on an allowlist fixed at install time.

`generate.endpoint` (and `evaluate.endpoint`) are run parameters: anyone who can start a run from the
KFP UI can point them anywhere. The key (the `cluster.teacher_secret` Secret) must not follow:

- the compiled pipeline carries the allowlist (`cluster.teacher_hosts`, or the compiled recipe's own
  endpoints) as constants (the configure task's input and THINKFORGE_TEACHER_HOSTS on the generate and
  evaluate pods), never as a run parameter;
- the openai engine refuses, before any request, to start with a key and an endpoint off the list (a
  loopback server records that no request, let alone an Authorization header, arrived); a listed host
  gets the key (positive control); an endpoint without a key is unaffected;
- host matching is exact: no suffix, userinfo, fragment, port or scheme tricks;
- a redirect to another port carries no key (the engine follows none; a urllib client, the positive
  control, would have forwarded it);
- the chart's `teacher.allowedHosts` (plus its own teacher Service) reaches the upload Job's compile as
  `--set cluster.teacher_hosts=...`, and the pipeline compiled from those arguments enforces it;
- a key read from a mounted file is masked in log lines as environment secrets are.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from reliability_helpers import ROOT

from thinkforge.config import ConfigError, TemplateConfig, key_allowed, load_recipe, teacher_host
from thinkforge.engines.base import SamplingParams
from thinkforge.engines.openai import ENV_API_KEY, ENV_API_KEY_FILE, ENV_KEY_HOSTS, EngineError, OpenAIEngine
from chart_helpers import set_flags

KEY = "sk-teacherkey-allowlist-7c41e9"
ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "\\boxed{4}"}, "finish_reason": "stop"}],
          "usage": {"completion_tokens": 3}}


class Recorder:
    """A loopback HTTP server that records each request's path and Authorization header; answers a chat
    completion, or redirects (307) to `redirect_to`."""

    def __init__(self, redirect_to: str = ""):
        self.seen: list[tuple[str, str | None]] = []
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                rec.seen.append((self.path, self.headers.get("Authorization")))
                if redirect_to:
                    self.send_response(307)
                    self.send_header("Location", redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(ANSWER).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Recorder()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_API_KEY, ENV_API_KEY_FILE, ENV_KEY_HOSTS, "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)


def engine(url: str, **kw: Any) -> OpenAIEngine:
    return OpenAIEngine(f"{url}/v1", "teacher", TemplateConfig(), stream=False, max_retries=0, **kw)


def ask(eng: OpenAIEngine) -> Any:
    try:
        return eng.generate(["What is 2 + 2?"], SamplingParams(n=1, max_new_tokens=8, temperature=0.0, top_p=1.0))
    finally:
        eng.close()


def compiled(recipe: Any, tmp_path: Path) -> dict[str, Any]:
    from thinkforge.pipelines.training import compile_pipeline

    out = compile_pipeline(recipe, tmp_path / "pipeline.yaml")
    return next(yaml.safe_load_all(out.read_text()))  # the IR (the platform spec follows)


def key_env(ir: dict[str, Any]) -> dict[str, str | None]:
    """executor -> its THINKFORGE_TEACHER_HOSTS value (None: not set)."""
    out = {}
    for name, ex in ir["deploymentSpec"]["executors"].items():
        env = {e["name"]: e.get("value", "") for e in ex["container"].get("env", [])}
        out[name] = env.get(ENV_KEY_HOSTS)
    return out


# -- the compiled pipeline --------------------------------------------------------------------------


def test_compiled_pipeline_carries_the_allowlist_as_a_constant(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", {
        "cluster.teacher_secret": "tf-teacher", "generate.engine": "openai", "generate.endpoint_model": "teacher",
        "generate.endpoint": "http://tf-teacher.ml.svc:8000/v1",
        "cluster.teacher_hosts": '["http://tf-teacher.ml.svc:8000", "API.deepseek.com"]'})
    ir = compiled(recipe, tmp_path)
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert "generate__endpoint" in params  # the endpoint stays a run parameter ...
    assert not [p for p in params if "teacher_hosts" in p]  # ... its allowlist does not
    want = ["http://tf-teacher.ml.svc:8000", "api.deepseek.com:443"]
    assert ir["root"]["dag"]["tasks"]["configure"]["inputs"]["parameters"]["cluster__teacher_hosts"] == {
        "runtimeValue": {"constant": want}}
    env = key_env(ir)
    assert env["exec-generate"] == ",".join(want)
    assert {v for k, v in env.items() if k.startswith("exec-evaluate")} == {",".join(want)}
    assert {v for k, v in env.items() if not k.startswith(("exec-generate", "exec-evaluate"))} == {None}


def test_empty_allowlist_compiles_the_recipes_own_endpoint(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", {
        "cluster.teacher_secret": "tf-teacher", "generate.engine": "openai", "generate.endpoint_model": "teacher",
        "generate.endpoint": "https://api.deepseek.com/v1"})
    assert key_env(compiled(recipe, tmp_path))["exec-generate"] == "api.deepseek.com:443"
    # no endpoint in the recipe: an empty list, loopback only
    hf = load_recipe(ROOT / "recipes" / "smoke.yaml", {"cluster.teacher_secret": "tf-teacher"})
    assert key_env(compiled(hf, tmp_path))["exec-generate"] == ""


def test_compile_refuses_a_recipe_endpoint_off_its_own_list(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", {
        "cluster.teacher_secret": "tf-teacher", "generate.engine": "openai", "generate.endpoint_model": "teacher",
        "generate.endpoint": "https://api.other.example/v1", "cluster.teacher_hosts": '["api.deepseek.com"]'})
    with pytest.raises(ConfigError, match=r"generate\.endpoint .*api\.other\.example.*cluster\.teacher_hosts"):
        compiled(recipe, tmp_path)


@pytest.mark.parametrize("entry", ["*.example.com", "http://user@host", "host/v1", "ftp://host", ".example.com",
                                   "host:99999", ""])
def test_allowlist_entries_are_exact_hosts(entry):
    with pytest.raises(ConfigError, match=r"cluster\.teacher_hosts.*(exact host|expected host|Port|no host)"):
        load_recipe(ROOT / "recipes" / "smoke.yaml", {"cluster.teacher_hosts": [entry]})
    ok = load_recipe(ROOT / "recipes" / "smoke.yaml", {"cluster.teacher_hosts": ["API.x.example", "https://x.example/"]})
    assert ok.cluster.teacher_hosts == ["api.x.example:443", "x.example:443"]


# -- the engine ---------------------------------------------------------------------------------------


def test_run_parameter_endpoint_off_the_list_gets_no_key(server, monkeypatch):
    # THINKFORGE_TEACHER_HOSTS as the compiled pipeline sets it; generate.endpoint changed by a run parameter
    monkeypatch.setenv(ENV_KEY_HOSTS, "api.deepseek.com:443,http://tf-teacher.ml.svc:8000")
    monkeypatch.setenv(ENV_API_KEY, KEY)
    with pytest.raises(EngineError) as err:
        engine(server.url)
    msg = str(err.value)
    assert "generate.endpoint" in msg and f"127.0.0.1:{server.port}" in msg and "cluster.teacher_hosts" in msg
    assert "api.deepseek.com:443" in msg and KEY not in msg
    assert server.seen == []  # refused before any request
    # positive control: the same server, listed, gets the key
    monkeypatch.setenv(ENV_KEY_HOSTS, f"api.deepseek.com:443,127.0.0.1:{server.port}")
    assert ask(engine(server.url))[0][0].finish_reason == "stop"
    assert server.seen == [("/v1/chat/completions", f"Bearer {KEY}")]


def test_in_a_pod_an_empty_or_missing_list_allows_loopback_only(monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, KEY)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    for hosts in ("", None):
        if hosts is None:
            monkeypatch.delenv(ENV_KEY_HOSTS, raising=False)
        else:
            monkeypatch.setenv(ENV_KEY_HOSTS, hosts)
        with pytest.raises(EngineError, match="loopback only"):
            engine("https://api.deepseek.com")
        engine("http://127.0.0.1:9").close()  # constructing sends nothing


def test_outside_a_pod_without_a_list_the_key_never_travels_in_clear_text(monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, KEY)
    with pytest.raises(EngineError, match=f"plain http.*{ENV_KEY_HOSTS}|{ENV_KEY_HOSTS}.*plain http"):
        engine("http://teacher.lan:8000")
    engine("https://api.deepseek.com").close()
    engine("http://localhost:8000").close()
    monkeypatch.setenv(ENV_KEY_HOSTS, "http://teacher.lan:8000")
    engine("http://teacher.lan:8000").close()


def test_keyless_endpoint_is_unaffected(server, monkeypatch):
    monkeypatch.setenv(ENV_KEY_HOSTS, "api.deepseek.com:443")  # the server is not listed, but no key is sent
    assert ask(engine(server.url, api_key=""))[0][0].finish_reason == "stop"
    assert server.seen == [("/v1/chat/completions", None)]


@pytest.mark.parametrize("endpoint, allowed, ok", [
    ("https://api.deepseek.com/v1", ["api.deepseek.com"], True),
    ("https://API.DeepSeek.com/v1", ["api.deepseek.com"], True),
    ("https://api.deepseek.com.attacker.example/v1", ["api.deepseek.com"], False),  # suffix
    ("https://evil-api.deepseek.com/v1", ["api.deepseek.com"], False),
    ("https://deepseek.com/v1", ["api.deepseek.com"], False),
    ("https://api.deepseek.com:8443/v1", ["api.deepseek.com"], False),  # port
    ("http://api.deepseek.com/v1", ["api.deepseek.com"], False),  # plain http to a https entry
    ("https://api.deepseek.com./v1", ["api.deepseek.com"], False),  # trailing dot
    ("https://evil.example#@api.deepseek.com/v1", ["api.deepseek.com"], False),  # fragment
    ("https://evil.example/api.deepseek.com", ["api.deepseek.com"], False),  # path
    ("http://tf-teacher.ml.svc:8000/v1", ["http://tf-teacher.ml.svc:8000"], True),
    ("http://tf-teacher.ml.svc:8001/v1", ["http://tf-teacher.ml.svc:8000"], False),
    ("http://127.0.0.1:8000/v1", ["127.0.0.1:8000"], True),  # loopback http under a bare entry
    ("http://127.0.0.1:8000/v1", ["api.deepseek.com"], False),  # a list is exact, loopback included
])
def test_host_matching_is_exact(endpoint, allowed, ok, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, KEY)
    if ok:
        OpenAIEngine(endpoint, "teacher", TemplateConfig(), allowed_hosts=allowed).close()  # sends nothing
    else:
        with pytest.raises(EngineError, match="refusing to send the teacher API key"):
            OpenAIEngine(endpoint, "teacher", TemplateConfig(), allowed_hosts=allowed)


@pytest.mark.parametrize("endpoint", ["http://api.deepseek.com@evil.example", "http://api.deepseek.com:x@evil.example",
                                      "https://api.deepseek.com\\@evil.example"])
def test_userinfo_tricks_are_refused(endpoint, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, KEY)
    with pytest.raises(EngineError):
        engine(endpoint, allowed_hosts=["api.deepseek.com", "http://api.deepseek.com:80"])
    assert not key_allowed("https", "evil.example", 443, [teacher_host("api.deepseek.com")])


def test_redirect_to_another_port_carries_no_key(monkeypatch):
    target = Recorder()
    front = Recorder(redirect_to=target.url)
    try:
        # positive control: urllib follows the redirect and forwards the header to the other port
        req = urllib.request.Request(f"{front.url}/probe", headers={"Authorization": f"Bearer {KEY}"})
        urllib.request.urlopen(req, timeout=10).read()
        assert target.seen == [("/probe", f"Bearer {KEY}")]
        target.seen.clear()
        front.seen.clear()

        monkeypatch.setenv(ENV_API_KEY, KEY)
        monkeypatch.setenv(ENV_KEY_HOSTS, f"127.0.0.1:{front.port}")
        with pytest.raises(EngineError, match=f"HTTP 307, a redirect to http://127.0.0.1:{target.port}") as err:
            ask(engine(front.url))
        assert "not followed" in str(err.value) and KEY not in str(err.value)
        assert front.seen == [("/v1/chat/completions", f"Bearer {KEY}")]
        assert target.seen == []  # the key stayed with the listed host
    finally:
        front.close()
        target.close()


# -- the chart ------------------------------------------------------------------------------------------


def _upload_args(values: dict[str, Any]) -> list[str]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")
    with helm.Chart.load(ROOT / "helm" / "thinkforge") as c:
        out = c.render(values=values, name="tf", namespace="ml-team", is_install=True)
    job = next(yaml.safe_load(v) for k, v in out.items() if k.endswith("upload/job.yaml"))
    (upload,) = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "upload"]
    return upload["args"]


def test_chart_allowlist_reaches_the_compiled_pipeline(tmp_path):
    from thinkforge.config import parse_set_flags

    assert not [s for s in set_flags(_upload_args({})) if "teacher_hosts" in s]  # no teacher, no list: the recipe's own
    teacher = "http://tf-thinkforge-teacher.ml-team.svc:8000"
    assert f'cluster.teacher_hosts=["{teacher}"]' in set_flags(_upload_args({"teacher": {"enabled": True}}))
    args = _upload_args({"teacher": {"enabled": True, "allowedHosts": ["api.deepseek.com"]}})
    sets = set_flags(args)
    assert f'cluster.teacher_hosts=["{teacher}","api.deepseek.com"]' in sets
    # the upload Job's own arguments compile into a pipeline whose generate pod carries the list
    recipe = load_recipe(ROOT / args[args.index("--recipe") + 1].removeprefix("/app/"), parse_set_flags(sets))
    assert key_env(compiled(recipe, tmp_path))["exec-generate"] == f"{teacher},api.deepseek.com:443"


def test_chart_schema_refuses_a_wildcard_host():
    with pytest.raises(Exception, match="allowedHosts"):
        _upload_args({"teacher": {"allowedHosts": ["*.deepseek.com"]}})


# -- redaction of a key read from a file -------------------------------------------------------------


def test_key_from_a_mounted_file_is_masked_in_logs(tmp_path, monkeypatch):
    import io

    from thinkforge.engines.openai import read_api_key
    from thinkforge.progress import configure_logging, redact

    secret = "sk-from-mounted-file-55d2a1"
    (tmp_path / "api-key").write_text(secret + "\n")
    monkeypatch.setenv(ENV_API_KEY_FILE, str(tmp_path / "api-key"))
    assert redact(f"x {secret} y") == f"x {secret} y"  # nothing in the environment names it
    assert read_api_key() == secret
    assert redact(f"x {secret} y") == "x *** y"
    root = logging.getLogger("thinkforge")
    saved = (list(root.handlers), root.propagate, root.level)
    out = io.StringIO()
    try:
        configure_logging("run-1", "generate", stream=out)
        logging.getLogger("thinkforge.test").warning("header was Bearer %s", secret)
    finally:
        root.handlers[:], root.propagate = saved[0], saved[1]
        root.setLevel(saved[2])
    assert "Bearer ***" in out.getvalue() and secret not in out.getvalue()


def test_kfp_token_from_a_file_is_masked_in_logs(tmp_path):
    from thinkforge.cluster import read_token
    from thinkforge.progress import redact

    token = "eyJkfp-sa-token-from-file-9a0c"
    (tmp_path / "token").write_text(token)
    assert read_token([str(tmp_path / "token")]) == token
    assert token not in redact(f"Authorization: Bearer {token}")
