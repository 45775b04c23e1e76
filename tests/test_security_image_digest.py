"""Pipeline versions name their image by digest.

The component code lives in the image, so an uploaded pipeline version whose tasks name `repo:tag` runs
whatever the tag points at when a run starts, not what the version was compiled and tested against.
`thinkforge upload/schedule/submit --image-digest sha256:...` compiles with `<repo>@sha256:...` (tasks and
the `cluster.image` that Trainer jobs take), every image of the pipeline about to be uploaded is checked
(a tag-only one is a warning, or an error with `--require-digest`), and the chart renders
`image.digest` as `<repo>@<digest>` and passes `--require-digest`. The chart's upload Job arguments are
fed to the real CLI parser here, so chart and CLI agree on the flags.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import yaml

from thinkforge import cluster

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinkforge"
NAMESPACE, RELEASE = "ml-team", "tf"
D1 = "sha256:" + "0123456789abcdef" * 4
D2 = "sha256:" + "fedcba9876543210" * 4


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cluster.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("ref, parts", [
    ("ghcr.io/org/tf:0.1.0-cpu", ("ghcr.io/org/tf", "0.1.0-cpu", "")),
    ("localhost:5000/tf", ("localhost:5000/tf", "", "")),
    ("localhost:5000/tf:v1@" + D1, ("localhost:5000/tf", "v1", D1)),
    ("tf@" + D1, ("tf", "", D1)),
])
def test_split_image(ref, parts):
    assert cluster.split_image(ref) == parts
    assert cluster.is_pinned(ref) == bool(parts[2])


def test_pin_image():
    assert cluster.pin_image("ghcr.io/org/tf:0.1.0-cpu", D1) == "ghcr.io/org/tf@" + D1
    assert cluster.pin_image("localhost:5000/tf", D1) == "localhost:5000/tf@" + D1
    assert cluster.pin_image("tf:1@" + D1, D1) == "tf@" + D1
    with pytest.raises(ValueError, match="already names digest"):
        cluster.pin_image("tf@" + D1, D2)
    for bad in ("0123abcd", "sha256:xyz", "latest", ""):
        with pytest.raises(ValueError, match="expected sha256:<64 hex digits>"):
            cluster.pin_image("tf:1", bad)
    assert not cluster.is_pinned("tf@sha256:short")


# ------------------------------------------------------------------------------------------ the CLI


class NoKFP:
    """Stands in for kfp.Client: any use means something was sent to KFP."""

    def __getattr__(self, name):
        raise AssertionError(f"KFP API used ({name}) although the upload should have been refused")


@pytest.fixture
def no_kfp(monkeypatch):
    monkeypatch.setattr(cluster, "_client", lambda args: NoKFP())


def images(package: str | Path) -> set[str]:
    return set(cluster.package_images(package))


def test_upload_pins_the_tasks_and_the_trainer_image(tmp_path):
    args = parse(["upload", "--recipe", str(ROOT / "recipes/smoke.yaml"), "--image", "ghcr.io/org/tf:0.1.0-cpu",
                  "--image-digest", D1, "--require-digest"])
    package, compiled = cluster._package(args, str(tmp_path))
    assert compiled and images(package) == {"ghcr.io/org/tf@" + D1}
    ir = next(yaml.safe_load_all(Path(package).read_text()))
    consts = [t["inputs"]["parameters"]["cluster__image"]["runtimeValue"]["constant"]
              for t in ir["root"]["dag"]["tasks"].values() if "cluster__image" in t.get("inputs", {}).get("parameters", {})]
    assert consts == ["ghcr.io/org/tf@" + D1]  # the config every Trainer job is built from names it too


def test_a_digest_without_image_pins_the_default_image(tmp_path, monkeypatch):
    from thinkforge.pipelines import training

    args = parse(["upload", "--recipe", str(ROOT / "recipes/smoke.yaml"), "--image-digest", D1])
    package, _ = cluster._package(args, str(tmp_path))
    assert images(package) == {cluster.split_image(training.DEFAULT_IMAGE)[0] + "@" + D1}


def test_tag_only_images_warn_by_default(tmp_path, caplog):
    args = parse(["upload", "--recipe", str(ROOT / "recipes/smoke.yaml"), "--image", "ghcr.io/org/tf:0.1.0-cpu"])
    with caplog.at_level(logging.WARNING, logger="thinkforge.cluster"):
        package, _ = cluster._package(args, str(tmp_path))
    assert images(package) == {"ghcr.io/org/tf:0.1.0-cpu"}
    assert any("by tag, not digest: ghcr.io/org/tf:0.1.0-cpu" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("command", ["upload", "schedule", "submit"])
def test_require_digest_refuses_before_anything_is_sent(tmp_path, no_kfp, command, capsys):
    argv = [command, "--recipe", str(ROOT / "recipes/smoke.yaml"), "--image", "ghcr.io/org/tf:0.1.0-cpu", "--require-digest"]
    if command == "schedule":
        argv += ["--cron", "0 0 3 * * 0"]
    assert cluster.main(argv) == 2
    err = capsys.readouterr().err
    assert "names 1 image(s) by tag, not digest: ghcr.io/org/tf:0.1.0-cpu" in err and "--require-digest" in err


def test_compile_pinned_leaves_no_file_when_refused(tmp_path):
    """What `thinkforge compile --image-digest/--require-digest` calls: a refused pipeline is not written."""
    from thinkforge.config import load_recipe

    recipe = load_recipe(ROOT / "recipes/smoke.yaml")
    out = tmp_path / "build" / "pipeline.yaml"
    with pytest.raises(cluster.ClusterError, match="by tag, not digest"):
        cluster.compile_pinned(recipe, out, image="ghcr.io/org/tf:1", require=True)
    assert not out.exists() and not list(out.parent.iterdir())
    assert cluster.compile_pinned(recipe, out, image="ghcr.io/org/tf:1", digest=D1, require=True) == out
    assert images(out) == {"ghcr.io/org/tf@" + D1} and [p.name for p in out.parent.iterdir()] == ["pipeline.yaml"]


def test_require_digest_from_the_environment(monkeypatch):
    monkeypatch.setenv(cluster.ENV_REQUIRE_DIGEST, "1")
    assert parse(["upload", "--recipe", "r.yaml"]).require_digest is True
    monkeypatch.setenv(cluster.ENV_REQUIRE_DIGEST, "")
    assert parse(["upload", "--recipe", "r.yaml"]).require_digest is False


def test_a_precompiled_package_is_checked_too(tmp_path, no_kfp, capsys):
    from thinkforge.config import load_recipe
    from thinkforge.pipelines.training import compile_pipeline

    loose = compile_pipeline(load_recipe(ROOT / "recipes/smoke.yaml"), tmp_path / "loose.yaml", image="ghcr.io/org/tf:1")
    assert cluster.main(["upload", "--package", str(loose), "--require-digest"]) == 2
    assert "--package" in capsys.readouterr().err
    pinned = compile_pipeline(load_recipe(ROOT / "recipes/smoke.yaml"), tmp_path / "pinned.yaml", image="ghcr.io/org/tf@" + D1)
    assert cluster._package(parse(["upload", "--package", str(pinned), "--require-digest"]), str(tmp_path)) == (str(pinned), False)
    with pytest.raises(cluster.ClusterError, match="--image-digest pins the image of a pipeline compiled here"):
        cluster._package(parse(["upload", "--package", str(pinned), "--image-digest", D1]), str(tmp_path))


def test_a_recipe_image_by_tag_is_refused_even_when_the_flag_image_is_pinned(tmp_path):
    """--require-digest checks what the pipeline names, not only --image: with the chart's setImage off, a
    recipe's own cluster.image decides."""
    args = parse(["upload", "--recipe", str(ROOT / "recipes/smoke.yaml"), "--set", "cluster.image=ghcr.io/org/tf:moving",
                  "--require-digest"])
    with pytest.raises(cluster.ClusterError, match="ghcr.io/org/tf:moving"):
        cluster._package(args, str(tmp_path))
    args = parse(["upload", "--recipe", str(ROOT / "recipes/smoke.yaml"), "--set", "cluster.image=ghcr.io/org/tf:moving",
                  "--image-digest", D1, "--require-digest"])
    package, _ = cluster._package(args, str(tmp_path))
    assert images(package) == {"ghcr.io/org/tf@" + D1}


# ---------------------------------------------------------------------------------------- the chart


helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the Helm v4 library) is not installed")


def render(values: dict | None = None) -> tuple[list[dict], str]:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]
    return docs, next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def job_containers(docs) -> dict[str, dict]:
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def containers_of(docs, kind) -> list[dict]:
    return [c for d in docs if d["kind"] == kind for c in d["spec"]["template"]["spec"]["containers"]]


def test_chart_default_names_tags_and_says_so():
    docs, notes = render()
    upload = job_containers(docs)["upload"]
    assert upload["image"] == "ghcr.io/thinkforge/thinkforge:0.1.0-cpu" and "--require-digest" not in upload["args"]
    assert "image.digest is empty" in notes and "(ghcr.io/thinkforge/thinkforge:0.1.0-cpu)" in notes


def test_chart_digest_pins_every_reference_and_requires_it_of_the_pipeline(tmp_path):
    values = {"image": {"digest": D1}, "minio": {"image": {"digest": D2}},
              "teacher": {"enabled": True, "image": {"digest": D2}}, "schedule": {"enabled": True}}
    docs, notes = render(values)
    cs = job_containers(docs)
    assert {c["image"] for c in cs.values()} == {"ghcr.io/thinkforge/thinkforge@" + D1}
    for name in ("upload", "schedule"):
        args = cs[name]["args"]
        assert args[args.index("--image") + 1] == "ghcr.io/thinkforge/thinkforge@" + D1
        assert "--require-digest" in args
    assert [c["image"] for c in containers_of(docs, "StatefulSet")] == ["quay.io/minio/minio@" + D2]
    assert [c["image"] for c in containers_of(docs, "Deployment")] == ["vllm/vllm-openai@" + D2]
    assert "image.digest is empty" not in notes
    # the Job's own arguments, through the real CLI: it compiles a pinned pipeline and accepts it
    args = cs["upload"]["args"]
    args[args.index("--recipe") + 1] = str(ROOT / "recipes/smoke.yaml")  # the image's /app/recipes/..., here
    package, _ = cluster._package(parse(args), str(tmp_path))
    assert images(package) == {"ghcr.io/thinkforge/thinkforge@" + D1}


def test_chart_can_insist_on_a_digest():
    with pytest.raises(helm.HelmError, match="image.digest: required by pipeline.requireImageDigest"):
        render({"pipeline": {"requireImageDigest": True}})
    docs, _ = render({"pipeline": {"requireImageDigest": True}, "image": {"digest": D1}})
    assert "--require-digest" in job_containers(docs)["upload"]["args"]


@pytest.mark.parametrize("bad", ["0123", "sha256:ABC", "sha512:" + "0" * 128, "sha256:" + "0" * 63])
def test_chart_schema_refuses_a_malformed_digest(bad):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError, match="digest"):
            chart.validate_schema({"image": {"digest": bad}})
