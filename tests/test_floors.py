"""The dependency floors of pyproject.toml hold in the environment that runs the code, and the security
floors stay where the advisories put them.

pip enforces the floors when it installs the project, but not for what an environment already had: a
Docker base image's torch, `pip install --no-deps`, a conda environment. This check runs in CI with
the rest of the suite (`.ci/run` -> `make test`).
"""
from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# The floors that stand for published advisories (pyproject.toml names them, docs/hardening.md lists them).
SECURITY_FLOORS = {"torch": "2.6", "pyarrow": "14.0.1", "pillow": "13.0", "ray": "2.52"}


def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]


def unmet(requirements: list[Requirement], optional: bool) -> list[str]:
    """'name installed X, needs SPEC' for each requirement the environment does not meet; an optional
    one (an extra) counts only when installed."""
    problems = []
    for req in requirements:
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            if not optional:
                problems.append(f"{req.name}: not installed, needs {req.specifier or 'any version'}")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name}: installed {installed}, needs {req.specifier}")
    return problems


def test_the_installed_versions_meet_every_floor():
    meta = project()
    assert Version("%d.%d.%d" % sys.version_info[:3]) in SpecifierSet(meta["requires-python"])
    problems = unmet([Requirement(r) for r in meta["dependencies"]], optional=False)
    extras = [Requirement(r) for reqs in meta["optional-dependencies"].values() for r in reqs]
    problems += unmet(extras, optional=True)
    assert not problems, "the environment is below pyproject.toml's floors:\n  " + "\n  ".join(problems)


def test_the_security_floors_are_kept():
    declared = {Requirement(r).name.lower(): Requirement(r).specifier for r in project()["dependencies"]}
    for name, floor in SECURITY_FLOORS.items():
        lowest = [Version(s.version) for s in declared[name] if s.operator in (">=", "==", "~=")]
        assert lowest and min(lowest) >= Version(floor), f"{name}: {declared[name]} admits releases below {floor}"


def test_a_version_below_a_floor_is_reported():
    # The check itself: a requirement no installed version meets is named, with what is installed.
    problems = unmet([Requirement("torch>=999"), Requirement("no-such-package-xyz>=1")], optional=False)
    assert problems[0].startswith("torch: installed ") and problems[0].endswith("needs >=999")
    assert problems[1] == "no-such-package-xyz: not installed, needs >=1"
    assert unmet([Requirement("no-such-package-xyz>=1")], optional=True) == []
