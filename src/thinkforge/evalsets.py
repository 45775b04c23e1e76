"""Benchmarks as data: a catalog of evaluation sets, each declaring where it loads from, how its answers
compare and how many samples per problem it takes by default.

A recipe's `evaluate.benchmarks` entry (`thinkforge.config.Benchmark`) names a catalog entry (`dataset`,
or its `name` when that is a catalog key) and/or a `source`; anything else is a custom set. Every set
loads at run time through `thinkforge.sources` (a local file, `s3://`/`minio://`, `hf:`); nothing is
shipped with the package.

| entry | answers | default k | default source |
|---|---|---|---|
| math500 | math (equivalence) | 4 | hf:HuggingFaceH4/MATH-500:test |
| aime24 | integer | 16 | hf:HuggingFaceH4/aime_2024:train |
| amc23 | math | 8 | hf:math-ai/amc23:test |
| gsm8k | math | 1 | hf:openai/gsm8k:test?config=main |
| gpqa-diamond | choice (A-D, options shuffled with a fixed seed) | 8 | hf:Idavidrein/gpqa:train?config=gpqa_diamond (gated) |
| custom | math, integer or choice | 4 | the benchmark's `source`, with an optional field map |

GPQA-Diamond's authors ask that its questions never appear in plain text: the set is `redact`ed, so
its problem text is never logged, never put in an error message, an eval sample or a report (errors name
the file, the row and the field only).

Answer types: `math` uses the shared verifier's equivalence (math-verify); `integer` extracts the answer
with the shared verifier's rules and compares it as an integer (AIME answers are 0-999, `033` == `33`,
while `\\frac{66}{2}` is not an integer answer); `choice` compares option letters.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from thinkforge.records import RecordError, iter_jsonl_numbered
from thinkforge.sources import check_unique_ids, load_problems, normalize_problem

ANSWER_TYPES = ("math", "integer", "choice")
DEFAULT_K = 4
LETTERS = "ABCD"  # the shared verifier reads choice letters A-D
CANONICAL = ("problem", "answer", "id", "subject", "level", "choices")
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."


@dataclass(frozen=True)
class EvalSet:
    """One catalog entry."""

    key: str
    title: str
    source: str  # default source ("" = the benchmark must give one)
    answer_type: str
    k: int  # default samples per problem
    layout: str = "problems"  # "problems" (sources' layout, optional field map) | "gpqa"
    redact: bool = False  # never log or store the problem text
    fields: Mapping[str, str] = field(default_factory=dict)
    # Phi-4-Mini-Reasoning's published pass@1 (%) per stage (paper Table; protocol differs from yours)
    paper: Mapping[str, float] = field(default_factory=dict)
    notes: str = ""


CATALOG: dict[str, EvalSet] = {s.key: s for s in (
    EvalSet("math500", "MATH-500", "hf:HuggingFaceH4/MATH-500:test", "math", 4,
            paper={"base": 71.8, "midtrain": 82.9, "sft": 89.3, "dpo": 93.6, "final": 94.6},
            notes="500 MATH test problems (PRM800K split); subject and level per problem"),
    EvalSet("aime24", "AIME 2024", "hf:HuggingFaceH4/aime_2024:train", "integer", 16,
            paper={"base": 10.0, "midtrain": 30.0, "sft": 43.3, "dpo": 50.0, "final": 57.5},
            notes="30 problems, integer answers 0-999 (compared as integers)"),
    EvalSet("amc23", "AMC 2023", "hf:math-ai/amc23:test", "math", 8,
            notes="40 problems with numeric answers"),
    EvalSet("gsm8k", "GSM8K", "hf:openai/gsm8k:test?config=main", "math", 1,
            notes="1319 grade-school problems; the answer follows '####'"),
    EvalSet("gpqa-diamond", "GPQA-Diamond", "hf:Idavidrein/gpqa:train?config=gpqa_diamond", "choice", 8,
            layout="gpqa", redact=True,
            paper={"base": 36.9, "midtrain": 42.6, "sft": 48.3, "dpo": 49.0, "final": 52.0},
            notes="198 multiple-choice questions; gated on the hub (HF_TOKEN) or a file you supply; "
                  "problem text is never logged"),
    EvalSet("custom", "custom", "", "math", DEFAULT_K, notes="any problems file, or any JSONL with a field map"),
)}


@dataclass
class LoadedBenchmark:
    """A benchmark resolved against the catalog, with its problems loaded."""

    name: str
    spec: EvalSet
    source: str
    answer_type: str
    k: int
    limit: int
    problems: list[dict[str, Any]]

    @property
    def redact(self) -> bool:
        return self.spec.redact

    def describe(self) -> dict[str, Any]:
        """What identifies the benchmark for comparisons (the registry's protocol check)."""
        return {"dataset": self.spec.key, "source": self.source, "answer_type": self.answer_type, "k": self.k,
                "limit": self.limit, "n_problems": len(self.problems)}


def catalog_entry(bench: Any) -> EvalSet:
    """The catalog entry a `Benchmark` names (`dataset`, else its `name` when that is a key, else custom)."""
    key = (bench.dataset or "").strip().lower()
    if key:
        if key not in CATALOG:
            raise RecordError(f"benchmark {bench.name}: unknown dataset {bench.dataset!r} "
                              f"(catalog: {', '.join(CATALOG)})")
        return CATALOG[key]
    return CATALOG.get(bench.name.strip().lower(), CATALOG["custom"])


def resolve_k(bench: Any, default_k: int = 0) -> int:
    """Samples per problem: the benchmark's own k, else evaluate.k, else the catalog default."""
    return bench.k or default_k or catalog_entry(bench).k


def load_benchmark(bench: Any, default_k: int = 0) -> LoadedBenchmark:
    """Resolve a `Benchmark` against the catalog and load its problems (at most `bench.limit`)."""
    spec = catalog_entry(bench)
    source = bench.source or spec.source
    if not source:
        raise RecordError(f"benchmark {bench.name}: no source (a custom set needs `source`)")
    answer_type = bench.answer_type or spec.answer_type
    if answer_type not in ANSWER_TYPES:
        raise RecordError(f"benchmark {bench.name}: answer_type {answer_type!r}, expected one of {ANSWER_TYPES}")
    fields = {**spec.fields, **(bench.fields or {})}
    bad = sorted(set(fields) - set(CANONICAL))
    if bad:
        raise RecordError(f"benchmark {bench.name}: unknown field map keys {bad} (known: {list(CANONICAL)})")
    base, _, query = source.partition("?")
    q = dict(parse_qsl(query))
    if spec.layout == "problems" and not fields and "config" not in q and answer_type != "choice":
        problems = load_problems(source, limit=bench.limit)  # sources' own layouts (MATH, GSM8K, builtin)
    else:
        rows = read_rows(source, redact=spec.redact)
        limit = bench.limit or int(q.get("limit", 0) or 0)
        located = []
        for i, (where, row) in enumerate(rows):
            if limit and len(located) >= limit:
                break
            if spec.layout == "gpqa":
                located.append((where, _gpqa_problem(row, where, bench.name, i, bench.seed)))
            else:
                located.append((where, _mapped_problem(row, where, bench.name, i, fields, answer_type, bench.seed,
                                                       redact=spec.redact)))
        if not located:
            raise RecordError(f"benchmark {bench.name}: {base}: no problems")
        check_unique_ids(located)
        problems = [p for _, p in located]
    for p in problems:
        p["answer_type"] = answer_type
        if answer_type == "integer" and parse_integer(p["answer"]) is None:
            raise RecordError(f"benchmark {bench.name}: problem '{p['id']}': reference answer is not an integer")
    return LoadedBenchmark(bench.name, spec, source, answer_type, resolve_k(bench, default_k), bench.limit,
                           problems)


# --- raw rows ------------------------------------------------------------------------------------


def read_rows(source: str, redact: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a local `.jsonl`/`.json`/`.parquet`/`.csv` file, an `s3://`/`minio://`
    object or `hf:<dataset>[:<split>][?config=<name>]`, untouched (for field maps and special layouts)."""
    base, _, query = source.partition("?")
    q = dict(parse_qsl(query))
    if base.startswith("hf:"):
        import datasets

        name, _, split = base.removeprefix("hf:").partition(":")
        try:
            rows = datasets.load_dataset(name, q.get("config") or None, split=split or "train")
        except Exception as e:  # noqa: BLE001 - hub/network errors become one readable message
            raise RecordError(f"{base}: cannot load from the hub ({type(e).__name__}); gated sets need HF_TOKEN, "
                              "offline machines a local file (benchmark source: a path)") from None
        return [(f"{base}:row {i + 1}", dict(r)) for i, r in enumerate(rows)]
    if base.startswith(("s3://", "minio://")):
        from thinkforge.storage import download_to_cache

        path = download_to_cache(base)
    else:
        path = Path(base)
    if not path.exists():
        raise RecordError(f"{path}: benchmark source not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}:row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as fh:
            return [(f"{path}:row {i + 1}", dict(r)) for i, r in enumerate(csv.DictReader(fh))]
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RecordError(f"{path}: not valid JSON ({type(e).__name__})") from None
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of records")
        return [(f"{path}:item {i + 1}", r) for i, r in enumerate(data)]
    try:
        return [(f"{path}:{lineno}", r) for lineno, r in iter_jsonl_numbered(path)]
    except RecordError:
        if redact:  # the JSON error names the line and column only, but be certain nothing leaks
            raise RecordError(f"{path}: malformed JSONL (redacted benchmark: see the file)") from None
        raise


def _get(row: Any, column: str, where: str) -> Any:
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if column not in row or row[column] is None or (isinstance(row[column], str) and not row[column].strip()):
        raise RecordError(f"{where}: missing field '{column}'")
    return row[column]


def _mapped_problem(row: Any, where: str, name: str, index: int, fields: Mapping[str, str], answer_type: str,
                    seed: int, redact: bool) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    rec = dict(row)
    for canon, column in fields.items():
        rec[canon] = _get(row, column, where)
    if answer_type == "choice" and "choices" in rec:
        options = rec["choices"]
        if not isinstance(options, list) or not all(isinstance(o, (str, int, float)) for o in options):
            raise RecordError(f"{where}: field '{fields.get('choices', 'choices')}' must be a list of options")
        options = [str(o).strip() for o in options]
        correct = _correct_index(rec.get("answer"), options, where, fields.get("answer", "answer"))
        pid = _problem_id(rec, name, index)
        question = _get(rec, "problem", where) if "problem" in rec else _get(rec, "question", where)
        return _choice_problem(question, options, correct, seed, pid, name, rec, where)
    rec.pop("choices", None)
    if isinstance(rec.get("answer"), int) and answer_type == "choice":
        rec["answer"] = LETTERS[rec["answer"]] if 0 <= rec["answer"] < len(LETTERS) else None
    try:
        return normalize_problem(rec, where, name, index)
    except RecordError as e:
        if redact:
            raise RecordError(f"{where}: not a usable problem record (redacted benchmark)") from None
        raise e from None


def _correct_index(answer: Any, options: list[str], where: str, column: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in LETTERS[:len(options)]:
            return LETTERS.index(a.upper())
        if a in options:
            return options.index(a)
    raise RecordError(f"{where}: field '{column}' is neither an option letter, an option index nor one of the options")


def _problem_id(rec: dict[str, Any], name: str, index: int) -> str:
    for key in ("id", "unique_id", "problem_id", "Record ID"):
        if rec.get(key) not in (None, ""):
            return str(rec[key])
    return f"{name}-{index}"


def _choice_problem(question: Any, options: list[str], correct: int, seed: int, pid: str, name: str,
                    rec: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(question, str):
        raise RecordError(f"{where}: the question must be text")
    if not 2 <= len(options) <= len(LETTERS):
        raise RecordError(f"{where}: {len(options)} options; multiple choice takes 2 to {len(LETTERS)} (A-D)")
    order = shuffled_order(len(options), seed, pid)
    text = question.strip() + "\n\n" + "\n".join(f"({LETTERS[j]}) {options[i]}" for j, i in enumerate(order))
    out = {"id": pid, "problem": f"{text}\n\n{CHOICE_INSTRUCTION}", "answer": LETTERS[order.index(correct)],
           "answer_type": "choice", "source": name}
    for key in ("subject", "level"):
        if rec.get(key) not in (None, ""):
            out[key] = rec[key]
    return out


def shuffled_order(n: int, seed: int, pid: str) -> list[int]:
    """A fixed permutation of n options for one problem: depends on the seed and the problem id only,
    so it is the same in every run, whatever the limit or the order of the file."""
    order = list(range(n))
    random.Random(f"choices:{seed}:{pid}").shuffle(order)
    return order


def _gpqa_problem(row: Any, where: str, name: str, index: int, seed: int) -> dict[str, Any]:
    """GPQA's layout: Question, Correct Answer, Incorrect Answer 1-3 (the correct one is always listed
    first in the file, hence the shuffle); Record ID, Subdomain."""
    question = _get(row, "Question", where)
    options = [str(_get(row, "Correct Answer", where)).strip()]
    options += [str(_get(row, f"Incorrect Answer {i}", where)).strip() for i in (1, 2, 3)]
    rec = {"subject": row.get("Subdomain") or row.get("High-level domain")}
    pid = str(row.get("Record ID") or f"{name}-{index}")
    return _choice_problem(question, options, 0, seed, pid, name, rec, where)


# --- integer answers -----------------------------------------------------------------------------


def parse_integer(text: Any) -> int | None:
    """`204`, `033`, `-5`, `1,000`, `27.0`, `$204$`, `\\text{204}` -> int; anything else -> None."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        return int(text) if text.is_integer() else None
    s = str(text).strip()
    for a, b in (("$", "$"), ("\\(", "\\)"), ("\\text{", "}"), ("\\mathrm{", "}"), ("{", "}")):
        if s.startswith(a) and s.endswith(b) and len(s) > len(a) + len(b) - 1:
            s = s[len(a):len(s) - len(b)].strip()
    s = s.replace(",", "").replace("\\!", "").replace(" ", "")
    if s.endswith(".0"):
        s = s[:-2]
    sign = -1 if s.startswith("-") else 1
    digits = s.lstrip("+-")
    if not digits.isdigit() or len(digits) > 30 or s.count("-") + s.count("+") > 1:
        return None
    return sign * int(digits)
