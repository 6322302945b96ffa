"""Turning a run manifest into the paths, models and settings that trainer/ functions take.

trainer/ knows nothing of manifests; the stage recipes call these. Every default that points into the
run folder (train-teacher's teacher, train-rpn's RPN, the synthetic world's annotations) is chosen here,
and a missing file is an error that names the command that makes it. Stage modules import it at module
level (to name their upstream stages), so torch is imported only inside the functions that use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from pipeline.config import ModelRef, RunManifest
from pipeline.layout import RunLayout, synthetic_world
from pipeline.stage import StageInputError

if TYPE_CHECKING:
    import torch


def teacher_from_train_teacher(manifest: RunManifest) -> bool:
    """Whether the teacher CLIP is train-teacher's output (teacher.checkpoint null, train-teacher on):
    then the stages that load the teacher read train-teacher."""
    return manifest.teacher.checkpoint is None and manifest.train_teacher.enabled


def rpn_from_train_rpn(manifest: RunManifest, purpose: str) -> bool:
    """Whether the RPN of `purpose` (pipeline.config.RPN_PURPOSES) is train-rpn's output (no checkpoint
    set for it, train-rpn on): then the stages that load that RPN read train-rpn."""
    return manifest.rpn_checkpoint(purpose) is None and manifest.train_rpn.enabled


def teacher_checkpoint_path(manifest: RunManifest) -> Path:
    """The teacher's weights: `teacher.checkpoint` (relative to the manifest) if set, else the
    train-teacher stage's output `checkpoints/teacher/teacher.pt`."""
    if manifest.teacher.checkpoint:
        return Path(manifest.resolve(manifest.teacher.checkpoint))
    return RunLayout.of(manifest).teacher_checkpoint


def load_model_ref(ref: ModelRef, manifest: Optional[RunManifest] = None, fallback: Optional[Path] = None,
                   device: Union[str, torch.device] = "cpu"):
    """load_clip for a manifest's ModelRef: `ref.checkpoint` resolved against the manifest's folder;
    when it is null, `fallback` (e.g. train-teacher's output). A TorchScript file loads only with
    `ref.trust_torchscript`."""
    from trainer.models.checkpoint import CheckpointNotFoundError
    from trainer.models.clip import load_clip

    checkpoint = ref.checkpoint
    if checkpoint is not None and manifest is not None:
        checkpoint = manifest.resolve(checkpoint)
    if checkpoint is None and (fallback is None or not Path(fallback).is_file()):
        produced = f" (expected at {fallback})" if fallback is not None else ""
        raise CheckpointNotFoundError(
            f"no checkpoint for {ref.arch}: the checkpoint setting is null and train-teacher's output is "
            f"missing{produced}. Set teacher.checkpoint to a local weights file (e.g. OpenAI's "
            f"{ref.arch}.pt), or enable train_teacher and run `regionclip train-teacher MANIFEST`.")
    checkpoint = checkpoint or fallback
    return load_clip(ref.arch, checkpoint, allow_partial=ref.allow_partial, device=device,
                     trust_torchscript=ref.trust_torchscript)


def load_teacher_clip(manifest: RunManifest, device: Union[str, torch.device] = "cpu"):
    """(model, tokenizer) of the manifest's teacher CLIP, in eval mode on `device`."""
    return load_model_ref(manifest.teacher, manifest, fallback=teacher_checkpoint_path(manifest), device=device)


RPN_SETTING = {"proposals": "proposals.checkpoint", "transfer": "transfer.rpn_checkpoint",
               "zero_shot": "evaluate.zero_shot_rpn_checkpoint"}


def rpn_checkpoint_file(manifest: RunManifest, purpose: str) -> Path:
    """Where the RPN of `purpose` (pipeline.config.RPN_PURPOSES: proposals, transfer, zero_shot) is:
    its own setting, else proposals.checkpoint, else train-rpn's output. The file may not exist."""
    return manifest.resolve(manifest.rpn_checkpoint(purpose)) or RunLayout.of(manifest).rpn_checkpoint


def rpn_checkpoint_path(manifest: RunManifest, purpose: str) -> Path:
    """rpn_checkpoint_file, which must exist (an error naming the setting to fix otherwise)."""
    path = rpn_checkpoint_file(manifest, purpose)
    if not path.is_file():
        own = "" if purpose == "proposals" else f"{RPN_SETTING[purpose]} or "
        raise FileNotFoundError(f"{path}: no RPN checkpoint for {purpose}; set {own}proposals.checkpoint to a "
                                "class-agnostic RPN (trainer/models/rpn.py), or enable train_rpn and run "
                                "`regionclip train-rpn MANIFEST`")
    return path


def teacher_scale(manifest: RunManifest) -> dict:
    """The teacher's input scale when it labels regions: label.min_size / max_size, each defaulting to the
    proposals' scale."""
    return {"min_size": manifest.label.min_size or manifest.proposals.min_size,
            "max_size": manifest.label.max_size or manifest.proposals.max_size}


def rpn_inference(manifest: RunManifest, purpose: str, training: bool = False) -> dict:
    """How the RPN of `purpose` proposes, as the keywords of its `propose` (min_size, max_size,
    pre_nms_top_n, post_nms_top_n, nms_thresh). Each purpose has its own settings, as the reference
    runs each RPN with its own detectron2 config (docs/method.md §2, §6, §7):
      proposals  pretraining's boxes: the proposals section (paper: 1000 per FPN level, NMS 0.5, 300 kept)
      transfer   the detector's boxes: transfer.rpn_pre_nms_top_n before NMS (paper COCO C4: 6000); NMS
                 and boxes kept from the transfer section for its training images (`training`), from the
                 evaluate section at test time (paper: 0.7, 1000)
      zero_shot  evaluate.zero_shot_rpn_pre_nms_top_n, zero_shot_rpn_nms_thresh (0.9), evaluate.proposals_per_image
    A null pre-NMS setting is proposals.pre_nms_top_n. Every RPN runs at proposals.min_size / max_size."""
    p, t, e = manifest.proposals, manifest.transfer, manifest.evaluate
    if training and purpose != "transfer":
        raise ValueError(f"only the transfer RPN proposes for training images, not {purpose!r}")
    if purpose == "proposals":
        pre, post, nms = p.pre_nms_top_n, p.post_nms_top_n, p.nms_thresh
    elif purpose == "transfer":
        pre = t.rpn_pre_nms_top_n
        post, nms = (t.proposals_per_image, t.rpn_nms_thresh) if training else (e.proposals_per_image,
                                                                                 e.rpn_nms_thresh)
    elif purpose == "zero_shot":
        pre, post, nms = e.zero_shot_rpn_pre_nms_top_n, e.proposals_per_image, e.zero_shot_rpn_nms_thresh
    else:
        raise ValueError(f"unknown RPN purpose {purpose!r}; one of proposals, transfer, zero_shot")
    return {"min_size": p.min_size, "max_size": p.max_size, "pre_nms_top_n": pre or p.pre_nms_top_n,
            "post_nms_top_n": post, "nms_thresh": nms}


def actor_precision(manifest: RunManifest, section: str) -> str:
    """The precision the actors of GPU stage `section` (proposals, label) run their model in: the
    section's `precision` with `auto` resolved (trainer/offline/streaming.py resolved_precision) by the
    stage's actor plan, GPUs or CPUs (pipeline/ray_runtime.py plan_actor_pool, which starts or joins
    Ray for it). The stage fingerprints this value: outputs made in bf16 on GPUs and in fp32 on CPUs
    never share a fingerprint, and `auto` on CPUs is the same run as `fp32`."""
    from trainer.offline.streaming import resolved_precision

    cfg = getattr(manifest, section)
    if cfg.precision != "auto":
        return resolved_precision(cfg.precision, uses_gpu=False)
    from pipeline.ray_runtime import init_ray, plan_actor_pool

    init_ray(manifest.ray)
    return resolved_precision("auto", uses_gpu=plan_actor_pool(section, cfg, manifest.ray).num_gpus > 0)


def annotation_file(manifest, which: str) -> Path:
    """transfer.annotations (which='train') or transfer.val_annotations ('val'); default: the
    synthetic world's instances_train.json / instances_val.json."""

    cfg = manifest.transfer
    explicit = cfg.annotations if which == "train" else cfg.val_annotations
    if explicit:
        path = Path(manifest.resolve(explicit))
        if not path.is_file():
            raise FileNotFoundError(f"transfer.{'annotations' if which == 'train' else 'val_annotations'}: "
                                    f"{path}: no such file")
        return path
    if manifest.corpus.format != "synthetic":
        raise StageInputError(f"set transfer.{'annotations' if which == 'train' else 'val_annotations'} to "
                              "a COCO/LVIS-format file (the default is the synthetic world's)")
    path = synthetic_world(manifest) / f"instances_{which}.json"
    if not path.is_file():
        raise StageInputError(f"{path}: the synthetic world is not there; run `regionclip synth MANIFEST`")
    return path


def detection_images(manifest, which: str, section: str = "transfer") -> dict:
    """How `section`'s (transfer, train_rpn) `which` (train, val) detection set is read, as DetectionSet's
    and read_coco_boxes' keywords: the images root (None: the annotation file's folder), whether file
    names may lead outside it (the setting named in the refusal), whether boxes are clipped to their
    image (training sets; an evaluation set keeps its boxes as given) and whether a file that would lose
    annotations is refused (`strict_annotations`, or --strict)."""
    cfg = getattr(manifest, section)
    root = cfg.images_root if which == "train" else cfg.val_images_root
    return {"images_root": manifest.resolve(root) if root else None,
            "allow_outside_root": cfg.allow_outside_root, "setting": f"{section}.allow_outside_root",
            "clip_boxes": which == "train", "strict": cfg.strict_annotations,
            "strict_setting": f"{section}.strict_annotations"}


def clip_checkpoint(manifest, which: str) -> Path:
    """The CLIP checkpoint of `teacher` (teacher.checkpoint or train-teacher's output) or `pretrain`
    (the exported student); a missing file is an error naming the stage that makes it."""
    from trainer.models.checkpoint import CheckpointNotFoundError

    if which == "teacher":
        path = Path(teacher_checkpoint_path(manifest))
        hint = "set teacher.checkpoint or run `regionclip train-teacher MANIFEST`"
    elif which == "pretrain":
        path = RunLayout.of(manifest).student_checkpoint
        hint = "run `regionclip pretrain MANIFEST` first"
    else:
        raise ValueError(f"unknown model {which!r}; use teacher or pretrain")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no {which} checkpoint; {hint}")
    return path


def class_embeddings(manifest, names: Sequence[str], device="cpu", text_model=None) -> torch.Tensor:
    """Class text embeddings [C, D] (L2-normalized) from the teacher's text encoder over the 81
    templates (embed.ensemble), checked against the teacher's width."""
    import torch

    from trainer.models.clip import check_embedding_dim, embedding_dim
    from trainer.offline.text_embed import embed_names

    if text_model is None:
        text_model = load_teacher_clip(manifest, device=device)
    model, tokenizer = text_model
    emb = embed_names(model, tokenizer, list(names), manifest.embed.ensemble, device=device, progress=False)
    check_embedding_dim(embedding_dim(model), emb.shape[1], "the class embeddings", manifest.teacher.arch)
    return torch.from_numpy(emb).to(device)


def load_frozen_rpn(manifest, purpose: str, device="cpu"):
    """The class-agnostic RPN of `purpose` (rpn_checkpoint_path), frozen."""
    from trainer.models.rpn import load_rpn

    rpn = load_rpn(rpn_checkpoint_path(manifest, purpose), device)
    rpn.requires_grad_(False)
    return rpn.eval()


def test_settings(evaluate_cfg) -> dict:
    """How a detector is tested (sizes, score threshold, detections, suppression): the `evaluate` section."""
    e = evaluate_cfg
    return {"test_min_size": e.min_size, "test_max_size": e.max_size, "score_threshold": e.score_threshold,
            "detections_per_image": e.detections_per_image, "soft_nms_sigma": e.soft_nms_sigma,
            "soft_nms_prune": e.soft_nms_prune, "multiply_rpn_score": e.multiply_rpn_score,
            "objectness": e.objectness}


def detector_settings(manifest: RunManifest) -> "DetectorSettings":  # noqa: F821
    from trainer.models.detector import DetectorSettings

    t = manifest.transfer
    return DetectorSettings(
        min_sizes=tuple(t.min_sizes), max_size=t.max_size, flip=t.flip, rois_per_image=t.rois_per_image,
        positive_fraction=t.positive_fraction, iou_threshold=t.iou_threshold, focal_gamma=t.focal_gamma,
        background_weight=t.background_weight, only_sample_fg_proposals=t.only_sample_fg_proposals,
        **test_settings(manifest.evaluate))


def apply_test_settings(detector, evaluate_cfg) -> None:
    """The manifest's `evaluate` section decides how a trained detector is tested, whatever its
    checkpoint recorded."""
    for name, value in test_settings(evaluate_cfg).items():
        setattr(detector.settings, name, value)


def train_settings(manifest):
    from trainer.tasks.transfer import TrainSettings

    t = manifest.transfer
    return TrainSettings(steps=t.steps, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                         weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_steps=list(t.lr_steps),
                         repeat_factor_threshold=t.repeat_factor_threshold, flip=t.flip, seed=t.seed,
                         num_workers=t.num_workers)


def synthetic_world_note(manifest: RunManifest) -> Optional[str]:
    """What `detect` and `search` say once when the run's teacher is train-teacher's, trained on the
    synthetic world: its models know coloured shapes only, so on real photos they give noise."""
    if manifest.corpus.format != "synthetic" or manifest.teacher.checkpoint is not None \
            or not manifest.train_teacher.enabled:
        return None
    return ("note: this run's models were trained by train-teacher on the synthetic world (24 kinds of drawn "
            "shapes): its own images are what they know, and on real photos their boxes, labels and matches "
            "are noise. For real pictures use real weights, as manifests/cc3m-rn50.yaml and coco-ovd.yaml do: "
            "teacher.checkpoint (OpenAI's RN50.pt after `regionclip convert-teacher`, or RegionCLIP's released "
            "checkpoints: docs/transfer-evaluate.md) and an RPN trained on real boxes (proposals.checkpoint).")
