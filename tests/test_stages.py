"""Every stage as a plain function on the smoke recipe: real tiny models, real trainers, real verifier."""

import json

import pytest

from thinkforge.config import load_recipe
from thinkforge.models import resolve
from thinkforge.records import EmptyDataError, RecordError, read_jsonl
from thinkforge.stages.dpo import dpo
from thinkforge.stages.evaluate import evaluate
from thinkforge.stages.filter import filter_rollouts
from thinkforge.stages.generate import generate
from thinkforge.stages.midtrain import midtrain
from thinkforge.stages.rl import annealed_temperature, rl
from thinkforge.stages.sft import sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(request):
    return load_recipe(request.config.rootpath / "recipes" / "smoke.yaml")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def rollouts(cfg, work):
    out = work / "rollouts.jsonl"
    result = generate(cfg, out)
    return result, out


@pytest.fixture(scope="module")
def filtered(cfg, work, rollouts):
    return filter_rollouts(cfg, rollouts[1], work / "filter"), work / "filter"


def test_generate_samples_and_imports(cfg, rollouts):
    result, path = rollouts
    rows = read_jsonl(path)
    n = 16
    assert result.problems == n and result.imported == n
    # the smoke imports two worked solutions per problem (one right, one with a slip), then samples
    assert result.rollouts == len(rows) == n * (2 + cfg.generate.samples_per_prompt)
    keys = {(r["problem_id"], r["sample_index"]) for r in rows}
    assert len(keys) == len(rows), "each (problem, sample) appears once"
    sampled = [r for r in rows if r["teacher"] != "imported"]
    assert all(r["sample_index"] >= 1 and r["finish_reason"] in ("stop", "length") for r in sampled)
    assert all(0 < r["num_tokens"] <= cfg.generate.max_new_tokens for r in sampled)


def test_filter_counts_and_outputs(cfg, filtered, rollouts):
    result, out = filtered
    assert sum(result.counts.values()) == result.rollouts
    # The random teacher never answers correctly; the imported references always do (their slips never).
    assert result.kept == result.counts["correct"] == 16
    sft_rows, pairs, rl_rows = (read_jsonl(out / f) for f in ("sft.jsonl", "dpo.jsonl", "rl_prompts.jsonl"))
    assert len(read_jsonl(out / "midtrain.jsonl")) == result.kept
    assert len(sft_rows) == result.sft and len(pairs) == result.dpo_pairs == 16
    verdicts = {(v["problem_id"], v["completion"]): v for v in read_jsonl(out / "verdicts.jsonl")}
    for p in pairs:
        assert verdicts[(p["problem_id"], p["chosen"])]["correct"]
        assert not verdicts[(p["problem_id"], p["rejected"])]["answer_correct"]
    assert all(abs(r["pass_rate"] - 1 / 4) < 1e-9 for r in rl_rows)
    assert json.loads((out / "summary.json").read_text())["kept"] == 16


def test_filter_keeping_nothing_names_the_counts(cfg, work, rollouts):
    rows = [r for r in read_jsonl(rollouts[1]) if r["teacher"] != "imported"]
    only_wrong = work / "wrong.jsonl"
    only_wrong.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EmptyDataError) as err:
        filter_rollouts(cfg, only_wrong, work / "filter-empty")
    assert "kept 0 of 32" in str(err.value) and "truncated=" in str(err.value)
    assert not (work / "filter-empty" / "sft.jsonl").exists()


def test_filter_names_file_and_line_of_a_bad_rollout(cfg, work, rollouts):
    bad = work / "bad.jsonl"
    lines = rollouts[1].read_text().splitlines()
    lines[2] = lines[2][:-5]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=rf"{bad}:3: malformed JSON"):
        filter_rollouts(cfg, bad, work / "filter-bad")


@pytest.fixture(scope="module")
def trained(cfg, work, filtered):
    base = str(resolve(cfg.model.student))
    out = {}
    out["midtrain"] = midtrain(cfg, base, work / "filter" / "midtrain.jsonl", work / "m-mid")
    out["sft"] = sft(cfg, work / "m-mid", work / "filter" / "sft.jsonl", work / "m-sft")
    # the smoke's pairs differ in one number (a worked solution vs its slip): a few more, larger steps
    # (two epochs over the 16 pairs, so the last steps see the pairs the first ones saw)
    dpo_cfg = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"max_steps": 16, "learning_rate": 1e-3,
                                                                        "logging_steps": 1})})
    out["dpo"] = dpo(dpo_cfg, work / "m-sft", work / "filter" / "dpo.jsonl", work / "m-dpo")
    out["rl"] = rl(cfg, work / "m-dpo", work / "filter" / "rl_prompts.jsonl", work / "m-rl")
    return out


@pytest.mark.parametrize("stage", ["midtrain", "sft", "dpo"])
def test_training_stage_lowers_its_loss(trained, work, stage):
    r = trained[stage]
    assert r.steps >= 2 and r.metric == "loss"
    if stage == "dpo":  # one pair batch to the next is noisy: compare the epochs' mean losses
        losses = [h["loss"] for h in r.history if "loss" in h]
        half = len(losses) // 2
        assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half, f"dpo: losses {losses}"
    else:
        assert r.last < r.first, f"{stage}: loss {r.first} -> {r.last}"
    assert (work / f"m-{'mid' if stage == 'midtrain' else stage}" / "model.safetensors").exists()


def test_rl_runs_and_anneals(trained, cfg):
    r = trained["rl"]
    assert r.steps == cfg.rl.max_steps and r.metric == "reward"
    assert r.extra["temperatures"] == [annealed_temperature(s, r.steps, cfg.rl) for s in range(r.steps)]
    assert r.extra["temperatures"][0] == cfg.rl.temperature_start


def test_annealing_schedule(cfg):
    rl_cfg = cfg.rl.model_copy(update={"temperature_start": 1.0, "temperature_end": 0.6, "anneal_fraction": 0.5})
    temps = [annealed_temperature(s, 10, rl_cfg) for s in range(11)]
    assert temps[0] == 1.0 and temps[5] == pytest.approx(0.6) and temps[10] == pytest.approx(0.6)
    assert all(a > b for a, b in zip(temps[:5], temps[1:6]))


def test_evaluate_scores_every_sample(cfg, work, trained):
    res = evaluate(cfg, work / "m-rl", work / "eval", label="final")
    m = res["benchmarks"]["word-problems"]
    assert m["n_problems"] == 8 and m["k"] == 2
    samples = read_jsonl(work / "eval" / "samples-word-problems.jsonl")
    assert len(samples) == 16 and all("correct" in s and "reason" in s for s in samples)
    assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0
    assert json.loads((work / "eval" / "results.json").read_text())["label"] == "final"
