"""The stage runner and the registry: what reruns after a settings change, a killed rerun makes every
stage downstream refuse to run (naming the stage to rerun), one run at a time per run folder, and the
one stage list behind `regionclip --help`, `run` and `status`."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest

from pipeline.config import RunManifest, Section, fingerprinted_settings, is_runtime_only
from pipeline.layout import RunLayout
from pipeline.stage import StageInputError, read_stage_manifest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}

WORLD = """
corpus: {format: synthetic}
synth: {num_images: 8, num_val_images: 0, min_side: 64, max_side: 96}
shard: {samples_per_shard: 4}
concepts: {parser: lookups, min_count: 1}
"""

def with_sections(body: str, *lines: str) -> str:
    """`body` with each `section: {...}` line of `lines` in place of the line of that section (a manifest
    writes each section once)."""
    for line in lines:
        section = line.split(":")[0]
        kept = [old for old in body.splitlines(keepends=True) if not old.startswith(f"{section}:")]
        body = "".join(kept) + line
    return body


# Every setting marked runtime-only on the schema (pipeline/config.py): a new mark must be argued for.
RUNTIME_ONLY = {
    "ray.address", "ray.num_cpus", "ray.include_dashboard", "ray.dashboard_host",
    "ray.gpu_wait_s",          # how long a GPU stage waits for a GPU node: where it runs, not what it writes
    "concepts.batch_size", "embed.batch_size", "embed.device", "train_teacher.device", "train_rpn.device",
    "proposals.num_gpus_per_actor", "proposals.num_actors", "proposals.cpus_per_actor", "label.cpus_per_actor",
    "label.num_gpus_per_actor", "label.num_actors", "label.region_index",
    "pretrain.checkpoint_every", "pretrain.device", "pretrain.resume", "pretrain.log_every",
    "transfer.device", "evaluate.device", "teacher.trust_torchscript",
    "train_teacher.checkpoint_every", "train_rpn.checkpoint_every", "transfer.checkpoint_every", "transfer.num_workers",
    # only whether an annotation file naming images outside its images root is refused or read: a run
    # that finished read the same images either way
    "train_rpn.allow_outside_root", "transfer.allow_outside_root",
    # only whether a file that would lose (or clip) annotations is refused: a run that finished read the
    # same annotations either way
    "train_rpn.strict_annotations", "transfer.strict_annotations",
}


def sections(manifest: RunManifest) -> dict[str, Section]:
    return {name: getattr(manifest, name) for name in type(manifest).model_fields
            if isinstance(getattr(manifest, name), Section)}


def another_value(annotation, value):
    """A value of the field's type that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(value, list):
        return value + value[:1] if value else [{int: 7, str: "other"}[args[0]]]
    if isinstance(value, dict):
        return {**value, "other": "other"}
    if typing.get_origin(annotation) is typing.Literal:
        return next(a for a in args if a != value)
    if isinstance(value, str):
        return value + "-other"
    assert value is None, (annotation, value)
    kind = args[0]
    return {int: 7, float: 0.5, str: "other"}.get(kind) or [7]


# -- (a) what a settings change reruns ---------------------------------------------------------------

def test_runtime_only_marks_are_left_out_of_every_fingerprint_and_every_other_field_is_in(write_manifest):
    from stages.registry import PIPELINE

    manifest = write_manifest("")
    marked = set()
    for name, section in sections(manifest).items():
        fields = type(section).model_fields
        for field_name, info in fields.items():
            changed = section.model_copy(update={field_name: another_value(info.annotation,
                                                                           getattr(section, field_name))})
            same = fingerprinted_settings(changed) == fingerprinted_settings(section)
            assert same == is_runtime_only(info), f"{name}.{field_name}"
            if is_runtime_only(info):
                marked.add(f"{name}.{field_name}")
                assert field_name not in fingerprinted_settings(section)
    assert marked == RUNTIME_ONLY
    for stage in PIPELINE:                      # every section a stage names is one of the manifest's
        assert set(stage.sections) <= set(sections(manifest)), stage.name


@pytest.mark.slow
def test_a_runtime_only_change_reruns_nothing_and_any_other_reruns_the_stage_and_those_after(
        ray_local, write_manifest):
    from stages import concepts, shard, synth

    chain = [synth.STAGE, shard.STAGE, concepts.STAGE]
    first = write_manifest(WORLD)
    layout = RunLayout.of(first)
    # synth as a script (`python -m stages.cli synth MANIFEST`), the others in this process
    subprocess.run([sys.executable, "-m", "stages.cli", "synth", first.source_path], env=ENV, cwd=REPO, check=True,
                   capture_output=True)
    for stage in chain[1:]:
        stage.run(first)

    def books() -> dict[str, tuple[str, int]]:
        """(fingerprint, mtime) of each stage manifest."""
        return {s.name: (read_stage_manifest(layout.stage(s.name))["fingerprint"],
                         layout.stage(s.name).manifest.stat().st_mtime_ns) for s in chain}

    def data_files() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file()
                and not p.name.endswith("manifest.json")}

    before, files = books(), data_files()
    runtime = write_manifest(with_sections(WORLD, "concepts: {parser: lookups, min_count: 1, batch_size: 3}\n"))
    runtime.ray.num_cpus = 1
    for stage in chain:
        assert stage.run(runtime)["work"] == stage.nothing_done, stage.name
    assert books() == before and data_files() == files

    changes = [("synth", "synth: {num_images: 8, num_val_images: 0, min_side: 64, max_side: 96, seed: 3}\n"),
               ("shard", "shard: {samples_per_shard: 4, jpeg_quality: 80}\n"),
               ("concepts", "concepts: {parser: lookups, min_count: 2}\n")]
    body = WORLD
    for changed, setting in changes:
        body = with_sections(body, setting)
        manifest = write_manifest(body)
        before = books()
        for stage in chain:
            stage.run(manifest)
        after = books()
        reran = [s.name for s in chain if after[s.name][0] != before[s.name][0]]
        rewritten = [s.name for s in chain if after[s.name][1] != before[s.name][1]]
        expected = [s.name for s in chain][[s.name for s in chain].index(changed):]
        assert reran == rewritten == expected, (changed, reran, rewritten)


# -- (b) a killed rerun: every stage downstream refuses, naming the stage to rerun -------------------

def fake_done(layout: RunLayout, name: str, upstream: dict[str, str]) -> str:
    """A stage manifest as the runner writes it when the stage is done (the work itself is not run)."""
    from pipeline.io import write_json

    fingerprint = f"{name}-done"
    write_json(layout.stage(name).manifest, {"stage": name, "status": "done", "fingerprint": fingerprint,
                                             "upstream": upstream})
    return fingerprint


def downstream_world(layout: RunLayout, synth_fp: str, shard_fp: str) -> dict[str, str]:
    """Done manifests for every stage after shard (as their own runs record them), reading the given synth
    and shard runs."""
    fp = {"synth": synth_fp, "shard": shard_fp}
    fp["concepts"] = fake_done(layout, "concepts", {"shard": fp["shard"]})
    fp["embed"] = fake_done(layout, "embed", {"concepts": fp["concepts"], "shard": fp["shard"]})
    fp["proposals"] = fake_done(layout, "proposals", {"shard": fp["shard"]})
    fp["label"] = fake_done(layout, "label", {"proposals": fp["proposals"], "embed": fp["embed"]})
    fp["pretrain"] = fake_done(layout, "pretrain", {k: fp[k] for k in ("shard", "embed", "proposals", "label")})
    fp["transfer"] = fake_done(layout, "transfer", {"synth": fp["synth"], "pretrain": fp["pretrain"]})
    return fp


def refusal(stage, manifest) -> str:
    with pytest.raises(StageInputError) as err:
        stage.run(manifest)
    return str(err.value)


@pytest.mark.slow
def test_a_shard_rerun_killed_midway_leaves_every_stage_after_it_refusing(ray_local, write_manifest):
    from pipeline.runner import require_current
    from stages import shard, synth
    from stages.registry import PIPELINE

    manifest = write_manifest(WORLD)
    layout = RunLayout.of(manifest)
    synth_fp = synth.run(manifest)["fingerprint"]
    shard_fp = shard.run(manifest)["fingerprint"]
    downstream_world(layout, synth_fp, shard_fp)
    later = [s for s in PIPELINE if s.name not in ("synth", "shard") and s.is_enabled(manifest)]
    for stage in later:                           # consistent: the runner's checks let every stage start
        require_current(layout, stage.upstream(manifest))

    # The rerun with other settings, SIGKILLed once it is under way (its own process joins this Ray).
    changed = write_manifest(with_sections(WORLD, "shard: {samples_per_shard: 4, jpeg_quality: 70}\n"))
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "shard", changed.source_path], cwd=REPO,
                            env={**ENV, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while (read_stage_manifest(layout.shards) or {}).get("fingerprint") == shard_fp:
            assert proc.poll() is None and time.time() < deadline, "the shard rerun never started"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_stage_manifest(layout.shards)["status"] == "running"

    expected = "stage 'shard' is running or was interrupted; run `regionclip shard MANIFEST`"
    for stage in later:
        assert expected in refusal(stage, changed), stage.name
    assert {s.name for s in later} >= {"concepts", "embed", "proposals", "label", "pretrain", "transfer", "evaluate"}

    # The rerun finished: shard's readers (proposals here) would rerun; their readers refuse stale inputs.
    shard.run(changed)
    message = refusal(next(s for s in PIPELINE if s.name == "label"), changed)
    assert "stage 'proposals' is out of date" in message and "run `regionclip proposals MANIFEST`" in message


@pytest.mark.slow
def test_a_label_rerun_killed_midway_leaves_pretrain_and_after_refusing(ray_local, write_manifest):
    from pipeline.runner import require_current
    from stages import label, shard, synth
    from stages.registry import STAGES

    manifest = write_manifest(WORLD)
    layout = RunLayout.of(manifest)
    synth_fp = synth.run(manifest)["fingerprint"]
    shard_fp = shard.run(manifest)["fingerprint"]
    fp = downstream_world(layout, synth_fp, shard_fp)
    after_label = [STAGES[name] for name in ("pretrain", "transfer", "evaluate")]
    require_current(layout, STAGES["evaluate"].upstream(manifest))

    # label with other settings, through the real runner: marked running, then killed inside its work.
    class Killed(Exception):
        pass

    def killed(run):
        assert read_stage_manifest(run.stage_dir)["status"] == "running"
        raise Killed

    rerun = dataclasses.replace(label.STAGE, identify=lambda run: {"teacher": "other"}, work=killed)
    with pytest.raises(Killed):
        rerun.run(write_manifest(WORLD + "label: {temperature: 0.05}\n"))
    running = read_stage_manifest(layout.labels)
    assert running["status"] == "running" and running["fingerprint"] != fp["label"]
    assert running["last_complete"]["fingerprint"] == fp["label"]    # kept for finer reuse

    expected = "stage 'label' is running or was interrupted; run `regionclip label MANIFEST`"
    for stage in after_label:
        assert expected in refusal(stage, manifest), stage.name


def test_status_names_each_stage_from_the_registry_and_what_is_out_of_date(write_manifest, capsys):
    from pipeline.io import write_json
    from stages.status import print_status
    from stages.registry import PIPELINE

    manifest = write_manifest(WORLD)
    layout = RunLayout.of(manifest)
    synth_fp = fake_done(layout, "synth", {})
    downstream_world(layout, synth_fp, fake_done(layout, "shard", {"synth": synth_fp}))
    write_json(layout.shards.manifest, {"stage": "shard", "status": "done", "fingerprint": "shard-rerun",
                                        "upstream": {"synth": synth_fp}})      # shard rerun since
    print_status(manifest)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:len(PIPELINE) + 1]}
    assert list(rows) == [s.name for s in PIPELINE]
    assert "done" in rows["shard"] and "out of date" in rows["concepts"] and "disabled" in rows["train-rpn"]
    assert "not run" in rows["evaluate"]
    assert any("run `regionclip concepts MANIFEST`" in line for line in lines)


# -- (c) one run at a time per run folder -------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.config import load_manifest
    from pipeline.layout import RunLayout
    from pipeline.runner import run_lock

    with run_lock(RunLayout.of(load_manifest(sys.argv[1])), "regionclip run " + sys.argv[1]):
        print("holding", flush=True)
        time.sleep(120)
""")


def test_a_second_run_on_one_output_dir_is_refused_naming_the_first(write_manifest, capfd):
    from pipeline.runner import LOCK_HELD_ENV, run_in_progress
    from stages.cli import main

    manifest = write_manifest(WORLD)
    layout = RunLayout.of(manifest)
    first = subprocess.Popen([sys.executable, "-c", HOLDER, manifest.source_path], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        capfd.readouterr()
        assert main(["synth", manifest.source_path]) == 1
        err = capfd.readouterr().err
        assert f"pid {first.pid}" in err and f"`regionclip run {manifest.source_path}`" in err
        assert "started 20" in err and "in use by another run" in err
        assert not layout.stage("synth").manifest.exists()          # refused before any work
        assert f"pid {first.pid}" in run_in_progress(layout)        # what `regionclip status` shows

        # A stage process that `regionclip run` starts works under the run's lock (no refusal, no wait).
        child = subprocess.run([sys.executable, "-m", "stages.cli", "synth", manifest.source_path], cwd=REPO,
                               env={**ENV, LOCK_HELD_ENV: str(layout.run_lock.resolve())}, capture_output=True,
                               text=True, timeout=120)
        assert child.returncode == 0, child.stderr[-2000:]
        assert read_stage_manifest(layout.stage("synth"))["status"] == "done"
    finally:
        first.kill()
        first.wait()
    # The first run is gone (killed: the kernel dropped its lock): the folder is free again, though the
    # killed run could not remove its run.lock.json.
    assert layout.run_lock_holder.exists() and run_in_progress(layout) is None
    assert main(["synth", manifest.source_path]) == 0


# -- (d) the registry ---------------------------------------------------------------------------------

def test_help_lists_every_stage_of_the_registry_without_importing_torch():
    from stages.registry import PIPELINE, TOOLS

    probe = ("import sys, contextlib, io\n"
             "from stages.cli import main\n"
             "out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
             "    main(['--help'])\n"
             "print(out.getvalue())\n"
             "print('heavy:', sorted(m for m in ('torch', 'ray', 'spacy', 'open_clip') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ") and line.split()]
    names = [s.name for s in PIPELINE]
    assert [n for n in listed if n in names] == names                     # every stage, in pipeline order
    assert {"run", "status", *(t.COMMAND for t in TOOLS)} <= set(listed)


def test_one_entry_point_runs_every_command_and_no_stage_module_runs_as_a_script(write_manifest, capsys):
    from pipeline.config import load_manifest
    from stages.cli import build_parser, main
    from stages.registry import PIPELINE, TOOLS

    manifest = write_manifest(WORLD)
    # every stage and command of the registry is a command of `python -m stages.cli` (`regionclip`)
    for name in [*(s.name for s in PIPELINE), *(t.COMMAND for t in TOOLS)]:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: regionclip {name} [-h]")
    # pretrain's --resume (`torchrun -m stages.cli pretrain MANIFEST --resume never`) is its setting,
    # in its place among the --set options
    args = build_parser().parse_args(["pretrain", manifest.source_path, "--set", "pretrain.resume=auto",
                                      "--resume", "never"])
    assert load_manifest(args.manifest, args.overrides).pretrain.resume == "never"
    args = build_parser().parse_args(["pretrain", manifest.source_path, "--resume", "never", "--set",
                                      "pretrain.resume=auto"])
    assert load_manifest(args.manifest, args.overrides).pretrain.resume == "auto"
    # a stage module run as a script runs nothing: its one way in is the entry point, which loads it once
    child = subprocess.run([sys.executable, "-m", "stages.synth", manifest.source_path], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout == "", child.stderr[-2000:]
    assert not RunLayout.of(manifest).stage("synth").manifest.exists()
