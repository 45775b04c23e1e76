"""The KFP UI: what a person sees beside each run parameter, and what `configure` does with what they type.

- Descriptions: `pipeline_docstring` gives the pipeline function a Google-style `Args:` section; KFP's
  compiler (kfp.dsl.component_factory: docstring_parser on `inspect.getdoc(func)`) copies each entry into
  the IR's `root.inputDefinitions.parameters.<name>.description`, which the UI shows. Checked on a real
  compile of a throwaway pipeline around the real `configure` component.
- Values: list/dict parameters arrive as JSON text (typed into the UI) or already parsed; the generated
  `configure` function itself is called here, as the component's body runs it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docstring_parser
import pytest
import yaml

from thinkforge.components.configure import (_field, configure_function, parameter_description, parameter_type,
                                             pipeline_docstring)
from thinkforge.config import ConfigError, Recipe, flatten

DEFAULTS = flatten(Recipe())
BENCH_HINT = '(enter a JSON list like ["math500", {"name": "gsm8k", "limit": 200}]; [] for none)'


# ------------------------------------------------------------------------------- typed values


@pytest.fixture(scope="module")
def configure():
    return configure_function(DEFAULTS)


def run_configure(configure, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Call the generated component function with every parameter, as the KFP executor does."""
    artifact = SimpleNamespace(path=str(tmp_path / "config.json"), metadata={})
    configure(**{**DEFAULTS, **overrides}, config=artifact)
    return json.loads(Path(artifact.path).read_text())


def configure_error(configure, tmp_path: Path, **overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        run_configure(configure, tmp_path, **overrides)
    assert "Traceback" not in str(err.value)
    return str(err.value).splitlines()


@pytest.mark.parametrize("name, typed, expected", [
    ("evaluate__benchmarks", '["math500", {"name": "gsm8k", "limit": 5}]',
     [{"name": "math500"}, {"name": "gsm8k", "limit": 5}]),
    ("evaluate__benchmarks", [{"name": "aime24", "k": 8}], [{"name": "aime24", "k": 8}]),  # already parsed
    ("evaluate__benchmarks", ["math500"], [{"name": "math500"}]),
    ("evaluate__benchmarks", "[math500, aime24]", [{"name": "math500"}, {"name": "aime24"}]),  # YAML flow, as --set
    ("evaluate__pass_k", "[1, 8]", [1, 8]),
    ("evaluate__pass_k", " [1,8]\n", [1, 8]),
    ("evaluate__pass_k", [1, 8], [1, 8]),
    ("evaluate__pass_k", "[]", []),
    ("filter__decontaminate_extra", '["hf:openai/gsm8k:test", "s3://b/x.jsonl"]',
     ["hf:openai/gsm8k:test", "s3://b/x.jsonl"]),
    ("filter__decontaminate_extra", [], []),
])
def test_list_values_typed_or_parsed_are_accepted(configure, tmp_path, name, typed, expected):
    cfg = run_configure(configure, tmp_path, **{name: typed})
    section, field = name.split("__")
    got = cfg[section][field]
    if name == "evaluate__benchmarks":
        got = [{k: b[k] for k in e} for b, e in zip(got, expected)]
        assert len(cfg[section][field]) == len(expected)
    assert got == expected


@pytest.mark.parametrize("name, typed, expected", [
    ("evaluate__benchmarks", "math500,aime",
     "pipeline parameters: evaluate.benchmarks: expected a list of benchmark names or objects, got 'math500,aime' "
     + BENCH_HINT),
    ("evaluate__benchmarks", "math500",
     "pipeline parameters: evaluate.benchmarks: expected a list of benchmark names or objects, got 'math500' "
     + BENCH_HINT),
    ("evaluate__benchmarks", '{"name": "math500"}',
     "pipeline parameters: evaluate.benchmarks: expected a list of benchmark names or objects, got "
     "'{\"name\": \"math500\"}' " + BENCH_HINT),
    ("evaluate__benchmarks", "", "pipeline parameters: evaluate.benchmarks: expected a list of benchmark names "
     "or objects, got '' " + BENCH_HINT),
    ("evaluate__pass_k", "1,4", "pipeline parameters: evaluate.pass_k: expected a list of integers, got '1,4' "
     "(enter a JSON list like [1, 4]; [] for none)"),
    ("evaluate__pass_k", "[1, 4", "pipeline parameters: evaluate.pass_k: expected a list of integers, got '[1, 4' "
     "(enter a JSON list like [1, 4]; [] for none)"),
    ("evaluate__pass_k", 4, "pipeline parameters: evaluate.pass_k: expected a list of integers, got 4 "
     "(enter a JSON list like [1, 4]; [] for none)"),
    ("filter__decontaminate_extra", "s3://bucket/extra.jsonl",
     "pipeline parameters: filter.decontaminate_extra: expected a list of strings, got 's3://bucket/extra.jsonl' "
     '(enter a JSON list like ["hf:HuggingFaceH4/MATH-500:test"]; [] for none)'),
])
def test_a_value_that_is_not_a_list_names_the_field_and_how_to_enter_it(configure, tmp_path, name, typed, expected):
    assert configure_error(configure, tmp_path, **{name: typed}) == [expected]


@pytest.mark.parametrize("name, typed, expected", [
    ("evaluate__pass_k", '["one"]', "pipeline parameters: evaluate.pass_k.0: Input should be a valid integer"),
    ("evaluate__pass_k", "[0, 4]", "pipeline parameters: evaluate: Value error, pass_k entries must be >= 1"),
    ("evaluate__benchmarks", '[{"name": "m", "limt": 3}]',
     "pipeline parameters: evaluate.benchmarks.0.limt: unknown key (did you mean limit?)"),
    ("evaluate__benchmarks", "[3]", "pipeline parameters: evaluate.benchmarks.0: Input should be a valid "
     "dictionary or instance of Benchmark"),
    ("filter__decontaminate_extra", "[1]", "pipeline parameters: filter.decontaminate_extra.0: Input should be a "
     "valid string"),
])
def test_bad_items_name_the_field_and_the_index(configure, tmp_path, name, typed, expected):
    [line] = configure_error(configure, tmp_path, **{name: typed})
    assert line.startswith(expected), line


def test_all_errors_at_once_one_line_each(configure, tmp_path):
    lines = configure_error(configure, tmp_path, evaluate__benchmarks="math500,aime", evaluate__pass_k="1,4",
                            sft__learning_rate=3.0)
    assert len(lines) == 3, lines
    assert [line.split(": ")[1] for line in lines] == ["evaluate.benchmarks", "evaluate.pass_k", "sft.learning_rate"]


def test_kfp_local_strings_for_every_field_still_validate(configure, tmp_path):
    """kfp.local hands some parameters back as text (numbers, booleans, and lists as JSON)."""
    as_text = {k: json.dumps(v) if isinstance(v, (list, dict, bool)) or not isinstance(v, str) else v
               for k, v in DEFAULTS.items()}
    assert run_configure(configure, tmp_path, **as_text) == json.loads(json.dumps(Recipe().model_dump()))


# --------------------------------------------------------------------------------- descriptions

# the fields people set most from the UI: each has a real description, not a generated one
MOST_SET = ["model__student", "data__train", "data__train_limit", "generate__engine", "generate__teacher",
            "generate__samples_per_prompt", "generate__temperature", "generate__max_new_tokens",
            "filter__min_kept", "sft__learning_rate", "sft__epochs", "sft__max_steps", "sft__batch_size",
            "dpo__learning_rate", "dpo__beta", "rl__learning_rate", "rl__num_generations",
            "rl__max_completion_tokens", "evaluate__benchmarks", "evaluate__k", "evaluate__pass_k",
            "evaluate__temperature", "evaluate__max_new_tokens", "storage__endpoint", "storage__bucket",
            "registry__margin", "run__name", "run__seed"]


@pytest.mark.parametrize("name", MOST_SET)
def test_the_most_set_fields_have_real_descriptions(name):
    if name not in DEFAULTS:
        pytest.fail(f"{name} is no longer a run parameter: update MOST_SET")
    assert _field(name).description, name
    assert not parameter_description(name, DEFAULTS[name]).startswith("Recipe field")


def test_a_field_without_description_gets_its_type_bounds_and_default(monkeypatch):
    field = _field("sft__grad_accum")
    monkeypatch.setattr(field, "description", None)
    assert parameter_description("sft__grad_accum", 2) == "Recipe field sft.grad_accum. [integer >= 1; default 2]"
    field = _field("evaluate__pass_k")
    monkeypatch.setattr(field, "description", None)
    assert parameter_description("evaluate__pass_k", [1, 4]) == (
        "Recipe field evaluate.pass_k. [JSON: a list of integers; e.g. [1, 4]; default [1, 4]]")


def test_descriptions_say_type_choices_and_default():
    d = parameter_description("generate__engine", "vllm")
    assert d.startswith("Teacher sampler") and '[one of "hf", "vllm", "openai"; default "vllm"]' in d
    assert parameter_description("rl__learning_rate", 1e-6).endswith("[number > 0.0 and <= 1.0; default 1e-06]")
    assert "[true or false; default true]" in parameter_description("filter__decontaminate", True)
    long = parameter_description("template__system_prompt", "x" * 500)
    assert len(long) < 300 and long.endswith('...]')


def test_docstring_parses_to_one_description_per_parameter():
    doc = pipeline_docstring(DEFAULTS, "The thinkforge DAG.")
    parsed = docstring_parser.parse(inspect.cleandoc(doc))
    assert parsed.short_description == "The thinkforge DAG."
    assert {p.arg_name: p.description for p in parsed.params} == {
        name: parameter_description(name, value) for name, value in DEFAULTS.items()}


def _throwaway_pipeline(defaults: dict[str, Any]):
    """A pipeline shaped like pipelines/training.py's: one parameter per recipe field, all into `configure`."""
    from kfp import dsl

    configure = dsl.component(base_image="python:3.11-slim")(configure_function(defaults))

    def docs_check(*args: Any, **kwargs: Any):
        configure(**{**dict(zip(defaults, args)), **kwargs})

    docs_check.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value,
                           annotation=parameter_type(value)) for name, value in defaults.items()])
    docs_check.__annotations__ = {n: parameter_type(v) for n, v in defaults.items()}
    docs_check.__doc__ = pipeline_docstring(defaults, "Throwaway pipeline for the descriptions.")
    return dsl.pipeline(name="docs-check", description="Throwaway pipeline for the descriptions.")(docs_check)


def test_compiled_ir_carries_every_parameter_description(tmp_path):
    from kfp import compiler

    recipe = Recipe.model_validate({"evaluate": {"benchmarks": ["math500"], "pass_k": [1, 8]},
                                    "template": {"system_prompt": "Use \\boxed{}: answer \"x\"."}})
    defaults = flatten(recipe)
    out = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(_throwaway_pipeline(defaults), str(out))
    [ir, *_] = list(yaml.safe_load_all(out.read_text()))
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(defaults)
    for name, value in defaults.items():
        assert params[name].get("description") == parameter_description(name, value), name
    assert params["evaluate__pass_k"]["parameterType"] == "LIST"
    assert params["evaluate__pass_k"]["description"].endswith("e.g. [1, 4]; default [1, 8]]")
    assert "default [{" in params["evaluate__benchmarks"]["description"]
    assert ir["pipelineInfo"]["description"] == "Throwaway pipeline for the descriptions."
