"""Generation throughput of the transformers (HF) engine: the configured batch vs batch 1.

The same prompts (built-in word problems), the same sampling settings and seed, one loaded model:
first a short warm-up, then the batched run (one full batch of ``generate.batch_size`` sequences per
forward pass, as the generate stage uses it), then batch 1 on the first 16 of those prompts.
Throughput is real output tokens (up to and including
EOS; padding after a sequence ends is not counted, but its time is) per second of wall time.

    python benchmarks/bench_generation.py [--recipe recipes/cpu-demo.yaml] [--batch B] [--prompts P]
                                          [--max-new-tokens 64] [--rounds R] [--json out.json]

Defaults come from the recipe (model = generate.teacher or model.student, dtype, batch size,
temperature, top_p); flags override them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(engine, prompts, params) -> tuple[int, float, int]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(c.num_tokens for row in out for c in row)
    return tokens, seconds, sum(c.finish_reason == "length" for row in out for c in row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu-demo.yaml"))
    ap.add_argument("--model", help="default: the recipe's generate.teacher or model.student")
    ap.add_argument("--batch", type=int, help="sequences per forward pass (default: generate.batch_size)")
    ap.add_argument("--prompts", type=int, help="prompts in the batched run (default: enough to fill one batch)")
    ap.add_argument("--baseline-prompts", type=int, default=16,
                    help="prompts in the batch-1 run (its rate does not depend on how many)")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", help="default: generate.dtype")
    ap.add_argument("--rounds", type=int, default=1, help="alternate batched / batch-1 runs this many times")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    import torch

    from thinkforge.config import load_recipe
    from thinkforge.engines import SamplingParams
    from thinkforge.engines.hf import HFEngine
    from thinkforge.sources import word_problems

    cfg = load_recipe(args.recipe)
    g = cfg.generate
    model = args.model or g.teacher or cfg.model.student
    batch = args.batch or g.batch_size
    dtype = args.dtype or g.dtype
    n_prompts = args.prompts or max(1, batch // args.n)
    prompts = [p["problem"] for p in word_problems("train", max(n_prompts, args.baseline_prompts), seed=1)]
    baseline, prompts = prompts[:args.baseline_prompts], prompts[:n_prompts]
    params = SamplingParams(n=args.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=args.max_new_tokens,
                            seed=cfg.run.seed)
    t0 = time.perf_counter()
    engine = HFEngine(model, cfg.template, dtype=dtype, batch_size=batch)
    load_s = time.perf_counter() - t0
    print(f"{model} ({dtype}) loaded in {load_s:.1f} s; torch threads {torch.get_num_threads()}; "
          f"{len(prompts)} prompts x {args.n} batched, {len(baseline)} at batch 1, max {args.max_new_tokens} new "
          "tokens", flush=True)
    engine.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=8, seed=0))  # warm-up

    rates: dict[str, list[float]] = {"batched": [], "batch1": []}
    for r in range(args.rounds):  # alternate the two, so a busy spell on a shared machine hits both
        engine.batch_size = batch
        b_tok, b_s, b_len = run(engine, prompts, params)
        print(f"round {r + 1} batch {batch:3d}: {b_tok / b_s:8.1f} output tokens/s ({b_tok} tokens in {b_s:.1f} s, "
              f"{b_len} hit the limit)", flush=True)
        engine.batch_size = args.n  # one prompt per forward pass
        s_tok, s_s, s_len = run(engine, baseline, params)
        print(f"round {r + 1} batch   1: {s_tok / s_s:8.1f} output tokens/s ({s_tok} tokens in {s_s:.1f} s, "
              f"{s_len} hit the limit)", flush=True)
        rates["batched"].append(b_tok / b_s)
        rates["batch1"].append(s_tok / s_s)
    b_rate, s_rate = statistics.median(rates["batched"]), statistics.median(rates["batch1"])
    ratio = b_rate / s_rate
    print(f"batch {batch}: {b_rate:.1f} tokens/s, batch 1: {s_rate:.1f} tokens/s (median of {args.rounds}); "
          f"ratio batch {batch} / batch 1: {ratio:.2f}x")
    res = {"model": model, "dtype": dtype, "batch": batch, "prompts": len(prompts), "baseline_prompts": len(baseline),
           "n": args.n,
           "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "rounds": args.rounds, "batched_tokens_per_s": b_rate, "batch1_tokens_per_s": s_rate, "ratio": ratio,
           "per_round": rates,
           "load_seconds": load_s}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
