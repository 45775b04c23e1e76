"""Prompt optimization under two processes: every rank ends with the same RL prompt set.

The test launches this file as a script on two CPU processes (``torch.distributed.run``, gloo). Each rank
runs the real ``optimize_prompts`` with a scripted sampler whose verdicts depend on the rank, the way GPU
sampling differs between devices (kernels are not bitwise reproducible): a rank that judged every candidate
itself would keep its own set. Run as a script, the file is the worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

N_PROMPTS = 12


def _worker(out_dir: str) -> None:
    import torch

    from thinkforge.config import load_recipe
    from thinkforge.engines.base import Completion
    from thinkforge.stages import rl as rl_mod

    rank = int(os.environ["RANK"])
    sampled: list[str] = []

    class RankDependentEngine:
        def __init__(self, model, template, tokenizer=None, **kw):
            pass

        def generate(self, problems, params, progress=None):
            sampled.extend(problems)
            # 2 samples: the first always right; the second right when (index // 2 + rank) is even, so for
            # every prompt one rank measures a pass rate of 1.0 (above the band) and the other 0.5 (inside it).
            return [[Completion("7", 10, "stop"),
                     Completion("7" if (int(p[1:]) // 2 + rank) % 2 == 0 else "3", 10, "stop")] for p in problems]

    import thinkforge.engines.hf as hf

    hf.HFEngine = RankDependentEngine
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"
    cfg = load_recipe(recipe, {"rl.prompt_optimization": True, "rl.prompt_min_pass_rate": 0.2,
                               "rl.prompt_max_pass_rate": 0.8, "rl.prompt_opt_samples": 2,
                               "rl.prompt_opt_max_length_cv": 0.5})
    rows = [{"id": f"p{i}", "problem": f"p{i}", "answer": "7"} for i in range(N_PROMPTS)]
    kept, stats = rl_mod.optimize_prompts(cfg, torch.nn.Linear(1, 1), None, rows)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"kept": [r["id"] for r in kept],
                                                             "pass_rates": [r["pass_rate"] for r in kept],
                                                             "stats": stats, "sampled": sampled}))
    if torch.distributed.is_initialized():  # a clean gloo teardown: without it a rank can abort at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_keep_the_same_prompts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), __file__, str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["kept"] == r1["kept"] and r0["pass_rates"] == r1["pass_rates"] and r0["stats"] == r1["stats"]
    # each candidate was sampled and judged by exactly one rank: half the work each
    assert sorted(r0["sampled"] + r1["sampled"], key=lambda p: int(p[1:])) == [f"p{i}" for i in range(N_PROMPTS)]
    assert set(r0["sampled"]).isdisjoint(r1["sampled"])
    # rank 0 judged p0, p2, p4, ... and measured 0.5 where index // 2 is odd; rank 1 judged p1, p3, ... and
    # measured 0.5 where index // 2 is even. (Each rank judging all 12 itself would keep p2, p3, p6, p7, ... on
    # rank 0 and p0, p1, p4, p5, ... on rank 1.) Kept in the candidates' order.
    assert r0["kept"] == ["p1", "p2", "p5", "p6", "p9", "p10"] and r0["pass_rates"] == [0.5] * 6
    assert r0["stats"]["candidates"] == N_PROMPTS and r0["stats"]["ranks"] == 2 and r0["stats"]["kept"] == 6
    assert r0["stats"]["dropped"]["pass_rate_high"] == 6


def test_candidate_subset_is_seeded_and_rank_free(monkeypatch):
    from thinkforge.config import RLConfig
    from thinkforge.stages.rl import prompt_candidates

    rows = [{"id": f"p{i}"} for i in range(100)]
    rl = RLConfig(prompt_opt_max_candidates=10)
    picks = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        picks.append([r["id"] for r in prompt_candidates(rows, rl, seed=3)])
    assert picks[0] == picks[1] and len(picks[0]) == 10
    assert picks[0] == sorted(picks[0], key=lambda p: int(p[1:])), "original order kept"
    assert picks[0] != [f"p{i}" for i in range(10)], "a seeded sample, not the first rows"
    assert [r["id"] for r in prompt_candidates(rows, rl, seed=4)] != picks[0]
    assert prompt_candidates(rows, RLConfig(), seed=3) == rows


if __name__ == "__main__":
    _worker(sys.argv[1])
