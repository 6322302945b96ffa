"""The Dockerfile, read as text (Docker does not run in CI): the torch it installs meets pyproject.toml's
floors, lvis's system libraries are installed, it runs as a non-root user, the demo's run folder lands
in the folder the documented command mounts, and the build context leaves out runs and environments.
The image's steps themselves were run in a clean virtualenv (docs/hardening.md, "The Docker image")."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from pipeline.config import parse_manifest

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def one(kind: str) -> str:
    found = [args for instruction, args in instructions() if instruction == kind]
    assert len(found) == 1, f"{kind}: {found}"
    return found[0]


def args() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in instructions() if kind == "ARG" and "=" in a)


def floors() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def run_commands() -> list[list[str]]:
    """Each RUN, split into its `&&`-joined commands (as argument lists)."""
    commands = []
    for kind, line in instructions():
        if kind == "RUN":
            commands += [shlex.split(c) for c in line.split("&&")]
    return commands


def test_the_image_installs_a_torch_at_or_above_the_floors():
    pins = args()
    pip = next(c for c in run_commands() if c[:2] == ["pip", "install"] and any(a.startswith("torch==") for a in c))
    assert "torch==${TORCH_VERSION}" in pip and "torchvision==${TORCHVISION_VERSION}" in pip
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert floors()[name].specifier.contains(pins[arg]), f"{arg}={pins[arg]} is below {floors()[name]}"


def test_the_base_image_has_the_python_the_project_needs():
    base = one("FROM")
    version = re.match(r"python:(\d+\.\d+)", base)
    python = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    assert version and Requirement(f"python{python}").specifier.contains(version.group(1) + ".0"), base


def test_lvis_gets_its_system_libraries_and_the_extras_are_installed():
    apt = next(c for c in run_commands() if c[:2] == ["apt-get", "install"])
    assert {"libgl1", "libglib2.0-0"} <= set(apt)  # OpenCV (through lvis) loads libGL and GLib
    project = next(c for c in run_commands() if c[:2] == ["pip", "install"] and any(a.startswith(".[") for a in c))
    assert {"gpu", "lvis"} <= set(project[-1][2:-1].split(","))


def test_the_image_runs_as_a_user_that_is_not_root():
    users = [a for kind, a in instructions() if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    kinds = [kind for kind, _ in instructions()]
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert any(c[:2] == ["useradd", "--create-home"] and users[-1] in c for c in run_commands())


def test_the_demo_writes_into_the_mounted_folder():
    # The image's manifests are WORKDIR/manifests; demo.yaml's output_dir is relative to its file.
    workdir = Path(one("WORKDIR"))
    volume = Path(re.findall(r'"([^"]+)"', one("VOLUME"))[0])
    demo = yaml.safe_load((REPO / "manifests" / "demo.yaml").read_text(encoding="utf-8"))
    manifest = parse_manifest(demo, source_path=str(workdir / "manifests" / "demo.yaml"))
    assert manifest.output_path.is_relative_to(volume), (manifest.output_path, volume)
    # the non-root user can write there, and the documented command mounts it
    assert any(c[:3] == ["mkdir", "-p", str(volume)] for c in run_commands())
    assert any(c[0] == "chown" and c[-1] == str(volume) for c in run_commands())
    readme = (REPO / "docs" / "running.md").read_text(encoding="utf-8")  # its Docker section
    assert f'-v "$PWD/runs:{volume}"' in readme and "regionclip-pipeline run manifests/demo.yaml" in readme


def test_the_build_context_leaves_out_runs_environments_and_git():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"runs", ".venv", ".git"} <= ignored
