"""manifests/ray-cluster-gpu.yaml, read as data (no cloud here): every node gets a Python that meets
requires-python, the Dockerfile's torch pair, the `gpu` extra and the spaCy model; GPU workers refuse an
NVIDIA driver too old for torch's CUDA build (the check itself is run against stand-in `nvidia-smi`s);
Ray's object store has its shared memory."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement

from pipeline.config import ConceptsConfig
from tests.test_docker import args as dockerfile_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((REPO / "manifests" / "ray-cluster-gpu.yaml").read_text(encoding="utf-8"))
SETUP = CLUSTER["setup_commands"]

# The oldest Linux driver of each CUDA major version (NVIDIA's CUDA compatibility tables: 12.x 525.60.13,
# 13.x 580.65.06); torch's CUDA libraries fail to initialise on an older one.
MIN_DRIVER_FOR_CUDA = {12: 525, 13: 580}


def venv_command() -> str:
    made = [c for c in SETUP if re.search(r"\bvenv\b.*~/venv\s*$", c)]
    assert len(made) == 1, made
    return made[0]


def test_every_node_gets_a_python_that_meets_requires_python():
    command = venv_command()
    version = re.search(r"--python (\d+)\.(\d+)", command)
    assert version, command
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(f"{version[1]}.{version[2]}.0"), (requires, command)
    # an existing venv is kept only when its Python is at least that version (a 3.10 one is made again)
    kept_from = re.search(r"sys\.version_info < \((\d+), (\d+)\)", command)
    assert kept_from and kept_from.groups() == version.groups() and "--clear" in command
    # Ubuntu 22.04's own python3 (3.10) makes no venv; everything after uses the venv's tools
    assert not any(re.search(r"python3(\.10)? -m venv", c) for c in SETUP)
    after = SETUP[SETUP.index(command) + 1:]
    assert all(c.startswith("~/venv/bin/") for c in after if re.match(r"(pip|python|ray)\b", c.split()[0]))
    for start in CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]:
        assert start.startswith("~/venv/bin/ray ")


def test_nodes_install_the_dockerfiles_torch_pair_the_gpu_extra_and_the_spacy_model():
    pins = dockerfile_args()
    torch_install = next(c for c in SETUP if '"torch==' in c)
    assert f'"torch=={pins["TORCH_VERSION"]}"' in torch_install
    assert f'"torchvision=={pins["TORCHVISION_VERSION"]}"' in torch_install
    project = next(c for c in SETUP if "regionclip-pipeline[" in c)
    assert SETUP.index(torch_install) < SETUP.index(project)    # the pinned pair first, then the project
    assert re.search(r"regionclip-pipeline\[gpu\]", project)
    model = ConceptsConfig().spacy_model        # what concepts.parser auto looks for
    assert any(c == f"~/venv/bin/python -m spacy download {model}" for c in SETUP)


def run_driver_check(tmp_path: Path, driver: str | None) -> subprocess.CompletedProcess:
    """The GPU workers' driver check, with a stand-in nvidia-smi that reports `driver` (None: none)."""
    (check,) = CLUSTER["worker_setup_commands"]
    bin_dir = tmp_path / f"bin-{driver}"
    bin_dir.mkdir()
    if driver is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho {driver}\n")
        smi.chmod(0o755)
    return subprocess.run(["bash", "-c", check], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)


def test_gpu_workers_refuse_a_driver_older_than_torchs_cuda_build_needs(tmp_path):
    (check,) = CLUSTER["worker_setup_commands"]
    floor = int(re.search(r"-ge (\d+)", check)[1])
    cuda = torch.version.cuda
    if cuda is None:
        pytest.skip("this torch is a CPU-only build: no CUDA version to hold the floor against")
    assert floor >= MIN_DRIVER_FOR_CUDA[int(cuda.split(".")[0])], (floor, cuda)
    assert run_driver_check(tmp_path, f"{floor}.65.06").returncode == 0
    assert run_driver_check(tmp_path, f"{floor + 10}.1").returncode == 0
    older = run_driver_check(tmp_path, f"{floor - 5}.57.08")
    assert older.returncode == 1 and f"NVIDIA driver {floor - 5}.57.08" in older.stdout
    assert f"R{floor} or newer" in older.stdout
    missing = run_driver_check(tmp_path, None)
    assert missing.returncode == 1 and "NVIDIA driver not found" in missing.stdout


def test_rays_object_store_gets_shared_memory():
    """VM nodes have /dev/shm at the kernel's default (half the memory); a container needs it asked for."""
    docker = CLUSTER.get("docker")
    if docker is not None:
        options = " ".join(docker.get("run_options", []))
        assert "--shm-size" in options or "--ipc=host" in options, options
    else:
        assert all(kind.get("docker") is None for kind in CLUSTER["available_node_types"].values())
