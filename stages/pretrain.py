"""Stage `pretrain`: the student region encoder from the shards and their sidecars (docs/method.md §4-5).

    student init   teacher CLIP (teacher.checkpoint, or train-teacher's output)
    data           shards/*.tar + proposals/ + labels/ (+ codec) + concepts/caption_embeddings/
    output         checkpoints/pretrain/last.pt      trainer state (resumes exactly; pretrain.resume)
                   checkpoints/pretrain/student.pt   the student as an open_clip checkpoint (load_clip)
                   checkpoints/pretrain/last.png     training curve;  tensorboard/pretrain/  scalars

One process by default; under torchrun every rank runs this same recipe through the one entry point:
    torchrun --nproc_per_node 8 -m stages.cli pretrain MANIFEST [--resume auto|never|PATH]
"""
from __future__ import annotations

from pipeline.layout import RunLayout
from pipeline.runner import Stage, StageRun
from stages.resolve import rpn_from_train_rpn, teacher_from_train_teacher


def reads(manifest) -> tuple[str, ...]:
    upstream = ("shard", "embed")
    if manifest.pretrain.online_teacher:
        upstream += ("train-rpn",) if rpn_from_train_rpn(manifest, "proposals") else ()
    else:
        upstream += ("proposals", "label")
    return upstream + (("train-teacher",) if teacher_from_train_teacher(manifest) else ())


def train(run: StageRun) -> dict:
    from stages.resolve import load_model_ref, rpn_checkpoint_path
    from trainer.data.pretrain_stream import shard_sources
    from trainer.tasks.pretrain import OnlineTeacher, PretrainPaths, PretrainTrainer
    from trainer.offline.text_embed import load_concept_embeddings

    manifest, layout = run.manifest, run.layout
    cfg = manifest.pretrain
    shard_ids = run.shard_ids()
    student, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
    concepts = load_concept_embeddings(layout)
    codec = online = None
    if cfg.online_teacher:
        from trainer.engine.device import resolve_device
        from trainer.models.rpn import load_rpn

        teacher, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
        p = manifest.proposals
        rpn = load_rpn(rpn_checkpoint_path(manifest, "proposals"), resolve_device(cfg.device))
        online = OnlineTeacher(rpn, teacher, p.pre_nms_top_n, p.post_nms_top_n, p.nms_thresh)
    else:
        from trainer.offline.codecs import load_codec

        codec = load_codec(layout.labels.root)
    paths = PretrainPaths(state=layout.pretrain_state, student=layout.student_checkpoint,
                          tensorboard=layout.tensorboard / run.stage.name,
                          curve=layout.pretrain_state.with_suffix(".png"))
    trainer = PretrainTrainer(cfg, student, concepts, paths,
                              sources=shard_sources(layout, shard_ids, online=cfg.online_teacher),
                              codec=codec, online=online, arch=manifest.teacher.arch,
                              fingerprint=run.fingerprint)
    summary = trainer.train()
    print(f"pretrain: {summary['status']} at step {summary['step']}/{cfg.steps} "
          f"({summary['images_per_s']:.1f} images/s; losses "
          + ", ".join(f"{k} {v:.4f}" for k, v in summary["losses"].items()) + f"; skipped {summary['skipped']})")
    if summary["status"] != "done":
        raise SystemExit(143)  # stopped by SIGTERM: the state is saved, run again to resume
    run.report = {k: v for k, v in summary.items() if k != "history"}
    return {"counts": {"steps": summary["step"], "images": summary["step"] * cfg.batch_size,
                       **{f"skipped_{k}": v for k, v in summary["skipped"].items()}},
            "losses": summary["losses"], "world_size": trainer.world}


def student_file(layout: RunLayout, manifest) -> list:
    return [layout.student_checkpoint]


STAGE = Stage(
    name="pretrain", help="streaming region-concept pretraining of the student (tars + sidecars; torchrun for DDP) "
    "-> checkpoints/pretrain/", reads=reads, sections=("pretrain", "teacher"), outputs=student_file, work=train)
run = STAGE.run
