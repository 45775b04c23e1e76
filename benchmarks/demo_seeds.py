"""The demo's recipe under several seeds: is its gain a property of the recipe or of one lucky run?

Runs the whole DAG (`thinkforge run`) once per seed (run.seed moves the data order, sampling and
initialisation of every stage; the problems stay the same), then reads each run's evaluation results
and RL log from its pipeline root and prints one row per seed: base and final pass@1 under each
reading (fallback, strict, boxed only) with the paired bootstrap interval of the gain, and the RL
reward's mean over the first and last quarter of its steps and its reward check.

    python benchmarks/demo_seeds.py [--recipe recipes/cpu-demo.yaml] [--seeds 0,1,2] [--set k=v ...]
                                    [--reuse] [--json out.json]

`--reuse` reads runs already under runs/<name>-seed-<s> instead of running them again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_run(root: Path) -> Path:
    runs = sorted(p for p in root.glob("thinkforge-*") if p.is_dir())
    if not runs:
        raise SystemExit(f"{root}: no pipeline run here")
    return runs[-1]


def read_run(run: Path) -> dict:
    """label -> evaluation results, and the RL summary, of one pipeline run's artifacts."""
    results, rl = {}, None
    for path in run.glob("*/results"):
        data = _load(path)
        if isinstance(data, dict) and data.get("label"):
            results[data["label"]] = data
    for path in run.glob("rl*/summary"):
        rl = _load(path)
    return {"results": results, "rl": rl}


def row(cfg, run: dict, seed: int) -> dict:
    from thinkforge.scoring import paired_bootstrap

    base, final = run["results"].get("base"), run["results"].get("final")
    if not base or not final:
        raise SystemExit(f"seed {seed}: base or final evaluation missing (found {sorted(run['results'])})")
    out = {"seed": seed, "benchmarks": {}}
    for bench, fm in final["benchmarks"].items():
        bm = base["benchmarks"][bench]
        readings = {cfg.evaluate.extraction: (bm["per_problem"], fm["per_problem"])}
        for name, fpp in (fm.get("per_problem_by_reading") or {}).items():
            readings.setdefault(name, (bm["per_problem_by_reading"][name], fpp))
        out["benchmarks"][bench] = {
            name: {"base": sum(b.values()) / len(b), "final": sum(f.values()) / len(f),
                   "gain": paired_bootstrap(b, f, samples=cfg.evaluate.bootstrap_samples, seed=seed)}
            for name, (b, f) in readings.items()}
    rewards = [h["reward"] for h in (run["rl"] or {}).get("history", []) if isinstance(h, dict) and "reward" in h]
    q = len(rewards) // 4
    if q:
        out["rl_reward"] = {"steps": len(rewards), "first_quarter": sum(rewards[:q]) / q,
                            "last_quarter": sum(rewards[-q:]) / q}
    check = ((run["rl"] or {}).get("extra") or {}).get("reward_check")
    if check and "skipped" not in check:
        out["rl_reward_check"] = check
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu-demo.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], help="section.field=value, passed to every run")
    ap.add_argument("--reuse", action="store_true", help="read existing runs instead of running")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    from thinkforge.config import load_recipe

    cfg = load_recipe(args.recipe)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        name = f"{cfg.run.name}-seed-{seed}"
        root = ROOT / "runs" / name
        took = None
        if not args.reuse:
            cmd = [str(Path(sys.executable).with_name("thinkforge")), "run", "--recipe", args.recipe,
                   "--set", f"run.seed={seed}", "--set", f"run.name={name}", "--pipeline-root", str(root)]
            for s in args.set:
                cmd += ["--set", s]
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            took = time.time() - t0
            if proc.returncode != 0:
                raise SystemExit(f"seed {seed}: thinkforge run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        r = row(cfg, read_run(latest_run(root)), seed)
        r["minutes"] = round(took / 60, 1) if took else None
        rows.append(r)
        for bench, readings in r["benchmarks"].items():
            cells = "; ".join(f"{name} {100 * x['base']:.1f} -> {100 * x['final']:.1f} "
                              f"({100 * x['gain']['delta']:+.1f} [{100 * x['gain']['ci_low']:+.1f}, "
                              f"{100 * x['gain']['ci_high']:+.1f}])" for name, x in readings.items())
            rl = r.get("rl_reward")
            rl_txt = f"; RL reward {rl['first_quarter']:+.2f} -> {rl['last_quarter']:+.2f}" if rl else ""
            c = r.get("rl_reward_check")
            if c:  # the same prompts at one temperature, before and after RL
                rl_txt += (f" (its {c['prompts']} prompts at T={c['temperature']:g}: {100 * c['before']:.1f} -> "
                           f"{100 * c['after']:.1f}, {100 * c['delta']:+.1f} [{100 * c['ci_low']:+.1f}, "
                           f"{100 * c['ci_high']:+.1f}])")
            print(f"seed {seed} {bench}: {cells}{rl_txt}" + (f"; {r['minutes']} min" if took else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
