"""`thinkforge plan`: the preflight of a recipe (thinkforge.plan), the master-weights rule of the config, and
the refusals of compile / upload / submit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from thinkforge import cli, cluster, plan
from thinkforge.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
PHI4 = ROOT / "recipes" / "phi4-mini-reasoning.yaml"
SMOKE = ROOT / "recipes" / "smoke.yaml"
CPU_DEMO = ROOT / "recipes" / "cpu-demo.yaml"
SOURCE = "recipes/phi4-mini-reasoning.yaml"  # as the CLI names it: the chart's store size applies


def phi4(**overrides):
    return load_recipe(PHI4, overrides)


def errors(recipe, source=SOURCE, **assume) -> list[str]:
    return plan.make_plan(recipe, source, plan.Assumptions(**assume)).errors


def only(errs: list[str]) -> str:
    assert len(errs) == 1, errs
    return errs[0]


# --- the rule: half-precision weights need fp32 master weights -------------------------------------


def _adamw_step(dtype, autocast: bool = False):
    """One real AdamW step (lr 5e-7, the DPO and RL rate) on a tiny Llama; the share of weights it changed
    among those with a gradient."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, 128, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    graded = [p.grad != 0 for p in model.parameters()]
    opt.step()
    changed = sum(int(((p.detach() != b) & g).sum()) for p, b, g in zip(model.parameters(), before, graded))
    return changed / sum(int(g.sum()) for g in graded)


def test_adamw_at_lr_5e7_leaves_bf16_weights_unchanged_and_moves_fp32_master_weights():
    import torch

    assert _adamw_step(torch.bfloat16) < 0.01  # all but the weights within ~1e-4 of zero round back
    assert _adamw_step(torch.float32) > 0.99
    assert _adamw_step(torch.float32, autocast=True) > 0.99  # bf16 mixed precision: fp32 master weights move


def test_config_refuses_half_precision_weights_without_deepspeed():
    with pytest.raises(ConfigError) as e:
        phi4(**{"model.dtype": "bfloat16", "sft.deepspeed": "none"})
    msg = str(e.value)
    assert "model.dtype bfloat16" in msg and "sft.deepspeed" in msg and "dpo.deepspeed" not in msg
    assert "model.dtype: float32" in msg and "sft.bf16: true" in msg and "zero2" in msg
    assert not msg.split(": ", 1)[1].startswith(":")  # a rule across sections reads as one sentence
    with pytest.raises(ConfigError, match="float16"):
        load_recipe(SMOKE, {"model.dtype": "float16"})
    # DeepSpeed's bf16 keeps fp32 master partitions, and a stage that is off trains nothing
    assert phi4(**{"model.dtype": "bfloat16"}).model.dtype == "bfloat16"
    off = {f"{s}.enabled": False for s in ("midtrain", "sft", "dpo", "rl")}
    assert load_recipe(SMOKE, {"model.dtype": "bfloat16", **off}).model.dtype == "bfloat16"


# --- the phi4 plan ---------------------------------------------------------------------------------


def test_phi4_uses_every_gpu_it_books_and_fits_an_80gb_gpu():
    recipe = phi4()
    p = plan.make_plan(recipe, SOURCE)
    assert p.ok, p.errors
    by = {s.stage: s for s in p.stages}
    for name in ("midtrain", "sft", "dpo", "rl"):
        t, s = getattr(recipe, name), by[name]
        assert recipe.cluster.placement(name).gpus == t.num_processes * t.nodes == 8, name
        assert t.deepspeed in ("zero2", "zero3") and t.bf16, name
        assert s.gpu_gib == 80 and s.total_gib < 0.9 * 80, (name, s.memory)
        assert s.memory["optimizer"] < 6  # fp32 master weights and moments sharded over the 8
        gbatch = t.batch_size * t.grad_accum * t.num_processes
        assert gbatch == (256 if name == "rl" else 128)  # the recipe's comment: global batch 128
    assert "vLLM" in by["rl"].memory and by["evaluate"].total_gib <= 0.9 * 80 + 0.01
    assert recipe.model.dtype == "float32"
    text = p.text()
    assert "OK: every stage fits" in text and "| rl | 1 x 8 | 8 | bf16 over fp32, ZeRO-2 |" in text
    assert "GPU-hours" in text and "MFU 0.35" in text


def test_the_old_phi4_placement_is_refused_with_the_fields_named():
    """8 GPUs booked per pod, one process: 7 idle."""
    msg = only(errors(phi4(**{"sft.num_processes": 1})))
    assert msg.startswith("cluster.stages.sft.gpus: 8 GPUs per pod") and "sft.num_processes 1" in msg
    assert "7 of 8 GPUs idle" in msg and "set sft.num_processes: 8" in msg
    msg = only(errors(phi4(**{"cluster.stages.dpo.gpus": 4})))
    assert "cluster.stages.dpo.gpus: 4" in msg and "dpo.num_processes 8" in msg
    # a multi-node stage: GPUs per pod (each node's pod) against processes per node
    assert errors(phi4(**{"sft.nodes": 2})) == []


def test_memory_over_the_gpu_is_refused():
    msg = only(errors(phi4(**{"midtrain.gradient_checkpointing": False})))
    assert msg.startswith("midtrain: ") and "over the 80 GiB of NVIDIA-H100-80GB-HBM3" in msg
    assert "cluster.stages.midtrain.node_selector nvidia.com/gpu.product" in msg
    assert "midtrain.deepspeed: zero3" in msg and "midtrain.batch_size" in msg
    assert errors(phi4(**{"sft.deepspeed": "zero3"})) == []
    # 12 x 20K-token sequences of checkpointed activations: over 80 GB, within an H200's 141
    assert only(errors(phi4(**{"sft.batch_size": 12}))).startswith("sft: ")
    assert plan.make_plan(phi4(**{"sft.batch_size": 12}), SOURCE,
                          plan.Assumptions(gpu_product="NVIDIA-H200")).ok


def test_vllm_kv_cache_and_context_limits_are_refused():
    msg = only(errors(phi4(**{"rl.vllm_gpu_memory_utilization": 0.1})))
    assert msg.startswith("rl.vllm_gpu_memory_utilization: 0.1") and "rl.vllm_max_model_length" in msg
    msg = only(errors(phi4(**{"evaluate.max_new_tokens": 140_000})))
    assert msg.startswith("evaluate.max_new_tokens: 140,000") and "context of 131,072" in msg
    errs = errors(phi4(**{"sft.max_length": 140_000}))
    assert "sft.max_length: 140,000 tokens, over model.student's context of 131,072" in errs


def test_teacher_context_is_refused():
    """The chart's teacher serves 36,864 tokens: a 4,096-token prompt plus generate.max_new_tokens must fit."""
    msg = only(errors(phi4(**{"generate.max_new_tokens": 40_000})))
    assert msg.startswith("generate.max_new_tokens: 40,000") and "teacher.maxModelLen 36,864" in msg
    msg = only(errors(phi4(), teacher_max_model_len=16_384))
    assert "--teacher-max-model-len 16,384" in msg
    # another endpoint: its limit is unknown unless given
    assert errors(phi4(**{"generate.endpoint": "https://api.example.com/v1", "generate.max_new_tokens": 60_000})) == []


def test_checkpoints_over_the_object_store_are_refused(monkeypatch):
    msg = only(errors(phi4(**{"rl.keep_checkpoints": 5})))
    assert msg.startswith("midtrain.keep_checkpoints, sft.keep_checkpoints, dpo.keep_checkpoints, rl.keep_checkpoints")
    assert "over the object store's 500 GiB (the chart's default MinIO volume" in msg
    assert errors(phi4(**{"rl.keep_checkpoints": 5}), store_gib=1024) == []
    assert "object store's 300 GiB (--store-size)" in only(errors(phi4(), store_gib=300))
    monkeypatch.setenv(plan.ENV_STORE_SIZE, "1Ti")
    assert errors(phi4(**{"rl.keep_checkpoints": 5})) == []


def test_unknown_accelerator_and_idle_gpus_elsewhere_are_refused():
    msg = only(errors(phi4(**{"cluster.stages.evaluate.node_selector": {}})))
    assert msg.startswith("evaluate: cluster.stages.evaluate.node_selector nvidia.com/gpu.product: not set")
    msg = only(errors(phi4(**{"cluster.stages.generate.gpus": 1})))
    assert msg.startswith("cluster.stages.generate.gpus: 1 GPUs booked") and "generate.engine openai" in msg
    msg = only(errors(phi4(**{"cluster.stages.evaluate.gpus": 2})))
    assert "evaluate.tensor_parallel_size" in msg


@pytest.mark.parametrize("path", [SMOKE, CPU_DEMO], ids=lambda p: p.name)
def test_cpu_recipes_are_accepted_and_run_on_cpu(path):
    p = plan.make_plan(load_recipe(path), f"recipes/{path.name}")
    assert p.ok, p.errors
    assert "runs on CPU" in p.text()
    assert {s.where for s in p.stages} == {"cpu"} and all(s.gpu_hours is None for s in p.stages)
    plan.preflight(load_recipe(path), f"recipes/{path.name}")


def test_sizes_from_a_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,'
        ' "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,'
        ' "tie_word_embeddings": true}')
    m, where = plan.model_size(str(tmp_path))
    assert where.endswith("config.json")
    assert abs(m["params"] - plan.MODELS["builtin:smollm2-135m-instruct"]["params"]) / m["params"] < 0.01
    phi = dict(plan.MODELS["microsoft/Phi-4-mini-instruct"])
    computed = plan._with_params(dict(phi), tied=True)["params"]
    assert abs(computed - 3.836e9) / 3.836e9 < 0.01


def test_the_chart_facts_the_plan_mirrors():
    values = yaml.safe_load((ROOT / "helm" / "thinkforge" / "values.yaml").read_text())
    assert values["teacher"]["maxModelLen"] == plan.CHART_TEACHER_MAX_MODEL_LEN
    assert values["teacher"]["maxPromptTokens"] == plan.CHART_TEACHER_MAX_PROMPT_TOKENS
    helpers = (ROOT / "helm" / "thinkforge" / "templates" / "_helpers.tpl").read_text()
    table = dict(re.findall(r"^recipes/(\S+\.yaml): \{.*storage: (\d+)Gi\}", helpers, re.M))
    assert {k: int(v) for k, v in table.items()} == plan.CHART_STORE_GIB


# --- the command line -----------------------------------------------------------------------------


def test_plan_cli_exit_codes(capsys):
    assert cli.main(["plan", "--recipe", str(PHI4)]) == 0
    out = capsys.readouterr().out
    assert "| midtrain | 1 x 8 | 8 |" in out and "OK: every stage fits" in out
    assert cli.main(["plan", "--recipe", str(PHI4), "--set", "rl.num_processes=4"]) == 2
    out = capsys.readouterr().out
    assert "REFUSED: 1 contradiction(s)" in out and "cluster.stages.rl.gpus" in out
    assert cli.main(["plan", "--recipe", str(SMOKE), "--mfu", "0.5"]) == 0
    assert cli.main(["plan", "--recipe", str(PHI4), "--store-size", "lots"]) == 2
    assert "--store-size lots" in capsys.readouterr().err


def test_compile_refuses_a_contradicting_recipe(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--recipe", str(PHI4), "--set", "dpo.num_processes=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the plan refuses this recipe" in err and "cluster.stages.dpo.gpus" in err and "dpo.num_processes" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["upload", "submit"])
def test_upload_and_submit_refuse_before_reaching_kfp(command, monkeypatch, capsys):
    monkeypatch.setattr(cluster, "_client", lambda args: pytest.fail("reached the KFP client"))
    argv = [command, "--recipe", str(PHI4), "--set", "sft.num_processes=2", "--host", "http://127.0.0.1:9"]
    assert cluster.main(argv) == 2
    assert cli.main(argv) == 2
    assert "cluster.stages.sft.gpus" in capsys.readouterr().err


def test_the_readme_shows_the_actual_plan():
    readme = (ROOT / "README.md").read_text()
    assert plan.make_plan(phi4(), SOURCE).text() in readme
