"""`thinkforge eval`: any model through the DAG's own evaluate stage (catalog, protocol, verifier), with
lighteval names beside the numbers; unknown benchmarks refused with the known ones listed."""

import json

import pytest
import yaml

from thinkforge.cli import main as cli
from thinkforge.config import ConfigError, Recipe, load_recipe
from thinkforge.eval_cli import lighteval_names, select_benchmarks
from thinkforge.stages.evaluate import evaluate

MATH = [{"problem": "What is $2+3$?", "answer": "5", "subject": "Algebra", "level": 1},
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "answer": "1", "subject": "Prealgebra", "level": 2}]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir

    for k in ("THINKFORGE_S3_ENDPOINT", "THINKFORGE_S3_ACCESS_KEY", "THINKFORGE_S3_SECRET_KEY"):
        monkeypatch.delenv(k, raising=False)  # results stay local (no durable store)
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps(r) + "\n" for r in MATH))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "eval-cli", "seed": 3},
        "model": {"student": "random:llama-tiny", "dtype": "float32"},
        "template": {"think": False},
        "evaluate": {"benchmarks": [{"name": "word-problems", "source": "builtin:word-problems?split=test",
                                     "limit": 3},
                                    {"name": "math500", "source": str(math)}],
                     "k": 2, "pass_k": [1, 2], "max_new_tokens": 8, "batch_size": 8, "dtype": "float32",
                     "bootstrap_samples": 200},
    }))
    cfg = load_recipe(str(recipe))
    texts = [system_message(cfg.template)] + [p["problem"] for p in load_problems("builtin:word-problems?split=test",
                                                                                  limit=3)] + [r["problem"] for r in MATH]
    model = tiny_model_dir(tmp_path / "model", texts, vocab_size=300)
    return cfg, recipe, model


def test_eval_equals_the_dag_evaluation_and_carries_lighteval_names(setup, tmp_path, capsys):
    cfg, recipe, model = setup
    dag = evaluate(cfg, model, tmp_path / "dag", label="final")  # what the DAG's final evaluate task runs

    out = tmp_path / "ondemand" / "results.json"
    rc = cli(["eval", "--model", str(model), "--recipe", str(recipe), "--benchmarks", "word-problems,math500",
              "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    got = json.loads(out.read_text())
    assert got["benchmarks"] == json.loads(json.dumps(dag["benchmarks"]))  # every number, per problem too
    assert got["benchmark_specs"] == dag["benchmark_specs"] and got["protocol"] == dag["protocol"]
    assert set(got) == set(dag) | {"lighteval"} and got["label"] == "eval"
    for bench in ("word-problems", "math500"):
        a = (tmp_path / "dag" / f"samples-{bench}.jsonl").read_text()
        assert (out.parent / f"samples-{bench}.jsonl").read_text() == a

    le = got["lighteval"]
    m = dag["benchmarks"]["math500"]
    assert le["math_500|pass@1:2_samples"] == m["pass@1"]
    assert le["math_500|pass@1:2_samples_stderr"] == m["pass@1_se"]
    assert le["math_500|pass@2:2_samples"] == m["pass@2"] and le["math_500|maj@2"] == m["cons@2"]
    assert le["word-problems|pass@1:2_samples"] == dag["benchmarks"]["word-problems"]["pass@1"]
    assert "math500: 2 problems x 2 samples  pass@1" in printed and "seed 3" in printed

    # without --benchmarks: the recipe's own benchmarks, the same numbers
    out2 = tmp_path / "again.json"
    assert cli(["eval", "--model", str(model), "--recipe", str(recipe), "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["benchmarks"] == got["benchmarks"]


def test_unknown_benchmark_is_refused_listing_the_known(tmp_path, capsys):
    rc = cli(["eval", "--model", "random:llama-tiny", "--benchmarks", "math500,nope", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown benchmark(s) nope" in err
    assert "known: math500, aime24, amc23, gsm8k, gpqa-diamond" in err and not (tmp_path / "r.json").exists()
    rc = cli(["eval", "--model", str(tmp_path / "missing"), "--benchmarks", "math500"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


def test_benchmark_names_map_to_catalog_entries():
    cfg = Recipe.model_validate({"evaluate": {"benchmarks": [{"name": "mine", "source": "x.jsonl", "limit": 5}]}})
    got = select_benchmarks(cfg, ["math_500", "aime24", "mine", "gpqa"], k=3, limit=7).evaluate.benchmarks
    assert [(b.name, b.source, b.k, b.limit) for b in got] == [
        ("math500", "", 3, 7), ("aime24", "", 3, 7), ("mine", "x.jsonl", 3, 7), ("gpqa-diamond", "", 3, 7)]
    assert select_benchmarks(cfg, []) is cfg
    with pytest.raises(ConfigError, match="known: .*gpqa-diamond, mine"):
        select_benchmarks(cfg, ["math"])
    names = lighteval_names({"benchmarks": {"a": {"k": 16, "pass@1": 0.5, "pass@1_se": 0.1, "cons@16": 0.6,
                                                  "n_problems": 30}},
                             "benchmark_specs": {"a": {"dataset": "aime24"}}})
    assert names == {"aime24|pass@1:16_samples": 0.5, "aime24|pass@1:16_samples_stderr": 0.1, "aime24|maj@16": 0.6}


def test_eval_of_a_model_in_s3(setup, tmp_path, monkeypatch, s3_server, object_store, capsys):
    cfg, recipe, model = setup
    dag = evaluate(cfg, model, tmp_path / "dag", label="final")
    object_store.upload_dir(model, "models/tiny")
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("THINKFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "s3.json"
    rc = cli(["eval", "--model", f"s3://{object_store.bucket}/models/tiny", "--recipe", str(recipe),
              "--set", f"storage.bucket={object_store.bucket}", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    assert json.loads(out.read_text())["benchmarks"] == json.loads(json.dumps(dag["benchmarks"]))
