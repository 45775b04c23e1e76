"""Trainer overhead: tokens/s of the SFT stage (TRL SFTTrainer, thinkforge settings) vs a plain PyTorch
training loop on the same model, data and batch shape, same run.

    python benchmarks/bench_trainer.py [--model random:llama-small] [--steps 30] [--batch 4] [--json out.json]

Both count non-padding tokens and time only the optimizer steps (model loading excluded).
Goal: stage >= 0.9x the plain loop.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    from thinkforge.config import Recipe
    from thinkforge.models import load_model, load_tokenizer, resolve
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.stages.sft import sft
    from thinkforge.templates import render_prompt, render_target

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    n = args.steps * args.batch
    probs = load_problems(f"builtin:word-problems?split=train&n={n}&solutions=1")
    write_jsonl(work / "sft.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                                     for p in probs])
    cfg = Recipe()
    cfg.template.think = False
    cfg.sft = cfg.sft.model_copy(update={"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1e-4,
                                         "logging_steps": args.steps, "max_length": 512})
    path = str(resolve(args.model))

    result = sft(cfg, path, work / "sft.jsonl", work / "out")
    final = [h for h in result.history if "train_runtime" in h][-1]
    tokens = [h for h in result.history if "num_tokens" in h][-1]["num_tokens"]
    stage_tps = tokens / final["train_runtime"]

    # The baseline: the same examples, batches and loss mask (completion tokens), by hand.
    tok = load_tokenizer(path)
    model = load_model(path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    examples = []
    for p in probs:
        prompt = tok(render_prompt(tok, p["problem"], cfg.template), add_special_tokens=False)["input_ids"]
        full = tok(render_prompt(tok, p["problem"], cfg.template) + render_target(tok, p["completion"]),
                   add_special_tokens=False)["input_ids"]
        examples.append((full, len(prompt)))
    seen = 0
    start = time.perf_counter()
    for i in range(0, n, args.batch):
        batch = examples[i:i + args.batch]
        width = max(len(f) for f, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (full, plen) in enumerate(batch):
            ids[j, :len(full)] = torch.tensor(full)
            labels[j, plen:len(full)] = torch.tensor(full[plen:])
            mask[j, :len(full)] = 1
            seen += len(full)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    plain_tps = seen / (time.perf_counter() - start)
    res = {"name": "trainer overhead", "stage_tokens_per_s": stage_tps, "plain_tokens_per_s": plain_tps,
           "ratio": stage_tps / plain_tps, "steps": args.steps, "batch": args.batch, "model": args.model}
    print(f"SFT stage {stage_tps:.0f} tokens/s, plain PyTorch loop {plain_tps:.0f} tokens/s, "
          f"ratio {res['ratio']:.2f}x (goal >= 0.9x)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
