"""The streaming pretraining trainer: data joins, determinism, exact resume, SIGTERM, DDP, export."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import PretrainConfig
from pipeline.layout import RunLayout, sample_key
from tests.pretrain_world import make_world
from trainer.models.clip import create_clip, load_clip
from pipeline.sidecars import shard_samples
from trainer.data.pretrain_stream import (DataError, DataOptions, PretrainStream, collate, open_sidecars, prepare_sample,
                                         sample_rng, shard_sources)
from trainer.tasks.pretrain import PretrainPaths, PretrainTrainer

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=4, regions_per_image=8, min_size=64, max_size=96, warmup_steps=2, lr=0.01,
             log_every=1, checkpoint_every=100, device="cpu", resume="auto", seed=3)


@pytest.fixture(autouse=True)
def one_thread():
    # Deterministic and quick on a shared 2-core machine; the subprocesses use one thread too.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return make_world(root, corrupt=(sample_key(0, 3),), drop_rows=(sample_key(1, 5),))


def _opts(**kw):
    return DataOptions(**{**dict(batch_size=4, seed=3, min_size=64, max_size=96, regions_per_image=8), **kw})


def _trainer(world, out: Path, fingerprint: str = "", **cfg):
    torch.manual_seed(0)
    model, _ = create_clip("RN50-tiny")
    c = PretrainConfig(**{**SMALL, **cfg})
    paths = PretrainPaths(out / "last.pt", out / "student.pt", out / "tb", out / "last.png")
    return PretrainTrainer(c, model, world["concepts"], paths, progress=False, fingerprint=fingerprint,
                           sources=shard_sources(world["layout"], world["shard_ids"]), codec=world["codec"])


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.encoder.state_dict().items()}


# -- data -------------------------------------------------------------------------------------------------

def test_stream_is_deterministic_and_counts_bad_samples(world):
    sources = shard_sources(world["layout"], world["shard_ids"])
    keys = []
    it = iter(PretrainStream(sources, _opts()))
    batches = [next(it) for _ in range(4)]  # 14 usable samples per epoch: the 4th batch enters epoch 1
    keys = [k for b in batches for k in b["keys"]]
    again = iter(PretrainStream(sources, _opts()))
    assert [k for _ in range(4) for k in next(again)["keys"]] == keys
    assert sample_key(0, 3) not in keys[:14] and sample_key(1, 5) not in keys[:14]
    assert len(set(keys[:14])) == 14  # an epoch visits every usable sample once
    assert batches[3]["_skipped"] == {"corrupt_image": 1, "missing_labels": 1}
    b = batches[0]
    assert b["images"].dtype == torch.uint8 and b["images"].shape[2] % 32 == 0 and b["images"].shape[3] % 32 == 0
    assert b["boxes"].shape == (4, 8, 4) and b["codes"].shape == (4, 8, 128) and b["valid"].all()
    assert min(min(hw) for hw in b["image_sizes"].tolist()) == 64  # short side = min_size
    # another seed, another order
    other = iter(PretrainStream(sources, _opts(seed=4)))
    assert [k for _ in range(3) for k in next(other)["keys"]] != keys[:12]


def test_streamed_batches_equal_those_of_shards_read_whole(world):
    """The reader streams (an index of member offsets, one sample read at a time); its batches are
    those of the former loader that read each tar whole into memory, written out here as the reference."""
    sources = shard_sources(world["layout"], world["shard_ids"])
    opts = _opts(batch_size=3)
    stream = PretrainStream(sources, opts)
    expected, pending = [], []
    for epoch in range(2):
        for place, shard in enumerate(stream.slot_shards(epoch, 0)):
            src = sources[shard]
            samples, side = list(shard_samples(src.tar)), open_sidecars(src)
            for index in np.random.default_rng([opts.seed, epoch, src.shard_id, place]).permutation(len(samples)):
                key, members = samples[index]
                try:
                    pending.append(prepare_sample(key, members, side, opts,
                                                  sample_rng(opts.seed, epoch, src.shard_id, int(index))))
                except Exception:  # SkipSample: the corrupt image, the dropped labels row
                    continue
                if len(pending) == opts.batch_size:
                    expected.append(collate(pending, opts.regions_per_image, opts.online))
                    pending = []
    assert len(expected) == 9  # 2 epochs x 14 usable samples, batches of 3
    it = iter(stream)
    for want in expected:
        got = next(it)
        assert got["keys"] == want["keys"]
        for name in ("images", "image_sizes", "flipped", "captions", "boxes", "valid", "pseudo_labels",
                     "pseudo_probs", "codes"):
            assert torch.equal(got[name], want[name]), name


def test_too_few_shards_is_an_error_unless_resampling(world):
    sources = shard_sources(world["layout"], world["shard_ids"])
    with pytest.raises(DataError, match="resample_shards"):
        PretrainStream(sources, _opts(), rank=0, world_size=2, num_workers=2)
    it = iter(PretrainStream(sources, _opts(resample_shards=True), rank=1, world_size=2, num_workers=2))
    assert len(next(it)["keys"]) == 4


def test_flip_mirrors_boxes_and_uses_stored_flipped_targets(tmp_path):
    w = make_world(tmp_path, num_shards=1, per_shard=4, store_flipped=True)
    src = shard_sources(w["layout"], [0])[0]
    side = open_sidecars(src)
    samples = list(shard_samples(src.tar))
    seen_flip = False
    for index, (key, members) in enumerate(samples):
        a = prepare_sample(key, members, side, _opts(flip=True), sample_rng(3, 0, 0, index))
        b = prepare_sample(key, members, side, _opts(flip=False), sample_rng(3, 0, 0, index))
        if not a["flip"]:
            continue
        seen_flip = True
        width = a["size"][1]
        np.testing.assert_allclose(a["boxes"][:, 0], width - b["boxes"][:, 2], atol=1e-4)
        np.testing.assert_allclose(a["boxes"][:, 2], width - b["boxes"][:, 0], atol=1e-4)
        np.testing.assert_allclose(a["boxes"][:, [1, 3]], b["boxes"][:, [1, 3]])
        assert torch.equal(a["image"], b["image"].flip(-1))
        assert not np.array_equal(a["codes"], b["codes"])  # the stored flipped teacher outputs
        np.testing.assert_array_equal(a["labels"], b["labels"])
    assert seen_flip


def test_an_image_with_several_captions_draws_one_per_seed_and_epoch(tmp_path):
    """One sample per image; its caption (one of 3 caption-embedding rows) is drawn per (seed, epoch):
    the same for the same pair, different across epochs; the boxes do not depend on it."""
    from pipeline.sidecars import read_caption_embeddings, write_caption_embeddings

    w = make_world(tmp_path, num_shards=1, per_shard=4)
    layout = w["layout"]
    keys, emb = read_caption_embeddings(layout.caption_embeddings, 0)
    three = np.stack([emb[0], emb[1], emb[2]])       # key 0 gets three distinct captions
    write_caption_embeddings(layout.caption_embeddings, 0, [keys[0]] * 3 + keys[1:], np.concatenate([three, emb[1:]]))
    src = shard_sources(layout, [0])[0]
    side = open_sidecars(src)
    assert [c.tolist() for c in side.captions(keys[0])] == three.tolist()
    assert [c.tolist() for c in side.captions(keys[1])] == [emb[1].tolist()]
    key, members = next(iter(shard_samples(src.tar)))

    def caption(seed, epoch):
        out = prepare_sample(key, members, side, _opts(), sample_rng(seed, epoch, 0, 0))
        return [i for i in range(3) if np.array_equal(out["caption"], three[i])], out["boxes"]

    chosen = [caption(3, epoch)[0] for epoch in range(12)]
    assert all(len(c) == 1 for c in chosen) and len({c[0] for c in chosen}) == 3   # every caption comes up
    assert [caption(3, epoch)[0] for epoch in range(12)] == chosen                  # fixed per (seed, epoch)
    assert [caption(4, epoch)[0] for epoch in range(12)] != chosen                  # another seed, others
    # the box sample is drawn before the caption: the same as with one caption
    with_three = caption(3, 5)[1]
    write_caption_embeddings(layout.caption_embeddings, 0, keys, emb)
    one = open_sidecars(src)
    np.testing.assert_array_equal(with_three, prepare_sample(key, members, one, _opts(),
                                                             sample_rng(3, 5, 0, 0))["boxes"])


def test_a_batch_never_holds_an_image_twice(tmp_path):
    # One shard of 5 images drawn again every epoch (resample_shards): batches of 4 straddle epochs,
    # where a sample already in the batch being filled is skipped (counted), never taken twice.
    w = make_world(tmp_path, num_shards=1, per_shard=5)
    it = iter(PretrainStream(shard_sources(w["layout"], [0]), _opts(resample_shards=True)))
    batches = [next(it) for _ in range(10)]
    assert all(len(set(b["keys"])) == len(b["keys"]) == 4 for b in batches)
    assert batches[-1]["_skipped"].get("repeated_in_batch", 0) > 0
    assert len({k for b in batches for k in b["keys"]}) == 5
    # fewer distinct images than a batch: an error that says so (a batch would repeat an image)
    small = make_world(tmp_path / "small", num_shards=1, per_shard=3)
    with pytest.raises(DataError, match="fewer distinct"):
        next(iter(PretrainStream(shard_sources(small["layout"], [0]), _opts())))


# -- exact resume ------------------------------------------------------------------------------------------

def _losses(history):
    return [(h["step"], h["loss_region_concept"], h["loss_distill"], h["loss_image_caption"]) for h in history]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(world, tmp_path, workers):
    n = 3 if workers else 2  # with 2 workers an odd n checks the round-robin rotation
    full = _trainer(world, tmp_path / "full", steps=2 * n, num_workers=workers)
    s_full = full.train()
    part = _trainer(world, tmp_path / "part", steps=2 * n, num_workers=workers)
    s_part = part.train(stop_after=n)  # n steps, then stop as on SIGTERM (the state is saved)
    assert s_part["status"] == "interrupted" and (tmp_path / "part" / "last.pt").exists()
    resumed = _trainer(world, tmp_path / "part", steps=2 * n, num_workers=workers)
    s_res = resumed.train()
    assert s_res["status"] == "done" and resumed.step == 2 * n
    assert _losses(s_res["history"]) == _losses(s_full["history"])  # identical, step by step
    a, b = _weights(full), _weights(resumed)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nexact resume ({workers} workers): {n}+{n} steps vs {2 * n}: losses identical "
          f"({len(s_full['history'])} steps), max |weight diff| {diff:.3g}")
    assert diff <= 1e-6
    assert s_res["skipped"] == s_full["skipped"]
    assert (tmp_path / "part" / "last.png").stat().st_size > 0
    assert list((tmp_path / "part" / "tb").glob("events.*"))


SIGTERM_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from pathlib import Path
    from trainer.offline.codecs import load_codec
    from tests.test_pretrain import _trainer
    from trainer.tasks.pretrain import HookBase
    import numpy as np
    from pipeline.layout import RunLayout
    root = Path({root!r})
    world = dict(layout=RunLayout(root), shard_ids=[0, 1], codec=load_codec(RunLayout(root).labels.root),
                 concepts=np.load(RunLayout(root).concept_embeddings))
    class Tell(HookBase):
        def after_step(self, t):
            print("step", t.step, flush=True)
            import time; time.sleep(0.3)
    t = _trainer(world, Path({out!r}), steps={steps})
    t.hooks.insert(0, Tell())
    s = t.train()
    print("status", s["status"], s["step"], flush=True)
""")


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(world, tmp_path):
    steps = 5
    torch.set_num_threads(1)
    full = _trainer(world, tmp_path / "full", steps=steps)
    full.train()
    out = tmp_path / "killed"
    script = SIGTERM_CHILD.format(repo=str(REPO), root=str(world["layout"].root), out=str(out), steps=steps)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("step 2"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert "status interrupted" in rest, rest
    saved = torch.load(out / "last.pt", weights_only=True)
    assert 2 <= saved["step"] < steps
    resumed = _trainer(world, out, steps=steps)
    resumed.train()
    a, b = _weights(full), _weights(resumed)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\nSIGTERM at step {saved['step']} of {steps}, resumed: max |weight diff| vs uninterrupted {diff:.3g}")
    assert diff <= 1e-6


# -- DDP ---------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from pathlib import Path
    import numpy as np
    from pipeline.layout import RunLayout
    from trainer.offline.codecs import load_codec
    from tests.test_pretrain import _trainer
    root, out = Path({root!r}), Path({out!r})
    world = dict(layout=RunLayout(root), shard_ids=[0, 1], codec=load_codec(RunLayout(root).labels.root),
                 concepts=np.load(RunLayout(root).concept_embeddings))
    t = _trainer(world, out, steps=1, batch_size=4, loss_region_concept=0.0, resume="never")
    rank = int(os.environ["RANK"])
    data = t.loader()
    first = next(data)
    torch.save({{k: v for k, v in first.items() if not k.startswith("_")}}, out / f"batch{{rank}}.pt")
    s = t.train(batches=iter([first]))
    (out / f"group{{rank}}.json").write_text(json.dumps(torch.distributed.is_initialized()))
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(s["history"]))
        torch.save(t.encoder.state_dict(), out / "weights.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    w = make_world(tmp_path / "w", portrait=False)  # equal sizes: the padded batch does not depend on the split
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), root=str(w["layout"].root), out=str(out)))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    # each rank left its process group when training ended (trainer.engine.device.end_distributed)
    assert [json.loads((out / f"group{rank}.json").read_text()) for rank in (0, 1)] == [False, False]
    ddp_history = json.loads((out / "summary.json").read_text())
    b0, b1 = torch.load(out / "batch0.pt", weights_only=True), torch.load(out / "batch1.pt", weights_only=True)
    assert not set(b0["keys"]) & set(b1["keys"])  # the ranks read different shards
    union = {k: (b0[k] + b1[k]) if isinstance(b0[k], list) else torch.cat([b0[k], b1[k]]) for k in b0}
    torch.set_num_threads(1)
    single = _trainer(w, tmp_path / "single", steps=1, batch_size=8, loss_region_concept=0.0, resume="never")
    s = single.train(batches=iter([union]))
    one, two = s["history"][0], ddp_history[0]
    # distill: mean over kept regions (6 concepts: max prob >= 1/6 > 0.1 keeps all, equal counts per rank);
    # image-caption: over the gathered global batch
    print("\n2 ranks (gloo) vs 1 process, first step: " + ", ".join(
        f"{k} {two[k]:.6f} vs {one[k]:.6f}" for k in ("loss_distill", "loss_image_caption")))
    for k in ("loss_distill", "loss_image_caption"):
        assert abs(one[k] - two[k]) <= 1e-5, (k, one[k], two[k])
    # the gradient (weights after one step) is the single-process one: DDP averages, gather sums
    ddp_w = torch.load(out / "weights.pt", weights_only=True)
    sw = single.encoder.state_dict()
    diff = max(float((sw[k] - ddp_w[k]).abs().max()) for k in sw)
    print(f"weights after the step: max |diff| {diff:.3g}")
    assert diff <= 1e-5


# -- export ------------------------------------------------------------------------------------------------

def test_student_export_loads_with_load_clip(world, tmp_path):
    t = _trainer(world, tmp_path, steps=2)
    t.train()
    model, _ = load_clip("RN50-tiny", tmp_path / "student.pt")
    trained = t.encoder.visual.state_dict()
    for k, v in model.visual.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, trained[k]), k
    # a finished run does nothing more when asked again (resume at the last step)
    again = _trainer(world, tmp_path, steps=2)
    assert again.train()["steps_run"] == 0


def test_auto_resume_skips_a_state_saved_under_other_settings(world, tmp_path):
    first = _trainer(world, tmp_path, fingerprint="run-a", steps=2)
    assert first.train()["steps_run"] == 2
    # same fingerprint: the finished state is resumed, nothing to do
    assert _trainer(world, tmp_path, fingerprint="run-a", steps=2).train()["steps_run"] == 2 - 2
    # the settings changed (another fingerprint): auto does not continue the stale state, it trains anew
    changed = _trainer(world, tmp_path, fingerprint="run-b", steps=3)
    assert changed.train()["steps_run"] == 3 and changed.step == 3
    # an explicit path is the user's choice: it continues whatever saved it
    explicit = _trainer(world, tmp_path / "other", fingerprint="run-c", steps=4, resume=str(tmp_path / "last.pt"))
    assert explicit.train()["steps_run"] == 1


# -- the stage ---------------------------------------------------------------------------------------------

def _stage_world(tmp_path, write_manifest, extra: str = ""):
    from pipeline.io import write_json
    from trainer.models.clip import save_clip_checkpoint

    manifest = write_manifest(f"""
        teacher: {{arch: RN50-tiny}}
        pretrain: {{steps: 3, batch_size: 4, regions_per_image: 8, min_size: 64, max_size: 96,
                   checkpoint_every: 2, warmup_steps: 1, device: cpu, log_every: 1{extra}}}
        """)
    layout = RunLayout.of(manifest)
    w = make_world(layout.root)
    for d in (layout.shards, layout.stage("embed"), layout.proposals, layout.labels):
        write_json(d.manifest, {"status": "done", "fingerprint": "test", "shards": {"00000": {}, "00001": {}}})
    torch.manual_seed(0)
    save_clip_checkpoint(create_clip("RN50-tiny")[0], layout.teacher_checkpoint)
    return manifest, layout, w


def test_stage_trains_exports_and_is_then_up_to_date(tmp_path, write_manifest, capsys):
    from stages import pretrain as stage

    manifest, layout, _ = _stage_world(tmp_path, write_manifest)
    result = stage.run(manifest)["work"]
    assert result["status"] == "done" and result["step"] == 3
    assert layout.student_checkpoint.exists() and layout.pretrain_state.exists()
    assert layout.pretrain_state.with_suffix(".png").exists()
    assert list((layout.tensorboard / "pretrain").glob("events.*"))
    done = json.loads(layout.stage("pretrain").manifest.read_text())
    assert done["status"] == "done" and done["counts"]["steps"] == 3
    load_clip("RN50-tiny", layout.student_checkpoint)
    assert stage.run(manifest)["work"] is False
    assert "up to date" in capsys.readouterr().out


def test_stage_online_teacher_runs_rpn_and_teacher_in_the_step(tmp_path, write_manifest, monkeypatch):
    import tests.rpn_standin as standin
    from stages import pretrain as stage

    monkeypatch.setitem(sys.modules, "trainer.models.rpn", standin)  # the stand-in RPN (trainer/models/rpn.py's contract)
    manifest, layout, _ = _stage_world(tmp_path, write_manifest, ", online_teacher: true")
    layout.rpn_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    layout.rpn_checkpoint.write_bytes(b"stand-in rpn (its loader builds a seeded one)")
    result = stage.run(manifest)["work"]
    assert result["status"] == "done" and result["step"] == 3
    assert all(np.isfinite(v) for v in result["losses"].values())


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("auto", torch.float32)])
def test_precision_sets_the_students_compute_dtype_and_keeps_fp32_weights(world, tmp_path, precision, dtype):
    """pretrain.precision: bf16 autocasts the student's forward (on a CPU too, to measure it), auto is
    fp32 off CUDA; the weights and the losses stay fp32 either way."""
    t = _trainer(world, tmp_path, steps=1, precision=precision)
    seen = []
    conv = next(m for m in t.encoder.visual.layer4.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    t.train()
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in t.encoder.parameters())


def test_the_old_amp_setting_is_refused_naming_its_replacement(tmp_path):
    from pipeline.config import ManifestError, load_manifest

    path = tmp_path / "m.yaml"
    path.write_text("pretrain: {amp: true}\n")
    with pytest.raises(ManifestError, match=r"pretrain\.amp: renamed; write pretrain\.precision"):
        load_manifest(path)
