"""The model registry: finished models with their eval results, recipe, model card and lineage, and a
promotion gate that moves a `champion.json` pointer only for a model that wins.

Layout (the same in MinIO/S3 under `storage.bucket`, and in a local directory when no endpoint is set):

    <registry.prefix>/<name>/
        versions/<version>/model/...            the weights (with their own _MANIFEST.json, written last)
        versions/<version>/eval/results-<label>.json   eval results (base, per stage, final)
        versions/<version>/recipe.yaml          the resolved recipe
        versions/<version>/MODEL_CARD.md        the model card (metrics, protocol, lineage)
        versions/<version>/manifest.json        written LAST: its existence means the entry is complete
        champion.json                           the promoted version (compare-and-swap updates)
        decisions/<version>.json                every gate decision, promoted or not

`<name>` is `registry.name` (default the run name); keys are built with `thinkforge.storage.safe_key`,
so names cannot escape their prefix. A champion only ever points at a complete entry: the manifest is
written before the pointer moves.

Versions are `<UTC time>-<config digest>-<id>`. Published from a KFP run (`kfp_run`, the pipeline job
id, which a retried task keeps), `<id>` is derived from the run id and the model's tree digest, so a
retried publish finds the version its earlier attempt started and finishes it instead of publishing a
twin: what is already complete (the model, the entry) is kept, a pointer the earlier attempt already
moved to this version counts as this version's promotion, and a decision already recorded is returned
as it is. Without a run id (a local run outside KFP) `<id>` is random: every call is a new version.

The gate compares the candidate with the champion on `registry.benchmark`/`registry.metric` (default:
the first benchmark's pass@1) and promotes only when the candidate is higher by more than
`registry.margin`. Numbers measured under different protocols (benchmark source, limit, answer type,
temperature, top_p, max tokens, extraction) are not compared: the run is not promoted and says why
(`registry.force` overrides). A run that is not promoted is not a failure: the decision and its reason
go to the report and the KFP Metrics.

`champion.json` moves by compare-and-swap: S3 conditional writes (`If-Match` on the ETag read, or
`If-None-Match: *` for the first champion; MinIO and AWS S3 honour both) or, locally, an exclusive file
lock and an atomic rename. When another run moved the pointer in between, the gate runs again against
the new champion.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from thinkforge.cards import model_card  # noqa: F401 - registry.model_card stays importable
from thinkforge.config import Recipe
from thinkforge.scoring import metrics_only, paired_bootstrap
from thinkforge.storage import MANIFEST, raise_for_disk, replace_dir, safe_key, split_prefix, upload_files

log = logging.getLogger("thinkforge.registry")

FORMAT = "thinkforge-registry/1"
ENTRY_MANIFEST = "manifest.json"
CHAMPION = "champion.json"
#: protocol fields that must match for two numbers to be compared
PROTOCOL_KEYS = ("temperature", "top_p", "max_new_tokens", "extraction")
BENCHMARK_KEYS = ("source", "answer_type", "limit", "n_problems")
STAGE_LABELS = ("base", "midtrain", "sft", "dpo", "final")
_CAS_TRIES = 5


class RegistryError(RuntimeError):
    """The registry cannot be read or written (the message names where)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(files: dict[str, dict[str, Any]]) -> str:
    """One digest of a directory: sha256 over its sorted (path, sha256) list."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def dir_files(root: Path) -> dict[str, dict[str, Any]]:
    return {f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != MANIFEST}


# --- backends: the same keys in S3 or in a directory ---------------------------------------------


class LocalBackend:
    """A registry in a local directory (runs without an object-storage endpoint)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalBackend({self.root})"

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root):
            raise RegistryError(f"registry key {key!r} escapes {self.root}")
        return p

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def upload_dir(self, local: Path, key: str) -> dict[str, Any]:
        """Copy a directory in (its manifest last). Symbolic links inside it are refused, not followed."""
        dest = self._path(key)
        listed = upload_files(local)  # ValueError on a link, before anything is written
        (dest / MANIFEST).unlink(missing_ok=True)
        files: dict[str, dict[str, Any]] = {}
        for path, rel in listed:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(path, target)
            except OSError as e:
                raise_for_disk(e, target, f"copying {path} into the registry")
                raise
            files[rel] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
        manifest = {"version": 1, "created": time.time(), "files": files,
                    "total_bytes": sum(f["size"] for f in files.values())}
        self._write(f"{key}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

    def dir_manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of a complete directory at `key`, or None."""
        data = self.get_bytes(f"{key}/{MANIFEST}")
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    def download_dir(self, key: str, local: Path) -> Path:
        """Copy a complete directory out to `local` (replaced if it exists), each file checked against the
        manifest. The copy lands in a temporary sibling renamed into place when complete: a failed copy (a
        full disk) leaves nothing at `local` and names the file it could not write."""
        src = self._path(key)
        m = self.dir_manifest(key)
        if m is None or not isinstance(m.get("files"), dict):
            raise RegistryError(f"{src}: no {MANIFEST} (incomplete entry)")
        dest = Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for rel, meta in m["files"].items():
                source, target = self._path(f"{key}/{rel}"), tmp / rel
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise RegistryError(f"{src}: manifest entry {rel!r} escapes the directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(source, target)
                except OSError as e:
                    raise_for_disk(e, target, f"copying {source} out of the registry into {dest}; the partial "
                                              "copy was removed and nothing there looks complete")
                    raise
                if target.stat().st_size != meta.get("size") or sha256_file(target) != meta.get("sha256"):
                    raise RegistryError(f"{source}: does not match its manifest (size or sha256); corrupt entry")
            try:
                (tmp / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True))
            except OSError as e:
                raise_for_disk(e, tmp / MANIFEST, f"copying {src} out of the registry into {dest}; the partial "
                                                  "copy was removed and nothing there looks complete")
                raise
            replace_dir(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def list_children(self, key: str) -> list[str]:
        p = self._path(key)
        return sorted(c.name for c in p.iterdir() if c.is_dir()) if p.is_dir() else []

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        data = self.get_bytes(key)
        return data, (hashlib.sha256(data).hexdigest() if data is not None else None)

    def put_if(self, key: str, data: bytes, token: str | None) -> bool:
        """Write `data` only if the object still has version `token` (None: only if it does not exist)."""
        with self._lock(key):
            _, now = self.read_versioned(key)
            if now != token:
                return False
            self._write(key, data)
            return True


class S3Backend:
    """A registry in a MinIO/S3 bucket, through `thinkforge.storage.ObjectStore`."""

    def __init__(self, store: Any):
        self.store = store

    def __repr__(self) -> str:
        return f"S3Backend({self.store!r})"

    def uri(self, key: str) -> str:
        return self.store.uri(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.store.put_bytes(key, data, content_type="application/json" if key.endswith(".json") else "text/plain")

    def get_bytes(self, key: str) -> bytes | None:
        from thinkforge.storage import NotFound

        try:
            return self.store.get_bytes(key)
        except NotFound:
            return None

    def upload_dir(self, local: Path, key: str) -> dict[str, Any]:
        return self.store.upload_dir(local, key)

    def download_dir(self, key: str, local: Path) -> Path:
        return self.store.download_dir(key, local)

    def dir_manifest(self, key: str) -> dict[str, Any] | None:
        from thinkforge.storage import IncompleteError

        try:
            return self.store.manifest(key)
        except IncompleteError:
            return None

    def list_children(self, key: str) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in self.store.list_prefixes(key)]

    # Conditional requests are not part of ObjectStore's API: they go through its retrying call
    # wrapper and its minio client, with the S3 headers set directly.
    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        from minio.error import S3Error

        store = self.store

        def go() -> tuple[bytes | None, str | None]:
            try:
                resp = store._client.get_object(store.bucket, key)
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return None, None
                raise
            try:
                return resp.read(), (resp.headers.get("ETag") or "").strip('"') or None
            finally:
                resp.close()
                resp.release_conn()

        return store._call("get", key, go)

    def put_if(self, key: str, data: bytes, token: str | None) -> bool:
        from minio.error import S3Error

        store = self.store
        headers = {"Content-Type": "application/json"}
        if token is None:
            headers["If-None-Match"] = "*"
        else:
            headers["If-Match"] = f'"{token}"'

        def go() -> bool:
            try:
                store._client._put_object(store.bucket, key, data, headers)
                return True
            except S3Error as e:
                if e.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise

        return store._call("put", key, go)


def open_backend(cfg: Recipe) -> LocalBackend | S3Backend:
    """S3 when an endpoint is configured (storage.endpoint or THINKFORGE_S3_ENDPOINT), else a directory."""
    from thinkforge.storage import ObjectStore

    store = ObjectStore.from_config_or_none(cfg.storage)
    if store is not None:
        store.ensure_bucket()
        return S3Backend(store)
    return LocalBackend(cfg.registry.local_dir or cfg.run.output_dir)


# --- the registry ------------------------------------------------------------------------------


class Registry:
    def __init__(self, backend: LocalBackend | S3Backend, prefix: str, name: str):
        if not name:
            raise RegistryError("registry: empty model name (set registry.name or run.name)")
        self.backend = backend
        self.name = name
        self.root = safe_key(*split_prefix(prefix), name)

    @classmethod
    def for_recipe(cls, cfg: Recipe, backend: LocalBackend | S3Backend | None = None) -> Registry:
        return cls(backend or open_backend(cfg), cfg.registry.prefix, cfg.registry.name or cfg.run.name)

    def key(self, *parts: str) -> str:
        return f"{self.root}/{safe_key(*parts)}"

    def entry(self, version: str) -> str:
        return self.key("versions", version)

    def uri(self, key: str = "") -> str:
        return self.backend.uri(key or self.root)

    def get_json(self, key: str) -> Any:
        data = self.backend.get_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise RegistryError(f"{self.backend.uri(key)}: not valid JSON ({e})") from None

    def put_json(self, key: str, obj: Any) -> None:
        self.backend.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def versions(self) -> list[str]:
        """Complete versions (their manifest exists), oldest first."""
        return [v for v in self.backend.list_children(self.key("versions"))
                if self.backend.get_bytes(f"{self.entry(v)}/{ENTRY_MANIFEST}") is not None]

    def manifest(self, version: str) -> dict[str, Any] | None:
        return self.get_json(f"{self.entry(version)}/{ENTRY_MANIFEST}")

    def champion(self) -> tuple[dict[str, Any] | None, str | None]:
        data, token = self.backend.read_versioned(self.key(CHAMPION))
        if data is None:
            return None, None
        try:
            return json.loads(data), token
        except ValueError as e:
            raise RegistryError(f"{self.backend.uri(self.key(CHAMPION))}: not valid JSON ({e})") from None

    def find_version(self, ident: str) -> str | None:
        """The version (complete or not) whose id is `ident` (see `version_id`), or None."""
        found = [v for v in self.backend.list_children(self.key("versions")) if v.endswith(f"-{ident}")]
        return found[0] if found else None

    def fetch_model(self, dest: str | os.PathLike[str], version: str = "") -> Path:
        """Download a version's weights (default: the champion) into `dest`."""
        if not version:
            champ, _ = self.champion()
            if champ is None:
                raise RegistryError(f"{self.uri()}: no champion yet")
            version = champ["version"]
        return self.backend.download_dir(f"{self.entry(version)}/model", Path(dest))


def version_id(kfp_run: str, model_digest: str) -> str:
    """The id of what one KFP run publishes: a retried publish of the same run and model gets the same."""
    return hashlib.sha256(f"thinkforge-publish\0{kfp_run}\0{model_digest}".encode()).hexdigest()[:12]


def new_version(cfg: Recipe, ident: str = "") -> str:
    """`<UTC time>-<config digest>-<id>`: sortable by time; `id` is `version_id(...)` or random (unique
    across concurrent runs)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{cfg.digest()[:8]}-{ident or uuid.uuid4().hex[:6]}"


def gate_target(cfg: Recipe) -> tuple[str, str]:
    bench = cfg.registry.benchmark or (cfg.evaluate.benchmarks[0].name if cfg.evaluate.benchmarks else "")
    return bench, cfg.registry.metric


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def decide(cfg: Recipe, candidate: dict[str, Any], champion: dict[str, Any] | None,
           champion_manifest: dict[str, Any] | None, champion_results: dict[str, Any] | None = None,
           candidate_per_problem: dict[str, float] | None = None) -> dict[str, Any]:
    """The promotion gate. `candidate` is this run's gate view (`gate_view`); returns a decision dict
    with `promote` (bool) and `reason` (a sentence)."""
    r = cfg.registry
    bench, metric = gate_target(cfg)
    out: dict[str, Any] = {"benchmark": bench, "metric": metric, "margin": r.margin,
                           "candidate_value": candidate.get("value")}
    if champion is not None:
        out["champion_version"] = champion.get("version")

    def result(promote: bool, reason: str) -> dict[str, Any]:
        if r.force and not promote:
            return {**out, "promote": True, "forced": True,
                    "reason": f"promoted by registry.force (the gate said: {reason})"}
        return {**out, "promote": promote, "forced": False, "reason": reason}

    value = candidate.get("value")
    if value is None:
        return result(False, f"this run has no {bench} {metric} result (evaluation off, or no such benchmark/metric)")
    if champion is None:
        return result(True, f"no champion yet: {bench} {metric} {_pct(value)} becomes the first")
    cm = champion_manifest or {}
    champ_value = cm.get("metrics", {}).get(bench, {}).get(metric)
    out["champion_value"] = champ_value
    if champ_value is None:
        return result(False, f"the champion {champion.get('version')} has no {bench} {metric} result to compare "
                             "with (set registry.force=true to promote anyway)")
    diffs = []
    for key in PROTOCOL_KEYS:
        a, b = candidate.get("protocol", {}).get(key), cm.get("protocol", {}).get(key)
        if a != b:
            diffs.append(f"{key} {b!r} -> {a!r}")
    for key in BENCHMARK_KEYS:
        a = candidate.get("benchmark_spec", {}).get(key)
        b = cm.get("benchmarks", {}).get(bench, {}).get(key)
        if a != b:
            diffs.append(f"{bench} {key} {b!r} -> {a!r}")
    if diffs:
        return result(False, f"not comparable with the champion {champion.get('version')}: measured under a "
                             f"different protocol ({'; '.join(diffs)}); set registry.force=true to promote anyway")
    base_pp = (champion_results or {}).get("benchmarks", {}).get(bench, {}).get("per_problem")
    if base_pp and candidate_per_problem and metric == "pass@1":
        with contextlib.suppress(ValueError):
            out["bootstrap"] = paired_bootstrap(base_pp, candidate_per_problem, samples=cfg.evaluate.bootstrap_samples,
                                                seed=cfg.run.seed)
    gain = value - champ_value
    out["gain"] = gain
    if gain > r.margin:
        return result(True, f"{bench} {metric} {_pct(value)} beats the champion {champion.get('version')} "
                            f"({_pct(champ_value)}) by {100 * gain:+.1f} points (margin {100 * r.margin:.1f})")
    return result(False, f"{bench} {metric} {_pct(value)} does not beat the champion {champion.get('version')} "
                         f"({_pct(champ_value)}) by more than the margin of {100 * r.margin:.1f} points "
                         f"({100 * gain:+.1f})")


def gate_view(cfg: Recipe, final: dict[str, Any] | None) -> dict[str, Any]:
    bench, metric = gate_target(cfg)
    b = (final or {}).get("benchmarks", {}).get(bench, {})
    return {"benchmark": bench, "metric": metric, "value": b.get(metric),
            "protocol": (final or {}).get("protocol", {}),
            "benchmark_spec": (final or {}).get("benchmark_specs", {}).get(bench, {})}


def lineage(cfg: Recipe, artifacts: dict[str, Any], kfp_run: str = "") -> dict[str, Any]:
    """Where the model came from: input sources, the digests of the artifacts seen here, the config hash."""
    g = cfg.generate
    teacher = (f"{g.endpoint_model}@{g.endpoint}" if g.engine == "openai"
               else g.teacher or cfg.model.student)
    return {
        "config_digest": cfg.digest(),
        "kfp_run": kfp_run,
        "sources": {
            "student": cfg.model.student, "tokenizer": cfg.model.tokenizer or cfg.model.student,
            "teacher": teacher, "train": cfg.data.train, "train_limit": cfg.data.train_limit,
            "train_snapshot": cfg.data.snapshot,
            "benchmarks": {b.name: b.source or b.dataset or b.name for b in cfg.evaluate.benchmarks},
        },
        "stages": {s: getattr(cfg, s).enabled for s in ("midtrain", "sft", "dpo", "rl")},
        "artifacts": artifacts,
    }


def artifact_digest(path: str | os.PathLike[str], uri: str = "") -> dict[str, Any]:
    """sha256 (a file) or tree digest (a directory) of an artifact, with its URI when known."""
    p = Path(path)
    out: dict[str, Any] = {"uri": uri} if uri else {}
    if p.is_file():
        out.update(sha256=sha256_file(p), size=p.stat().st_size)
    elif p.is_dir():
        files = dir_files(p)
        out.update(sha256=tree_digest(files), size=sum(f["size"] for f in files.values()), files=len(files))
    return out


def publish(cfg: Recipe, model_dir: str | os.PathLike[str], results: dict[str, dict[str, Any] | None],
            artifacts: dict[str, Any] | None = None, kfp_run: str = "",
            backend: LocalBackend | S3Backend | None = None) -> dict[str, Any]:
    """Publish the final model, its eval results (`results[label]`, label in base/midtrain/sft/dpo/final;
    None or skipped results are left out) and the recipe as a registry version, then run the promotion
    gate. Returns the decision (published, promoted, reason, version, where, gate, ...) and the model
    card's text (`card`); the decision without the card is kept at `decisions/<version>.json`.

    With `kfp_run` (the KFP pipeline job id) the version is derived from the run and the model's digest:
    a retry of the same run with the same model finishes the version its earlier attempt started (see
    the module docstring) instead of publishing a twin that "does not beat the champion"."""
    from thinkforge.models import follow_pointer, is_model_file, stage_model_folder

    reg = Registry.for_recipe(cfg, backend)
    results = {k: v for k, v in results.items() if v and not v.get("skipped")}
    model = follow_pointer(Path(model_dir))
    t0 = time.time()
    model_digest = ident = ""
    earlier = None
    if kfp_run:
        model_digest = tree_digest({rel: f for rel, f in dir_files(model).items() if is_model_file(rel)})
        ident = version_id(kfp_run, model_digest)
        earlier = reg.find_version(ident)
    version = earlier or new_version(cfg, ident)
    entry = reg.entry(version)
    decision_key = reg.key("decisions", f"{version}.json")
    if earlier:
        log.info("publishing %s: version %s was started by an earlier attempt of KFP run %s; finishing it",
                 reg.name, version, kfp_run)
        recorded = reg.get_json(decision_key)
        if recorded is not None and reg.manifest(version) is not None:
            log.info("%s %s: decided by the earlier attempt: %s (%s)", reg.name, version,
                     "PROMOTED" if recorded.get("promoted") else "not promoted", recorded.get("reason"))
            card = reg.backend.get_bytes(f"{entry}/MODEL_CARD.md")
            return {**recorded, "card": card.decode() if card is not None else ""}
    else:
        log.info("publishing %s version %s to %s", reg.name, version, reg.uri(entry))

    final = results.get("final")
    candidate = gate_view(cfg, final)
    lin = lineage(cfg, artifacts or {}, kfp_run)
    existing = reg.manifest(version) if earlier else None
    # The folder a user downloads: only the model, the evaluation protocol as its generation config, the
    # system message in its chat template, the card as README.md (thinkforge.models.stage_model_folder).
    staging = Path(tempfile.mkdtemp(prefix="thinkforge-publish-"))
    atexit.register(shutil.rmtree, staging, True)
    staged = stage_model_folder(model, staging / "model", cfg,
                                model_card(cfg, reg.name, version, results, None, lin, in_model_folder=True))
    staged_digest = tree_digest(dir_files(staged))
    if existing is not None and existing.get("model", {}).get("digest") == staged_digest:
        model_info = existing["model"]  # the entry is complete: only the gate (and its record) is left
        card = model_card(cfg, reg.name, version, results, model_info, lin)
    else:
        mm = reg.backend.dir_manifest(f"{entry}/model") if earlier else None
        if mm is None or tree_digest(mm.get("files", {})) != staged_digest:
            mm = reg.backend.upload_dir(staged, f"{entry}/model")
        model_info = {"files": len(mm["files"]), "total_bytes": mm["total_bytes"], "digest": tree_digest(mm["files"])}
        files: dict[str, Any] = {f"model/{rel}": meta for rel, meta in mm["files"].items()}

        def put(rel: str, data: bytes) -> None:
            reg.backend.put_bytes(f"{entry}/{rel}", data)
            files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

        for label, res in results.items():
            put(f"eval/results-{safe_key(label)}.json", json.dumps(res, indent=2, sort_keys=True, default=str).encode())
        put("recipe.yaml", cfg.to_yaml().encode())
        card = model_card(cfg, reg.name, version, results, model_info, lin)
        put("MODEL_CARD.md", card.encode())

        manifest = {
            "format": FORMAT, "name": reg.name, "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config_digest": cfg.digest(), "run": {"name": cfg.run.name, "seed": cfg.run.seed, "kfp_run": kfp_run},
            "model": model_info, "metrics": metrics_only(final),
            "stages": {lbl: {b: m.get("pass@1") for b, m in metrics_only(res).items()}
                       for lbl, res in results.items()},
            "protocol": (final or {}).get("protocol", {}), "benchmarks": (final or {}).get("benchmark_specs", {}),
            "gate": {"benchmark": candidate["benchmark"], "metric": candidate["metric"], "value": candidate["value"]},
            "lineage": lin, "card": "MODEL_CARD.md", "files": dict(sorted(files.items())),
        }
        reg.put_json(f"{entry}/{ENTRY_MANIFEST}", manifest)  # LAST: the entry is complete from here on
    shutil.rmtree(staging, ignore_errors=True)

    per_problem = (final or {}).get("benchmarks", {}).get(candidate["benchmark"], {}).get("per_problem")
    for _ in range(_CAS_TRIES):
        champ, token = reg.champion()
        if earlier and champ is not None:
            done = _earlier_promotion(cfg, candidate, champ, version)
            if done is not None:
                decision = done
                break
        champ_manifest = champ_results = None
        if champ is not None:
            champ_manifest = reg.manifest(champ["version"])
            champ_results = reg.get_json(f"{reg.entry(champ['version'])}/eval/results-final.json")
        decision = decide(cfg, candidate, champ, champ_manifest, champ_results, per_problem)
        if not decision["promote"]:
            break
        pointer = {"name": reg.name, "version": version, "benchmark": candidate["benchmark"],
                   "metric": candidate["metric"], "value": candidate["value"],
                   "promoted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": decision["reason"],
                   "manifest": f"versions/{version}/{ENTRY_MANIFEST}",
                   "previous": {"version": champ.get("version"), "value": champ.get("value")} if champ else None}
        if reg.backend.put_if(reg.key(CHAMPION), json.dumps(pointer, indent=2, sort_keys=True).encode(), token):
            break
        now, _ = reg.champion()
        if now is not None and now.get("version") == version:  # our write landed; only its answer was lost
            break
        log.warning("champion moved while this run was deciding; running the gate again")
    else:
        decision = {**decision, "promote": False,
                    "reason": f"champion pointer kept changing under {_CAS_TRIES} attempts; not promoted"}
    out = {"published": True, "promoted": decision["promote"], "reason": decision["reason"], "name": reg.name,
           "version": version, "where": reg.uri(entry), "champion_uri": reg.uri(reg.key(CHAMPION)),
           "seconds": time.time() - t0, "gate": decision}
    reg.put_json(decision_key, out)
    log.info("%s %s: %s (%s)", reg.name, version, "PROMOTED" if out["promoted"] else "not promoted", out["reason"])
    return {**out, "card": card}


def _earlier_promotion(cfg: Recipe, candidate: dict[str, Any], champ: dict[str, Any],
                       version: str) -> dict[str, Any] | None:
    """The decision an earlier attempt of this run already carried out (it moved the pointer to `version`,
    then died before recording it), or None when the pointer says nothing about `version`."""
    bench, metric = gate_target(cfg)
    base = {"benchmark": bench, "metric": metric, "margin": cfg.registry.margin,
            "candidate_value": candidate.get("value"), "promote": True, "resumed": True,
            "forced": str(champ.get("reason", "")).startswith("promoted by registry.force")}
    if champ.get("version") == version:
        prev = champ.get("previous") or {}
        return {**base, "champion_version": prev.get("version"),
                "reason": f"{champ.get('reason')} (the champion pointer was moved by an earlier attempt of this "
                          "KFP run; this retry finished the publish)"}
    if (champ.get("previous") or {}).get("version") == version:
        return {**base, "superseded_by": champ.get("version"),
                "reason": f"promoted by an earlier attempt of this KFP run, and since superseded by "
                          f"{champ.get('version')} ({_pct(champ.get('value'))})"}
    return None


# --- by hand: list, show, fetch, promote, rollback (`thinkforge registry ...`) -------------------
#
# A manual promotion or rollback moves `champion.json` with the same compare-and-swap as the gate
# (`put_if` on the token read), and refuses rather than retries when the pointer moved in between:
# a person decided against the champion they saw, not against whatever is there now. The pointers
# these write carry `history` (earlier champions, newest first), so rollback pops one; a pointer the
# gate wrote (publish) carries only `previous`, and the chain behind it comes from the decision log
# (`decisions/<version>.json` of a promoted publish names the champion it replaced). Every manual move
# is recorded under `decisions/manual-<UTC time>-<action>-<version>.json` with who and why.

HISTORY_DEPTH = 50


class ChampionMoved(RegistryError):
    """The champion pointer changed between reading it and writing it: nothing was changed."""


def open_registry(target: str = "", cfg: Recipe | None = None) -> Registry:
    """The registry of `target` (`s3://bucket/<prefix>/<name>` or `minio://...`, or a local directory
    `<dir>/<prefix>/<name>`), else the recipe's (`registry.*` and `storage.*`)."""
    if target:
        if target.startswith(("s3://", "minio://")):
            from thinkforge.storage import ObjectStore

            store, key = ObjectStore.from_uri(target, cfg.storage if cfg is not None else None)
            parts = split_prefix(key)
            if not parts:
                raise RegistryError(f"{target}: expected s3://bucket/<prefix>/<name> (the model line's folder)")
            return Registry(S3Backend(store), "/".join(parts[:-1]), parts[-1])
        path = Path(target).expanduser().resolve()
        return Registry(LocalBackend(path.parent), "", path.name)
    if cfg is None:
        raise RegistryError("no registry: give --registry s3://bucket/registry/<name> (or a directory) or --recipe")
    return Registry.for_recipe(cfg)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def list_versions(reg: Registry) -> list[dict[str, Any]]:
    """Every version (oldest first) with its gate metric, per-benchmark pass@1, completeness and whether
    it is the champion."""
    champ, _ = reg.champion()
    champ_version = (champ or {}).get("version")
    out = []
    for v in reg.backend.list_children(reg.key("versions")):
        m = reg.manifest(v)
        row: dict[str, Any] = {"version": v, "complete": m is not None, "champion": v == champ_version}
        if m is not None:
            row.update(created=m.get("created"), gate=m.get("gate", {}),
                       metrics={b: {k: x for k, x in ms.items() if k.startswith(("pass@", "cons@"))}
                                for b, ms in (m.get("metrics") or {}).items()})
        out.append(row)
    return out


def show_version(reg: Registry, version: str) -> dict[str, Any]:
    """A version's manifest, model card and final results (metrics without per-problem scores)."""
    version = _resolve_version(reg, version)
    m = _complete_manifest(reg, version)
    card = reg.backend.get_bytes(f"{reg.entry(version)}/{m.get('card') or 'MODEL_CARD.md'}")
    champ, _ = reg.champion()
    return {"version": version, "where": reg.uri(reg.entry(version)), "manifest": m,
            "card": card.decode() if card is not None else "", "metrics": m.get("metrics", {}),
            "champion": (champ or {}).get("version") == version}


def fetch_version(reg: Registry, version: str, dest: str | os.PathLike[str]) -> Path:
    """Download a complete version's model folder into `dest`: every file checked against the model's
    manifest, written to a temporary sibling and renamed into place (nothing half-written on failure)."""
    version = _resolve_version(reg, version)
    _complete_manifest(reg, version)
    return reg.fetch_model(dest, version)


def _resolve_version(reg: Registry, version: str) -> str:
    if version in ("champion", "@champion"):
        champ, _ = reg.champion()
        if champ is None:
            raise RegistryError(f"{reg.uri()}: no champion yet")
        return champ["version"]
    return version


def _complete_manifest(reg: Registry, version: str) -> dict[str, Any]:
    known = reg.backend.list_children(reg.key("versions"))
    if version not in known:
        near = ", ".join(known[-5:]) or "none"
        raise RegistryError(f"{reg.uri()}: no version {version!r} (latest: {near})")
    m = reg.manifest(version)
    if m is None:
        raise RegistryError(f"{reg.uri(reg.entry(version))}: incomplete version (no {ENTRY_MANIFEST}: its publish "
                            "did not finish)")
    if reg.backend.dir_manifest(f"{reg.entry(version)}/model") is None:
        raise RegistryError(f"{reg.uri(reg.entry(version))}: incomplete version (its model has no manifest)")
    return m


def champion_history(reg: Registry, champ: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Earlier champions, newest first: the pointer's own `history`, or (a pointer the gate wrote) its
    `previous` and, behind that, the champion each promoted publish replaced (decision log)."""
    if champ is None:
        return []
    if isinstance(champ.get("history"), list):
        return [h for h in champ["history"] if isinstance(h, dict) and h.get("version")]
    out: list[dict[str, Any]] = []
    prev = (champ.get("previous") or {}).get("version")
    seen = {champ.get("version")}
    while prev and prev not in seen and len(out) < HISTORY_DEPTH:
        seen.add(prev)
        m = reg.manifest(prev) or {}
        out.append({"version": prev, "value": (m.get("gate") or {}).get("value")})
        decision = reg.get_json(reg.key("decisions", f"{prev}.json")) or {}
        gate = decision.get("gate") or {}
        prev = gate.get("champion_version") if decision.get("promoted") else None
    return out


def _pointer_entry(champ: dict[str, Any]) -> dict[str, Any]:
    return {k: champ.get(k) for k in ("version", "value", "promoted", "reason") if champ.get(k) is not None}


def _move_champion(reg: Registry, version: str, action: str, reason: str, by: str,
                   expect: tuple[dict[str, Any] | None, str | None],
                   history: list[dict[str, Any]]) -> dict[str, Any]:
    champ, token = expect
    m = _complete_manifest(reg, version)
    gate = m.get("gate") or {}
    why = f"{action} by {by}" + (f": {reason}" if reason else "")
    pointer = {"name": reg.name, "version": version, "benchmark": gate.get("benchmark"), "metric": gate.get("metric"),
               "value": gate.get("value"), "promoted": _now(), "reason": why, "manual": action, "by": by,
               "manifest": f"versions/{version}/{ENTRY_MANIFEST}",
               "previous": {"version": champ.get("version"), "value": champ.get("value")} if champ else None,
               "history": history[:HISTORY_DEPTH]}
    if not reg.backend.put_if(reg.key(CHAMPION), json.dumps(pointer, indent=2, sort_keys=True).encode(), token):
        now, _ = reg.champion()
        if now is None or now.get("promoted") != pointer["promoted"] or now.get("version") != version \
                or now.get("by") != by:
            raise ChampionMoved(f"{reg.uri(reg.key(CHAMPION))}: the champion moved while this {action} was deciding "
                                f"(it was {(champ or {}).get('version')}, it is now {(now or {}).get('version')}); "
                                "nothing was changed: look again and retry")
    record = {"action": action, "manual": True, "promoted": True, "name": reg.name, "version": version,
              "previous": (champ or {}).get("version"), "by": by, "reason": why, "note": reason, "time": pointer["promoted"],
              "where": reg.uri(reg.entry(version)), "champion_uri": reg.uri(reg.key(CHAMPION))}
    reg.put_json(reg.key("decisions", f"manual-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{action}-{version}"
                                      f"-{uuid.uuid4().hex[:4]}.json"), record)
    log.info("%s %s: champion %s -> %s (%s)", reg.name, action, record["previous"], version, why)
    return record


def promote_version(reg: Registry, version: str, reason: str = "", by: str = "") -> dict[str, Any]:
    """Make `version` the champion by hand (compare-and-swap on the pointer read here): refused for a
    version that does not exist or is incomplete, and when the pointer moved in between (`ChampionMoved`)."""
    _complete_manifest(reg, version)
    champ, token = reg.champion()
    if champ is not None and champ.get("version") == version:
        return {"action": "promote", "version": version, "previous": version, "unchanged": True,
                "reason": f"{version} is already the champion"}
    history = ([_pointer_entry(champ)] + champion_history(reg, champ)) if champ is not None else []
    return _move_champion(reg, version, "promote", reason, by or default_actor(), (champ, token), history)


def rollback(reg: Registry, reason: str = "", by: str = "") -> dict[str, Any]:
    """Make the previous champion the champion again (one step back in the champion history)."""
    champ, token = reg.champion()
    if champ is None:
        raise RegistryError(f"{reg.uri()}: no champion, nothing to roll back")
    history = champion_history(reg, champ)
    if not history:
        raise RegistryError(f"{reg.uri()}: the champion {champ.get('version')} has no previous champion to roll "
                            "back to (promote a version by name instead)")
    target, rest = history[0], history[1:]
    return _move_champion(reg, target["version"], "rollback", reason, by or default_actor(), (champ, token), rest)


def default_actor() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in a container
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"
