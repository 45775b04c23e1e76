"""Packing: fraction of non-padding tokens per batch on a mid-train corpus, packed (TRL best-fit
decreasing, what the mid-train stage uses) vs padded batches without packing, same corpus, same run.

    python benchmarks/bench_packing.py [--n 2000] [--max-length 1024] [--batch 8] [--json out.json]

The corpus is MATH train solutions (../shared/data/math_train_12k.jsonl) rendered with the one prompt
template, as the filter stage would hand them to mid-training. Goal: >= 0.98 packed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "math_train_12k.jsonl"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from thinkforge.config import TemplateConfig
    from thinkforge.models import load_tokenizer
    from thinkforge.records import read_jsonl
    from thinkforge.templates import render_prompt, render_target

    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    rows = read_jsonl(DATA)[: args.n]
    tpl = TemplateConfig()
    texts = [render_prompt(tok, r["problem"], tpl) + render_target(tok, r["solution"]) for r in rows]
    ids = [x[: args.max_length] for x in tok(texts, add_special_tokens=False)["input_ids"]]

    def fill(lengths: list[int]) -> float:
        """Non-padding share when batches of `args.batch` are padded to their longest sequence."""
        real = padded = 0
        for i in range(0, len(lengths), args.batch):
            chunk = lengths[i:i + args.batch]
            real += sum(chunk)
            padded += max(chunk) * len(chunk)
        return real / padded

    random.Random(0).shuffle(ids)
    unpacked = fill([len(x) for x in ids])
    packed_ds = pack_dataset(Dataset.from_dict({"input_ids": ids}), args.max_length, strategy="bfd")
    packed = fill([len(x) for x in packed_ds["input_ids"]])
    res = {"name": "packing", "packed_fill": packed, "unpacked_fill": unpacked, "ratio": packed / unpacked,
           "sequences": len(ids), "packed_rows": len(packed_ds), "max_length": args.max_length, "batch": args.batch}
    print(f"non-padding tokens per batch: packed (bfd) {packed:.3f}, unpacked {unpacked:.3f}, "
          f"ratio {res['ratio']:.2f}x over {len(ids)} sequences (goal >= 0.98 packed)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
