"""`thinkforge eval`: evaluate any model on demand through the DAG's own evaluate stage.

The model is a local directory, an `s3://`/`minio://` prefix (downloaded and checked against its
manifest, `storage.*` of the recipe or THINKFORGE_S3_* for the endpoint), or a spec `model.student`
accepts (`builtin:...`, `random:...`, a hub name). The benchmarks are catalog entries
(`thinkforge.evalsets.CATALOG`) or benchmark names of the recipe; the protocol (temperature, top_p, max
tokens, seed, extraction, engine) is the recipe's, or the defaults without one. Scoring is
`thinkforge.stages.evaluate.evaluate` itself, so the numbers equal the DAG's evaluation of the same
model under the same recipe, and the results file has the same format, with one more key: `lighteval`,
the same numbers under lighteval's task|metric names (`math_500|pass@1:4_samples`,
`aime24|pass@1:16_samples`, `..._stderr`, `maj@k` for cons@k), the names open-r1's tables use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from thinkforge.config import Benchmark, ConfigError, Recipe
from thinkforge.evalsets import CATALOG
from thinkforge.records import write_json

#: catalog entry -> lighteval task name (lighteval's `math_500`, `aime24`, `gpqa:diamond`, ...)
LIGHTEVAL_TASKS = {"math500": "math_500", "aime24": "aime24", "amc23": "amc23", "gsm8k": "gsm8k",
                   "gpqa-diamond": "gpqa:diamond"}
ALIASES = {v: k for k, v in LIGHTEVAL_TASKS.items()} | {"math-500": "math500", "gpqa_diamond": "gpqa-diamond",
                                                        "gpqa": "gpqa-diamond", "aime2024": "aime24"}


def known_benchmarks(cfg: Recipe) -> list[str]:
    return [k for k in CATALOG if k != "custom"] + [b.name for b in cfg.evaluate.benchmarks
                                                    if b.name.lower() not in CATALOG]


def select_benchmarks(cfg: Recipe, names: list[str], k: int = 0, limit: int = 0) -> Recipe:
    """`cfg` with `evaluate.benchmarks` set to `names` (the recipe's own entry of that name, else the
    catalog entry; lighteval task names are accepted too), each with `k`/`limit` when given. An unknown
    name is refused with the known ones listed."""
    own = {b.name: b for b in cfg.evaluate.benchmarks}
    chosen: list[Benchmark] = []
    unknown = []
    for raw in names or [b.name for b in cfg.evaluate.benchmarks]:
        name = raw.strip()
        if not name:
            continue
        if name in own:
            b = own[name]
        else:
            key = ALIASES.get(name.lower(), name.lower())
            if key not in CATALOG or key == "custom":
                unknown.append(name)
                continue
            b = own.get(key) or Benchmark(name=key)
        update = {**({"k": k} if k else {}), **({"limit": limit} if limit else {})}
        chosen.append(b.model_copy(update=update) if update else b)
    if unknown:
        raise ConfigError(f"--benchmarks: unknown benchmark(s) {', '.join(unknown)} "
                          f"(known: {', '.join(known_benchmarks(cfg))})")
    if not chosen:
        raise ConfigError(f"--benchmarks: no benchmark named (known: {', '.join(known_benchmarks(cfg))})")
    if not names and not k and not limit:
        return cfg  # the recipe's own benchmarks, untouched: the DAG's evaluation exactly
    data = cfg.model_dump()
    data["evaluate"]["benchmarks"] = [b.model_dump() for b in chosen]
    return Recipe.model_validate(data)


def lighteval_names(results: dict[str, Any]) -> dict[str, float]:
    """The results' numbers under lighteval's `task|metric` names (the task's catalog entry, else the
    benchmark name): pass@1 over n samples, its standard error, pass@k over n samples, maj@n (cons@n)."""
    out: dict[str, float] = {}
    for bench, m in results.get("benchmarks", {}).items():
        spec = results.get("benchmark_specs", {}).get(bench, {})
        task = LIGHTEVAL_TASKS.get(spec.get("dataset") or "", bench)
        n = m.get("k")
        for key, value in m.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith("pass@"):
                j, _, se = key.removeprefix("pass@").partition("_")
                out[f"{task}|pass@{j}:{n}_samples" + ("_stderr" if se == "se" else "")] = value
            elif key.startswith("cons@") and not key.endswith("_se"):
                out[f"{task}|maj@{key.removeprefix('cons@')}"] = value
    return out


def resolve_model(model: str, cfg: Recipe) -> str:
    """A local path for an object-storage model (downloaded, manifest-checked, cached); other specs as given."""
    if model.startswith(("s3://", "minio://")):
        from thinkforge.storage import download_to_cache

        return str(download_to_cache(model.rstrip("/"), cfg.storage))
    if model.startswith(("builtin:", "random:")):
        return model
    p = Path(model).expanduser()
    if p.exists():
        return str(p)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"--model {model}: no such directory")
    return model  # a hub name (org/name)


def evaluate_model(model: str, benchmarks: str | list[str] = "", k: int = 0, limit: int = 0,
                   recipe: Recipe | None = None, out: str | os.PathLike[str] = "", label: str = "eval",
                   overrides: dict[str, Any] | None = None, engine: Any = None) -> dict[str, Any]:
    """Evaluate `model` on `benchmarks` under `recipe`'s protocol (defaults without one); writes the
    results file (`out`, default ./results.json) with the samples beside it and returns the results
    (with `path`)."""
    from thinkforge.stages.evaluate import evaluate

    if recipe is None:  # the default protocol, with any --set
        from thinkforge.config import apply_overrides, validate

        recipe = validate(apply_overrides({}, overrides or {}, "--set"), origin="--set")
    cfg = recipe
    names = [n for n in benchmarks.split(",")] if isinstance(benchmarks, str) else list(benchmarks)
    cfg = select_benchmarks(cfg, [n for n in names if n.strip()], k=k, limit=limit)
    dest = Path(out or "results.json").resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model, cfg)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.stem}-eval-", dir=dest.parent))
    try:
        results = evaluate(cfg, path, work, label=label, engine=engine)
        if path != model:
            results["model"] = model  # the URI asked for, not the cache it was downloaded to
        results["lighteval"] = lighteval_names(results)
        for f in work.glob("samples-*.jsonl"):
            os.replace(f, dest.parent / f.name)
        write_json(dest, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**results, "path": str(dest)}
