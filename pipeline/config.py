"""The run manifest: one YAML file that describes a whole run, validated before any work starts.

Every stage reads its own section; every setting has a default except `name` and `output_dir`.
An unknown key or a bad value is a `ManifestError` that names the field (e.g. `shard.max_side`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from pipeline.images import DEFAULT_IMAGE_FORMATS, openable_formats


class ManifestError(ValueError):
    """A run manifest that cannot be used; the message names the field and the fix."""


# Whole numbers beyond this are refused in every field (2**53: exact as a float, far inside int64, so that
# nothing overflows in numpy, torch or Arrow); a seed is at most MAX_SEED (numpy's seed range).
MAX_NUMBER = 2 ** 53
MAX_SEED = 2 ** 32 - 1
# Processes and CPUs a setting may ask for (DataLoader workers per rank, Ray actors, a local Ray's CPUs).
MAX_WORKERS = 64
MAX_CPUS = 1024


class Section(BaseModel):
    # extra="forbid" turns a typo ("max_sied") into an error that names the field; allow_inf_nan=False
    # refuses nan and inf in every float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _plain_numbers(cls, value):
        """Every number of every field (lists included): not negative (no setting takes one) and at most
        MAX_NUMBER; fields add their own ranges."""
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                if number < 0:
                    raise ValueError(f"{number} is negative; no setting takes a negative number")
                if number > MAX_NUMBER:
                    raise ValueError(f"{number} is larger than {MAX_NUMBER}")
        return value


# The mark of a setting that changes how a stage runs but never what it writes (where it runs, how
# many actors, how often it logs). Stage fingerprints leave these out, so changing one reruns nothing.
# Only settings that provably leave the outputs alone carry it: a batch size whose items are padded
# together (images of different sizes) or a worker count that decides the data order does not.
RUNTIME_ONLY = {"runtime_only": True}


def is_runtime_only(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("runtime_only") is True


def fingerprinted_settings(section: BaseModel) -> dict:
    """A section's settings that decide its stage's outputs, as plain data: every field except those
    marked runtime-only (the input to a stage's fingerprint)."""
    data = section.model_dump(mode="json")
    return {name: data[name] for name, field in type(section).model_fields.items()
            if name in data and not is_runtime_only(field)}


class SynthConfig(Section):
    """The synthetic open-vocabulary world (tests, the demo, the quality benchmark)."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    num_images: int = Field(400, ge=1, description="captioned training images (the caption corpus)")
    num_val_images: int = Field(100, ge=0, description="held-out images with all categories boxed")
    min_side: int = Field(160, ge=32)
    max_side: int = Field(320, ge=32)
    max_objects: int = Field(4, ge=1, le=8)
    num_novel: int = Field(6, ge=0, description="categories held out as novel (never boxed in train)")


class CorpusConfig(Section):
    format: Literal["cc3m_tsv", "img2dataset", "coco_captions", "folder", "synthetic"] = "synthetic"
    path: Optional[str] = Field(
        None, description="input file or folder; for `synthetic`, where the world is written "
        "(default <output_dir>/synth)")
    images_root: Optional[str] = Field(
        None, description="base folder for relative image paths (cc3m_tsv, coco_captions); images are only "
        "read from inside it (default: the corpus file's folder)")
    allow_outside_root: bool = Field(
        False, description="read image and caption files the corpus names anywhere on this machine; by default "
        "a path (or file:// URL, or link) leading outside images_root (cc3m_tsv, coco_captions) or the corpus "
        "folder (folder, img2dataset) is a rejected row `outside_root`")
    max_file_bytes: int = Field(
        50_000_000, ge=1, description="larger image files (and tar members, parquet values) are rejected rows "
        "`too_large`, refused before they are read")
    max_caption_bytes: int = Field(
        65_536, ge=1, description="larger caption files and tar text members are rejected rows `caption_too_large`")
    caption_column: str = "caption"
    url_column: str = "url"
    max_rows: Optional[int] = Field(None, ge=1, description="read at most this many rows (smoke runs)")


class RayConfig(Section):
    address: Optional[str] = Field(
        None, description="null: start a local Ray in this process; 'auto' or host:port: an existing "
        "cluster (RAY_ADDRESS is honoured too)", json_schema_extra=RUNTIME_ONLY)
    num_cpus: Optional[int] = Field(None, ge=1, le=MAX_CPUS, description="CPUs for a local Ray (default: all)",
                                    json_schema_extra=RUNTIME_ONLY)
    include_dashboard: bool = Field(False, json_schema_extra=RUNTIME_ONLY)
    dashboard_host: str = Field("127.0.0.1", json_schema_extra=RUNTIME_ONLY)
    gpu_wait_s: float = Field(
        0.0, ge=0, description="a GPU stage (proposals, label) on a cluster reached by address whose alive nodes "
        "have no GPU yet waits up to this many seconds for an autoscaler to add a GPU node, then fails; 0: plan "
        "from the nodes alive at the start (the model runs on CPUs when none has a GPU). The local Ray never "
        "waits", json_schema_extra=RUNTIME_ONLY)

    @model_validator(mode="after")
    def _dashboard_on_localhost(self):
        if self.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("dashboard_host must be a loopback address (127.0.0.1); expose a cluster "
                             "dashboard with an SSH tunnel instead")
        return self


class ShardConfig(Section):
    samples_per_shard: int = Field(1000, ge=1)
    max_side: int = Field(1333, ge=16, description="images whose longest side exceeds this are resized")
    max_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb limit (PIL's default)")
    min_side: int = Field(8, ge=1, description="smaller images are rejected")
    jpeg_quality: int = Field(95, ge=1, le=100)
    max_caption_chars: int = Field(2000, ge=1)
    image_formats: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_FORMATS), description="the only formats PIL opens (its "
        "names: JPEG, PNG, WEBP, GIF, BMP, TIFF, AVIF, ...); any other file is a rejected row `not_an_image`. "
        "The default holds what web caption corpora hold; each added format is more decoder code facing "
        "untrusted bytes")

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value):
        names = [str(name).upper() for name in value]
        unknown = sorted(set(names) - set(openable_formats()))
        if unknown or not names:
            raise ValueError(f"{', '.join(unknown) or 'an empty list'}: name formats this PIL opens: "
                             f"{', '.join(openable_formats())}")
        return list(dict.fromkeys(names))


class ConceptsConfig(Section):
    parser: Literal["auto", "spacy_model", "lookups"] = Field(
        "auto", description="auto: a trained spaCy English pipeline if installed, else the offline "
        "lookups extractor")
    spacy_model: str = "en_core_web_sm"
    min_count: int = Field(100, ge=1)
    max_concepts: Optional[int] = Field(None, ge=1)
    stopwords: list[str] = Field(default_factory=list, description="non-object nouns to drop (added to "
                                 "the built-in list)")
    vocabulary: Optional[str] = Field(None, description="class names merged into the pool: a text file, "
                                      "a COCO/LVIS JSON, or a comma list")
    pool_file: Optional[str] = Field(None, description="a given concept pool instead of the corpus' frequent "
                                     "nouns: a text file (relative to the manifest's folder) with one name per "
                                     "line, in pool order (the reference's coco_nouns_4764.txt: lines "
                                     "`name,count`); min_count, max_concepts and stopwords then do not apply, "
                                     "vocabulary names not in it are appended")
    batch_size: int = Field(256, ge=1, description="captions per spaCy nlp.pipe batch (each parsed on its own)",
                            json_schema_extra=RUNTIME_ONLY)


class ModelRef(Section):
    """A CLIP model: an open_clip architecture name or one of our JSON configs, plus local weights."""
    arch: str = "RN50"
    checkpoint: Optional[str] = Field(None, description="local weights file (OpenAI TorchScript/state "
                                      "dict, open_clip checkpoint or safetensors); null: use train-teacher's output")
    allow_partial: bool = False
    # Loading a TorchScript archive runs code from the file, so the run refuses one unless told the file
    # is trusted. Strict: only a YAML `true` switches it on (not "yes" or 1). It never changes what a
    # stage writes (the same tensors load either way), so it is runtime-only.
    trust_torchscript: StrictBool = Field(
        False, description="load TorchScript CLIP files (OpenAI's RN50.pt) as they are; loading one runs "
        "code from the file, so only for files you trust. Better: convert the file once with "
        "`regionclip convert-teacher MANIFEST` and point checkpoint at the safetensors file it writes",
        json_schema_extra=RUNTIME_ONLY)


class EmbedConfig(Section):
    ensemble: Literal["mean_unnormalized", "normalize_mean_normalize"] = "mean_unnormalized"
    batch_size: int = Field(256, ge=1, description="texts per forward pass (each padded to the context "
                            "length on its own)", json_schema_extra=RUNTIME_ONLY)
    device: str = Field("auto", json_schema_extra=RUNTIME_ONLY)


class TrainTeacherConfig(Section):
    enabled: bool = Field(False, description="train an image-level CLIP on the shards (no weights here)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    min_crop_scale: float = Field(0.9, gt=0, le=1, description="RandomResizedCrop's smallest area share "
                                  "(open_clip's default 0.9; lower regularises small corpora)")
    init_checkpoint: Optional[str] = Field(None, description="start from these CLIP weights (a new "
                                           "domain) instead of random ones")
    device: str = Field("auto", json_schema_extra=RUNTIME_ONLY)
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description="data loader processes (they split the shards, so the "
                             "order of the samples depends on it)")
    checkpoint_every: int = Field(500, ge=1, json_schema_extra=RUNTIME_ONLY, description="steps between training states (resumed after a kill)")


class TrainRpnConfig(Section):
    enabled: bool = Field(False, description="train a class-agnostic RPN on base-category boxes")
    annotations: Optional[str] = Field(None, description="COCO-format train set (default: the synthetic "
                                       "world's instances_train.json)")
    images_root: Optional[str] = Field(None, description="folder of the train images' file_name "
                                       "(default: the annotations file's folder)")
    val_annotations: Optional[str] = Field(None, description="COCO-format set for the recall report "
                                           "(default: the synthetic world's instances_val.json); "
                                           "categories with a `split` field are reported per split")
    val_images_root: Optional[str] = None
    allow_outside_root: StrictBool = Field(
        False, json_schema_extra=RUNTIME_ONLY, description="read train and val images whose file_name leads "
        "outside images_root / val_images_root (an absolute path, `..`, a link leading out); by default such "
        "an annotation file is refused before training, naming the first few")
    strict_annotations: StrictBool = Field(
        False, json_schema_extra=RUNTIME_ONLY, description="refuse an annotation file (train and val) that "
        "would lose annotations (an unknown image or category, zero or negative size, outside the image, "
        "a repeated id) or have boxes clipped to the image, instead of dropping (clipping) them with a "
        "count per reason (also `--strict`)")
    backbone: Literal["resnet50_fpn", "resnet18_fpn", "clip_res4"] = "resnet50_fpn"
    backbone_weights: Optional[str] = Field(None, description="local weights file: torchvision ImageNet "
                                            "ResNet / Faster R-CNN state dict, or CLIP weights for "
                                            "clip_res4; null: train from scratch")
    clip_arch: Optional[str] = Field(None, description="clip_res4's CLIP architecture (default: teacher.arch)")
    anchor_sizes: Optional[list[Annotated[int, Field(ge=1, le=8192)]]] = Field(
        None, description="FPN: one per level (5); clip_res4: all on res4; default 32..512 (pixels, 1-8192)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(0.01, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_size: int = Field(800, ge=32)
    max_size: int = Field(1333, ge=32)
    eval_each_epoch: bool = Field(False, description="val recall after every epoch (for the curve)")
    device: str = Field("auto", json_schema_extra=RUNTIME_ONLY)
    checkpoint_every: int = Field(500, ge=1, json_schema_extra=RUNTIME_ONLY, description="steps between training states (resumed after a kill)")


class GpuActorSettings(Section):
    """How a GPU stage's Ray actors run (proposals, label): each holds the model on a GPU when the cluster
    has them and decodes images in cpus_per_actor threads ahead of it (one per 8 CPUs when the model
    runs on the CPU, whose threads take the rest)."""
    num_gpus_per_actor: float = Field(1.0, ge=0, le=16, json_schema_extra=RUNTIME_ONLY)
    num_actors: Optional[int] = Field(None, ge=1, le=MAX_CPUS, json_schema_extra=RUNTIME_ONLY)
    cpus_per_actor: Optional[int] = Field(None, ge=1, le=MAX_CPUS, json_schema_extra=RUNTIME_ONLY,
                                          description="CPUs each actor asks Ray for; with a GPU they "
                                          "all decode; null: 8 when the cluster has GPUs (at most the GPU "
                                          "nodes' CPUs per GPU), else 1")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast with TF32 on CUDA, fp32 on CPU; boxes, RoIAlign "
        "coordinates and logits stay fp32")


class RpnInferenceConfig(GpuActorSettings):
    checkpoint: Optional[str] = Field(None, description="the pretraining RPN (the proposals stage and the "
                                      "online teacher), and every other purpose's unless it names its own "
                                      "(transfer.rpn_checkpoint, evaluate.zero_shot_rpn_checkpoint); "
                                      "null: train-rpn's output")
    min_size: int = Field(800, ge=32, description="canonical short side")
    max_size: int = Field(1333, ge=32, description="canonical long-side cap")
    nms_thresh: float = Field(0.5, gt=0, le=1)
    pre_nms_top_n: int = Field(1000, ge=1, description="boxes kept before NMS, per FPN level (pretraining's "
                               "RPN; also transfer's and zero-shot's unless transfer.rpn_pre_nms_top_n / "
                               "evaluate.zero_shot_rpn_pre_nms_top_n say otherwise)")
    post_nms_top_n: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1, description="images per forward pass (padded to one size together, "
                            "so it is part of the fingerprint)")


class LabelConfig(GpuActorSettings):
    codec: Literal["pq", "topk", "fp16"] = "pq"
    pq_subquantizers: int = Field(64, ge=1)
    pq_bits: int = Field(8, ge=1, le=16)
    pq_train_regions: int = Field(20000, ge=256)
    topk: int = Field(64, ge=1)
    temperature: float = Field(0.01, gt=0)
    store_flipped: bool = False
    min_size: Optional[int] = Field(None, ge=32, description="the teacher's input scale, short side "
                                    "(default: proposals.min_size, as the reference); a small CLIP "
                                    "sees regions best near the scale it was trained at")
    max_size: Optional[int] = Field(None, ge=32, description="... long side cap (default: proposals.max_size)")
    faiss_threshold: int = Field(100_000, ge=1, description="use FAISS search above this pool size")
    region_index: bool = Field(False, description="also write a FAISS index over every region embedding "
                               "(an extra output: turning it on later builds only the index)",
                               json_schema_extra=RUNTIME_ONLY)
    batch_size: int = Field(8, ge=1, description="images per forward pass (padded to one size together)")


class PretrainConfig(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1, description="images per optimizer step (global)")
    grad_accum: int = Field(1, ge=1)
    regions_per_image: int = Field(100, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_steps: list[int] = Field(default_factory=list)
    grad_clip: Optional[float] = Field(5.0, gt=0)
    loss_region_concept: float = 1.0
    loss_distill: float = 1.0
    loss_image_caption: float = 1.0
    temperature: float = Field(0.01, gt=0)
    flip: bool = True
    online_teacher: bool = False
    checkpoint_every: int = Field(500, ge=1, description="steps between trainer states (a resume is exact "
                                  "whichever step it starts from)", json_schema_extra=RUNTIME_ONLY)
    num_workers: int = Field(0, ge=0, le=MAX_WORKERS, description="data loader processes per rank (each is a data slot: "
                             "the order of the samples depends on it)")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", json_schema_extra=RUNTIME_ONLY)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="fp32 (the reference's; bf16 lowered the demo's transfer novel AP50, "
        "docs/pretrain.md); auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 autocasts on a CPU too; "
        "losses and optimizer state stay fp32")
    min_size: int = Field(800, ge=32, description="images resized so the short side is this (bicubic)")
    max_size: int = Field(1333, ge=32, description="... and the long side at most this")
    keep_threshold: float = Field(0.1, ge=0, le=1, description="regions with teacher max prob above "
                                  "this enter the region-concept loss (all when none does)")
    resample_shards: bool = Field(False, description="draw shards with replacement per rank and worker "
                                  "(needed when there are fewer shards than ranks x workers)")
    resume: str = Field("auto", description="auto: resume from checkpoints/pretrain/last.pt if this run (same "
                        "settings and inputs) saved it; never: start fresh; or a path to a trainer state",
                        json_schema_extra=RUNTIME_ONLY)
    log_every: int = Field(10, ge=1, json_schema_extra=RUNTIME_ONLY)


class TransferConfig(Section):
    """Detector transfer (docs/method.md §6): a C4 detector trained on base classes, one per initialisation."""
    init: list[Literal["pretrain", "teacher"]] = Field(
        default_factory=lambda: ["pretrain"], description="initialisations to train: pretrain (the "
        "student checkpoint), teacher (the plain CLIP baseline); a name or a list")
    annotations: Optional[str] = Field(None, description="COCO/LVIS-format train set (default: the "
                                       "synthetic world's instances_train.json, base boxes only)")
    val_annotations: Optional[str] = Field(None, description="evaluation set (default: the world's "
                                           "instances_val.json, all categories)")
    images_root: Optional[str] = Field(None, description="folder of the train images (default: the "
                                       "annotation file's folder)")
    val_images_root: Optional[str] = None
    allow_outside_root: StrictBool = Field(
        False, json_schema_extra=RUNTIME_ONLY, description="read images (transfer's train set, evaluate's "
        "val set) whose file_name or coco_url leads outside images_root / val_images_root (an absolute "
        "path, `..`, a link leading out); by default such an annotation file is refused before any work, "
        "naming the first few")
    strict_annotations: StrictBool = Field(
        False, json_schema_extra=RUNTIME_ONLY, description="refuse an annotation file (transfer's train set, "
        "evaluate's val set) that would lose annotations (an unknown image or category, zero or negative "
        "size, outside the image, a repeated id) or have boxes clipped to the image, instead of dropping "
        "(clipping) them with a count per reason (also `--strict`)")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    lr_steps: list[int] = Field(default_factory=list)
    focal_gamma: Optional[float] = Field(0.5, ge=0, description="COCO 0.5; LVIS null (weighted CE)")
    background_weight: float = Field(0.2, ge=0, description="COCO 0.2; LVIS 0.8")
    repeat_factor_threshold: Optional[float] = Field(None, gt=0, le=1, description="LVIS: 0.001")
    rois_per_image: int = Field(512, ge=1)
    positive_fraction: float = Field(0.25, gt=0, le=1)
    only_sample_fg_proposals: bool = Field(False, description="RegionCLIP's ONLY_SAMPLE_FG_PROPOSALS: "
                                           "the classifier trains on foreground RoIs only (unlabelled novel "
                                           "objects are never taught as background); pair with "
                                           "evaluate.multiply_rpn_score")
    iou_threshold: float = Field(0.5, gt=0, lt=1)
    min_sizes: list[Annotated[int, Field(ge=32)]] = Field(default_factory=lambda: [640, 672, 704, 736, 768, 800],
                                                          min_length=1)
    max_size: int = Field(1333, ge=32)
    flip: bool = True
    rpn_checkpoint: Optional[str] = Field(None, description="the RPN that proposes the detector's boxes, "
                                          "in training and in testing (evaluate, detect): one trained on "
                                          "the transfer set's base classes only (the reference: COCO's 48, "
                                          "LVIS' 866); null: proposals.checkpoint (or train-rpn's output)")
    rpn_pre_nms_top_n: Optional[int] = Field(None, ge=1, description="the detector's RPN (rpn_checkpoint): "
                                             "boxes kept before NMS, per FPN level (a C4 RPN has one level), in "
                                             "training and in testing (evaluate, detect); the reference: 6000 for "
                                             "COCO's C4 RPN, 1000 for LVIS' FPN RPN; null: proposals.pre_nms_top_n")
    proposals_per_image: int = Field(1000, ge=1, description="RPN post-NMS top-n for training images")
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    allow_partial: bool = False
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", json_schema_extra=RUNTIME_ONLY)
    checkpoint_every: int = Field(1000, ge=1, json_schema_extra=RUNTIME_ONLY, description="steps between training states (resumed after a kill)")
    num_workers: int = Field(2, ge=0, le=MAX_WORKERS, description="processes reading training images ahead of the step (0: "
                             "read in the training process); the trained detector does not depend on it",
                             json_schema_extra=RUNTIME_ONLY)

    @field_validator("init", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class EvaluateConfig(Section):
    """Evaluation of the transferred detectors and zero-shot inference (docs/method.md §6-7)."""
    score_threshold: float = Field(0.001, ge=0, le=1)
    detections_per_image: int = Field(100, ge=1)
    objectness: Literal["sigmoid", "raw"] = Field("sigmoid", description="how the RPN's objectness enters "
                                                  "a score (zero-shot RPN boxes, multiply_rpn_score): "
                                                  "sqrt(p * sigmoid(logit)); raw: sqrt(p * logit), the "
                                                  "reference's form (negative logits dropped, scores may "
                                                  "exceed 1)")
    min_size: int = Field(800, ge=32, description="test-time short side (detector and zero-shot)")
    max_size: int = Field(1333, ge=32)
    soft_nms_sigma: float = Field(0.5, gt=0)
    soft_nms_prune: float = Field(0.001, ge=0, lt=1, description="soft-NMS drops a box once its decayed score is "
                                  "at or below this (detectron2's SOFT_NMS_PRUNE); score_threshold filters "
                                  "before soft-NMS (the reference's LVIS test: 0.02 before, 0.001 after)")
    multiply_rpn_score: bool = Field(False, description="RegionCLIP's MULTIPLY_RPN_SCORE: a detection "
                                     "scores sqrt(p * objectness), objectness as `objectness` says")
    proposals_per_image: int = Field(1000, ge=1, description="RPN post-NMS top-n at test time")
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1, description="RPN NMS for the detector's proposals")
    zero_shot_rpn_checkpoint: Optional[str] = Field(None, description="the RPN of zero-shot inference "
                                                    "(evaluate's RPN boxes, detect with a CLIP checkpoint); "
                                                    "the reference uses its pretraining RPN (LVIS-866 base); "
                                                    "null: proposals.checkpoint (or train-rpn's output)")
    zero_shot_rpn_pre_nms_top_n: Optional[int] = Field(None, ge=1, description="the zero-shot RPN's boxes kept "
                                                       "before NMS, per FPN level (the reference: 1000); null: "
                                                       "proposals.pre_nms_top_n")
    zero_shot_rpn_nms_thresh: float = Field(0.9, gt=0, le=1)
    zero_shot_nms_thresh: float = Field(0.5, gt=0, le=1)
    zero_shot: list[Literal["teacher", "pretrain"]] = Field(
        default_factory=lambda: ["teacher", "pretrain"], description="CLIP models evaluated zero-shot "
        "(GT boxes, RPN boxes, region recognition)")
    detectors: dict[str, str] = Field(default_factory=dict, description="more detectors to evaluate beside "
                                      "transfer.init's, name: weights file (a detector saved by transfer, or "
                                      "RegionCLIP's released regionclip_finetuned-*.pth); architecture "
                                      "teacher.arch")
    max_images: Optional[int] = Field(None, ge=1, description="evaluate the first N images only (smoke runs)")
    picture_image: int = Field(0, ge=0, description="position of the evaluation image drawn with detections")
    device: str = Field("auto", json_schema_extra=RUNTIME_ONLY)

    @field_validator("zero_shot", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else (value or [])

    @field_validator("detectors")
    @classmethod
    def _plain_names(cls, value):
        # Names become file names (eval/metrics_detector_<name>.json); transfer's inits own theirs.
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in ("teacher", "pretrain"):
                raise ValueError(f"detector name {name!r}: use letters, digits, '_', '-', '.' and not "
                                 "teacher or pretrain (transfer.init's detectors)")
        return value


# One RPN per purpose, as the reference runs them: pretraining's proposals (an RPN trained on LVIS' 866
# base categories), the transferred detector's proposals (one trained on the transfer set's base
# classes: an RPN that has seen boxes of the novel classes inflates their AP), zero-shot inference.
RPN_PURPOSES = ("proposals", "transfer", "zero_shot")


class RunManifest(Section):
    name: str = Field(..., min_length=1)
    output_dir: str
    seed: int = Field(0, ge=0, le=MAX_SEED)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig)
    teacher: ModelRef = Field(default_factory=ModelRef)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    train_teacher: TrainTeacherConfig = Field(default_factory=TrainTeacherConfig)
    train_rpn: TrainRpnConfig = Field(default_factory=TrainRpnConfig)
    proposals: RpnInferenceConfig = Field(default_factory=RpnInferenceConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    # Where the manifest file lives; relative paths inside it are resolved against this folder.
    source_path: Optional[str] = Field(None, exclude=True)

    def resolve(self, path: Optional[str]) -> Optional[Path]:
        """A path from the manifest, relative to the manifest's folder (or absolute), or None."""
        if path is None:
            return None
        p = Path(os.path.expanduser(path))
        if not p.is_absolute() and self.source_path:
            p = Path(os.path.normpath(Path(self.source_path).parent / p))
        return p

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output_dir)

    def rpn_checkpoint(self, purpose: str) -> Optional[str]:
        """The RPN checkpoint setting of one purpose (see RPN_PURPOSES), as written in the manifest:
        its own setting when set, else proposals.checkpoint; None means train-rpn's output."""
        own = {"proposals": self.proposals.checkpoint, "transfer": self.transfer.rpn_checkpoint,
               "zero_shot": self.evaluate.zero_shot_rpn_checkpoint}
        if purpose not in own:
            raise ValueError(f"unknown RPN purpose {purpose!r}; one of {', '.join(RPN_PURPOSES)}")
        return own[purpose] or self.proposals.checkpoint

    def section_dict(self, name: str) -> dict:
        """Every setting of one section as plain data (a fingerprint takes `fingerprinted_settings`)."""
        return getattr(self, name).model_dump(mode="json")


# Settings that were renamed: the error says what to write instead.
RENAMED = {"pretrain.amp": "pretrain.precision (fp32, bf16 or auto; amp: true was bf16 on CUDA = auto)"}


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid run manifest"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden" and field in RENAMED:
            lines.append(f"  {field}: renamed; write {RENAMED[field]}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; check its spelling against manifests/demo.yaml "
                         "or the settings in pipeline/config.py")
        elif e["type"] == "missing":
            lines.append(f"  {field}: required; add it to the manifest")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {field}: {e['msg']} (got {got if len(got) <= 200 else got[:200] + ' ...'})")
    return "\n".join(lines)


def parse_manifest(data: dict, origin: str = "<manifest>", source_path: Optional[str] = None) -> RunManifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: a run manifest is a YAML mapping, got {type(data).__name__}")
    try:
        manifest = RunManifest(**data)
    except ValidationError as err:
        raise ManifestError(_format_errors(err, origin)) from None
    manifest.source_path = source_path
    return manifest


def load_manifest(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> RunManifest:
    """Read and validate a YAML run manifest. `overrides` are `section.key=value` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    data = plain_yaml(text, str(path)) or {}
    for item in overrides or []:
        apply_override(data, item)
    return parse_manifest(data, str(path), source_path=str(path.resolve()))


def plain_yaml(text: str, origin: str):
    """YAML text as plain data: safe_load (a manifest can never construct Python objects; !!python/object
    tags are refused), and a key written twice in one mapping is refused naming it (YAML itself keeps
    the last one silently, so a section written twice would lose the first)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = _expanded_values(node, {})
        if values == float("inf"):
            raise ManifestError("a value holds itself through an alias (*name); write it out")
        if values > MAX_YAML_VALUES:
            raise ManifestError(f"holds {values} values once its aliases (*name) are expanded; a run manifest "
                                f"holds far fewer (at most {MAX_YAML_VALUES})")
        _refuse_duplicate_keys(node, "", set())
        return yaml.safe_load(text)
    except ManifestError as err:
        raise ManifestError(f"{origin}: {err}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise ManifestError(f"{origin}: not valid YAML (only plain YAML is accepted, no object tags): "
                            f"{err}") from None


# The most values a manifest may expand to through YAML aliases (a few `&defaults` are fine; aliases of
# aliases grow exponentially, the "billion laughs", and validating them would never end).
MAX_YAML_VALUES = 100_000


def _expanded_values(node, memo: dict) -> float:
    """How many values `node` holds with every alias expanded, counting each node once (memo by id); an
    alias to a node that holds it counts as infinitely many."""
    if id(node) in memo:
        return memo[id(node)] if memo[id(node)] is not None else float("inf")
    memo[id(node)] = None
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    memo[id(node)] = 1 + sum(_expanded_values(child, memo) for child in children)
    return memo[id(node)]


def _refuse_duplicate_keys(node, path: str, seen_nodes: set) -> None:
    """ManifestError naming the first key written twice in a mapping of the composed YAML `node`. A node
    reached again through an alias is not walked again (aliases of aliases would take exponential time)."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                _refuse_duplicate_keys(value, path, seen_nodes)
                continue
            name = f"{path}.{key.value}" if path else key.value
            if key.value in seen:
                raise ManifestError(f"{name} is written twice (lines {seen[key.value]} and {key.start_mark.line + 1}); "
                                    "YAML would keep only the last: write it once (one section, each key once)")
            seen[key.value] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, name, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", seen_nodes)


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` inside nested dict `data` (the value is parsed as YAML)."""
    if "=" not in item:
        raise ManifestError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    value = plain_yaml(raw, f"override {item!r}")
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ManifestError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value
