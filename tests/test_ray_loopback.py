"""The embedded local Ray listens on loopback only (round three): every TCP socket its processes listen
on (GCS, raylet, object manager, workers, agents) is bound to 127.0.0.1, none to every interface nor to
the machine's network address; a cluster is joined only through ray.address (or RAY_ADDRESS)."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A stage process's Ray, started as every stage starts it (init_ray), with a few tasks run (workers
# listen too); prints the listening sockets of the whole process tree.
CHILD = """
import json, os, sys, time
import ray
from pipeline.config import RayConfig
from pipeline.ray_runtime import init_ray
from tests.test_ray_loopback import listening_sockets
init_ray(RayConfig(num_cpus=2))
@ray.remote
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(4)])
time.sleep(2)
print(json.dumps({"sockets": listening_sockets(os.getpid()), "node": ray.util.get_node_ip_address(),
                  "gcs": ray.get_runtime_context().gcs_address}))
"""


def listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    """(command, address, port) of every listening TCP socket of `pid` and its descendants (Linux /proc)."""
    pids, todo = set(), [pid]
    while todo:
        current = todo.pop()
        pids.add(current)
        for task in _listdir(f"/proc/{current}/task"):
            try:
                todo += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    owners = {}
    for p in pids:
        for fd in _listdir(f"/proc/{p}/fd"):
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[target[8:-1]] = p
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owners:          # 0A: LISTEN
                continue
            raw_ip, raw_port = fields[1].split(":")
            raw = bytes.fromhex(raw_ip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # little-endian words
            try:
                command = Path(f"/proc/{owners[fields[9]]}/comm").read_text().strip()
            except OSError:
                command = "?"
            found.add((command, socket.inet_ntop(family, raw), int(raw_port, 16)))
    return sorted(found)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux's /proc")
def test_the_embedded_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    child = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    sockets = [tuple(s) for s in report["sockets"]]
    commands = {command for command, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= commands, sockets           # the servers were seen listening
    assert [s for s in sockets if not is_loopback(s[1])] == [], sockets
    assert report["node"] == "127.0.0.1" and report["gcs"].startswith("127.0.0.1:")


def test_a_cluster_is_joined_only_through_its_address(monkeypatch):
    """init_ray's two ways, with ray.init recorded: an address (the manifest's or RAY_ADDRESS) joins that
    cluster as it is; without one (or with "local") a local Ray starts on loopback."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.ray_runtime import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")          # restored after the test
    from ray._private import ray_constants
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    init_ray(RayConfig(address="10.1.2.3:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    init_ray(RayConfig())
    assert [c["address"] for c in calls] == ["10.1.2.3:6379", "auto"] and "_node_ip_address" not in calls[0]
    assert ray_constants.ENABLE_RAY_CLUSTER is True                       # joining changes nothing
    monkeypatch.setenv("RAY_ADDRESS", "local")
    init_ray(RayConfig(num_cpus=2))
    assert calls[-1]["address"] == "local" and calls[-1]["_node_ip_address"] == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER is False and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
