"""Orchestration overhead: wall time of the smoke DAG under kfp.local vs calling the same stage
functions directly in one process, same recipe, same run.

    python benchmarks/bench_orchestration.py [--json out.json]

Reports the overhead per task: (kfp.local - direct) / number of tasks. Both paths load models and
train for real, so the difference is what KFP's subprocess-per-task model costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The same work on both paths: no per-stage evaluations, no registry (publish then only reports "off").
OVERRIDES = {"evaluate.per_stage": False, "registry.enabled": False}


def direct(recipe_path: Path, work: Path) -> None:
    """The DAG's stage functions in order, in this process."""
    from thinkforge.config import load_recipe
    from thinkforge.models import load_model, load_tokenizer, save_model
    from thinkforge.stages.dpo import dpo
    from thinkforge.stages.evaluate import evaluate
    from thinkforge.stages.filter import filter_rollouts
    from thinkforge.stages.generate import generate
    from thinkforge.stages.midtrain import midtrain
    from thinkforge.stages.publish import publish
    from thinkforge.stages.report import compare, markdown
    from thinkforge.stages.rl import rl
    from thinkforge.stages.sft import sft

    cfg = load_recipe(recipe_path, OVERRIDES)
    save_model(load_model(cfg.model.student, cfg.model.dtype), load_tokenizer(cfg.model.student), work / "base")
    generate(cfg, work / "rollouts.jsonl")
    filter_rollouts(cfg, work / "rollouts.jsonl", work / "filter")
    midtrain(cfg, work / "base", work / "filter" / "midtrain.jsonl", work / "mid")
    sft(cfg, work / "mid", work / "filter" / "sft.jsonl", work / "sft")
    dpo(cfg, work / "sft", work / "filter" / "dpo.jsonl", work / "dpo")
    rl(cfg, work / "dpo", work / "filter" / "rl_prompts.jsonl", work / "rl")
    base = evaluate(cfg, work / "base", work / "eval-base", label="base")
    final = evaluate(cfg, work / "rl", work / "eval-final", label="final")
    markdown(cfg, compare(cfg, base, final), {})
    publish(cfg, work / "rl", {"base": None, "final": None})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smoke.yaml"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    # Each path in a fresh interpreter, so neither inherits the other's warm imports.
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--direct", args.recipe, str(work / "direct")], check=True,
                   capture_output=True)
    direct_s = time.perf_counter() - t
    t = time.perf_counter()
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={str(v).lower()}")]
    subprocess.run([sys.executable, "-m", "thinkforge.cli", "run", "--recipe", args.recipe, *sets, "--pipeline-root",
                    str(work / "kfp")], check=True, capture_output=True, cwd=ROOT)
    kfp_s = time.perf_counter() - t
    tasks = len(list((work / "kfp").glob("*/*/executor_output.json")))  # the tasks that really ran
    res = {"name": "orchestration", "kfp_local_s": kfp_s, "direct_s": direct_s, "tasks": tasks,
           "overhead_per_task_s": (kfp_s - direct_s) / tasks, "ratio": direct_s / kfp_s}
    print(f"smoke DAG: kfp.local {kfp_s:.1f} s, stage functions in one process {direct_s:.1f} s, "
          f"ratio {res['ratio']:.2f}x, overhead {res['overhead_per_task_s']:.1f} s per task ({tasks} tasks)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--direct":
        Path(sys.argv[3]).mkdir(parents=True, exist_ok=True)
        direct(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
