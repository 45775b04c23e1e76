"""Who may do what, from the chart's rendered Roles and RoleBindings.

The upload Job's ServiceAccount and the pipeline runs' service account are different subjects with
different needs: the Job talks to the Kubeflow Pipelines API only (multi-user KFP authorizes it with a
SubjectAccessReview on pipelines.kubeflow.org resources); runs need the Kubernetes API only to launch
multi-node stages as Trainer jobs, and the right to create Trainer jobs is the right to create pods that
mount any Secret of the namespace. So the effective rights of each subject are computed here from the
rendered objects (as the RBAC authorizer would: the union of the rules of every Role bound to it) and
compared with what each needs, for the defaults, multi-node training on, and multi-user KFP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
NAMESPACE, RELEASE = "ml-team", "tf"
JOB_SA = ("ServiceAccount", NAMESPACE, f"{RELEASE}-thinkforge")
RUNNER = ("ServiceAccount", NAMESPACE, "pipeline-runner")
TRAINER_JOBS = {("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs")}
# What the upload Job needs (thinkforge upload/schedule against KFP's API), and no more.
JOB_NEEDS = {("pipelines.kubeflow.org", "pipelines"): {"create", "get", "list"},
             ("pipelines.kubeflow.org", "experiments"): {"create", "get", "list"},
             ("pipelines.kubeflow.org", "jobs"): {"create", "get", "list", "delete", "enable", "disable"}}


def render(values: dict | None = None) -> tuple[list[dict], str]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    return docs, next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def rights(docs: list[dict]) -> dict[tuple[str, str, str], dict[tuple[str, str], set[str]]]:
    """subject (kind, namespace, name) -> {(apiGroup, resource): verbs}, from Roles and RoleBindings."""
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], "cluster-wide RBAC"
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"}
    out: dict = {}
    for b in (d for d in docs if d["kind"] == "RoleBinding"):
        assert b["roleRef"]["kind"] == "Role"
        role = roles[(b["metadata"]["namespace"], b["roleRef"]["name"])]
        for s in b["subjects"]:
            subject = (s["kind"], s.get("namespace", b["metadata"]["namespace"]), s["name"])
            granted = out.setdefault(subject, {})
            for rule in role["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        granted.setdefault((g, r), set()).update(rule["verbs"])
    return out


def test_default_the_job_gets_kfp_rights_only_and_runs_get_nothing():
    got = rights(render()[0])
    assert set(got) == {JOB_SA}, "only the upload Job's account is bound by default"
    assert got[JOB_SA] == JOB_NEEDS
    assert not any(g == "" or (g, r) in TRAINER_JOBS for g, r in got[JOB_SA])  # no Kubernetes API rights


def test_multi_node_training_gives_trainer_rights_to_the_runs_only():
    docs, notes = render({"rbac": {"multiNodeTraining": True}})
    got = rights(docs)
    assert set(got) == {JOB_SA, RUNNER}
    assert got[JOB_SA] == JOB_NEEDS  # unchanged: the Job never gets pods or Trainer jobs
    run = got[RUNNER]
    for res in TRAINER_JOBS:
        assert {"create", "get", "list", "watch", "patch", "delete"} == run[res]
    assert run[("", "pods")] == run[("", "pods/log")] == {"get", "list", "watch"}
    assert not [k for k in run if k[0] == "pipelines.kubeflow.org"]
    assert not [k for k in run if k[1] in ("secrets", "roles", "rolebindings", "serviceaccounts")]
    # the chart says what this amounts to, where an operator reads it
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-trainer")]
    grants = role["metadata"]["annotations"]["thinkforge.io/grants"]
    assert "pods" in grants and "Secret" in grants and "service account" in grants
    assert "rbac.multiNodeTraining is on" in notes and "any Secret" in notes


@pytest.mark.parametrize("values, account", [
    ({"kfp": {"multiUser": True}}, "default-editor"),
    ({"kfp": {"runServiceAccount": "team-runner"}}, "team-runner"),
])
def test_trainer_rights_follow_the_runs_account(values, account):
    got = rights(render({"rbac": {"multiNodeTraining": True}, **values})[0])
    assert set(got) == {JOB_SA, ("ServiceAccount", NAMESPACE, account)}
    assert TRAINER_JOBS <= set(got[("ServiceAccount", NAMESPACE, account)])


def test_values_file_says_what_multi_node_training_grants():
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("\nrbac:"):text.index("multiNodeTraining:")]
    assert "WHAT IT GRANTS" in block and "Secret" in block and "service account" in block
    assert yaml.safe_load(text)["rbac"] == {"create": True, "multiNodeTraining": False}


MULTI_NODE_NEEDED = "rbac.multiNodeTraining: "


@pytest.mark.parametrize("values, stage", [
    ({"pipeline": {"overrides": ["sft.nodes=2"]}}, "sft"),
    ({"pipeline": {"recipe": {"rl": {"nodes": 4}}}}, "rl"),
    ({"pipeline": {"recipe": {"midtrain": {"nodes": 2}, "dpo": {"nodes": 3}}}}, "dpo, midtrain"),
])
def test_a_multi_node_recipe_needs_the_value(values, stage):
    """Without the Role the Trainer job would fail with a 403 in the middle of a run: the install says so."""
    with pytest.raises(helm.HelmError) as err:
        render(values)
    msg = str(err.value)
    assert MULTI_NODE_NEEDED in msg and f"runs {stage} on several nodes" in msg and "every Secret" in msg
    render({**values, "rbac": {"multiNodeTraining": True}})  # opted in
    render({**values, "rbac": {"create": False}})  # RBAC managed outside the chart: its business
    render({"pipeline": {**values["pipeline"], "overrides": [*values["pipeline"].get("overrides", []),
                                                                 "sft.nodes=1", "rl.nodes=1", "midtrain.nodes=1", "dpo.nodes=1"]}})


def test_single_node_recipes_install_without_it():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        values = {"pipeline": {"recipeFile": f"recipes/{recipe.name}"}}
        render(values)


def test_known_recipe_table_says_which_recipes_are_multi_node(tmp_path):
    """The chart's table of shipped recipes (templates/_helpers.tpl) against recipes/*.yaml."""
    config = pytest.importorskip("thinkforge.config")
    import shutil

    d = tmp_path / "thinkforge"
    shutil.copytree(CHART, d)
    (d / "templates" / "zz-probe.yaml").write_text('{{ include "thinkforge.recipes.known" $ }}\n')
    with helm.Chart.load(d) as c:
        known = yaml.safe_load(c.render(values={}, name=RELEASE, namespace=NAMESPACE)["thinkforge/templates/zz-probe.yaml"])
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = config.load_recipe(path)
        multi = any(getattr(recipe, s).nodes > 1 for s in ("midtrain", "sft", "dpo", "rl"))
        assert known[f"recipes/{path.name}"]["multiNode"] is multi, path.name


def test_the_runs_account_must_not_be_the_jobs():
    with pytest.raises(helm.HelmError, match="kfp.runServiceAccount: tf-thinkforge is the upload Job's own ServiceAccount"):
        render({"rbac": {"multiNodeTraining": True}, "kfp": {"runServiceAccount": f"{RELEASE}-thinkforge"}})


def test_the_removed_value_says_what_replaced_it():
    with pytest.raises(helm.HelmError, match="rbac.trainer: removed; pipeline runs get Trainer-job rights only with rbac.multiNodeTraining=true"):
        render({"rbac": {"trainer": True}})
