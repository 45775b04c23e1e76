"""Helpers shared by the tests that render the Helm chart: merging values, and reading the `--set`
arguments the chart's upload Job compiles the pipeline with."""

from __future__ import annotations

import copy


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` laid over it, nested dicts merged (neither is changed)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_flags(args: list[str]) -> list[str]:
    """The values of every `--set` in an argument list."""
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def upload_sets(docs: list[dict]) -> list[str]:
    """The `--set` arguments the chart's upload Job compiles the pipeline with."""
    job = next(d for d in docs if d.get("kind") == "Job" and "upload" in d["metadata"]["name"])
    c = job["spec"]["template"]["spec"]["containers"][0]
    argv = [*c.get("command", []), *c.get("args", [])]
    return set_flags(argv if "upload" in argv else " ".join(argv).split())
