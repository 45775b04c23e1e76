"""Versioned record formats and JSONL I/O that names the file and line of every bad record.

Formats (each record carries `"v": RECORD_VERSION`):
- problem:    id, problem, answer, answer_type ("math" | "choice"), optional subject, level, source
- rollout:    problem_id, sample_index, problem, answer, answer_type, completion, finish_reason, num_tokens
- verdict:    a rollout plus correct, reason, extracted, rule
- sft:        problem_id, problem, completion           (the template is applied at train time)
- pair:       problem_id, problem, chosen, rejected
- rl_prompt:  id, problem, answer, answer_type, pass_rate, mean_length, length_cv
- eval sample: benchmark, problem_id, sample_index, gold, completion, extracted, correct, rule, num_tokens,
               finish_reason, optional subject, level
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

RECORD_VERSION = 1

PROBLEM_FIELDS = {"id": str, "problem": str, "answer": str}
ROLLOUT_FIELDS = {
    "problem_id": str,
    "sample_index": int,
    "problem": str,
    "answer": str,
    "completion": str,
}
SFT_FIELDS = {"problem_id": str, "problem": str, "completion": str}
PAIR_FIELDS = {"problem_id": str, "problem": str, "chosen": str, "rejected": str}
RL_PROMPT_FIELDS = {"id": str, "problem": str, "answer": str}

#: The longest problem text accepted anywhere (characters). Real competition problems are a few
#: thousand characters; anything near this is a broken export, not a problem, and would only cost
#: tokens (and memory) in every stage downstream.
MAX_PROBLEM_CHARS = 65536
#: Fields that hold a problem's text in any record format or prompt source.
PROBLEM_TEXT_KEYS = ("problem", "question", "prompt")


class RecordError(ValueError):
    """A record that cannot be used; the message names file, line and field."""


class EmptyDataError(RuntimeError):
    """A stage would hand an empty (or too small) data set downstream."""


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(t, t.__name__)


def check_fields(rec: Any, fields: dict[str, type], where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name, typ in fields.items():
        if name not in rec or rec[name] is None:
            raise RecordError(f"{where}: missing field '{name}' (expected {_type_name(typ)})")
        value = rec[name]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            raise RecordError(f"{where}: field '{name}' is {type(value).__name__}, expected {_type_name(typ)}")
    return rec


def check_problem_text(rec: Any, where: str) -> Any:
    """Refuse a record whose problem text (``problem``/``question``, or a string ``prompt``) is not a
    string or is longer than :data:`MAX_PROBLEM_CHARS`; the message names ``where`` and the field."""
    if not isinstance(rec, dict):
        return rec
    for key in PROBLEM_TEXT_KEYS:
        value = rec.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            if key == "prompt":  # chat-style prompts (a list of messages) are not problem text
                continue
            raise RecordError(f"{where}: field '{key}' is {type(value).__name__}, expected a string (the problem text)")
        if len(value) > MAX_PROBLEM_CHARS:
            raise RecordError(f"{where}: field '{key}' is {len(value):,} characters, expected at most "
                              f"{MAX_PROBLEM_CHARS:,} (thinkforge.records.MAX_PROBLEM_CHARS)")
    return rec


def iter_jsonl(path: str | Path, fields: dict[str, type] | None = None) -> Iterator[dict[str, Any]]:
    """Yield records; raise RecordError naming `path:line` on undecodable or ill-typed lines."""
    for _, rec in iter_jsonl_numbered(path, fields):
        yield rec


def iter_jsonl_numbered(
    path: str | Path, fields: dict[str, type] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Like iter_jsonl, with each record's line number (blank lines are skipped, not renumbered).

    Every record's problem text is checked too (:func:`check_problem_text`: a string of at most
    :data:`MAX_PROBLEM_CHARS` characters)."""
    path = Path(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{where}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
            check_problem_text(rec, where)
            yield lineno, (check_fields(rec, fields, where) if fields else rec)


def read_jsonl(path: str | Path, fields: dict[str, type] | None = None) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, fields))


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write atomically: a reader never sees a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps({"v": RECORD_VERSION, **rec}, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
