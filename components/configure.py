"""The `configure` component: one typed input per recipe field, one validated config artifact out.

Its signature depends on the config model, so its source is generated: KFP ships a component as the
text of its function, and a plain `**params` or a dict of pipeline channels cannot carry ~120 typed
parameters (channels nested in a dict are pasted into JSON unescaped, so a value holding a backslash
or a quote, like the system prompt's `\\boxed{}`, breaks the run). The generated function is written
to a file so that `inspect.getsource` (what KFP uses) sees ordinary source.
"""

import hashlib
import importlib.util
import keyword
import tempfile
from pathlib import Path
from typing import Any, Callable

TEMPLATE = '''\
from kfp.dsl import Artifact, Output


def configure({signature}config: Output[Artifact]):
    """Validate the pipeline parameters as one recipe; every stage reads this artifact."""
    params = {{k: v for k, v in locals().items() if k != "config"}}
    import json

    from thinkforge.config import unflatten, validate

    recipe = validate(unflatten(params), origin="pipeline parameters")
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
