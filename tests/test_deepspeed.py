"""Stages on N processes: the shipped DeepSpeed configs, the accelerate command, and a real ZeRO-2 run
with two CPU processes (DeepSpeed built without ops: ``DS_BUILD_OPS=0 pip install deepspeed``)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from thinkforge.config import load_recipe
from thinkforge.launch import LaunchError, accelerate_command, deepspeed_config, plain_stage, stage_function


@pytest.fixture(scope="module")
def recipe(request):
    return request.config.rootpath / "recipes" / "smoke.yaml"


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_shipped_configs(name, stage, request):
    path = deepspeed_config(name)
    assert path == request.config.rootpath / "recipes" / "deepspeed" / f"{name}.json"
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # batch sizes, accumulation, clipping and precision come from the stage config through the Trainer
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_config_errors(tmp_path):
    assert deepspeed_config("none") is None
    with pytest.raises(LaunchError, match="no such file"):
        deepspeed_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(LaunchError, match="not JSON"):
        deepspeed_config(str(bad))


def test_accelerate_command(recipe):
    cfg = load_recipe(recipe, {"sft.num_processes": 4, "sft.deepspeed": "zero3"})
    cmd, env = accelerate_command("sft", cfg.sft, ["--config", "c.json"], port=29555)
    line = " ".join(cmd)
    assert "-m accelerate.commands.launch --num_processes 4" in line
    assert f"--use_deepspeed --deepspeed_config_file {deepspeed_config('zero3')}" in line
    assert "--cpu" not in cmd  # DeepSpeed does not run under accelerate's --cpu
    assert line.endswith("-m thinkforge.launch sft --worker --config c.json")
    assert env["THINKFORGE_LAUNCHED"] == "1" and env["THINKFORGE_DEEPSPEED_CONFIG"].endswith("zero3.json")


def test_stage_function_choice(recipe, monkeypatch):
    monkeypatch.delenv("THINKFORGE_LAUNCHED", raising=False)
    one = load_recipe(recipe)
    assert stage_function("sft", one) is plain_stage("sft")
    two = load_recipe(recipe, {"sft.num_processes": 2, "sft.deepspeed": "zero2"})
    assert stage_function("sft", two).__qualname__.startswith("launched")
    nodes = load_recipe(recipe, {"rl.nodes": 2, "rl.num_processes": 8})
    assert stage_function("rl", nodes).__qualname__.startswith("trainjob_stage")
    monkeypatch.setenv("THINKFORGE_LAUNCHED", "1")  # inside the launcher: always the plain stage
    assert stage_function("sft", two) is plain_stage("sft")
    with pytest.raises(LaunchError, match="unknown training stage"):
        plain_stage("evaluate")


def test_worker_leaves_the_process_group(recipe, tmp_path, monkeypatch):
    """A worker closes its process group after a barrier before it exits: a rank leaving with live gloo
    connections can abort its peers' background threads at exit, and accelerate then fails the launch
    (seen in CI: training done, result written, `accelerate launch exited 1`)."""
    import torch.distributed as dist

    from thinkforge import launch
    from thinkforge.stages.train import TrainResult

    calls = []

    def stage(cfg, model, data, out, metrics=None):
        calls.append(dist.is_initialized())
        return TrainResult(steps=1, examples=1, metric="loss", first=1.0, last=0.5, seconds=0.0)

    monkeypatch.setattr(launch, "plain_stage", lambda name: stage)
    monkeypatch.setenv("RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        result = tmp_path / "result.json"
        assert launch.main(["sft", "--worker", "--config", str(recipe), "--model", "m", "--data", "d",
                            "--out", str(tmp_path / "out"), "--result", str(result)]) == 0
        assert calls == [True] and json.loads(result.read_text())["steps"] == 1
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_with_two_cpu_processes(recipe, tmp_path, zero):
    """The SFT stage under `accelerate launch --num_processes 2 --use_deepspeed` with ZeRO-2 and ZeRO-3:
    both processes train on their own half of each global batch and rank 0 writes the model (under ZeRO-3
    gathered from both ranks' shards: stage3_gather_16bit_weights_on_model_save)."""
    import torch

    from thinkforge.models import load_model
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir, word_problem_texts

    problems = load_problems("builtin:word-problems?split=train&n=32&solutions=1")
    cfg = load_recipe(recipe, {"sft.num_processes": 2, "sft.deepspeed": zero, "sft.max_steps": 4,
                               "sft.batch_size": 2, "sft.learning_rate": 3e-3, "sft.lr_scheduler": "constant"})
    model = tiny_model_dir(tmp_path / "tiny", word_problem_texts(problems, system_message(cfg.template)),
                           vocab_size=600)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])
    r = stage_function("sft", cfg)(cfg, model, data, tmp_path / "out")
    assert r.steps == 4 and r.last < r.first
    # 32 examples, 2 processes x batch 2 = 4 per step -> 8 steps per epoch: 4 steps are half an epoch.
    # (Two processes that each read every example, as when accelerate sees one process, would show 0.25.)
    epochs = [h["epoch"] for h in r.history if "loss" in h]
    assert epochs[-1] == pytest.approx(0.5)
    # the whole model was written (ZeRO-3: gathered from both ranks' shards), and it is the trained one
    saved, start = load_model(tmp_path / "out"), load_model(model)
    assert [p.shape for p in saved.parameters()] == [p.shape for p in start.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(saved.parameters(), start.parameters()))


# ------------------------------------------------------------------------------- the GPU smoke script


def _smoke_script(request):
    return request.config.rootpath / "benchmarks" / "gpu_smoke.py"


def test_gpu_smoke_arguments(request):
    spec = importlib.util.spec_from_file_location("gpu_smoke", _smoke_script(request))
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    args = smoke.parse_args([])
    assert args.size == "llama-0.5b" and args.deepspeed == "auto" and args.peak_tflops == 989.0
    assert any("packing bfd" in line for line in smoke.plan(args))
    for bad in (["--batch", "0"], ["--grpo-generations", "1"], ["--size", "llama-huge"], ["--peak-tflops", "0"]):
        with pytest.raises(SystemExit) as err:
            smoke.parse_args(bad)
        assert err.value.code == 2
    md = smoke.table("NVIDIA H100 80GB HBM3", 500_000_000, 989e12,
                     {"steps": 30, "deepspeed": "zero2", "tokens": 491_520, "seconds": 10.0},
                     {"sequences": 64, "tokens": 16_384, "seconds": 8.0},
                     {"rollouts": 96, "steps": 3, "completion_tokens": 24_576, "generation_s": 20.0,
                      "scoring_s": 0.5, "training_s": 3.0, "tokens": 30_000})
    assert "| SFT (packing) | 30 steps, deepspeed=zero2, bf16, sdpa | 491,520 | 10.00 | 49,152 | 14.9% |" in md


def test_gpu_smoke_without_a_gpu(request):
    import subprocess
    import sys

    script = str(_smoke_script(request))
    dry = subprocess.run([sys.executable, script, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "gpu_smoke plan:" in dry.stdout
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the no-GPU exit is not reachable here")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA GPU visible" in run.stderr


@pytest.mark.slow
def test_gpu_smoke_code_path_on_cpu(request, tmp_path):
    """Every phase of the script once, on a tiny model on the CPU (--allow-cpu): the code runs end to end
    and prints the table; the numbers are not measurements."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(_smoke_script(request)), "--allow-cpu", "--size", "llama-tiny", "--sft-steps", "2",
         "--seq-len", "256", "--batch", "2", "--gen-prompts", "4", "--gen-tokens", "8", "--gen-batch", "4",
         "--grpo-steps", "1", "--grpo-prompts", "2", "--grpo-generations", "2", "--grpo-tokens", "8",
         "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| phase | what | tokens | seconds | tokens/s | MFU |" in out.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["sft"]["steps"] == 2 and r["grpo"]["steps"] == 1 and r["generation"]["tokens"] > 0
