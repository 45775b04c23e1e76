"""Stage 2, filter: keep rollouts whose final answer verifies, and derive every training set.

Each rollout gets exactly one verdict reason, the first that applies, in this order:

1. prompt-level (every rollout of the problem gets it):
   - ``engine_error``: the engine produced no sample (an endpoint that kept failing; ``finish_reason:
     "error"``); such a rollout says nothing about the problem and is left out of pass rates
   - ``contaminated``: the problem overlaps an evaluation problem (see *decontamination*)
   - ``duplicate_prompt``: the same text (case, spacing and Unicode form normalized) as an earlier problem
   - ``near_duplicate_prompt``: word-3-shingle Jaccard similarity >= ``filter.near_duplicate_jaccard`` to
     an earlier problem *with the same reference answer* (a changed number makes a new problem, not a copy)
2. ``unverifiable_gold``: the reference answer does not parse (the verifier's verdict)
3. completion-level: ``repetition`` (an n-gram loop, see below), ``unfinished_thinking`` (an opened
   ``<think>`` never closed), ``truncated`` (hit the token limit), ``no_answer``, ``over_length``
   (over ``filter.max_completion_tokens``), ``timeout`` (the verifier's hard limit), ``wrong_answer``
4. otherwise ``correct``.

"Earlier" means earlier in the rollouts file (which the generate stage writes in source order), so
deduplication keeps the first copy and is deterministic.

**Think tags** are normalized before anything else: a completion that closes its thinking with
``</think>`` but never opened it (DeepSeek-R1 through a chat API: the opening tag sat in the prompt) gets
its ``<think>`` back (``thinkforge.templates.normalize_think``), so no training target starts mid-thought
and the final answer is read after ``</think>``; ``summary.json`` counts them (``normalized_think``).

**Decontamination** (``filter.decontaminate``): every problem of every evaluation set in
``evaluate.benchmarks`` (loaded by ``thinkforge.evalsets`` as evaluation loads it, catalog default
sources included; the whole set, not only the evaluated ``limit``) plus the prompt sources in
``filter.decontaminate_extra`` is cut into word n-grams (``filter.decontaminate_ngram``, 8 by default;
a benchmark problem shorter than that counts as one n-gram of its own length). A training problem is
contaminated when it shares n-grams with a benchmark problem amounting to at least
``filter.decontaminate_threshold`` of the smaller of the two problems' n-gram sets (0 = any shared
n-gram, the classic strict rule). The default 0.7 catches verbatim copies, copies with a word or a
number changed (a 50-word problem with one number changed scores ~0.8), and a benchmark problem
embedded in a longer text, while templated problems that share only boilerplate pass: on the built-in
word problems (15-18 words each) 0.5 would flag 9% of the training split against the test split,
0.7 flags 1 in 400 (a test problem with one number changed).

**Repetition**: the share of repeated word n-grams (``filter.repetition_ngram``) in the whole
completion, or in its last 256 words (a loop at the end), is at least ``filter.repetition_max_fraction``.
Natural reasoning stays far below 0.5; a degenerate loop is close to 1.

Outputs (record formats in thinkforge.records):

- ``midtrain.jsonl``: every accepted rollout (the mid-train corpus)
- ``sft.jsonl``: the compact SFT subset, chosen by this rule:
    1. at most ``filter.sft_per_prompt`` accepted rollouts per problem, shortest first (concise traces;
       ties by sample index);
    2. problems ordered hardest first: lowest teacher pass rate, then id;
    3. when ``filter.sft_max_examples`` caps the total, problems are taken round-robin across domains
       (``subject``, else ``source``, else "general"; domains in name order), hardest first within each
       domain, so no domain crowds out the others; uncapped, every problem's picks are kept.
- ``dpo.jsonl``: preference pairs from the same problem, at most ``filter.dpo_pairs_per_prompt`` per
  problem (balanced: no problem dominates), each rollout used once. Chosen = an accepted rollout
  (shortest first); rejected = a complete wrong answer of that problem (reason ``wrong_answer``: it
  ended by itself, gave an answer, and the answer verifies as wrong), the one closest in length to the
  chosen, so the pair teaches correctness, not length. Truncated, timed-out, looping, unfinished,
  answerless and over-long rollouts are never rejected samples (the pair would teach "finish" or "be
  short" instead of "be right"); a problem without a complete wrong answer gives no pair. Rollouts of
  rejected problems (prompt-level reasons) and engine errors are never used.
- ``rl_prompts.jsonl``: every kept problem with its pass rate, mean completion length, length spread
  (``length_std`` and ``length_cv`` = std / mean), sample count, domain and difficulty
  (hard < 1/3 <= medium < 2/3 <= easy, by pass rate); except problems whose reference answer does not
  parse (``unverifiable_gold``: every RL rollout would score -1) and problems the teacher solved 0 of k
  times (often a wrong reference), unless ``filter.rl_keep_unverifiable_gold`` /
  ``filter.rl_keep_unsolved`` opt in; ``summary.json`` counts them in ``rl_dropped``
- ``verdicts.jsonl``: every rollout with its verdict (``reason``, ``correct``, ``answer_correct``,
  ``extracted``, ``rule``, ``domain``, ``difficulty``; for prompt-level rejections ``matched``: the
  ``benchmark:problem_id`` it overlaps or the id of the copy that was kept)
- ``summary.json``: counts per reason, histograms, contaminated problems per benchmark
- ``html_report(result)``: counts per reason, pass-rate histogram, length histogram (one HTML page)
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Iterable

from thinkforge.config import Recipe
from thinkforge.metrics import StageMetrics
from thinkforge.progress import progress
from thinkforge.records import ROLLOUT_FIELDS, EmptyDataError, iter_jsonl, write_json, write_jsonl
from thinkforge.templates import normalize_think
from thinkforge.verify import Verifier

VERIFY_CHUNK = 512

log = logging.getLogger("thinkforge.filter")

PROMPT_REASONS = ("engine_error", "contaminated", "duplicate_prompt", "near_duplicate_prompt")
REJECT_ORDER = (*PROMPT_REASONS, "unverifiable_gold", "repetition", "unfinished_thinking", "truncated",
                "no_answer", "over_length", "timeout", "wrong_answer")
LENGTH_BINS = 10
REPETITION_TAIL_WORDS = 256


@dataclass
class FilterResult:
    rollouts: int
    kept: int
    counts: dict[str, int]
    sft: int
    dpo_pairs: int
    rl_prompts: int
    pass_rate_histogram: list[int] = field(default_factory=list)
    length_bin_edges: list[int] = field(default_factory=list)
    length_histogram: list[int] = field(default_factory=list)  # all sampled rollouts, by num_tokens
    kept_length_histogram: list[int] = field(default_factory=list)  # accepted ones, same bins
    contamination: dict[str, int] = field(default_factory=dict)  # contaminated problems per benchmark
    rl_dropped: dict[str, int] = field(default_factory=dict)  # problems left out of the RL pool, by why
    normalized_think: int = 0  # completions whose missing <think> opening tag was restored


# --------------------------------------------------------------------------------------------
# text helpers: normalization, shingles, n-grams, repetition
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Unicode NFKC, lower case, single spaces: what "the same prompt" means."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def word_ngrams(toks: list[str], n: int) -> set[str]:
    """The word n-grams of `toks`; a text of at most n words is one n-gram of its own length."""
    if len(toks) <= n:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def shingles(text: str, k: int = 3) -> set[str]:
    return word_ngrams(words(text), k)


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def repeated_ngram_fraction(text: str, n: int = 8) -> float:
    """Share of word n-grams that repeat an earlier one, over the whole text or its last
    REPETITION_TAIL_WORDS words, whichever is higher (0 for texts too short to tell)."""
    toks = text.split()

    def frac(t: list[str]) -> float:
        total = len(t) - n + 1
        if total < n:  # fewer n-grams than n: too short to call a loop
            return 0.0
        grams = {tuple(t[i:i + n]) for i in range(total)}
        return 1.0 - len(grams) / total

    whole = frac(toks)
    tail = frac(toks[-REPETITION_TAIL_WORDS:]) if len(toks) > REPETITION_TAIL_WORDS else 0.0
    return max(whole, tail)


class NearDuplicateIndex:
    """Deterministic MinHash + LSH over word 3-shingles; candidates are confirmed by exact Jaccard.

    `add(text, group)` returns the key of an earlier kept text with Jaccard >= threshold in the same
    `group` (e.g. the same reference answer), else stores the text and returns None. Only kept texts
    are stored, so duplicates never chain.
    """

    def __init__(self, threshold: float, num_perm: int = 64, bands: int = 16, k: int = 3, seed: int = 1):
        import numpy as np

        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold = threshold
        self.k = k
        self.bands = bands
        self.rows = num_perm // bands
        rng = np.random.default_rng(seed)
        self._a = (rng.integers(1, 2**63 - 1, size=num_perm, dtype=np.uint64) | np.uint64(1))[:, None]
        self._b = rng.integers(0, 2**63 - 1, size=num_perm, dtype=np.uint64)[:, None]
        self._buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self._kept: list[tuple[Any, set[str], Any]] = []  # (key, shingles, group)

    def _signature(self, sh: set[str]) -> Any:
        import numpy as np

        x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sorted(sh)), dtype=np.uint64, count=len(sh))
        with np.errstate(over="ignore"):
            h = (self._a * x[None, :] + self._b) >> np.uint64(32)  # multiply-shift hashing, wraps mod 2^64
        return h.min(axis=1).astype(np.uint32)

    def add(self, key: Any, text: str, group: Any = None) -> Any:
        sh = shingles(text, self.k)
        if not sh:
            return None
        sig = self._signature(sh)
        band_keys = [(b, sig[b * self.rows:(b + 1) * self.rows].tobytes()) for b in range(self.bands)]
        seen: set[int] = set()
        for bk in band_keys:
            for j in self._buckets.get(bk, ()):
                if j in seen:
                    continue
                seen.add(j)
                other_key, other_sh, other_group = self._kept[j]
                if other_group == group and jaccard(sh, other_sh) >= self.threshold:
                    return other_key
        j = len(self._kept)
        self._kept.append((key, sh, group))
        for bk in band_keys:
            self._buckets[bk].append(j)
        return None


class ContaminationIndex:
    """Word n-grams of benchmark problems; `match(text)` names the benchmark problem it overlaps."""

    def __init__(self, n: int = 8, threshold: float = 0.5):
        self.n = n
        self.threshold = threshold
        self._grams: dict[str, list[int]] = defaultdict(list)
        self._docs: list[tuple[str, str, int]] = []  # (benchmark, problem id, number of n-grams)
        self._short_lengths: set[int] = set()

    def grams(self, toks: list[str], n: int) -> set[str]:
        if len(toks) < n:
            return set()
        return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}

    def add(self, benchmark: str, pid: str, text: str) -> None:
        toks = words(text)
        if not toks:
            return
        if len(toks) < self.n:
            self._short_lengths.add(len(toks))
        gs = word_ngrams(toks, self.n)
        d = len(self._docs)
        self._docs.append((benchmark, pid, len(gs)))
        for g in gs:
            self._grams[g].append(d)

    def __len__(self) -> int:
        return len(self._docs)

    def match(self, text: str) -> tuple[str, str] | None:
        """(benchmark, problem id) of the most overlapping benchmark problem over the threshold, else None."""
        toks = words(text)
        own = word_ngrams(toks, self.n)
        hits: Counter[int] = Counter()
        for g in own:
            for d in self._grams.get(g, ()):
                hits[d] += 1
        for k in self._short_lengths:  # a short benchmark problem inside a longer training text
            if k == len(toks):
                continue
            for g in self.grams(toks, k):
                for d in self._grams.get(g, ()):
                    hits[d] += 1
        best, best_ratio = None, -1.0
        for d, shared in sorted(hits.items()):
            ratio = shared / max(1, min(self._docs[d][2], len(own)))
            if ratio >= self.threshold and ratio > best_ratio:
                best, best_ratio = d, ratio
        if best is None:
            return None
        return self._docs[best][0], self._docs[best][1]


def build_contamination_index(cfg: Recipe) -> ContaminationIndex:
    """Every problem of every evaluation set (loaded as evaluation loads it, all problems, not only the
    evaluated `limit`) and of `filter.decontaminate_extra`."""
    from thinkforge.evalsets import load_benchmark
    from thinkforge.sources import load_problems

    f = cfg.filter
    index = ContaminationIndex(f.decontaminate_ngram, f.decontaminate_threshold)
    sets: list[tuple[str, Any]] = [(b.name, lambda b=b: load_benchmark(b.model_copy(update={"limit": 0})).problems)
                                   for b in cfg.evaluate.benchmarks]
    sets += [(Path(s.split("?")[0]).stem or s, lambda s=s: load_problems(s)) for s in f.decontaminate_extra]
    for name, load in sets:
        try:
            problems = load()
        except Exception as e:
            raise RuntimeError(
                f"decontamination: cannot load evaluation set {name!r} ({type(e).__name__}: {e}); fix its source "
                "or set filter.decontaminate=false") from None
        for p in problems:  # the text stays in memory only: redacted sets (GPQA) are never logged
            index.add(name, p["id"], p["problem"])
    log.info("decontamination index: %d problems from %d evaluation sets", len(index), len(sets))
    return index


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def _prompt_reasons(rollouts: list[dict[str, Any]], cfg: Recipe,
                    index: ContaminationIndex | None) -> tuple[dict[str, tuple[str, str]], Counter[str]]:
    """{problem_id: (prompt-level reason, what it matched)} for rejected problems, and contaminated
    problems per benchmark."""
    f = cfg.filter
    out: dict[str, tuple[str, str]] = {}
    per_bench: Counter[str] = Counter()
    first: dict[str, dict[str, Any]] = {}
    for r in rollouts:
        first.setdefault(r["problem_id"], r)
    exact: dict[str, str] = {}
    near = NearDuplicateIndex(f.near_duplicate_jaccard) if f.dedup_prompts and f.near_duplicate_jaccard < 1 else None
    for pid, r in first.items():
        if index is not None:
            hit = index.match(r["problem"])
            if hit is not None:
                out[pid] = ("contaminated", f"{hit[0]}:{hit[1]}")
                per_bench[hit[0]] += 1
                continue
        if not f.dedup_prompts:
            continue
        norm = normalize(r["problem"])
        if norm in exact:
            out[pid] = ("duplicate_prompt", exact[norm])
            continue
        exact[norm] = pid
        other = near.add(pid, r["problem"], group=normalize(str(r["answer"]))) if near is not None else None
        if other is not None:
            out[pid] = ("near_duplicate_prompt", other)
    return out, per_bench


def _reason(rec: dict[str, Any], verdict_reason: str, cfg: Recipe) -> str:
    if verdict_reason == "unverifiable_gold":
        return verdict_reason
    f = cfg.filter
    if f.repetition_max_fraction < 1 and repeated_ngram_fraction(rec["completion"], f.repetition_ngram) \
            >= f.repetition_max_fraction:
        return "repetition"
    if cfg.template.think and "<think>" in rec["completion"] and "</think>" not in rec["completion"]:
        return "unfinished_thinking"
    if rec.get("finish_reason") == "length":
        return "truncated"
    if verdict_reason in ("no_answer", "timeout"):
        return verdict_reason
    cap = f.max_completion_tokens
    if cap and rec.get("num_tokens", 0) > cap:
        return "over_length"
    return "correct" if verdict_reason == "correct" else "wrong_answer"


def domain_of(rec: dict[str, Any]) -> str:
    for key in ("subject", "source"):
        if isinstance(rec.get(key), str) and rec[key]:
            return rec[key]
    return "general"


def difficulty_of(pass_rate: float) -> str:
    return "hard" if pass_rate < 1 / 3 else "medium" if pass_rate < 2 / 3 else "easy"


def filter_rollouts(cfg: Recipe, rollouts_path: str | Path, out_dir: str | Path,
                    metrics: StageMetrics | None = None) -> FilterResult:
    out = Path(out_dir)
    m = metrics or StageMetrics.disabled("filter")
    f = cfg.filter
    rollouts = list(iter_jsonl(rollouts_path, ROLLOUT_FIELDS))
    normalized = 0
    for r in rollouts:  # before any check: a target must never start mid-thought
        fixed = normalize_think(r["completion"])
        if fixed != r["completion"]:
            r["completion"] = fixed
            normalized += 1
    index = build_contamination_index(cfg) if f.decontaminate else None
    prompt_reason, per_bench = _prompt_reasons(rollouts, cfg, index)

    def pre(r: dict[str, Any]) -> str | None:
        if r.get("finish_reason") == "error":
            return "engine_error"
        hit = prompt_reason.get(r["problem_id"])
        return hit[0] if hit else None

    pre_reasons = [pre(r) for r in rollouts]
    to_verify = [i for i, p in enumerate(pre_reasons) if p is None]
    items = [(rollouts[i]["answer"], rollouts[i]["completion"], rollouts[i].get("answer_type", "math"))
             for i in to_verify]
    verdicts = []
    # In chunks, so the progress bar moves; each chunk still spreads over the whole worker pool.
    mode = cfg.extraction(cfg.filter.extraction)
    with Verifier(mode=mode) as verifier, progress(len(items), "filter", "rollout") as bar:
        for start in range(0, len(items), VERIFY_CHUNK):
            chunk = items[start:start + VERIFY_CHUNK]
            verdicts.extend(verifier.verify_many(chunk))
            bar.update(len(chunk))
    verdict_of = dict(zip(to_verify, verdicts))

    by_problem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    counts: Counter[str] = Counter()
    annotated = []
    for i, rec in enumerate(rollouts):
        v = verdict_of.get(i)
        reason = pre_reasons[i] or _reason(rec, v.reason, cfg)  # type: ignore[union-attr]
        counts[reason] += 1
        row = {**rec, "correct": reason == "correct", "reason": reason,
               "extracted": v.extracted if v else None, "rule": v.rule if v else None,
               "answer_correct": bool(v and v.correct), "domain": domain_of(rec)}
        if rec["problem_id"] in prompt_reason and reason != "engine_error":
            row["matched"] = prompt_reason[rec["problem_id"]][1]  # benchmark:id, or the kept copy's id
        row.pop("v", None)
        annotated.append(row)
        if reason not in PROMPT_REASONS:  # rejected problems and engine errors say nothing about pass rates
            by_problem[rec["problem_id"]].append(row)

    accepted = [r for r in annotated if r["correct"]]
    m.inc("filter_kept_total", len(accepted))  # also when 0, so the series exists
    for reason in REJECT_ORDER:
        m.inc("filter_dropped_total", counts.get(reason, 0), reason=reason)
    if len(accepted) < f.min_kept:
        detail = ", ".join(f"{k}={counts.get(k, 0)}" for k in ("correct", *REJECT_ORDER))
        raise EmptyDataError(
            f"filter kept {len(accepted)} of {len(rollouts)} rollouts from {rollouts_path} "
            f"(filter.min_kept={f.min_kept}); counts per reason: {detail}"
        )

    stats: dict[str, dict[str, Any]] = {}
    rl_out: dict[str, str] = {}  # problem id -> why it stays out of the RL pool
    for pid, rows in by_problem.items():
        # Pass rate counts a correct final answer; the RL stage samples its own lengths later.
        lengths = [r.get("num_tokens", 0) for r in rows]
        mean_len = statistics.fmean(lengths)
        std = statistics.pstdev(lengths)
        rate = sum(r["answer_correct"] for r in rows) / len(rows)
        stats[pid] = {"pass_rate": rate, "mean_length": mean_len, "length_std": std,
                      "length_cv": std / mean_len if mean_len else 0.0, "n_samples": len(rows),
                      "domain": domain_of(rows[0]), "difficulty": difficulty_of(rate)}
        if any(r["reason"] == "unverifiable_gold" for r in rows):
            if not f.rl_keep_unverifiable_gold:
                rl_out[pid] = "unverifiable_gold"
        elif rate == 0 and not f.rl_keep_unsolved:
            rl_out[pid] = "unsolved"
    for row in annotated:
        if row["problem_id"] in stats:
            row["difficulty"] = stats[row["problem_id"]]["difficulty"]

    midtrain = [_sft_row(r) for r in accepted]
    sft = _select_sft(accepted, stats, cfg)
    pairs = _pairs(by_problem, f.dpo_pairs_per_prompt)
    if cfg.dpo.enabled and f.dpo_pairs_per_prompt and not pairs:
        # fail here, with the reasons, rather than in the DPO pod with "no training records"
        raise EmptyDataError(
            f"filter: no DPO pairs from {rollouts_path}: no problem has both a verified-correct and a complete "
            f"wrong rollout (wrong_answer={counts.get('wrong_answer', 0)}; truncated={counts.get('truncated', 0)} "
            f"and timeout={counts.get('timeout', 0)} never serve as rejected); sample more or longer "
            "(generate.samples_per_prompt, generate.max_new_tokens), import wrong traces, or compile with "
            "dpo.enabled=false")
    rl_prompts = [
        {"id": pid, "problem": by_problem[pid][0]["problem"], "answer": by_problem[pid][0]["answer"],
         "answer_type": by_problem[pid][0].get("answer_type", "math"), **s}
        for pid, s in stats.items() if pid not in rl_out
    ]
    rl_dropped = Counter(rl_out.values())
    if rl_out:
        log.info("RL pool: left out %d problems with an unverifiable reference answer and %d the teacher never "
                 "solved (filter.rl_keep_unverifiable_gold / filter.rl_keep_unsolved keep them)",
                 rl_dropped["unverifiable_gold"], rl_dropped["unsolved"])
    hist = [0] * 5
    for s in stats.values():
        hist[min(4, int(s["pass_rate"] * 5))] += 1
    sampled_lengths = [r.get("num_tokens", 0) for r in annotated if r.get("num_tokens", 0) > 0]
    edges = _bin_edges(sampled_lengths)
    kept_lengths = [r.get("num_tokens", 0) for r in accepted if r.get("num_tokens", 0) > 0]

    write_jsonl(out / "verdicts.jsonl", annotated)
    write_jsonl(out / "midtrain.jsonl", midtrain)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "dpo.jsonl", pairs)
    write_jsonl(out / "rl_prompts.jsonl", rl_prompts)
    result = FilterResult(len(rollouts), len(accepted), {k: counts.get(k, 0) for k in ("correct", *REJECT_ORDER)},
                          len(sft), len(pairs), len(rl_prompts), hist, edges, _histogram(sampled_lengths, edges),
                          _histogram(kept_lengths, edges), dict(sorted(per_bench.items())),
                          {k: rl_dropped.get(k, 0) for k in ("unverifiable_gold", "unsolved")}, normalized)
    write_json(out / "summary.json", result.__dict__)
    export_hf(cfg, out / "hf", sft, pairs, rl_prompts, result)
    return result


def export_hf(cfg: Recipe, out: Path, sft: list[dict[str, Any]], pairs: list[dict[str, Any]],
              rl_prompts: list[dict[str, Any]], result: FilterResult) -> None:
    """The exported sets in TRL's conversational formats, each in its own folder with a dataset card
    (``README.md``, huggingface_hub's DatasetCard) recording the filter's counts and decontamination:
    ``hf/sft`` (``messages``: system, user, assistant), ``hf/dpo`` (``prompt`` as [system, user],
    ``chosen``/``rejected`` as one assistant turn), ``hf/rl`` (``prompt`` as [system, user] plus
    ``answer``/``answer_type`` for a verifier reward). The stages read the flat files above; these are
    for ``datasets.load_dataset("json", data_files=...)`` and TRL's trainers."""
    from thinkforge.cards import dataset_card
    from thinkforge.templates import messages

    f = cfg.filter
    decon = {"enabled": f.decontaminate, "ngram": f.decontaminate_ngram, "threshold": f.decontaminate_threshold,
             "against": [b.name for b in cfg.evaluate.benchmarks] + list(f.decontaminate_extra),
             "contaminated_problems": dict(result.contamination),
             "contaminated_rollouts": result.counts.get("contaminated", 0)}
    counts = {"rollouts": result.rollouts, "kept": result.kept,
              **{f"dropped_{k}": v for k, v in result.counts.items() if k != "correct" and v}}

    def prompt(problem: str) -> list[dict[str, str]]:
        return messages(problem, cfg.template)

    sets = {
        "sft": ("SFT: conversational language modeling (`messages`)", [
            {"problem_id": r["problem_id"],
             "messages": [*prompt(r["problem"]), {"role": "assistant", "content": r["completion"]}]} for r in sft]),
        "dpo": ("DPO: conversational preference with explicit prompt (`prompt`, `chosen`, `rejected`)", [
            {"problem_id": r["problem_id"], "prompt": prompt(r["problem"]),
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pairs]),
        "rl": ("RL: conversational prompt-only (`prompt`) with the reference `answer` for the reward", [
            {"problem_id": r["id"], "prompt": prompt(r["problem"]), "answer": r["answer"],
             "answer_type": r["answer_type"], "pass_rate": r.get("pass_rate")} for r in rl_prompts]),
    }
    for name, (fmt, rows) in sets.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / ".data.jsonl.tmp"  # plain rows (no record version field): exactly the documented columns
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(d / "data.jsonl")
        card = dataset_card(f"{cfg.run.name} {name} data", "Teacher rollouts verified, filtered and split by "
                            "thinkforge's filter stage (system message: the recipe's template).", fmt,
                            {name: len(rows), **counts}, decon, source=cfg.data.train, tags=[name])
        (d / "README.md").write_text(card)


def _bin_edges(values: list[int], bins: int = LENGTH_BINS) -> list[int]:
    if not values:
        return []
    top = max(values)
    step = max(1, math.ceil(top / bins))
    return [step * i for i in range(bins + 1)]


def _histogram(values: Iterable[int], edges: list[int]) -> list[int]:
    if not edges:
        return []
    out = [0] * (len(edges) - 1)
    step = edges[1] - edges[0]
    for v in values:
        out[min(len(out) - 1, v // step)] += 1
    return out


def _shortest_first(r: dict[str, Any]) -> tuple[int, int]:
    return r.get("num_tokens", 0), r["sample_index"]


def _sft_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"problem_id": r["problem_id"], "problem": r["problem"], "completion": r["completion"]}


def _select_sft(accepted: list[dict[str, Any]], stats: dict[str, dict], cfg: Recipe) -> list[dict[str, Any]]:
    per_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in accepted:
        per_prompt[r["problem_id"]].append(r)
    picks = {pid: sorted(rows, key=_shortest_first)[: cfg.filter.sft_per_prompt] for pid, rows in per_prompt.items()}
    hardest_first = sorted(picks, key=lambda p: (stats[p]["pass_rate"], p))
    cap = cfg.filter.sft_max_examples
    if not cap:
        return [_sft_row(r) for pid in hardest_first for r in picks[pid]]
    by_domain: dict[str, list[str]] = defaultdict(list)
    for pid in hardest_first:
        by_domain[stats[pid]["domain"]].append(pid)
    queues = [by_domain[d] for d in sorted(by_domain)]
    chosen: list[dict[str, Any]] = []
    turn = 0
    while len(chosen) < cap and any(queues):
        q = queues[turn % len(queues)]
        turn += 1
        if q:
            chosen.extend(picks[q.pop(0)])
    return [_sft_row(r) for r in chosen[:cap]]


def _pairs(by_problem: dict[str, list[dict[str, Any]]], per_prompt: int) -> list[dict[str, Any]]:
    pairs = []
    for pid, rows in by_problem.items():
        good = sorted((r for r in rows if r["correct"]), key=_shortest_first)
        # Complete wrong answers only: never a truncated, timed-out or otherwise unfinished rollout.
        bad = [r for r in rows if r["reason"] == "wrong_answer" and not r["answer_correct"]]
        for g in good[:per_prompt]:
            if not bad:
                break
            # The closest in length to the chosen (no length shortcut).
            b = min(bad, key=lambda r: (abs(r.get("num_tokens", 0) - g.get("num_tokens", 0)), r["sample_index"]))
            bad.remove(b)
            pairs.append({"problem_id": pid, "problem": g["problem"], "chosen": g["completion"],
                          "rejected": b["completion"]})
    return pairs


def html_report(result: FilterResult) -> str:
    """A small self-contained HTML page: counts per reason, pass-rate and length histograms as bars."""
    def bars(items: list[tuple[str, int]], color: str = "#4a7") -> str:
        top = max([v for _, v in items] + [1])
        rows = "".join(
            f"<tr><td>{escape(str(label))}</td><td style='text-align:right'>{v}</td><td><div style='background:{color};"
            f"height:12px;width:{int(300 * v / top)}px'></div></td></tr>" for label, v in items)
        return f"<table>{rows}</table>"

    bins = [f"{20 * i}-{20 * (i + 1)}%" for i in range(5)]
    edges = result.length_bin_edges
    length_labels = [f"{edges[i]}-{edges[i + 1]}" for i in range(len(edges) - 1)]
    parts = [
        "<html><head><meta charset='utf-8'><title>thinkforge filter report</title></head>"
        "<body style='font-family:sans-serif'>",
        f"<h2>Filter: kept {result.kept} of {result.rollouts} rollouts</h2>",
        f"<h3>Rollouts by verdict</h3>{bars(list(result.counts.items()))}",
        f"<h3>Problems by pass rate</h3>{bars(list(zip(bins, result.pass_rate_histogram)))}",
    ]
    if length_labels:
        parts.append(f"<h3>Completion length (tokens), all sampled rollouts</h3>"
                     f"{bars(list(zip(length_labels, result.length_histogram)), '#48a')}")
        parts.append(f"<h3>Completion length (tokens), accepted rollouts</h3>"
                     f"{bars(list(zip(length_labels, result.kept_length_histogram)), '#4a7')}")
    if result.contamination:
        parts.append(f"<h3>Contaminated problems by benchmark</h3>{bars(list(result.contamination.items()), '#a44')}")
    left_out = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in result.rl_dropped.items() if v)
    parts.append(f"<p>SFT examples {result.sft}, DPO pairs {result.dpo_pairs}, RL prompts {result.rl_prompts}"
                 f"{f' (left out: {left_out})' if left_out else ''}</p></body></html>")
    return "".join(parts)
