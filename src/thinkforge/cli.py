"""`thinkforge` command line: run the DAG locally, compile it for a cluster, verify and score files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from thinkforge.cluster import ClusterError, add_cli, require_digest_default
from thinkforge.config import ConfigError, Recipe, load_recipe, parse_set_flags
from thinkforge.records import EmptyDataError, RecordError



def _recipe(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, parse_set_flags(args.set or []))


def _add_recipe_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--recipe", required=required, help="recipe YAML (see recipes/)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a recipe field")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the whole DAG on this machine through kfp.local (SubprocessRunner, no containers)."""
    from thinkforge.local_run import run_locally

    run_locally(_recipe(args), args.recipe, args.pipeline_root, verbose=args.verbose)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print what each stage books and needs; exit 2 when the recipe cannot work as placed."""
    from thinkforge.plan import make_plan

    plan = make_plan(_recipe(args), args.recipe, plan_assumptions(args))
    print(plan.text())
    return 0 if plan.ok else 2


def plan_assumptions(args: argparse.Namespace):
    from thinkforge.plan import Assumptions, parse_size_gib

    try:
        store = parse_size_gib(args.store_size) if getattr(args, "store_size", None) else None
    except ValueError:
        raise ConfigError(f"--store-size {args.store_size}: expected a size such as 500Gi or 1Ti") from None
    return Assumptions(mfu=getattr(args, "mfu", 0.35), prompts=getattr(args, "prompts", None),
                       fill=getattr(args, "fill", 0.5), accept_rate=getattr(args, "accept_rate", 0.5),
                       gpu_product=getattr(args, "gpu_product", "") or "", store_gib=store,
                       teacher_max_model_len=getattr(args, "teacher_max_model_len", None))


def cmd_compile(args: argparse.Namespace) -> int:
    from thinkforge.cluster import compile_pinned
    from thinkforge.plan import preflight

    recipe = _recipe(args)
    preflight(recipe, args.recipe)  # a recipe that cannot work is refused before anything is written
    out = compile_pinned(recipe, args.out, image=args.image or "", digest=args.image_digest or "",
                         require=args.require_digest)
    print(f"wrote {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    print(recipe.to_yaml(), end="")
    print(f"# digest {recipe.digest()}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from thinkforge.verify import verify_file

    out = args.out or str(Path(args.file).with_suffix(".verified.jsonl"))
    counts = verify_file(args.file, out, mode=args.mode, timeout=args.timeout)
    print(json.dumps(counts, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from thinkforge.stages.evaluate import score_jsonl

    ks = [int(k) for k in args.k.split(",") if k.strip()]
    results = score_jsonl(args.file, ks, args.mode)  # the evaluate stage's own scoring
    for bench, m in results.items():
        extra = "  ".join(f"{k} {100 * v:.1f}" for k, v in m.items()
                          if (k.startswith("pass@") or k.startswith("cons@")) and k not in ("pass@1", "pass@1_se"))
        print(f"{bench}: {m['n_problems']} problems x {m['k']} samples  "
              f"pass@1 {100 * m['pass@1']:.1f} ± {100 * m['pass@1_se']:.1f}  {extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_data_load(args: argparse.Namespace) -> int:
    """Check a prompt file as the generate stage would read it, then put it at an s3:// / minio:// URI
    (the data a recurring run reads: its snapshot task sees the new object version)."""
    from thinkforge.sources import load_problems, source_digest
    from thinkforge.storage import ObjectStore

    problems = load_problems(args.file)  # every bad line named before anything is written
    storage = _recipe(args).storage if args.recipe else None
    store, key = ObjectStore.from_uri(args.to, storage)
    if not key or key.endswith("/"):
        raise ConfigError(f"--to {args.to}: expected s3://bucket/key (a file name, not a prefix)")
    store.ensure_bucket()
    store.upload_file(args.file, key, content_type="application/x-ndjson" if args.file.endswith(".jsonl")
                      else "application/octet-stream")
    snap = source_digest(args.to, storage)
    print(f"loaded {len(problems)} problems from {args.file} to {args.to} (digest {snap['digest']})")
    return 0


def _registry(args: argparse.Namespace):
    from thinkforge.registry import open_registry

    cfg = _recipe(args) if args.recipe else None
    return open_registry(args.registry or "", cfg)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def cmd_registry(args: argparse.Namespace) -> int:
    """`thinkforge registry list|show|fetch|promote|rollback`: exit 0 done, 2 refused (no such version, an
    incomplete one, no history, storage errors), 3 the champion moved meanwhile (nothing changed)."""
    from thinkforge import registry as r
    from thinkforge.storage import StorageError

    try:
        reg = _registry(args)
        what = args.registry_command
        if what == "list":
            rows = r.list_versions(reg)
            if args.json:
                print(json.dumps({"registry": reg.uri(), "versions": rows}, indent=2, default=str))
                return 0
            print(f"{reg.uri()}: {len(rows)} version(s)")
            for row in rows:
                mark = "*" if row["champion"] else " "
                if not row["complete"]:
                    print(f"{mark} {row['version']}  (incomplete)")
                    continue
                g = row.get("gate") or {}
                benches = "  ".join(f"{b} " + " ".join(f"{k} {_pct(v)}" for k, v in sorted(ms.items())
                                                       if not k.endswith("_se"))
                                    for b, ms in row.get("metrics", {}).items())
                print(f"{mark} {row['version']}  {g.get('benchmark')} {g.get('metric')} {_pct(g.get('value'))}"
                      f"  | {benches}" + ("  <- champion" if row["champion"] else ""))
            return 0
        if what == "show":
            info = r.show_version(reg, args.version)
            if args.json:
                print(json.dumps(info, indent=2, default=str))
                return 0
            print(info["card"].rstrip())
            print(f"\n## Metrics ({info['where']}{', champion' if info['champion'] else ''})\n")
            print(json.dumps(info["metrics"], indent=2, sort_keys=True, default=str))
            return 0
        if what == "fetch":
            dest = r.fetch_version(reg, args.version, args.to)
            print(f"fetched {args.version} of {reg.name} into {dest} (every file checked against its manifest)")
            return 0
        if what == "promote":
            out = r.promote_version(reg, args.version, args.reason or "", args.by or "")
        else:
            out = r.rollback(reg, args.reason or "", args.by or "")
        if out.get("unchanged"):
            print(out["reason"])
        else:
            print(f"{reg.name}: champion {out['previous']} -> {out['version']} ({out['reason']})")
        return 0
    except r.ChampionMoved as e:
        print(f"thinkforge: error: {e}", file=sys.stderr)
        return 3
    except (r.RegistryError, StorageError, ValueError) as e:
        print(f"thinkforge: error: {e}", file=sys.stderr)
        return 2


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate any model through the evaluate stage's catalog, protocol and verifier."""
    from thinkforge.eval_cli import evaluate_model
    from thinkforge.storage import StorageError

    try:
        results = evaluate_model(args.model, benchmarks=args.benchmarks, k=args.k, limit=args.limit,
                                 recipe=_recipe(args) if args.recipe else None, out=args.out, label=args.label,
                                 overrides=None if args.recipe else parse_set_flags(args.set or []))
    except StorageError as e:
        print(f"thinkforge: error: {e}", file=sys.stderr)
        return 2
    for bench, m in results["benchmarks"].items():
        k = m["k"]
        print(f"{bench}: {m['n_problems']} problems x {k} samples  pass@1 {100 * m['pass@1']:.1f} ± "
              f"{100 * m['pass@1_se']:.1f}  cons@{k} {_pct(m.get(f'cons@{k}'))}")
    p = results["protocol"]
    print(f"protocol: temperature {p['temperature']}, top_p {p['top_p']}, max {p['max_new_tokens']} new tokens, "
          f"seed {p['seed']}, extraction {p['extraction']}, engine {p['engine']}")
    print(f"wrote {results['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thinkforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole DAG locally through kfp.local")
    _add_recipe_args(p)
    p.add_argument("--pipeline-root", help="where artifacts go (default: <run.output_dir>/<run.name>)")
    p.add_argument("--verbose", action="store_true",
                   help="stream every task's output (by default it goes to a log file whose path is printed)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="write the pipeline IR YAML for Kubeflow Pipelines")
    _add_recipe_args(p)
    p.add_argument("--out", default="thinkforge-pipeline.yaml")
    p.add_argument("--image", help="container image of the components (default: cluster.image, $THINKFORGE_IMAGE, the released CPU image)")
    p.add_argument("--image-digest", default=None, metavar="sha256:HEX", help="pin the image to this digest")
    p.add_argument("--require-digest", action="store_true", default=require_digest_default(),
                   help="refuse images named by tag only ($THINKFORGE_REQUIRE_IMAGE_DIGEST=1)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("plan", help="preflight: per stage GPUs, processes, memory per GPU, tokens, GPU-hours",
                       description=cmd_plan.__doc__)
    _add_recipe_args(p)
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilization for GPU-hours (default 0.35)")
    p.add_argument("--prompts", type=int, default=None, help="training prompts, when the source does not say")
    p.add_argument("--fill", type=float, default=0.5, help="mean generated length as a share of its cap (0.5)")
    p.add_argument("--accept-rate", type=float, default=0.5, help="share of rollouts the filter accepts (0.5)")
    p.add_argument("--gpu-product", default="", help="accelerator (nvidia.com/gpu.product label) when the "
                   "node_selector does not name one")
    p.add_argument("--store-size", default=None, help="object store size, e.g. 500Gi (default: the chart's "
                   "MinIO volume for a shipped recipe)")
    p.add_argument("--teacher-max-model-len", type=int, default=None, help="the teacher server's context length "
                   "(default: the chart's teacher.maxModelLen when generate.endpoint is its teacher)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="print the resolved recipe")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("verify", help="verify JSONL records with `gold` and `answer`; writes correct/reason")
    p.add_argument("file")
    p.add_argument("--out")
    p.add_argument("--mode", choices=["strict", "fallback"], default="fallback")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("score", help="score JSONL samples (problem_id, gold, completion[, benchmark])")
    p.add_argument("file")
    p.add_argument("--k", default="1", help="comma-separated k for pass@k, e.g. 1,4,8")
    p.add_argument("--mode", choices=["strict", "fallback"], default="fallback")
    p.add_argument("--json", help="also write the metrics as JSON here")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("data", help="data sets in object storage")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("load", help="check a prompt file and put it in the data bucket")
    p.add_argument("file", help="a .jsonl/.json/.parquet prompt file (fields as for data.train)")
    p.add_argument("--to", required=True, help="s3://bucket/key or minio://bucket/key")
    _add_recipe_args(p, required=False)  # storage.endpoint/secure/region; else THINKFORGE_S3_* env
    p.set_defaults(func=cmd_data_load)

    p = sub.add_parser("registry", help="the model registry: list, show, fetch, promote, rollback",
                       description=cmd_registry.__doc__)
    reg_sub = p.add_subparsers(dest="registry_command", required=True)

    def reg_parser(name: str, help_: str) -> argparse.ArgumentParser:
        q = reg_sub.add_parser(name, help=help_)
        q.add_argument("--registry", default="", help="s3://bucket/<prefix>/<name> or a local directory "
                       "<dir>/<prefix>/<name> (default: the recipe's registry.* and storage.*)")
        _add_recipe_args(q, required=False)
        q.set_defaults(func=cmd_registry)
        return q

    q = reg_parser("list", "versions with their metrics; * marks the champion")
    q.add_argument("--json", action="store_true")
    q = reg_parser("show", "a version's model card and metrics")
    q.add_argument("version", help="a version, or `champion`")
    q.add_argument("--json", action="store_true")
    q = reg_parser("fetch", "download a version's model folder (checked against its manifest)")
    q.add_argument("version", help="a version, or `champion`")
    q.add_argument("--to", required=True, help="directory to write the model to (replaced when complete)")
    for name, help_ in (("promote", "make a version the champion by hand (compare-and-swap)"),
                        ("rollback", "make the previous champion the champion again")):
        q = reg_parser(name, help_)
        if name == "promote":
            q.add_argument("version")
        q.add_argument("--reason", default="", required=name == "promote",
                       help="why (recorded in the decision log; required to promote)")
        q.add_argument("--by", default="", help="who (default: user@host)")

    p = sub.add_parser("eval", help="evaluate any model with the DAG's benchmarks, protocol and verifier",
                       description=cmd_eval.__doc__)
    p.add_argument("--model", required=True, help="a local model directory, s3://bucket/prefix, builtin:..., "
                   "random:..., or a hub name")
    p.add_argument("--benchmarks", default="", help="comma-separated catalog entries (math500,aime24,...) or "
                   "benchmark names of the recipe (default: the recipe's evaluate.benchmarks)")
    p.add_argument("--k", type=int, default=0, help="samples per problem (default: the recipe's, else the catalog's)")
    p.add_argument("--limit", type=int, default=0, help="at most this many problems per benchmark")
    p.add_argument("--label", default="eval", help="label in the results file (default eval)")
    p.add_argument("--out", default="", help="results file (default results.json in the current directory); the "
                   "samples go beside it")
    _add_recipe_args(p, required=False)
    p.set_defaults(func=cmd_eval)

    add_cli(sub)  # upload, submit, schedule against a KFP server

    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ConfigError, RecordError, EmptyDataError, ClusterError) as e:
        print(f"thinkforge: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a failed KFP task: its own log above says why
        from thinkforge.local_run import ANSI  # KFP colours its failure line; the message is plain text

        print(f"thinkforge: error: {ANSI.sub('', str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
