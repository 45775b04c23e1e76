"""Stage 1, generate: sample chain-of-thought rollouts of the training problems from the teacher.

Resumable. The prompts to sample are cut into chunks of `generate.shard_prompts` (consecutive, in
source order); each chunk's rollouts are written as one shard, `<shard_dir>/shard-NNNNN.jsonl`,
atomically (temp file + rename) as soon as the chunk is done. A rerun with the same generation
settings reads the shards, skips every (problem_id, sample_index) already there, and samples only
the rest, so a killed run loses at most the chunk in flight. Each chunk is seeded from the run seed
and the ids of its problems (never from its position or from how many chunks came before), so the
resumed run produces exactly the rollouts an uninterrupted run would have, for a deterministic
engine. A shard write that fails for lack of space (or a file-size limit) leaves no shard under its
name and raises a `thinkforge.storage.DiskWriteError` naming it. When every chunk is done the shards
are merged, in source order, into the one JSONL at `out_path` (written atomically) and removed (kept
with `generate.keep_shards`).

`<shard_dir>/manifest.json` records the settings that shape the samples (teacher, engine, sampling,
template, data source, seed, chunking); shards written under other settings are discarded with a
warning instead of being mixed in. `samples_per_prompt` is not part of it: raising it samples only
the new indices. Shards live beside the output (`<out_path>.shards`) unless `generate.shard_dir`
points at a persistent place (a PVC).

Durable shards. When object storage is configured (`storage.endpoint` or `THINKFORGE_S3_ENDPOINT`),
every shard is also uploaded as soon as it is written, to

    <storage.prefix>/<run.name>/generate/shards/<digest>/manifest.json            the settings (informative)
    <storage.prefix>/<run.name>/generate/shards/<digest>/shard-NNNNN/shard-NNNNN.jsonl
    <storage.prefix>/<run.name>/generate/shards/<digest>/shard-NNNNN/_MANIFEST.json  written last

where `<digest>` hashes the manifest above and the problems to sample (their ids, text and answers),
so a rerun under the same run name with other settings or other data never picks them up. Each shard
is one :meth:`ObjectStore.upload_dir` (sha256 manifest last): a shard without its `_MANIFEST.json` is an
upload a kill interrupted and is never used. On start the stage downloads (sha256-verified) every
complete remote shard missing from its shard directory, and uploads local shards the store lacks,
before resuming: a retried KFP task on a fresh disk samples only the chunks no attempt finished, and
writes the same final file as an uninterrupted run. Remote shards are kept after the merge (a retry
that comes after the merge but before KFP uploaded the output restores instead of resampling);
`<prefix>/<run>/generate/` can be deleted once the run is done. A failed upload is logged and tried
again after the next shard; it never fails the stage (the local shards and the output are unaffected).

Failed samples (an OpenAI-compatible endpoint that kept failing) are written with
`finish_reason: "error"` and an `error` message; the filter drops them (reason `engine_error`). A rerun
retries exactly those. When more than `generate.max_error_fraction` of the samples failed, the stage
fails after saving its shards, so the rerun resumes.

Problems that already carry a completion (import mode, e.g. a public CoT data set) are passed
through as rollouts (sample index 0) without sampling.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinkforge.config import Recipe
from thinkforge.engines import SamplingParams, make_engine
from thinkforge.metrics import StageMetrics
from thinkforge.progress import progress
from thinkforge.records import RecordError, iter_jsonl, write_json, write_jsonl
from thinkforge.sources import imported_traces, load_problems
from thinkforge.templates import normalize_think

log = logging.getLogger("thinkforge.generate")

SHARD_FORMAT = 1
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.jsonl$")


class GenerationError(RuntimeError):
    """Too many samples failed, or the shard directory is in use."""


@dataclass
class GenerateResult:
    problems: int
    rollouts: int
    imported: int
    output_tokens: int
    seconds: float
    failed: int = 0  # samples the engine could not produce (finish_reason "error")
    resumed: int = 0  # samples taken from shards of an earlier, interrupted run
    shards: int = 0  # shards written by this run
    restored: int = 0  # shards downloaded from object storage (written by an earlier attempt)


def rollout_record(problem: dict, index: int, completion: str, finish_reason: str, num_tokens: int,
                   teacher: str, error: str = "") -> dict:
    rec = {
        "problem_id": problem["id"],
        "sample_index": index,
        "problem": problem["problem"],
        "answer": problem["answer"],
        "answer_type": problem.get("answer_type", "math"),
        "completion": completion,
        "finish_reason": finish_reason,
        "num_tokens": num_tokens,
        "teacher": teacher,
    }
    for key in ("subject", "level", "source"):  # domain tags the filter balances on
        if key in problem:
            rec[key] = problem[key]
    if error:
        rec["error"] = error
    return rec


def chunk_seed(run_seed: int, ids: list[str], indices: tuple[int, ...]) -> int:
    """The seed of one engine call: a function of what is sampled, not of when or where."""
    h = hashlib.blake2b(json.dumps([run_seed, ids, list(indices)]).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


def fingerprint(cfg: Recipe, teacher: str) -> dict[str, Any]:
    """The settings that decide what a shard holds; shards from other settings are not reused."""
    g = cfg.generate
    return {
        "format": SHARD_FORMAT,
        "teacher": str(teacher),
        "engine": g.engine,
        "endpoint_model": g.endpoint_model if g.engine == "openai" else "",
        "api": g.api if g.engine == "openai" else "",
        "completions_tokenizer": g.completions_tokenizer if g.engine == "openai" else "",
        "temperature": g.temperature,
        "top_p": g.top_p,
        "max_new_tokens": g.max_new_tokens,
        "batch_size": g.batch_size if g.engine == "hf" else 0,  # batch composition shapes hf samples
        "dtype": g.dtype if g.engine != "openai" else "",
        "shard_prompts": g.shard_prompts,
        "template": cfg.template.model_dump(),
        "seed": cfg.run.seed,
        "data": cfg.data.train,
    }


class ShardStore:
    """The shard directory of one generation: load what is done, add shards atomically."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._lock_fh: Any = None

    def __enter__(self) -> ShardStore:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fh.close()
            raise GenerationError(f"{self.root}: another generation is writing these shards") from None
        mpath = self.root / "manifest.json"
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
            except (OSError, ValueError):
                old = None
            if old != self.manifest:
                stale = self.shard_files()
                if stale:
                    log.warning("%s: %d shards were written with other generation settings; discarding them",
                                self.root, len(stale))
                for p in stale:
                    p.unlink()
        write_json(mpath, self.manifest)
        for tmp in self.root.glob(".*.tmp"):  # a write killed before its rename
            tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def shard_files(self) -> list[Path]:
        return sorted((p for p in self.root.iterdir() if _SHARD_RE.match(p.name)), key=lambda p: p.name)

    def load(self) -> tuple[dict[tuple[str, int], dict], dict[tuple[str, int], dict]]:
        """(done, failed): the latest good record and the latest failed record of each (problem, index)."""
        done: dict[tuple[str, int], dict] = {}
        failed: dict[tuple[str, int], dict] = {}
        for path in self.shard_files():
            try:
                rows = list(iter_jsonl(path))
            except RecordError as e:  # cannot happen with atomic writes, unless the disk lied
                log.warning("%s: unreadable shard (%s); its prompts are sampled again", path, e)
                path.unlink()
                continue
            for r in rows:
                note_sample(done, failed, r)
        return done, failed

    def add(self, records: list[dict]) -> Path:
        files = self.shard_files()
        seq = int(_SHARD_RE.match(files[-1].name).group(1)) + 1 if files else 0  # type: ignore[union-attr]
        path = self.root / f"shard-{seq:05d}.jsonl"
        try:
            write_jsonl(path, records)  # a temp file renamed into place: a failed write leaves no shard
        except OSError as e:
            from thinkforge.storage import raise_for_disk

            raise_for_disk(e, path, f"writing a generation shard of {len(records)} rollouts; nothing was kept "
                                    "under that name, a rerun samples its prompts again")
            raise
        _fsync_dir(self.root)
        return path


def note_sample(done: dict[tuple[str, int], dict], failed: dict[tuple[str, int], dict], rec: dict) -> None:
    """File a rollout under (problem, index): a good sample replaces a failed one, never the reverse."""
    key = (rec["problem_id"], rec["sample_index"])
    if rec.get("finish_reason") != "error":
        done[key] = rec
        failed.pop(key, None)
    elif key not in done:
        failed[key] = rec


class RemoteShards:
    """The durable copy of one generation's shards in object storage (see the module docstring)."""

    def __init__(self, store: Any, prefix: str):
        from thinkforge.storage import check_key

        self.store = store
        self.prefix = check_key(prefix)
        self.pending: list[Path] = []  # local shards whose upload failed; tried again after the next one

    @classmethod
    def for_recipe(cls, cfg: Recipe, manifest: dict[str, Any], todo: list[dict]) -> RemoteShards | None:
        """The remote shard set of these settings and problems, or None when no object storage is configured."""
        from thinkforge.storage import ObjectStore

        store = ObjectStore.from_config_or_none(cfg.storage)
        if store is None:
            return None
        store.ensure_bucket()
        problems = hashlib.sha256(json.dumps(todo, sort_keys=True, default=str).encode()).hexdigest()
        digest = hashlib.sha256(json.dumps({"manifest": manifest, "problems": problems}, sort_keys=True,
                                           default=str).encode()).hexdigest()[:16]
        self = cls(store, store.run_prefix(*cfg.run.scope(), "generate", "shards", digest))
        others = [p for p in store.list_prefixes(self.prefix.rsplit("/", 1)[0]) if p != self.prefix]
        if others:
            log.info("generate: %d shard set(s) of other settings or data under %s are not used",
                     len(others), store.uri(self.prefix.rsplit("/", 1)[0]))
        if not store.exists(f"{self.prefix}/manifest.json"):
            store.put_json(f"{self.prefix}/manifest.json", {**manifest, "problems_sha256": problems})
        return self

    @property
    def uri(self) -> str:
        return self.store.uri(self.prefix)

    def complete(self) -> list[str]:
        """Names (``shard-NNNNN``) of the remote shards whose upload finished (manifest present)."""
        from thinkforge.storage import MANIFEST

        names = set()
        for key in self.store.list_keys(self.prefix):
            parts = key[len(self.prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and _SHARD_RE.match(parts[0] + ".jsonl"):
                names.add(parts[0])
        return sorted(names)

    def sync(self, shards: ShardStore) -> int:
        """Download the complete remote shards the local directory lacks, upload the local ones the store
        lacks; returns how many were downloaded."""
        from thinkforge.storage import StorageError

        remote = self.complete()
        local = {p.name.removesuffix(".jsonl") for p in shards.shard_files()}
        restored = 0
        for name in remote:
            if name in local:
                continue
            with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=shards.root) as tmp:
                try:
                    got = self.store.download_dir(f"{self.prefix}/{name}", Path(tmp) / name)
                except StorageError as e:  # a corrupt object: its prompts are sampled again
                    log.warning("generate: remote shard %s unusable (%s); its prompts are sampled again", name, e)
                    continue
                os.replace(got / f"{name}.jsonl", shards.root / f"{name}.jsonl")
            restored += 1
        if restored:
            _fsync_dir(shards.root)
        for path in shards.shard_files():
            if path.name.removesuffix(".jsonl") not in remote:
                self.pending.append(path)
        self.flush()
        return restored

    def push(self, path: Path) -> None:
        """Upload one new local shard (and any earlier one whose upload failed)."""
        self.pending.append(path)
        self.flush()

    def flush(self) -> bool:
        """Upload the pending shards; False (with an error logged) when some could not be uploaded."""
        from thinkforge.storage import StorageError

        while self.pending:
            path = self.pending[0]
            name = path.name.removesuffix(".jsonl")
            try:
                with tempfile.TemporaryDirectory(prefix=f".{name}.up.", dir=path.parent) as tmp:
                    try:
                        os.link(path, Path(tmp) / path.name)
                    except OSError:
                        shutil.copyfile(path, Path(tmp) / path.name)
                    self.store.upload_dir(tmp, f"{self.prefix}/{name}")
            except (StorageError, OSError) as e:
                log.error("generate: upload of %s to %s failed (%s); %d shard(s) only on local disk, tried again "
                          "after the next shard", path.name, self.uri, e, len(self.pending))
                return False
            self.pending.pop(0)
        return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def generate(cfg: Recipe, out_path: str | Path, teacher_path: str | None = None,
             metrics: StageMetrics | None = None) -> GenerateResult:
    """Write rollout records (see thinkforge.records) to `out_path`, resuming from its shards."""
    g = cfg.generate
    start = time.time()
    out_path = Path(out_path)
    problems = load_problems(cfg.data.train, limit=cfg.data.train_limit, storage=cfg.storage)
    imported = [p for p in problems if imported_traces(p)]
    todo = [p for p in problems if not imported_traces(p) or g.sample_imported]
    teacher = teacher_path or g.teacher or cfg.model.student
    label = (g.endpoint_model or str(teacher)) if g.engine == "openai" else str(teacher)
    m = metrics or StageMetrics.disabled("generate")
    m.set("generate_prompts_planned", len(todo))

    def wanted(p: dict) -> range:
        first = len(imported_traces(p))  # the first indices are the imported traces
        return range(first, first + g.samples_per_prompt)

    root = Path(g.shard_dir) if g.shard_dir else out_path.with_name(out_path.name + ".shards")
    tokens = sampled = written = restored = 0
    engine = None
    manifest = fingerprint(cfg, teacher)
    with ShardStore(root, manifest) as store:
        remote = RemoteShards.for_recipe(cfg, manifest, todo) if todo else None  # import only: nothing to keep
        if remote is not None:
            restored = remote.sync(store)
        done, failed = store.load()
        resumed = sum((p["id"], i) in done for p in todo for i in wanted(p))
        if remote is not None:
            chunks = [todo[lo:lo + g.shard_prompts] for lo in range(0, len(todo), g.shard_prompts)]
            finished = sum(all((p["id"], i) in done for p in c for i in wanted(p)) for c in chunks)
            log.info("generate: restored %d shard(s) from %s; %d of %d chunks already done (%d of %d samples)",
                     restored, remote.uri, finished, math.ceil(len(todo) / g.shard_prompts), resumed,
                     len(todo) * g.samples_per_prompt)
        if resumed:
            log.info("resuming: %d of %d samples already in %s", resumed, len(todo) * g.samples_per_prompt, root)
        bar = progress(len(todo), desc="generate", unit="prompt")
        prompts_done = 0

        def advance(k: int) -> None:
            nonlocal prompts_done
            prompts_done += k
            bar.update(k)
            m.set("generate_prompts_done", prompts_done)

        try:
            for lo in range(0, len(todo), g.shard_prompts):
                chunk = todo[lo:lo + g.shard_prompts]
                groups: dict[tuple[int, ...], list[dict]] = defaultdict(list)
                for p in chunk:
                    need = tuple(i for i in wanted(p) if (p["id"], i) not in done)
                    if need:
                        groups[need].append(p)
                if not groups:
                    advance(len(chunk))
                    continue
                advance(len(chunk) - sum(len(v) for v in groups.values()))
                if engine is None:
                    engine = _make_engine(cfg, teacher, m)
                records = []
                for indices, group in groups.items():
                    params = SamplingParams(n=len(indices), temperature=g.temperature, top_p=g.top_p,
                                            max_new_tokens=g.max_new_tokens,
                                            seed=chunk_seed(cfg.run.seed, [p["id"] for p in group], indices))
                    outs = engine.generate([p["problem"] for p in group], params, progress=advance)
                    for p, comps in zip(group, outs):
                        for i, c in zip(indices, comps):
                            # R1 through a chat API: "...</think>answer", the opening tag sat in the prompt
                            text = f"<think>\n{c.reasoning}\n</think>\n\n{c.text}" if c.reasoning \
                                else normalize_think(c.text)
                            records.append(rollout_record(p, i, text, c.finish_reason, c.num_tokens, label,
                                                          error=c.error))
                path = store.add(records)
                if remote is not None:
                    remote.push(path)
                written += 1
                chunk_tokens = sum(r["num_tokens"] for r in records)
                tokens += chunk_tokens
                sampled += len(records)
                for r in records:
                    note_sample(done, failed, r)
                m.inc("generate_samples_total", len(records))
                m.inc("generate_output_tokens_total", chunk_tokens)
                elapsed = max(time.time() - start, 1e-9)
                m.set("generate_samples_per_second", sampled / elapsed)
                m.set("generate_output_tokens_per_second", tokens / elapsed)
        finally:
            bar.close()
            if engine is not None:
                engine.close()

        if remote is not None and not remote.flush():
            log.error("generate: %d shard(s) could not be uploaded to %s; a retry on a fresh disk samples them "
                      "again", len(remote.pending), remote.uri)
        records = [rollout_record(p, i, trace, "stop", 0, "imported") for p in imported
                   for i, trace in enumerate(imported_traces(p))]
        n_failed = 0
        for p in todo:
            for i in wanted(p):
                rec = done.get((p["id"], i)) or failed.get((p["id"], i))
                if rec is None:  # every wanted pair was sampled above; a missing one is a bug
                    raise GenerationError(f"{root}: no sample for problem {p['id']!r} index {i}")
                n_failed += rec.get("finish_reason") == "error"
                records.append(rec)
        total = len(todo) * g.samples_per_prompt
        if total and n_failed > g.max_error_fraction * total:
            errors = sorted({r.get("error", "")[:120] for r in records if r.get("finish_reason") == "error"})
            raise GenerationError(
                f"{n_failed} of {total} samples failed (generate.max_error_fraction={g.max_error_fraction}); "
                f"shards kept in {root}, a rerun retries only the failed samples. Errors: {'; '.join(errors[:5])}")
        for r in records:
            r.pop("v", None)
        write_jsonl(out_path, records)
    if not g.keep_shards and not n_failed:
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.time() - start
    if seconds > 0:
        m.set("generate_samples_per_second", sampled / seconds)
        m.set("generate_output_tokens_per_second", tokens / seconds)
    all_tokens = sum(r["num_tokens"] for r in records)
    return GenerateResult(len(problems), len(records), len(imported), all_tokens, seconds,
                          failed=n_failed, resumed=resumed, shards=written, restored=restored)


def _make_engine(cfg: Recipe, teacher: Any, metrics: StageMetrics) -> Any:
    g = cfg.generate
    http: dict[str, Any] = {}
    if g.engine == "openai":
        http = dict(g.client_options(), metrics=metrics)
    return make_engine(g.engine, teacher, cfg.template, dtype=g.dtype, batch_size=g.batch_size,
                       trust_remote_code=cfg.model.trust_remote_code, tensor_parallel_size=g.tensor_parallel_size,
                       endpoint=g.endpoint, endpoint_model=g.endpoint_model, seed=cfg.run.seed, **http)
