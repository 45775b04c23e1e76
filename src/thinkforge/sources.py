"""Prompt sources: every data set, real or built in, enters through `load_problems(spec)`.

Spec forms:
- a local `.jsonl`/`.json`/`.parquet` path (fields mapped: problem|question, answer, id|unique_id)
- `s3://bucket/key` or `minio://bucket/key` (downloaded through thinkforge.storage)
- `hf:<dataset>[:<split>][?config=<name>]` (Hugging Face datasets: a hub name, which needs network or a
  local cache, or a local directory saved by `datasets`)
- `builtin:word-problems?split=train|test&n=400&seed=0`: one-step word problems with numbers under 50,
  the small problems SmolLM2-135M can learn from in minutes on a CPU (see README: cpu-demo)

Optional `?limit=N` on any spec keeps the first N problems.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from thinkforge.records import RecordError, check_fields, check_problem_text, iter_jsonl_numbered

PROBLEM_KEYS = ("problem", "question", "prompt")
ID_KEYS = ("id", "unique_id", "problem_id")


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    base, _, query = spec.partition("?")
    return base, dict(parse_qsl(query))


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def normalize_problem(rec: dict[str, Any], where: str, source: str, index: int) -> dict[str, Any]:
    """Map one raw record of a known data set layout onto the problem format."""
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    check_problem_text(rec, where)  # every source, not only JSONL: type and MAX_PROBLEM_CHARS
    text = next((rec[k] for k in PROBLEM_KEYS if isinstance(rec.get(k), str) and rec[k].strip()), None)
    if text is None:
        raise RecordError(f"{where}: missing field 'problem' (or 'question'): expected the problem text")
    answer = rec.get("answer")
    if isinstance(answer, str) and "####" in answer:  # GSM8K: reasoning, then '#### <final>'
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, (int, float)):
        answer = _number_text(answer)
    if isinstance(answer, (list, tuple, dict)):
        raise RecordError(f"{where}: field 'answer' is a {type(answer).__name__}, expected one reference final "
                          "answer (a string or a number)")
    if (answer is None or answer == "") and isinstance(rec.get("solution"), str):
        from thinkforge.answers import last_boxed

        answer = last_boxed(rec["solution"])
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError(f"{where}: missing field 'answer': expected the reference final answer")
    pid = next((str(rec[k]) for k in ID_KEYS if rec.get(k) not in (None, "")), None)
    out = {
        "id": pid or f"{source}-{index}",
        "problem": text.strip(),
        "answer": answer.strip(),
        "answer_type": rec.get("answer_type", "math"),
        "source": source,
    }
    for key in ("subject", "level", "choices"):
        if key in rec:
            out[key] = rec[key]
    for key in ("completion", "trace"):  # import mode: records that already carry a CoT
        if isinstance(rec.get(key), str):
            out["completion"] = rec[key]
    if "completions" in rec:  # several traces of one problem (public CoT sets, correct and wrong ones)
        traces = rec["completions"]
        if not isinstance(traces, list) or not traces or not all(isinstance(t, str) and t for t in traces):
            raise RecordError(f"{where}: field 'completions': expected a non-empty list of completion strings")
        if "completion" in out:
            raise RecordError(f"{where}: fields 'completion' and 'completions': give one of them")
        out["completions"] = list(traces)
    return out


def imported_traces(problem: dict[str, Any]) -> list[str]:
    """The completions a problem record carries (import mode), in order; [] when it carries none."""
    if "completions" in problem:
        return list(problem["completions"])
    return [problem["completion"]] if "completion" in problem else []


def _load_path(path: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, problem) pairs: `where` names the file and line (or row/item) for later errors."""
    if not path.exists():
        raise RecordError(f"{path}: prompt source not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return _normalized([(f"{path}:row {i + 1}", r) for i, r in enumerate(rows)], name)
    if path.suffix == ".json":
        import json

        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of problems")
        return _normalized([(f"{path}:item {i + 1}", r) for i, r in enumerate(rows)], name)
    out = _normalized(((f"{path}:{lineno}", rec) for lineno, rec in iter_jsonl_numbered(path)), name)
    if not out:
        raise RecordError(f"{path}: no problems (empty file)")
    return out


def _normalized(rows: Any, name: str) -> list[tuple[str, dict[str, Any]]]:
    return [(where, normalize_problem(rec, where, name, i)) for i, (where, rec) in enumerate(rows)]


def check_unique_ids(located: list[tuple[str, dict[str, Any]]]) -> None:
    """Problem ids key shards, verdicts and evaluation samples: a repeated id names both places."""
    first: dict[str, str] = {}
    for where, p in located:
        if p["id"] in first:
            raise RecordError(f"{where}: field 'id': duplicate problem id '{p['id']}' (first at {first[p['id']]})")
        first[p["id"]] = where


def load_problems(spec: str, limit: int = 0, storage: Any = None) -> list[dict[str, Any]]:
    """The problems of `spec`; `storage` (the recipe's StorageConfig) names the endpoint of s3:// and
    minio:// sources (a pod has the config, not THINKFORGE_S3_ENDPOINT)."""
    base, query = _split_spec(spec)
    limit = limit or int(query.pop("limit", 0) or 0)
    if base.startswith("builtin:"):
        built = builtin_source(base.removeprefix("builtin:"), query)
        problems = [(f"{base}:item {i + 1}", p) for i, p in enumerate(built)]
    elif base.startswith(("s3://", "minio://")):
        from thinkforge.storage import download_to_cache

        problems = _load_path(download_to_cache(base, storage), Path(base.rsplit("/", 1)[-1]).stem)
    elif base.startswith("hf:"):
        problems = _load_hub(base.removeprefix("hf:"), query.pop("config", None) or None)
    else:
        path = Path(base)
        problems = _load_path(path, path.stem)
    check_unique_ids(problems)
    out = [p for _, p in problems]
    return out[:limit] if limit else out


def source_digest(spec: str, storage: Any = None) -> dict[str, Any]:
    """What `spec` holds now, as a digest that changes exactly when its data does: object ETags and
    version ids of an s3:// / minio:// file or prefix, the content hash of a local file, the spec itself
    for built-in sources (generated from code) and hub data sets (`hf:` names carry no version here).
    The pipeline's uncached snapshot task feeds it to every task, so KFP's cache follows the data."""
    base, _ = _split_spec(spec)
    if base.startswith(("s3://", "minio://")):
        from thinkforge.storage import ObjectStore

        store, key = ObjectStore.from_uri(base, storage)
        objects = store.describe(key)
        if not objects:
            raise RecordError(f"{base}: no such object or prefix at {store.where()}")
        parts = [f"{o['key']}:{o['etag']}:{o['version_id']}:{o['size']}" for o in objects]
        kind = "objects"
    elif base.startswith(("builtin:", "hf:")):
        parts, kind = [], "spec"
    else:
        path = Path(base)
        if not path.is_file():
            raise RecordError(f"{base}: no such file")
        parts, kind = [hashlib.sha256(path.read_bytes()).hexdigest()], "file"
    digest = hashlib.sha256("\n".join([spec, *parts]).encode()).hexdigest()[:16]
    return {"source": spec, "kind": kind, "digest": digest, "objects": len(parts) if kind == "objects" else 0}


def _load_hub(name: str, config: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """`hf:<dataset>[:<split>][?config=<name>]` (default split: train; the same form as evaluation sets).

    `<dataset>` is a hub name (needs network or the local HF cache), a local data set directory
    written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a local folder of data files
    that `datasets.load_dataset` understands (JSONL, Parquet, CSV).
    """
    import datasets

    parts = name.split(":")
    if len(parts) > 2 or not parts[0]:
        raise RecordError(f"hf:{name}: expected hf:<dataset>[:<split>][?config=<name>]")
    dataset, split = parts[0], (parts[1] if len(parts) == 2 and parts[1] else "train")
    local = Path(dataset)
    try:
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise RecordError(f"hf:{name}: no split {split!r} (has {', '.join(loaded)})")
                loaded = loaded[split]
            rows = loaded
        else:
            rows = datasets.load_dataset(dataset, config, split=split)
    except RecordError:
        raise
    except Exception as e:  # network, missing split/config, unreadable files: name the source
        raise RecordError(f"hf:{name}: cannot load the data set ({type(e).__name__}: {e})") from e
    src = local.name if local.is_dir() else dataset.split("/")[-1]
    out = _normalized(((f"hf:{name}:row {i + 1}", dict(r)) for i, r in enumerate(rows)), src)
    if not out:
        raise RecordError(f"hf:{name}: no problems (empty split)")
    return out


def builtin_source(name: str, query: dict[str, str]) -> list[dict[str, Any]]:
    if name != "word-problems":
        raise RecordError(f"builtin:{name}: unknown built-in source (known: word-problems)")
    split = query.get("split", "train")
    if split not in ("train", "test"):
        raise RecordError(f"builtin:{name}: split must be train or test, got {split!r}")
    n = int(query.get("n", 400 if split == "train" else 60))
    problems = word_problems(split, n, seed=int(query.get("seed", 0)))
    solutions = query.get("solutions") in ("1", "true")  # import mode: a short reference chain of thought each
    distractors = query.get("distractors") in ("1", "true")
    if distractors and not solutions:
        raise RecordError(f"builtin:{name}: distractors=1 needs solutions=1")
    for p in problems:
        solution, slip = p.pop("solution"), p.pop("distractor")
        if distractors:  # also a complete worked solution with an arithmetic slip: wrong answers for DPO to reject
            p["completions"] = [solution, slip]
        elif solutions:
            p["completion"] = solution
    return problems


# --- built-in one-step word problems ---------------------------------------------------------

_NAMES = ["Tom", "Anna", "Ben", "Maya", "Liam", "Sara", "Noah", "Emma", "Omar", "Lily", "Jack", "Zoe"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "toy cars"]
_BOXES = ["bags", "boxes", "baskets", "jars", "packs"]


def _make_problem(rng: random.Random) -> tuple[str, int, str, str]:
    """(problem, answer, kind, a worked solution)."""
    kind = rng.choice(["add", "sub", "mul", "combine"])
    a, b = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    if kind == "add":
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        verb = rng.choice(["buys", "finds", "gets"])
        return (f"{a} has {x} {item}. {a} {verb} {y} more {item}. How many {item} does {a} have now?", x + y, kind,
                f"{a} starts with {x} {item} and gets {y} more, so {x} + {y} = {x + y}.")
    if kind == "sub":
        x = rng.randint(10, 49)
        y = rng.randint(1, x - 1)
        verb = rng.choice(["gives away", "loses", "eats" if item == "cookies" else "sells"])
        return (f"{a} has {x} {item}. {a} {verb} {y} of them. How many {item} does {a} have left?", x - y, kind,
                f"{a} starts with {x} {item} and {y} are gone, so {x} - {y} = {x - y}.")
    if kind == "mul":
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        box = rng.choice(_BOXES)
        return (f"There are {x} {box} with {y} {item} in each. How many {item} are there in total?", x * y, kind,
                f"There are {x} {box} of {y} {item}, so {x} * {y} = {x * y}.")
    x, y = rng.randint(2, 40), rng.randint(2, 40)
    return (f"{a} has {x} {item} and {b} has {y} {item}. How many {item} do they have together?", x + y, kind,
            f"Together they have {x} + {y} = {x + y} {item}.")


def _slip(worked: str, answer: int, salt: int) -> str:
    """The worked solution with its result off by 1 or 2 (a complete, wrong answer)."""
    wrong = answer + (1 + salt % 2) * (1 if salt % 4 < 2 else -1)
    if wrong < 0:
        wrong = answer + 1
    head, _, tail = worked.rpartition(str(answer))  # the result is the last occurrence
    return f"{head}{wrong}{tail}\nThe answer is \\boxed{{{wrong}}}."


def word_problems(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic problems; a problem's split is fixed by a hash of its text, so splits never overlap."""
    rng = random.Random(f"word-problems-{seed}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RecordError(f"builtin:word-problems: could not draw {n} distinct {split} problems")
        text, answer, kind, worked = _make_problem(rng)
        digest = hashlib.sha256(text.encode()).hexdigest()
        in_test = int(digest[:8], 16) % 5 == 0
        if text in seen or in_test != (split == "test"):
            continue
        seen.add(text)
        out.append({
            "id": f"wp-{digest[:12]}",
            "problem": text,
            "answer": str(answer),
            "answer_type": "math",
            "subject": kind,
            "source": f"word-problems-{split}",
            "solution": f"{worked}\nThe answer is \\boxed{{{answer}}}.",
            "distractor": _slip(worked, answer, int(digest[8:12], 16)),
        })
    return out


def problem_record(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a record that must already be in the problem format."""
    return check_fields(rec, {"id": str, "problem": str, "answer": str}, where)


_WS = re.compile(r"\s+")


def normalized_text(text: str) -> str:
    return _WS.sub(" ", text.strip().lower())
