"""Experiment tracking (issue 16): `report_to` per training stage, against a real MLflow tracking server.

The server (tests/plugins/mlflow.py) runs on loopback with a SQLite store; the stages are the real SFT
and GRPO stages on a tiny Llama (tests/tiny_models.py). What a run shows there is queried back with
MlflowClient: the run under its name (<run.name>-<run.id>-<stage>) in the experiment run.name, one loss
(reward) point per logged step, and the Trainer's final metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from thinkforge.config import ConfigError, Recipe, load_recipe, validate
from thinkforge.records import write_jsonl
from thinkforge.sources import load_problems
from thinkforge.templates import system_message
from tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def recipe(request):
    return request.config.rootpath / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, recipe):
    """(tiny model dir, SFT data, RL prompts)."""
    d = tmp_path_factory.mktemp("tracking")
    cfg = load_recipe(recipe)
    problems = load_problems("builtin:word-problems?split=train&n=16&solutions=1")
    texts = [system_message(cfg.template), *(p["problem"] for p in problems), *(p["completion"] for p in problems)]
    model = tiny_model_dir(d / "model", texts, vocab_size=400)
    write_jsonl(d / "sft.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                                  for p in problems])
    write_jsonl(d / "prompts.jsonl", [{"id": p["id"], "problem": p["problem"], "answer": "7", "answer_type": "math",
                                       "pass_rate": 0.1} for p in problems])
    return model, d / "sft.jsonl", d / "prompts.jsonl"


@pytest.fixture
def clean_env(monkeypatch):
    """No MLflow/wandb settings from the caller's environment; what a stage sets is undone afterwards."""
    for key in list(os.environ):
        if key.startswith(("MLFLOW_", "WANDB_")) or key == "THINKFORGE_RUN_ID":
            monkeypatch.delenv(key)
    for key in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS", "MLFLOW_TRACKING_URI", "WANDB_PROJECT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    yield monkeypatch


def run_of(client, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}: {[e.name for e in client.search_experiments()]}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"runs named {name!r} in {experiment!r}: {len(runs)}"
    return runs[0]


# ------------------------------------------------------------------------------------------------ config


def test_report_to_is_none_by_default_and_refuses_unknown_trackers_by_field_name(tmp_path, clean_env):
    from trl import SFTConfig

    from thinkforge.stages.train import training_args

    cfg = Recipe()
    assert all(getattr(cfg, s).report_to == [] for s in ("midtrain", "sft", "dpo", "rl"))
    assert cfg.tracking.uri == "" and cfg.tracking.experiment == ""
    # no tracker: no callback that could reach a server, and nothing set for one
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    args = training_args(SFTConfig, cfg, "sft", tmp_path)
    assert args.report_to in ([], ["none"], "none")
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ

    with pytest.raises(ConfigError) as e:
        validate({"rl": {"report_to": ["mlflow", "mlfow"]}})
    assert "rl.report_to" in str(e.value) and "mlfow" in str(e.value)
    with pytest.raises(ConfigError, match=r"sft\.report_to"):
        validate({"sft": {"report_to": "all"}})  # the Trainer's "all" would turn on whatever is installed
    # `--set sft.report_to=mlflow,tensorboard` and `none`
    assert validate({"sft": {"report_to": "mlflow,tensorboard"}}).sft.report_to == ["mlflow", "tensorboard"]
    assert validate({"dpo": {"report_to": "none"}}).dpo.report_to == []
    assert "tracking" in Recipe().model_dump()


# ------------------------------------------------------------------------------------- real MLflow server


@pytest.mark.slow
def test_sft_component_logs_its_loss_curve_to_mlflow_and_its_history_next_to_the_model(
        recipe, tiny, mlflow_server, tmp_path, clean_env):
    """The SFT component, as a pod runs it (run id from THINKFORGE_RUN_ID, tracking.uri from the recipe):
    the run shows every step's loss and the final train metrics, and log_history.json lies in the model."""
    from thinkforge.components.common import LOG_HISTORY, train_component

    model, sft_data, _ = tiny
    steps = 5
    cfg = load_recipe(recipe, {"run.name": "track-sft", "sft.max_steps": steps, "sft.batch_size": 4,
                               "sft.logging_steps": 1, "sft.report_to": ["mlflow"],
                               "tracking.uri": mlflow_server.url})
    clean_env.setenv("THINKFORGE_RUN_ID", "wf-123")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.model_dump()))
    logged: dict[str, float] = {}
    art = lambda p: SimpleNamespace(path=str(p))  # noqa: E731
    metrics = SimpleNamespace(log_metric=logged.__setitem__)
    train_component("sft", art(config), art(model), art(sft_data), art(tmp_path / "trained"),
                    art(tmp_path / "summary.json"), metrics)

    history = json.loads((tmp_path / "trained" / LOG_HISTORY).read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == steps and any("train_loss" in h for h in history)

    client = mlflow_server.client()
    run = run_of(client, "track-sft", "track-sft-wf-123-sft")
    assert run.info.status == "FINISHED"
    assert run.data.tags["thinkforge.stage"] == "sft" and run.data.tags["thinkforge.run_id"] == "wf-123"
    curve = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in curve] == list(range(1, steps + 1))
    assert [m.value for m in curve] == pytest.approx(losses)
    assert {"train_loss", "train_runtime", "learning_rate"} <= set(run.data.metrics)
    assert run.data.params["max_steps"] == str(steps)


@pytest.mark.slow
def test_rl_logs_its_reward_curve_to_the_server_in_mlflow_tracking_uri(recipe, tiny, mlflow_server, tmp_path,
                                                                        clean_env):
    """GRPO with report_to [mlflow] and no tracking.uri: the server comes from MLFLOW_TRACKING_URI."""
    from thinkforge.stages.rl import rl

    model, _, prompts = tiny
    steps = 3
    clean_env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cfg = load_recipe(recipe, {"run.name": "track-rl", "rl.max_steps": steps, "rl.batch_size": 4,
                               "rl.num_generations": 4, "rl.max_completion_tokens": 4, "rl.logging_steps": 1,
                               "rl.report_to": ["mlflow"], "tracking.experiment": "thinkforge-tests"})
    r = rl(cfg, model, prompts, tmp_path / "out")
    rewards = [h["reward"] for h in r.history if "reward" in h]
    run = run_of(mlflow_server.client(), "thinkforge-tests", "track-rl-rl")
    curve = sorted(mlflow_server.client().get_metric_history(run.info.run_id, "reward"), key=lambda m: m.step)
    assert len(curve) == steps == len(rewards)
    assert [m.value for m in curve] == pytest.approx(rewards)
    assert "train_runtime" in run.data.metrics


@pytest.mark.slow
def test_a_stage_without_report_to_sends_nothing_to_the_server(recipe, tiny, mlflow_server, tmp_path, clean_env):
    from thinkforge.stages.sft import sft

    model, sft_data, _ = tiny
    clean_env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    cfg = load_recipe(recipe, {"run.name": "track-none", "sft.max_steps": 2, "sft.batch_size": 4})
    sft(cfg, model, sft_data, tmp_path / "out")
    assert mlflow_server.client().get_experiment_by_name("track-none") is None
