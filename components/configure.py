"""The `configure` component: one typed input per recipe field, one validated config artifact out.

Its signature depends on the config model, so its source is generated: KFP ships a component as the
text of its function, and a plain `**params` or a dict of pipeline channels cannot carry ~120 typed
parameters (channels nested in a dict are pasted into JSON unescaped, so a value holding a backslash
or a quote, like the system prompt's `\\boxed{}`, breaks the run). The generated function is written
to a file so that `inspect.getsource` (what KFP uses) sees ordinary source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import keyword
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable

import annotated_types as at
from pydantic import BaseModel

from thinkforge.config import Benchmark, ConfigError, Recipe, unflatten, validate

ORIGIN = "pipeline parameters"

TEMPLATE = '''\
from kfp.dsl import Artifact, Output


def configure({signature}config: Output[Artifact]):
    """Validate the pipeline parameters as one recipe; every stage reads this artifact."""
    params = {{k: v for k, v in locals().items() if k != "config"}}
    import json

    from thinkforge.components.configure import recipe_from_parameters

    recipe = recipe_from_parameters(params)
    with open(config.path, "w") as fh:
        json.dump(recipe.model_dump(), fh, indent=2)
    config.metadata["digest"] = recipe.digest()
    config.metadata["run"] = recipe.run.name
'''


def parameter_type(value: Any) -> type:
    """The KFP parameter type of a recipe value (bool before int: True is an int too)."""
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return t
    raise TypeError(f"unsupported parameter value {value!r}")


def configure_function(parameters: dict[str, Any]) -> Callable[..., None]:
    for name in parameters:
        if not name.isidentifier() or keyword.iskeyword(name) or name == "config":
            raise ValueError(f"pipeline parameter {name!r} is not a valid identifier")
    signature = "".join(f"{name}: {parameter_type(v).__name__}, " for name, v in parameters.items())
    source = TEMPLATE.format(signature=signature)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "thinkforge-components" / f"configure_{digest}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(f"thinkforge_configure_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.configure


# --- values typed in the KFP UI ------------------------------------------------------------------


def _field(name: str) -> Any:
    """The config FieldInfo of a `<section>__<field>` parameter (None when there is no such field)."""
    section, _, field = name.partition("__")
    sec = Recipe.model_fields.get(section)
    if sec is None or not isinstance(sec.annotation, type):
        return None
    return getattr(sec.annotation, "model_fields", {}).get(field)


def _item_words(tp: Any) -> str:
    if tp is Benchmark:
        return "benchmark names or objects"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "objects"
    words = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if tp in words:
        return words[tp]
    if typing.get_origin(tp) is typing.Literal:
        return "values among " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is list:
        return "lists"
    if origin is dict:
        return "objects"
    return "values"


def _container(annotation: Any) -> type | None:
    """list or dict when a field holds one (what the KFP UI takes as JSON text), else None."""
    origin = typing.get_origin(annotation)
    return origin if origin in (list, dict) else None


def expected_value(annotation: Any) -> str:
    """`a list of strings`, `an object of strings`, ...: what a list/dict field takes, in words."""
    args = typing.get_args(annotation)
    if _container(annotation) is list:
        return f"a list of {_item_words(args[0] if args else Any)}"
    return f"an object of {_item_words(args[-1] if args else Any)}"


# Examples shown in the error (and the UI's description) of list/dict fields; other fields get a
# generic one from their item type.
EXAMPLES = {
    "evaluate.benchmarks": '["math500", {"name": "gsm8k", "limit": 200}]',
    "evaluate.pass_k": "[1, 4]",
    "filter.decontaminate_extra": '["hf:HuggingFaceH4/MATH-500:test"]',
}


def value_example(dotted: str, annotation: Any) -> str:
    if dotted in EXAMPLES:
        return EXAMPLES[dotted]
    args = typing.get_args(annotation)
    item = args[-1] if args else Any
    one = {int: "1", float: "0.5", bool: "true", str: '"text"'}.get(item, "{}")
    return f"[{one}]" if _container(annotation) is list else f'{{"key": {one}}}'


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_container(text: str, kind: type) -> Any:
    """JSON text (what the KFP UI sends), else a YAML flow value (`[math500, aime24]`, as `--set` takes)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, kind) else text


def coerce_parameters(params: dict[str, Any], origin: str = ORIGIN) -> tuple[dict[str, Any], list[str]]:
    """List/dict parameters as the KFP UI hands them over (JSON text, or values already parsed) turned
    into lists/dicts; the errors, one line each naming the field, for values that are neither. Items are
    left to the config model, whose errors name the field and the index."""
    out: dict[str, Any] = {}
    errors = []
    for name, value in params.items():
        field = _field(name)
        kind = _container(field.annotation) if field is not None else None
        if kind is None:
            out[name] = value
            continue
        parsed = _parse_container(value, kind) if isinstance(value, str) else value
        if isinstance(parsed, kind):
            out[name] = parsed
            continue
        dotted = name.replace("__", ".", 1)
        word = "list" if kind is list else "object"
        empty = "; [] for none" if kind is list else "; {} for none"
        errors.append(f"{origin}: {dotted}: expected {expected_value(field.annotation)}, got {_shown(value)} "
                      f"(enter a JSON {word} like {value_example(dotted, field.annotation)}{empty})")
    return out, errors


def recipe_from_parameters(params: dict[str, Any], origin: str = ORIGIN) -> Recipe:
    """The `configure` component's work: pipeline parameters (as KFP or a person in the KFP UI gave them)
    to one validated Recipe. Every error names its field; all are reported at once, as one ConfigError."""
    values, errors = coerce_parameters(params, origin)
    try:
        recipe = validate(unflatten(values), origin=origin)
    except ConfigError as err:
        errors.append(str(err))
    if errors:
        raise ConfigError("\n".join(errors))
    return recipe


# --- parameter descriptions for the KFP UI ------------------------------------------------------


def _constraints(field: Any) -> str:
    bounds = []
    for m in field.metadata:
        for cls, attr, sign in ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<")):
            if isinstance(m, cls):
                bounds.append(f"{sign} {getattr(m, attr)}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            bounds.append(f"matching {pattern}")
    return " and ".join(bounds)


def type_words(annotation: Any) -> str:
    """A field's type as a person filling in the KFP UI needs it."""
    if _container(annotation) is not None:
        return f"JSON: {expected_value(annotation)}"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(annotation))
    return {bool: "true or false", int: "integer", float: "number", str: "text"}.get(annotation, str(annotation))


def _default_words(value: Any, limit: int = 100) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parameter_description(name: str, default: Any) -> str:
    """The KFP UI description of one `<section>__<field>` parameter: the config field's description, then
    its type, bounds, an example for list/dict fields, and the default, on one line."""
    field = _field(name)
    dotted = name.replace("__", ".", 1)
    if field is None:
        return f"{dotted} (default {_default_words(default)})"
    text = " ".join((field.description or f"Recipe field {dotted}.").split())
    if text[-1] not in ".!?)":
        text += "."
    kind = type_words(field.annotation)
    bounds = _constraints(field)
    facts = [f"{kind} {bounds}" if bounds else kind]
    if _container(field.annotation) is not None:
        facts.append(f"e.g. {value_example(dotted, field.annotation)}")
    facts.append(f"default {_default_words(default)}")
    return f"{text} [{'; '.join(facts)}]"


def pipeline_docstring(defaults: dict[str, Any], summary: str) -> str:
    """A Google-style docstring for the pipeline function whose parameters are `defaults`' keys (the
    flattened recipe): `summary`, then `Args:` with every parameter's description. KFP's compiler reads
    these into the IR (`root.inputDefinitions.parameters.<name>.description`), which the KFP UI shows
    beside each run parameter. Set it as the function's `__doc__` before `dsl.pipeline` wraps it."""
    lines = [" ".join(summary.split()) or "thinkforge pipeline.", "", "Args:"]
    for name, value in defaults.items():
        desc = parameter_description(name, value)
        # one line per parameter: the parser ends a section at an unindented line, and KFP re-parses
        # the docstring for outputs when a line ends in "Return"/"Returns"
        assert "\n" not in desc and ":" not in name
        lines.append(f"    {name} ({parameter_type(value).__name__}): {desc}")
    return "\n".join(lines) + "\n"
