"""Run a training stage on one process, on N processes under ``accelerate launch`` (DeepSpeed), or as a
multi-node Kubeflow Trainer job.

``stage_function(stage, cfg)`` returns a callable with the signature every stage has,
``fn(cfg, model_path, data_path, out_path, metrics=None) -> TrainResult``, so a component calls it
exactly like the plain stage function:

- ``nodes > 1``: submit the stage as a TrainJob/PyTorchJob (:mod:`thinkforge.trainjob`) and follow it
  (imports point one way: this module imports ``trainjob``; both share :mod:`thinkforge.distributed`);
- ``num_processes > 1`` (or a DeepSpeed config on a GPU): re-execute this module under
  ``accelerate launch --num_processes N [--use_deepspeed --deepspeed_config_file F]``; the worker
  processes run the plain stage function (the Trainer picks up the distributed environment), rank 0
  writes the result as JSON, and the parent returns it;
- otherwise: the plain stage function in this process.

Command line (what a TrainJob's pods and the accelerate workers run)::

    python -m thinkforge.launch <midtrain|sft|dpo|rl> --config cfg.json --model DIR --data FILE --out DIR
        [--result result.json] [--worker]

``--config`` is a resolved config as JSON (the pipeline's config artifact) or a recipe YAML.
``--worker`` runs the stage in this process whatever the config says (used inside the launcher).
DeepSpeed config names ``zero2`` / ``zero3`` resolve to ``recipes/deepspeed/<name>.json``, looked up
beside the source tree, in ``$THINKFORGE_RECIPES`` and in ``./recipes`` (the image's ``/app/recipes``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from thinkforge.config import Recipe, TrainConfig, load_recipe, validate
from thinkforge.distributed import DEEPSPEED_NAMES, STAGES, result_from_json, result_to_json
from thinkforge.ranks import leave_process_group
from thinkforge.stages.train import ENV_DEEPSPEED_CONFIG, ENV_LAUNCHED, TrainResult

log = logging.getLogger("thinkforge.launch")


class LaunchError(RuntimeError):
    """A launch that could not start or whose processes failed; the message says which and why."""


def plain_stage(stage: str) -> Callable[..., TrainResult]:
    if stage not in STAGES:
        raise LaunchError(f"unknown training stage {stage!r} (expected one of {', '.join(STAGES)})")
    from thinkforge.stages import dpo, midtrain, rl, sft

    return {"midtrain": midtrain.midtrain, "sft": sft.sft, "dpo": dpo.dpo, "rl": rl.rl}[stage]


def recipes_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("THINKFORGE_RECIPES"):
        dirs.append(Path(os.environ["THINKFORGE_RECIPES"]))
    dirs.append(Path(__file__).resolve().parents[2] / "recipes")  # a source checkout / editable install
    dirs.append(Path.cwd() / "recipes")  # the image's WORKDIR /app holds /app/recipes
    return dirs


def deepspeed_config(spec: str) -> Path | None:
    """``none`` -> None; ``zero2``/``zero3`` -> the shipped config; anything else: a path to a JSON file."""
    if not spec or spec == "none":
        return None
    if spec in DEEPSPEED_NAMES:
        for d in recipes_dirs():
            p = d / "deepspeed" / f"{spec}.json"
            if p.is_file():
                return p
        raise LaunchError(f"deepspeed={spec}: recipes/deepspeed/{spec}.json not found in "
                          f"{', '.join(str(d) for d in recipes_dirs())} (set THINKFORGE_RECIPES)")
    p = Path(spec)
    if not p.is_file():
        raise LaunchError(f"deepspeed={spec}: no such file (use none, zero2, zero3 or a JSON path)")
    try:
        json.loads(p.read_text())
    except ValueError as e:
        raise LaunchError(f"deepspeed={spec}: not JSON ({e})") from None
    return p


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def needs_launcher(t: TrainConfig) -> bool:
    """N processes, or DeepSpeed on a GPU (one GPU too: ZeRO's optimizer-state partitioning and offload)."""
    return t.num_processes > 1 or (t.deepspeed != "none" and _gpu_count() > 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(stage: str, t: TrainConfig, args: list[str], *, port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` argv (and extra environment) that runs ``stage`` on ``t.num_processes``."""
    ds = deepspeed_config(t.deepspeed)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(t.num_processes),
           "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(port or _free_port()),
           "--mixed_precision", "bf16" if t.bf16 and _gpu_count() > 0 else "no", "--dynamo_backend", "no"]
    env = {ENV_LAUNCHED: "1"}
    if ds is not None:
        # DeepSpeed runs on CPU too, but not with accelerate's --cpu flag (DESIGN.md section 3)
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ds)]
        env[ENV_DEEPSPEED_CONFIG] = str(ds)
    elif _gpu_count() > 0:
        cmd += ["--multi_gpu"]
    else:
        cmd += ["--cpu"]
    cmd += ["-m", "thinkforge.launch", stage, "--worker", *args]
    return cmd, env


def launched(stage: str) -> Callable[..., TrainResult]:
    """The stage, run in ``t.num_processes`` processes under accelerate; blocks until they finish."""

    def run(cfg: Recipe, model_path: str | Path, data_path: str | Path, out_path: str | Path,
            metrics: Any = None) -> TrainResult:
        t: TrainConfig = getattr(cfg, stage)
        with tempfile.TemporaryDirectory(prefix=f"thinkforge-launch-{stage}-") as tmp:
            cfg_file = Path(tmp) / "config.json"
            cfg_file.write_text(json.dumps(cfg.model_dump()))
            result_file = Path(tmp) / "result.json"
            args = ["--config", str(cfg_file), "--model", str(model_path), "--data", str(data_path),
                    "--out", str(out_path), "--result", str(result_file)]
            cmd, env = accelerate_command(stage, t, args)
            log.info("%s: launching %d processes: %s", stage, t.num_processes, " ".join(cmd))
            proc = subprocess.run(cmd, env={**os.environ, **env})
            if proc.returncode != 0:
                raise LaunchError(f"{stage}: accelerate launch exited {proc.returncode} "
                                  f"({t.num_processes} processes, deepspeed={t.deepspeed}); see the log above")
            if not result_file.is_file():
                raise LaunchError(f"{stage}: the launched processes finished without a result from rank 0")
            return result_from_json(json.loads(result_file.read_text()))

    return run


def stage_function(stage: str, cfg: Recipe | None = None) -> Callable[..., TrainResult]:
    """The callable a component should run for ``stage`` under ``cfg`` (see the module docstring)."""
    fn = plain_stage(stage)
    if cfg is None or os.environ.get(ENV_LAUNCHED):
        return fn
    t: TrainConfig = getattr(cfg, stage)
    if t.nodes > 1:
        from thinkforge.trainjob import trainjob_stage

        return trainjob_stage(stage)
    if needs_launcher(t):
        return launched(stage)
    return fn


def load_config(path: str | Path) -> Recipe:
    p = Path(path)
    if p.suffix == ".json":
        return validate(json.loads(p.read_text()), origin=str(p))
    return load_recipe(p)


def _is_uri(text: str) -> bool:
    return text.startswith(("s3://", "minio://"))


def _local(path: str, cfg: Recipe | None = None) -> Path:
    """A local file for ``path``: itself, or a cached download of an s3:// / minio:// URI."""
    if not _is_uri(path):
        return Path(path)
    from thinkforge.storage import download_to_cache

    return download_to_cache(path, cfg.storage if cfg is not None else None)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thinkforge.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--config", required=True, help="resolved config (JSON) or recipe (YAML)")
    ap.add_argument("--model", required=True, help="input model directory")
    ap.add_argument("--data", required=True, help="training data file")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--result", default="", help="write the TrainResult here as JSON (rank 0)")
    ap.add_argument("--worker", action="store_true", help="run the stage in this process (inside a launcher)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # A multi-node job's pods get object-storage URIs (thinkforge.trainjob); local paths pass through.
    cfg = load_config(_local(ns.config))
    ns.data = str(_local(ns.data, cfg))
    out_uri = ns.out if _is_uri(ns.out) else ""
    if out_uri:
        ns.out = tempfile.mkdtemp(prefix=f"thinkforge-{ns.stage}-out-")
    if ns.worker:
        fn = plain_stage(ns.stage)
        if _rank() == 0 and cfg.metrics.push_url:
            from thinkforge.metrics import StageMetrics

            # pushes only: the parent process may hold the recipe's /metrics port
            pushing = cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"http_port": 0})})
            with StageMetrics.for_recipe(ns.stage, pushing) as metrics:
                result = fn(cfg, ns.model, ns.data, ns.out, metrics=metrics)
        else:
            result = fn(cfg, ns.model, ns.data, ns.out)
    else:
        result = stage_function(ns.stage, cfg)(cfg, ns.model, ns.data, ns.out)
    if _rank() == 0:
        if out_uri:
            from thinkforge.storage import ObjectStore

            store, key = ObjectStore.from_uri(out_uri, cfg.storage)
            store.upload_dir(ns.out, key)
        if ns.result and _is_uri(ns.result):
            from thinkforge.storage import ObjectStore

            store, key = ObjectStore.from_uri(ns.result, cfg.storage)
            store.put_json(key, result_to_json(result))
        elif ns.result:
            Path(ns.result).write_text(json.dumps(result_to_json(result)))
    if _rank() == 0:
        print(json.dumps({k: v for k, v in result_to_json(result).items() if k != "history"}), flush=True)
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
