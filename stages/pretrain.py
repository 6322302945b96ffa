"""Stage `pretrain`: the student region encoder from the shards and their sidecars (REFERENCE §4-5).

    student init   teacher CLIP (teacher.checkpoint, or train-teacher's output)
    data           shards/*.tar + proposals/ + labels/ (+ codec) + concepts/caption_embeddings/
    output         checkpoints/pretrain/last.pt      trainer state (resumes exactly; pretrain.resume)
                   checkpoints/pretrain/student.pt   the student as an open_clip checkpoint (load_clip)
                   checkpoints/pretrain/last.png     training curve;  tensorboard/pretrain/  scalars

One process by default; under torchrun every rank runs this same recipe:
    torchrun --nproc_per_node 8 -m stages.pretrain MANIFEST [--resume auto|never|PATH]
"""
from __future__ import annotations

import sys


from pipeline.config import RunManifest
from pipeline.layout import RunLayout
from pipeline.stage import StageState, read_stage_manifest, require_complete

STAGE = "pretrain"

# Settings that do not change what is trained (how it runs, how it is watched).
_RUNTIME_SETTINGS = ("resume", "log_every", "device", "num_workers", "checkpoint_every")


def run(manifest: RunManifest) -> dict:
    from stages.resolve import load_model_ref, rpn_checkpoint_path
    from trainer.data.pretrain_stream import shard_sources
    from trainer.tasks.pretrain import OnlineTeacher, PretrainPaths, PretrainTrainer
    from trainer.offline.text_embed import load_concept_embeddings

    layout = RunLayout.of(manifest)
    cfg = manifest.pretrain
    shards = require_complete("shard", layout.shards)
    inputs = {"shard": shards["fingerprint"],
              "embed": require_complete("embed", layout.stage("embed"))["fingerprint"]}
    if not cfg.online_teacher:
        inputs["proposals"] = require_complete("proposals", layout.proposals)["fingerprint"]
        inputs["label"] = require_complete("label", layout.labels)["fingerprint"]
    settings = {k: v for k, v in manifest.section_dict(STAGE).items() if k not in _RUNTIME_SETTINGS}
    settings["teacher"] = manifest.section_dict("teacher")
    state = StageState.open(STAGE, layout.stage(STAGE), settings, inputs)
    if state.is_done() and layout.student_checkpoint.exists():
        print(f"pretrain: up to date ({layout.student_checkpoint})")
        return {**(read_stage_manifest(state.stage_dir) or {}), "work": False}
    state.clean_temporaries()

    shard_ids = sorted(int(s) for s in shards.get("shards", {}))
    student, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
    concepts = load_concept_embeddings(layout)
    codec = online = None
    if cfg.online_teacher:
        from trainer.engine.device import resolve_device
        from trainer.models.rpn import load_rpn

        teacher, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
        p = manifest.proposals
        rpn = load_rpn(rpn_checkpoint_path(manifest), resolve_device(cfg.device))
        online = OnlineTeacher(rpn, teacher, p.pre_nms_top_n, p.post_nms_top_n, p.nms_thresh)
    else:
        from trainer.offline.codecs import load_codec

        codec = load_codec(layout.labels.root)
    paths = PretrainPaths(state=layout.pretrain_state, student=layout.student_checkpoint,
                          tensorboard=layout.tensorboard / STAGE,
                          curve=layout.pretrain_state.with_suffix(".png"))
    trainer = PretrainTrainer(cfg, student, concepts, paths,
                              sources=shard_sources(layout, shard_ids, online=cfg.online_teacher),
                              codec=codec, online=online, arch=manifest.teacher.arch,
                              fingerprint=state.fingerprint)
    summary = trainer.train()
    print(f"pretrain: {summary['status']} at step {summary['step']}/{cfg.steps} "
          f"({summary['images_per_s']:.1f} images/s; losses "
          + ", ".join(f"{k} {v:.4f}" for k, v in summary["losses"].items()) + f"; skipped {summary['skipped']})")
    if summary["status"] != "done":
        raise SystemExit(143)  # stopped by SIGTERM: the state is saved, run again to resume
    if trainer.rank == 0:
        state.finish([], outputs=[layout.student_checkpoint], extra={
            "counts": {"steps": summary["step"], "images": summary["step"] * cfg.batch_size,
                       **{f"skipped_{k}": v for k, v in summary["skipped"].items()}},
            "losses": summary["losses"], "world_size": trainer.world})
    return {k: v for k, v in summary.items() if k != "history"}


def _main(argv: list[str]) -> None:
    """`python -m stages.pretrain MANIFEST [--resume auto|never|PATH] [--set ...]`."""
    args = list(argv)
    if "--resume" in args:
        i = args.index("--resume")
        if i + 1 >= len(args):
            raise SystemExit("--resume needs a value: auto, never or a path")
        value = args[i + 1]
        del args[i:i + 2]
        args += ["--set", f"pretrain.resume={value}"]
    from stages.cli import main

    raise SystemExit(main([STAGE, *args]))


if __name__ == "__main__":
    _main(sys.argv[1:])
