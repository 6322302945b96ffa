"""Shared fixtures: one local Ray for the whole test session (starting Ray costs seconds)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """A test that needs Ray (directly or through a fixture) runs whole stages: it is in the slow tier."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # address="local": never join a cluster that a `ray start` on this machine left in /tmp/ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def write_manifest(tmp_path):
    """Write a YAML run manifest into tmp_path and load it: write_manifest('''corpus: ...''')."""
    from pipeline.config import load_manifest

    def make(body: str = "", name: str = "t") -> "object":
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\noutput_dir: out\nray: {{num_cpus: 2}}\n" + textwrap.dedent(body))
        return load_manifest(path)

    return make
