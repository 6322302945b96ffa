"""SIGKILL any stage at seeded moments, rerun it, and compare with an uninterrupted run.

The shard stage's harness (tests/test_shard_faults.py) generalised to every stage:

    report = kill_and_resume("concepts", manifest_path, kills=5, seed=0)
    assert report["matched"], report["differences"]

1. The stage runs uninterrupted (`python -m stages.cli <stage> MANIFEST`, its own process and local Ray);
   the files it created or changed are its outputs (the reference). Their rows (Parquet) and bytes
   (other files) are kept, then exactly those files are removed, so the stage starts from scratch.
2. `kills` times: the stage starts again and is killed with SIGKILL (its whole process group: the
   driver, Ray's workers and daemons) at a seeded moment: once a seeded number of further output files
   exist, plus a seeded fraction of a second, or at a seeded fraction of the reference's wall time,
   whichever comes first. After each kill every shard marker must vouch only for complete files.
3. A last run without a kill must finish, and its outputs must equal the reference: the same files,
   the same Parquet rows, the same tensors and plain data in checkpoints (timing entries such as
   `images_per_s` aside), the same bytes otherwise. Markers, manifests and pictures hold or draw
   timings and are compared by presence only; tensorboard event files are left out.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pipeline.io import TMP_PREFIX, sha256_file

REPO = Path(__file__).resolve().parents[1]


_RAY_ADDRESS: Optional[str] = None


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    # "local": a Ray of its own even when a `ray start` cluster on this machine left its address in
    # /tmp/ray (ray.init() without an address would join that one).
    env["RAY_ADDRESS"] = _RAY_ADDRESS or "local"
    return env


def wait_until_ray_is_idle(timeout: float = 60.0) -> None:
    """After a driver of the shared Ray is killed: wait until Ray has killed the tasks and actors of the
    dead job (their CPUs are free again), so that none of them writes after the moment counted as the kill."""
    import ray

    if not ray.is_initialized():
        return
    deadline = time.time() + timeout
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total:
        if time.time() > deadline:
            raise TimeoutError(f"Ray still busy {timeout:.0f}s after the kill: {ray.available_resources()}")
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Ray's raylet, GCS and workers start their own process groups)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a child started with start_new_session=True: its process group and every process below
    it (a machine that dies)."""
    below = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def stage_command(stage: str, manifest_path: Path) -> list[str]:
    return [sys.executable, "-m", "stages.cli", stage, str(manifest_path)]


def _run_root(manifest_path: Path) -> Path:
    from pipeline.config import load_manifest
    from pipeline.layout import RunLayout

    return RunLayout.of(load_manifest(manifest_path)).root


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under the run (temporaries left out)."""
    out = {}
    if not root.is_dir():
        return out
    for p in root.rglob("*"):
        if p.is_file() and not p.name.startswith(TMP_PREFIX) and ".tmp" not in p.name:
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _is_bookkeeping(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith("_stats.json") or name.endswith("manifest.json")


def _ignored(rel: str) -> bool:
    """Left out of the comparison: tensorboard event files (wall-clock times in the data and the name) and
    the run lock (a killed run leaves run.lock.json naming it)."""
    return (rel.startswith("tensorboard/") or "/tensorboard/" in rel or ".tfevents." in rel
            or rel in ("run.lock", "run.lock.json"))


def _presence_only(rel: str) -> bool:
    """Compared by presence: markers and manifests (timings), pictures (training curves may draw them)."""
    return _is_bookkeeping(rel) or rel.endswith(".png")


def _content(path: Path):
    """Parquet: its rows; a checkpoint or JSON: its tensors and plain data (timings aside); else sha256."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":  # metrics and summaries: their timings aside
        try:
            return _canonical(json.loads(path.read_text()))
        except (ValueError, UnicodeDecodeError):
            return sha256_file(path)
    if path.suffix == ".pt":
        import torch

        try:
            return _canonical(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 - TorchScript or not a checkpoint: compare bytes
            pass
    return sha256_file(path)


def _is_timing(key: str) -> bool:
    return key.endswith(("_s", "_per_s", "seconds")) or key in ("finished_at", "started_at")


def _canonical(obj):
    import hashlib

    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), hashlib.sha256(t.view(-1).view(torch.uint8).numpy()
                                                                         .tobytes() if t.numel() else b"").hexdigest())
    if isinstance(obj, dict):  # timings (units in the name: *_s, *_per_s, seconds) differ run to run
        return {str(k): _canonical(v) for k, v in obj.items() if not _is_timing(str(k))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def _run(cmd: list[str], timeout: float, log: Optional[Path] = None) -> float:
    started = time.time()
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.run(cmd, env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              start_new_session=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{tail}")
    return time.time() - started


def markers_truthful(root: Path) -> list[str]:
    """Files that a shard marker vouches for but that are missing or differ (must be empty)."""
    bad = []
    for marker in root.rglob("*_stats.json"):
        try:
            stats = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append(f"{marker}: unreadable")
            continue
        for name, record in (stats.get("files") or {}).items():
            path = marker.parent / name
            if not path.exists() or sha256_file(path) != record["sha256"]:
                bad.append(str(path.relative_to(root)))
    return bad


def kill_and_resume(stage: str, manifest_path: str | os.PathLike, kills: int = 5, seed: int = 0,
                    timeout: float = 600, log: Optional[Path] = None, ray_address: Optional[str] = None,
                    inline_reference: bool = False) -> dict:
    """Run `stage` uninterrupted, then from scratch with `kills` SIGKILLs, then to the end; compare.

    The upstream stages must be complete. `ray_address`: each run joins that Ray cluster (a killed
    driver's tasks and actors die with it) instead of starting its own local Ray. `inline_reference`: the uninterrupted run and the last
    resume happen in this process (kills are then timed by output progress only). Returns a report: kills, how many interrupted work (the
    process was still running), outputs compared, matched, differences, untruthful markers, seconds.
    """
    global _RAY_ADDRESS
    _RAY_ADDRESS = ray_address
    manifest_path = Path(manifest_path)
    root = _run_root(manifest_path)
    cmd = stage_command(stage, manifest_path)
    rng = random.Random(f"{stage}-{seed}")

    def run_inline() -> float:
        from pipeline.config import load_manifest
        from stages.registry import STAGES

        started = time.time()
        STAGES[stage].run(load_manifest(manifest_path))
        return time.time() - started

    before = _files(root)
    if inline_reference:  # in this process (its Ray already up): saves a process start in CI
        ref_seconds, inline_seconds = None, run_inline()
    else:
        ref_seconds = _run(cmd, timeout, log)
    after = _files(root)
    outputs = sorted(k for k in after if before.get(k) != after[k])
    if not outputs:
        raise RuntimeError(f"{stage}: the uninterrupted run wrote nothing (already complete?)")
    compared = [k for k in outputs if not _presence_only(k) and not _ignored(k)]
    reference = {k: _content(root / k) for k in compared}
    for k in outputs:
        if k in before:
            raise RuntimeError(f"{stage}: rewrote a file that existed before it ran: {k}; "
                               "run the harness on a stage whose outputs are its own")
    for k in outputs:
        (root / k).unlink()

    watched = set(outputs)
    moments, interrupted, untruthful = [], 0, []
    started_all = time.time()
    for i in range(kills):
        present = len(watched & set(_files(root)))
        target = min(len(watched) - 1, present + rng.randint(0, max(1, (len(watched) - present) // 2)))
        extra = rng.uniform(0.0, 0.5)
        deadline = rng.uniform(0.25, 1.0) * ref_seconds if ref_seconds else timeout
        with open(log or os.devnull, "ab") as out:
            proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        t0 = time.time()
        reached = None
        while proc.poll() is None and time.time() - t0 < deadline:
            if reached is None and len(watched & set(_files(root))) >= target:
                reached = time.time()
            if reached is not None and time.time() - reached >= extra:
                break
            time.sleep(0.02)
        running = proc.poll() is None
        if running:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                running = False
        proc.wait()
        if _RAY_ADDRESS:
            wait_until_ray_is_idle()
        interrupted += running
        moments.append({"after_s": round(time.time() - t0, 2), "outputs_present": len(watched & set(_files(root))),
                        "interrupted": running})
        untruthful += markers_truthful(root)
    kill_seconds = time.time() - started_all
    resume_seconds = run_inline() if inline_reference else _run(cmd, timeout, log)
    final = _files(root)
    leftovers = [str(p.relative_to(root)) for p in root.rglob(f"{TMP_PREFIX}*")]
    differences = sorted(k for k in set(outputs) ^ {k for k in final if k in watched or k not in before}
                         if not _ignored(k))
    for k in compared:
        if k in final and _content(root / k) != reference[k]:
            differences.append(k)
    untruthful += markers_truthful(root)
    return {"stage": stage, "kills": kills, "interrupted": interrupted, "moments": moments,
            "outputs": len(outputs), "compared": len(compared), "matched": not differences and not untruthful,
            "differences": differences, "untruthful_markers": sorted(set(untruthful)),
            "leftover_temporaries": leftovers, "reference_s": round(ref_seconds or inline_seconds, 1),
            "kills_s": round(kill_seconds, 1), "resume_s": round(resume_seconds, 1)}


def world_manifest(folder: Path, images: int = 16, per_shard: int = 4, val_images: int = 4) -> Path:
    """A tiny synthetic world with every stage enabled (tiny models, CPU): bench/faults.py, bench/scaling.py."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "world.yaml"
    path.write_text(f"""name: faults
output_dir: out
seed: 0
corpus: {{format: synthetic}}
synth: {{seed: 0, num_images: {images}, num_val_images: {val_images}, min_side: 96, max_side: 160, max_objects: 3}}
ray: {{num_cpus: 2}}
shard: {{samples_per_shard: {per_shard}}}
concepts: {{parser: lookups, min_count: 1}}
teacher: {{arch: RN50-tiny}}
embed: {{device: cpu}}
train_teacher: {{enabled: true, epochs: 1, batch_size: 8, warmup_steps: 0, device: cpu}}
train_rpn: {{enabled: true, backbone: clip_res4, epochs: 1, batch_size: 4, warmup_steps: 0, min_size: 128,
            max_size: 192, anchor_sizes: [16, 32, 64], device: cpu}}
proposals: {{min_size: 128, max_size: 192, post_nms_top_n: 12, pre_nms_top_n: 200, batch_size: 2, num_actors: 2}}
label: {{codec: pq, pq_subquantizers: 16, pq_bits: 6, pq_train_regions: 256, batch_size: 2, num_actors: 2}}
pretrain: {{steps: 6, batch_size: 4, regions_per_image: 8, min_size: 96, max_size: 160, checkpoint_every: 2,
           warmup_steps: 1, device: cpu, precision: fp32}}
transfer: {{init: [teacher, pretrain], steps: 4, batch_size: 2, min_sizes: [96], max_size: 160,
           rois_per_image: 32, proposals_per_image: 48, warmup_steps: 1, device: cpu}}
evaluate: {{min_size: 96, max_size: 160, proposals_per_image: 48, device: cpu}}
""")
    return path


def all_stages() -> list[str]:
    """Every stage after synth, in order, optional ones included (train-teacher / train-rpn make the
    weights that the synthetic world has no download for)."""
    from stages.stage_list import stage_names

    return [name for name in stage_names() if name != "synth"]
