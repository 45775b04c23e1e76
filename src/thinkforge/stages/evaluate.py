"""Stage 7, evaluate: k samples per problem per benchmark; pass@1 (mean over samples, with its standard
error), cons@k, unbiased pass@k, per-subject/level accuracy, length and truncation; every sample kept
for re-scoring.

Benchmarks come from the catalog in `thinkforge.evalsets` (answer type and default k per set). The
protocol is the recipe's: temperature, top_p, max new tokens, k and the run seed. Samples go through
`thinkforge.engines.make_engine` (hf, vllm or an OpenAI-compatible endpoint, so a hosted baseline is
scored by this same code). `score_records`/`score_benchmark` are also what `thinkforge score` runs.

Durable results. When object storage is configured (`storage.endpoint` or `THINKFORGE_S3_ENDPOINT`),
each benchmark is stored as soon as it is scored, under

    <storage.prefix>/<run.name>/evaluate/<label>/<benchmark>/result.json       scores, spec, identity
    <storage.prefix>/<run.name>/evaluate/<label>/<benchmark>/samples-<benchmark>.jsonl
    <storage.prefix>/<run.name>/evaluate/<label>/<benchmark>/_MANIFEST.json    written last (complete marker)

(:meth:`ObjectStore.upload_dir`). A rerun (a retried KFP task in a fresh pod and work dir) takes every
complete benchmark whose identity matches from there (sha256-verified; its samples file lands in the
work dir as if just written) and evaluates only the rest, so its results.json equals an uninterrupted
run's (all but `seconds`). The identity is the model (sha256 of every file of the model directory, a
pointer followed; `endpoint_model@endpoint` for engine=openai; the name for a hub id), the protocol
(:func:`protocol`, the template, dtype/batch size/tensor parallelism, pass_k) and the benchmark (its spec
and a digest of its problems). Stored results of another model, protocol or problem set are logged and
ignored, then replaced once the benchmark is evaluated again. No engine is built when every benchmark
is restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from thinkforge.answers import STRICT_RULES, extract_answer
from thinkforge.config import Recipe
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.evalsets import ANSWER_TYPES, LoadedBenchmark, load_benchmark, parse_integer
from thinkforge.metrics import StageMetrics
from thinkforge.progress import progress
from thinkforge.records import RecordError, iter_jsonl, write_json, write_jsonl
from thinkforge.scoring import score_samples
from thinkforge.verify import Verifier

log = logging.getLogger("thinkforge.evaluate")

SAMPLE_FIELDS = {"problem_id": str, "gold": str, "completion": str}


def score_records(records: list[dict[str, Any]], ks: list[int] | None = None, mode: str = "fallback",
                  verifier: Verifier | None = None) -> list[dict[str, Any]]:
    """Verify eval samples (gold, completion, optional answer_type) in place and return them.

    `math` and `choice` items go through the shared verifier; `integer` items (AIME) use the verifier's
    extraction and compare the answer as an integer. Adds correct, reason, extracted, rule (and `vote`,
    the normalized answer cons@k counts, for integer items).
    """
    del ks  # scoring needs no k; kept for callers that pass it
    for i, s in enumerate(records):
        t = s.get("answer_type", "math")
        if t not in ANSWER_TYPES:
            raise RecordError(f"sample {i + 1} (problem {s.get('problem_id')}): answer_type {t!r}, "
                              f"expected one of {list(ANSWER_TYPES)}")
    idx = [i for i, s in enumerate(records) if s.get("answer_type", "math") != "integer"]
    if idx:
        own = verifier is None
        v = verifier or Verifier(mode=mode)
        try:
            verdicts = v.verify_many([(records[i]["gold"], records[i]["completion"],
                                       records[i].get("answer_type", "math")) for i in idx])
        finally:
            if own:
                v.close()
        for i, verdict in zip(idx, verdicts):
            records[i].update(correct=verdict.correct, reason=verdict.reason, extracted=verdict.extracted,
                              rule=verdict.rule)
    for s in records:
        if s.get("answer_type") == "integer":
            s.update(integer_verdict(s["gold"], s["completion"], mode))
    return records


def integer_verdict(gold: Any, completion: str, mode: str) -> dict[str, Any]:
    g = parse_integer(gold)
    if g is None:
        return {"correct": False, "reason": "unverifiable_gold", "extracted": None, "rule": None}
    extracted, rule = extract_answer(completion or "", "math", mode)
    if extracted is None:
        return {"correct": False, "reason": "no_answer", "extracted": None, "rule": None}
    value = parse_integer(extracted)
    ok = value is not None and value == g
    return {"correct": ok, "reason": "correct" if ok else "wrong_answer", "extracted": extracted, "rule": rule,
            "vote": str(value) if value is not None else extracted}


def score_benchmark(samples: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """Metrics of one benchmark's verified samples (thinkforge.scoring) plus how the correct answers were
    found (extraction rule) and why the others were not (verifier reason)."""
    scores = score_samples(samples, ks=ks)
    rules = Counter((s.get("rule") or "none") for s in samples if s.get("correct"))
    scores["correct_by_rule"] = dict(sorted(rules.items()))
    scores.update(readings(samples))
    scores["reasons"] = dict(sorted(Counter(s.get("reason") or "unknown" for s in samples).items()))
    return scores


#: stricter readings of the same verdicts: a sample counts when its verified answer came through these rules
READINGS = {"strict": STRICT_RULES, "boxed": ("boxed",)}


def readings(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """pass@1 (and per-problem scores, for paired intervals) under the stricter readings of `READINGS`.

    Extraction tries \\boxed{} and "the answer is" before anything else, so a sample is correct under
    strict extraction exactly when it was correct through one of those rules; "boxed" counts answers
    stated in a box only (a box followed by "the answer is ..." counts as the latter: a lower bound)."""
    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_problem[str(s["problem_id"])].append(s)
    out: dict[str, Any] = {"readings": {}, "per_problem_by_reading": {}}
    for name, rules in READINGS.items():
        per = {pid: sum(bool(s.get("correct")) and s.get("rule") in rules for s in v) / len(v)
               for pid, v in by_problem.items()}
        out["readings"][name] = sum(per.values()) / len(per)
        out["per_problem_by_reading"][name] = per
    return out


def score_jsonl(path: str | Path, ks: list[int], mode: str = "fallback") -> dict[str, dict[str, Any]]:
    """`thinkforge score`: verify and score JSONL samples (problem_id, gold, completion, optional benchmark,
    answer_type, num_tokens, finish_reason, subject, level), per benchmark, exactly as the evaluate stage."""
    records = [dict(r) for r in iter_jsonl(path, SAMPLE_FIELDS)]
    if not records:
        raise RecordError(f"{path}: no samples")
    score_records(records, ks, mode)
    by_bench: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_bench[str(r.get("benchmark") or "default")].append(r)
    out = {}
    for bench, samples in sorted(by_bench.items()):
        m = score_benchmark(samples, ks)
        m.pop("per_problem")
        m.pop("per_problem_by_reading")
        out[bench] = m
    return out


def protocol(cfg: Recipe) -> dict[str, Any]:
    e = cfg.evaluate
    return {"temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens, "seed": cfg.run.seed,
            "extraction": e.extraction, "engine": e.engine, "template_think": cfg.template.think}


def build_engine(cfg: Recipe, model_path: str | Path, metrics: StageMetrics | None = None) -> Any:
    e = cfg.evaluate
    http: dict[str, Any] = {}
    if e.engine == "openai":  # client tuning (streaming too) is shared with generate's endpoint settings
        http = dict(cfg.generate.client_options(), metrics=metrics)
    return make_engine(e.engine, str(model_path), cfg.template, dtype=e.dtype, batch_size=e.batch_size,
                       trust_remote_code=cfg.model.trust_remote_code, tensor_parallel_size=e.tensor_parallel_size,
                       endpoint=e.endpoint, endpoint_model=e.endpoint_model, seed=cfg.run.seed, **http)


def load_benchmarks(cfg: Recipe) -> list[LoadedBenchmark]:
    return [load_benchmark(b, cfg.evaluate.k) for b in cfg.evaluate.benchmarks]


def evaluate(cfg: Recipe, model_path: str | Path, out_dir: str | Path, label: str = "model",
             metrics: StageMetrics | None = None, engine: Any = None,
             benchmarks: list[LoadedBenchmark] | None = None) -> dict[str, Any]:
    """Evaluate one model on every configured benchmark; writes samples-<bench>.jsonl and results.json.

    `engine` (optional) is an engine already built (tests; a caller scoring one endpoint several times).
    """
    e = cfg.evaluate
    m = metrics or StageMetrics.disabled("evaluate")
    out = Path(out_dir)
    start = time.time()
    benches = benchmarks if benchmarks is not None else load_benchmarks(cfg)  # fail before loading a model
    model_name = f"{e.endpoint_model}@{e.endpoint}" if e.engine == "openai" else str(model_path)
    results: dict[str, Any] = {"label": label, "model": model_name, "extraction": e.extraction,
                               "protocol": protocol(cfg), "benchmarks": {}, "benchmark_specs": {}}
    stored = StoredResults.for_recipe(cfg, model_path, label)
    own_engine = engine is None
    try:
        with Verifier(mode=e.extraction) as verifier:
            for bench in benches:
                scores = stored.load(bench, out) if stored is not None else None
                if scores is None:
                    if engine is None:  # built only when some benchmark is left to evaluate
                        engine = build_engine(cfg, model_path, m)
                    scores = _evaluate_one(cfg, bench, engine, verifier, label, out, m)
                    if stored is not None:
                        stored.save(bench, out, scores)
                else:
                    _set_accuracy(m, bench.name, scores)
                results["benchmarks"][bench.name] = scores
                results["benchmark_specs"][bench.name] = bench.describe()
    finally:
        if own_engine and engine is not None:
            engine.close()
    results["seconds"] = time.time() - start
    write_json(out / "results.json", results)
    return results


def _evaluate_one(cfg: Recipe, bench: LoadedBenchmark, engine: Any, verifier: Verifier, label: str, out: Path,
                  m: StageMetrics) -> dict[str, Any]:
    e = cfg.evaluate
    problems, k = bench.problems, bench.k
    params = SamplingParams(n=k, temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                            seed=cfg.run.seed)
    m.set("eval_problems_planned", len(problems), benchmark=bench.name)
    log.info("%s: %d problems x %d samples (%s answers)", bench.name, len(problems), k, bench.answer_type)
    bar = progress(len(problems), desc=f"evaluate {label} {bench.name}", unit="problem")
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        bar.update(n)
        m.set("eval_problems_done", done, benchmark=bench.name)

    try:
        outs = engine.generate([p["problem"] for p in problems], params, progress=advance)
    finally:
        bar.close()
    samples = []
    for p, comps in zip(problems, outs):
        for i, c in enumerate(comps):
            s = {"benchmark": bench.name, "problem_id": p["id"], "sample_index": i, "gold": p["answer"],
                 "answer_type": bench.answer_type, "completion": c.text, "num_tokens": c.num_tokens,
                 "finish_reason": c.finish_reason,
                 **{key: p[key] for key in ("subject", "level") if p.get(key) is not None}}
            if getattr(c, "error", ""):
                s["error"] = c.error
            samples.append(s)  # never the problem text: samples of a redacted set stay shareable
    score_records(samples, mode=e.extraction, verifier=verifier)
    write_jsonl(out / f"samples-{bench.name}.jsonl", samples)
    scores = score_benchmark(samples, [*e.pass_k, k])
    _set_accuracy(m, bench.name, scores)
    log.info("%s: pass@1 %.1f%% ± %.1f over %d problems", bench.name, 100 * scores["pass@1"],
             100 * scores["pass@1_se"], scores["n_problems"])
    return scores


def _set_accuracy(m: StageMetrics, bench: str, scores: dict[str, Any]) -> None:
    for key, value in scores.items():
        if key.startswith(("pass@", "cons@")) and not key.endswith("_se"):
            m.set("eval_accuracy", value, benchmark=bench, metric=key)


# ------------------------------------------------------------------------------------ durable results

RESULT_FILE = "result.json"
STORED_FORMAT = 1


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(cfg: Recipe, model_path: str | Path) -> dict[str, Any]:
    """What the evaluated model is, by content: the sha256 of every file of a local model directory
    (name and bytes; a skipped stage's pointer followed, hidden files and storage manifests left out),
    the endpoint model for engine=openai, the name itself for a hub id or a `random:` model."""
    from thinkforge.models import follow_pointer
    from thinkforge.storage import MANIFEST

    e = cfg.evaluate
    if e.engine == "openai":
        return {"endpoint": e.endpoint, "endpoint_model": e.endpoint_model}
    path = Path(str(model_path))
    if path.is_dir():
        path = follow_pointer(path)
    if path.is_file():
        files = [path]
        base = path.parent
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != MANIFEST
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        base = path
    else:
        return {"name": str(model_path)}
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(base).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return {"sha256": h.hexdigest(), "files": len(files)}


def benchmark_identity(cfg: Recipe, bench: LoadedBenchmark) -> dict[str, Any]:
    """The protocol and the problems one benchmark's stored results stand for (the model aside)."""
    e = cfg.evaluate
    return {
        "format": STORED_FORMAT,
        "protocol": protocol(cfg),
        "sampling": {"template": cfg.template.model_dump(), "dtype": e.dtype if e.engine != "openai" else "",
                     "batch_size": e.batch_size if e.engine == "hf" else 0,
                     "tensor_parallel_size": e.tensor_parallel_size if e.engine == "vllm" else 1},
        "scoring": {"pass_k": list(e.pass_k)},
        "benchmark": {**bench.describe(), "problems_sha256": _sha256(bench.problems)},
    }


class StoredResults:
    """Finished benchmarks of one model label in object storage (see the module docstring)."""

    def __init__(self, cfg: Recipe, store: Any, prefix: str, label: str, model: dict[str, Any]):
        self.cfg = cfg
        self.store = store
        self.prefix = prefix
        self.label = label
        self.model = model

    @classmethod
    def for_recipe(cls, cfg: Recipe, model_path: str | Path, label: str) -> StoredResults | None:
        """None when no object storage is configured (results stay local, as before)."""
        from thinkforge.storage import ObjectStore

        store = ObjectStore.from_config_or_none(cfg.storage)
        if store is None:
            return None
        store.ensure_bucket()
        t0 = time.monotonic()
        model = model_identity(cfg, model_path)
        log.info("evaluate %s: model identity %s (%.1fs)", label,
                 f"sha256 {model['sha256'][:16]} over {model['files']} files" if "sha256" in model else model,
                 time.monotonic() - t0)
        return cls(cfg, store, store.run_prefix(*cfg.run.scope(), "evaluate", label), label, model)

    def key(self, bench: LoadedBenchmark) -> str:
        from thinkforge.storage import safe_key

        return f"{self.prefix}/{safe_key(bench.name)}"

    def identity(self, bench: LoadedBenchmark) -> dict[str, Any]:
        return {"model": self.model, **benchmark_identity(self.cfg, bench)}

    def load(self, bench: LoadedBenchmark, out: Path) -> dict[str, Any] | None:
        """The stored scores of `bench` (its samples file copied into `out`), or None when there are none
        for this model and protocol."""
        from thinkforge.storage import NotFound, StorageError

        key = self.key(bench)
        uri = self.store.uri(key)
        if not self.store.is_complete(key):
            return None
        try:
            stored = self.store.get_json(f"{key}/{RESULT_FILE}")
        except NotFound:
            stored = None
        want = self.identity(bench)
        have = stored.get("identity") if isinstance(stored, dict) else None
        if have != want:
            differs = sorted(k for k in want if not isinstance(have, dict) or have.get(k) != want[k]) or ["format"]
            log.info("evaluate %s: %s in %s is for another %s; evaluating it again", self.label, bench.name, uri,
                     "/".join(differs))
            return None
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".stored-{bench.name}-", dir=out) as tmp:
            try:
                got = self.store.download_dir(key, Path(tmp) / "b")
            except StorageError as e:
                log.warning("evaluate %s: %s in %s unusable (%s); evaluating it again", self.label, bench.name,
                            uri, e)
                return None
            name = f"samples-{bench.name}.jsonl"
            verified = json.loads((got / RESULT_FILE).read_text())
            if verified.get("identity") != want or not (got / name).is_file():
                log.warning("evaluate %s: %s in %s changed while it was read; evaluating it again", self.label,
                            bench.name, uri)
                return None
            os.replace(got / name, out / name)
        log.info("evaluate %s: %s already done in %s, skipped (pass@1 %.1f%%)", self.label, bench.name, uri,
                 100 * verified["scores"].get("pass@1", 0.0))
        return verified["scores"]

    def save(self, bench: LoadedBenchmark, out: Path, scores: dict[str, Any]) -> None:
        """Store one finished benchmark (samples, then scores, manifest last). A failed upload is logged;
        the evaluation itself stands (a retry would evaluate that benchmark again)."""
        from thinkforge.storage import StorageError

        key = self.key(bench)
        name = f"samples-{bench.name}.jsonl"
        with tempfile.TemporaryDirectory(prefix=f".store-{bench.name}-", dir=out) as tmp:
            try:
                os.link(out / name, Path(tmp) / name)
            except OSError:
                shutil.copyfile(out / name, Path(tmp) / name)
            (Path(tmp) / RESULT_FILE).write_text(json.dumps(
                {"identity": self.identity(bench), "label": self.label, "benchmark": bench.name,
                 "spec": bench.describe(), "scores": scores}, indent=2, ensure_ascii=False, default=str),
                encoding="utf-8")
            try:
                self.store.upload_dir(tmp, key)
            except StorageError as e:
                log.error("evaluate %s: storing %s in %s failed (%s); a retry evaluates it again", self.label,
                          bench.name, self.store.uri(key), e)
                return
        log.info("evaluate %s: %s stored in %s", self.label, bench.name, self.store.uri(key))
