"""The chart's table of the recipes shipped in the image (thinkforge.recipes.known in
helm/thinkforge/templates/_helpers.tpl) against the recipe files themselves.

The chart cannot read files inside the image, so it decides image flavor, object-store size and the
teacher's context check from that table (and from an inline pipeline.recipe, whose unset fields take the
recipe defaults). Here the table is rendered by the real Helm library and compared with every
recipes/*.yaml as thinkforge.config loads it, so a recipe edit that changes GPU use, the student or
generate.max_new_tokens fails this test until the table follows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")
config = pytest.importorskip("thinkforge.config")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    """The chart plus one template that renders `.Values.global.probe.template` (stand-ins for embedded files)."""
    d = tmp_path_factory.mktemp("probe") / "thinkforge"
    shutil.copytree(CHART, d)
    for name, text in (("prometheus-rules.yaml", "groups: []\n"), ("grafana-dashboard.json", "{}\n")):
        if not (d / "files" / name).exists():
            (d / "files").mkdir(exist_ok=True)
            (d / "files" / name).write_text(text)
    (d / "templates" / "zz-probe.yaml").write_text("{{- with .Values.global }}{{- with .probe }}{{ tpl .template $ }}{{- end }}{{- end }}\n")
    return d


def probe(probe_dir: Path, template: str, values: dict | None = None, **objects) -> str:
    """Render `template` inside the chart with `values`; `objects` are at .Values.global.probe."""
    vals = {**(values or {}), "global": {"probe": {"template": template, **objects}}}
    with helm.Chart.load(probe_dir) as c:
        out = c.render(values=vals, name="tf", namespace="ml-team", is_install=True)
    return next(v for k, v in out.items() if k.endswith("zz-probe.yaml")).strip()


@pytest.fixture(scope="module")
def known(probe_dir) -> dict:
    return yaml.safe_load(probe(probe_dir, '{{ include "thinkforge.recipes.known" $ }}'))


def facts(path: Path) -> dict:
    recipe = config.load_recipe(path)
    gpu = any(recipe.cluster.placement(stage).gpus > 0 for stage in config.STAGE_KEYS)
    return {"gpu": gpu, "student": recipe.model.student, "maxNewTokens": recipe.generate.max_new_tokens}


def test_every_shipped_recipe_is_known(known):
    assert RECIPES
    assert set(known) == {f"recipes/{p.name}" for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_known_table_matches_the_recipe(known, path):
    entry = known[f"recipes/{path.name}"]
    assert {k: entry[k] for k in ("gpu", "student", "maxNewTokens")} == facts(path)
    assert entry["storage"]  # every shipped recipe has a store-size estimate


def test_inline_recipe_defaults_match_the_config(probe_dir):
    """An inline recipe that leaves model.student / generate.max_new_tokens unset gets the config defaults."""
    got = json.loads(probe(probe_dir, '{{ include "thinkforge.recipe" $ }}', {"pipeline": {"recipe": {"run": {"name": "x"}}}}))
    default = config.Recipe()
    assert (got["student"], got["maxNewTokens"], got["gpu"]) == (default.model.student, default.generate.max_new_tokens, False)


@pytest.mark.parametrize(
    "student, hub",
    [("microsoft/Phi-4-mini-instruct", True), ("Qwen/Qwen2.5-0.5B", True), ("builtin:smollm2-135m-instruct", False),
     ("random:llama-tiny", False), ("minio://thinkforge/models/x", False), ("s3://b/m", False), ("/models/phi4", False), ("./m", False)],
)
def test_hub_model_detection(probe_dir, student, hub):
    got = json.loads(probe(probe_dir, '{{ include "thinkforge.recipe" $ }}', {"pipeline": {"recipe": {"model": {"student": student}}}}))
    assert got["hubModel"] is hub


@pytest.mark.parametrize("q, gi", [("10Gi", 10.0), ("1Ti", 1024.0), ("512Mi", 0.5), ("600G", 558.79), ("0.4Ti", 409.6), (53687091200, 50.0), ("lots", -1.0)])
def test_quantity_parsing(probe_dir, q, gi):
    """minio.persistence.size is compared with the recipe's estimate in GiB (-1: unreadable, not checked)."""
    got = float(probe(probe_dir, '{{ include "thinkforge.quantityGi" .Values.global.probe.q }}', q=q))
    assert got == pytest.approx(gi, abs=0.01)
