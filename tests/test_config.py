"""The one config model: presets load, overrides apply, bad recipes fail with the field named."""

import json
from pathlib import Path

import pytest

from thinkforge.config import (ConfigError, Recipe, flatten, load_recipe, parse_set_flags, unflatten, validate)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_presets_load(path):
    recipe = load_recipe(path)
    assert recipe.run.name == path.stem


def test_presets_exist():
    assert {p.stem for p in RECIPES} >= {"smoke", "cpu-demo", "phi4-mini-reasoning"}


def test_cli_overrides_apply_and_parse_types(tmp_path):
    r = load_recipe(RECIPES[0], parse_set_flags(["sft.learning_rate=2e-5", "rl.use_vllm=true",
                                                  "evaluate.pass_k=[1, 8]"]))
    assert r.sft.learning_rate == 2e-5 and r.rl.use_vllm is True and r.evaluate.pass_k == [1, 8]


@pytest.mark.parametrize("text, expected", [
    ("sft:\n  bogus: 1\n", "sft.bogus: unknown key"),
    ("nosuch:\n  x: 1\n", "nosuch: unknown key"),
    ("sft:\n  learning_rate: fast\n", "sft.learning_rate: Input should be a valid number"),
    ("generate:\n  samples_per_prompt: 0\n", "generate.samples_per_prompt: Input should be greater than or equal to 1"),
    ("rl:\n  prompt_min_pass_rate: 0.9\n  prompt_max_pass_rate: 0.1\n", "prompt_min_pass_rate must not exceed"),
    ("evaluate:\n  pass_k: [0, 4]\n", "pass_k entries must be >= 1"),
    ("- just\n- a list\n", "expected a mapping of sections"),
    ("sft: [unclosed\n", "line 2: invalid YAML"),
])
def test_bad_recipes_name_file_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate({"sft": {"bogus": 1, "epochs": -1}, "dpo": {"beta": 0}})
    msg = str(err.value)
    assert "sft.bogus" in msg and "sft.epochs" in msg and "dpo.beta" in msg


def test_bad_override_key():
    with pytest.raises(ConfigError, match="expected <section>.<field>=<value>"):
        parse_set_flags(["sft.learning_rate"])
    with pytest.raises(ConfigError, match="section one of"):
        load_recipe(RECIPES[0], {"learning_rate": 1})


def test_pipeline_parameters_round_trip_through_kfp_strings():
    recipe = load_recipe(RECIPES[-1])
    flat = flatten(recipe, everything=True)  # what the configure task receives
    assert all("__" in k for k in flat)
    # kfp.local hands parameters collected in a dict back as strings, ints as floats.
    as_kfp = {k: (str(float(v)) if isinstance(v, int) and not isinstance(v, bool) else
                  str(v) if isinstance(v, bool) else v) for k, v in flat.items()}
    assert validate(unflatten(as_kfp)) == recipe


def test_string_fields_stay_strings():
    data = unflatten({"run__name": "123", "model__student": "true"})
    assert data == {"run": {"name": "123"}, "model": {"student": "true"}}


def test_digest_is_stable_and_sensitive():
    a, b = Recipe(), Recipe()
    assert a.digest() == b.digest()
    b.sft.learning_rate = 3e-5
    assert a.digest() != b.digest()


def test_a_benchmark_may_be_given_by_its_catalog_name():
    r = validate({"evaluate": {"benchmarks": ["math500", {"name": "gsm8k", "limit": 50}]}})
    assert [(b.name, b.limit) for b in r.evaluate.benchmarks] == [("math500", 0), ("gsm8k", 50)]
    assert r == validate(r.model_dump())  # and the dump (objects) reads back the same


def test_a_dumped_config_keeps_each_stages_placement():
    """The pipeline's config artifact is a dump read back by every pod: a stage's placement must still
    take the fields it does not set from cluster.defaults (a multi-node stage builds its job from it)."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "phi4-mini-reasoning.yaml")
    again = validate(json.loads(json.dumps(recipe.model_dump())))
    for stage in ("generate", "sft", "rl", "report"):
        assert again.cluster.placement(stage) == recipe.cluster.placement(stage), stage
    assert again.digest() == recipe.digest()
