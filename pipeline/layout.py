"""The run directory: the one place that knows file names. Every other module asks here.

<output_dir>/
  run.lock     held by the run using the folder (run.lock.json names it while it runs)
  synth/       the synthetic world (when corpus.format is synthetic) and its stage manifest
  shards/      00000.tar  00000.parquet  00000_stats.json ...  sizes.json  manifest.json
  concepts/    concepts.parquet  concept_embeddings.npy  concepts.faiss  captions/00000.parquet  manifest.json
  proposals/   00000.parquet  00000_stats.json ...  manifest.json
  labels/      00000.parquet  00000_stats.json ...  (codec files)  manifest.json
  checkpoints/ teacher/ rpn/ pretrain/ transfer/
  eval/        metrics json, COCO-format detections, pictures
  search/      region indexes (index/) and search results (`regionclip search`)
  report.html  the run's page (`regionclip report`)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SHARD_ID_DIGITS = 5


class UnsafeName(ValueError):
    """A file name read from a run folder (a shard marker, a stage manifest, codec.json, sizes.json) that
    leads outside the folder it must stay in."""


def inside(folder: str | os.PathLike, name, *, entry_only: bool = False) -> Path:
    """`folder / name` for a file name read back from a run folder, refused with UnsafeName unless it stays
    inside `folder`: a relative name without `..`, and no symbolic link on the way that leads out.

    Such names come from files anyone who can write the run folder can craft; `regionclip verify
    --repair` renames what they name. `entry_only`: the last component may itself be a link (renaming a
    directory entry never touches what a link points at)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UnsafeName(f"{folder}: {name!r} is not a file name")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise UnsafeName(f"{folder}: {name!r} leads outside the folder")
    path = Path(folder) / relative
    root = os.path.realpath(folder)
    real = os.path.realpath(path.parent if entry_only else path)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise UnsafeName(f"{folder}: {name!r} leads outside the folder (through a link to {real})")
    return path


class LinkedFolder(ValueError):
    """A folder inside a run folder that is a symbolic link: a stage would write through it, and the
    cleanup of temporaries would delete files wherever it leads."""


def linked_folders(root: str | os.PathLike) -> list[Path]:
    """Every symbolic link to a folder inside `root`, at any depth (never followed while looking)."""
    found = []
    for parent, dirnames, _ in os.walk(root):          # followlinks=False: a linked folder is listed, not entered
        found += [Path(parent) / name for name in dirnames if os.path.islink(os.path.join(parent, name))]
    return sorted(found)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_ID_DIGITS}d}"


def sample_key(shard_id: int, index: int, index_digits: int = 4) -> str:
    """img2dataset's key convention: shard id and index inside the shard, zero-padded."""
    return f"{shard_name(shard_id)}{index:0{index_digits}d}"


@dataclass(frozen=True)
class StageDir:
    """A stage's output folder with per-shard files `<shard><suffix>` and a stage manifest."""
    root: Path
    manifest_name: str = "manifest.json"

    def shard_file(self, shard_id: int, suffix: str) -> Path:
        return self.root / f"{shard_name(shard_id)}{suffix}"

    def stats(self, shard_id: int) -> Path:
        """Per-shard completion marker: written last, so its presence means the shard is done."""
        return self.shard_file(shard_id, "_stats.json")

    def parquet(self, shard_id: int) -> Path:
        return self.shard_file(shard_id, ".parquet")

    @property
    def manifest(self) -> Path:
        return self.root / self.manifest_name


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, manifest) -> "RunLayout":
        return cls(Path(manifest.output_path))

    def refuse_links(self, *folders: Path) -> None:
        """LinkedFolder unless every folder inside the run folder is a real one: no link to a folder at any
        depth, and none of `folders` (those about to be written), nor a folder on the way to one, is a link
        (leading anywhere or nowhere). The run folder itself may be a link: output_dir is the user's choice."""
        links = linked_folders(self.root) if self.root.is_dir() else []
        for folder in folders:
            relative = Path(folder).relative_to(self.root)
            links += [self.root.joinpath(*relative.parts[:i]) for i in range(1, len(relative.parts) + 1)
                      if os.path.islink(self.root.joinpath(*relative.parts[:i]))]
        if links:
            shown = ", ".join(f"{link} -> {os.readlink(link)}" for link in sorted(set(links))[:5])
            raise LinkedFolder(f"{self.root}: a folder of the run folder is a symbolic link ({shown}); a run "
                               "writes and removes files only in real folders inside it, never through a link. "
                               "Remove the link (to keep a run on another disk, point output_dir there)")

    # -- the run lock ----------------------------------------------------------------------------
    @property
    def run_lock(self) -> Path:
        return self.root / "run.lock"

    @property
    def run_lock_holder(self) -> Path:
        """Who holds run.lock (pid, command, start time); present only while a run holds it."""
        return self.root / "run.lock.json"

    # -- synthetic world ---------------------------------------------------------------------
    @property
    def synth(self) -> Path:
        """The synthetic world's default folder (corpus.path puts it elsewhere: `synthetic_world`)."""
        return self.root / "synth"

    # -- stage folders -------------------------------------------------------------------------
    def stage(self, name: str) -> StageDir:
        """The folder (and stage manifest) of a stage. `embed` shares concepts/ with its own manifest."""
        if name == "embed":
            return StageDir(self.root / "concepts", "embed_manifest.json")
        folder = {"shard": "shards", "label": "labels", "train-teacher": "checkpoints/teacher",
                  "train-rpn": "checkpoints/rpn", "pretrain": "checkpoints/pretrain",
                  "transfer": "checkpoints/transfer", "evaluate": "eval"}.get(name, name)
        return StageDir(self.root / folder)

    @property
    def shards(self) -> StageDir:
        return StageDir(self.root / "shards")

    def shard_tar(self, shard_id: int) -> Path:
        return self.shards.shard_file(shard_id, ".tar")

    @property
    def sizes_json(self) -> Path:
        return self.shards.root / "sizes.json"

    @property
    def concepts(self) -> StageDir:
        return StageDir(self.root / "concepts")

    @property
    def concepts_parquet(self) -> Path:
        return self.concepts.root / "concepts.parquet"

    @property
    def concept_embeddings(self) -> Path:
        return self.concepts.root / "concept_embeddings.npy"

    @property
    def concepts_faiss(self) -> Path:
        return self.concepts.root / "concepts.faiss"

    @property
    def caption_concepts(self) -> StageDir:
        """Per-shard caption sidecars: concept ids of each caption (concepts), caption embedding (embed)."""
        return StageDir(self.concepts.root / "captions")

    @property
    def caption_embeddings(self) -> StageDir:
        return StageDir(self.concepts.root / "caption_embeddings")

    @property
    def proposals(self) -> StageDir:
        return StageDir(self.root / "proposals")

    @property
    def labels(self) -> StageDir:
        return StageDir(self.root / "labels")

    # -- checkpoints and evaluation ------------------------------------------------------------
    def checkpoints(self, kind: str) -> Path:
        if kind not in ("teacher", "rpn", "pretrain", "transfer"):
            raise ValueError(f"unknown checkpoint kind {kind!r}")
        return self.root / "checkpoints" / kind

    @property
    def teacher_checkpoint(self) -> Path:
        """train-teacher's output: an open_clip checkpoint (load_clip / open_clip.create_model)."""
        return self.checkpoints("teacher") / "teacher.pt"

    @property
    def teacher_state(self) -> Path:
        """train-teacher's full training state (model, optimizer, schedule, RNG, data position) for resuming."""
        return self.checkpoints("teacher") / "last.pt"

    @property
    def rpn_checkpoint(self) -> Path:
        """train-rpn's output: the class-agnostic RPN (trainer/models/rpn.py's load_rpn)."""
        return self.checkpoints("rpn") / "rpn.pt"

    @property
    def rpn_state(self) -> Path:
        """train-rpn's full training state for resuming."""
        return self.checkpoints("rpn") / "last.pt"

    @property
    def pretrain_state(self) -> Path:
        """pretrain's full trainer state (model, optimizer, schedule, RNG, data position) for resuming."""
        return self.checkpoints("pretrain") / "last.pt"

    @property
    def student_checkpoint(self) -> Path:
        """pretrain's exported student: an open_clip checkpoint like the teacher's."""
        return self.checkpoints("pretrain") / "student.pt"

    def transfer_checkpoint(self, init: str) -> Path:
        """transfer's detector, per initialisation (`pretrain` or `teacher`)."""
        return self.checkpoints("transfer") / f"detector_{init}.pt"

    def transfer_state(self, init: str) -> Path:
        """transfer's full training state per initialisation, for resuming."""
        return self.checkpoints("transfer") / f"last_{init}.pt"

    @property
    def transfer_train_proposals(self) -> Path:
        """transfer's RPN proposals for its training images (kept while current: a restart reuses them)."""
        return self.checkpoints("transfer") / "train_proposals.parquet"

    @property
    def labels_codec(self) -> Path:
        """The label stage's codec description (and files named beside it, e.g. a PQ codebook)."""
        return self.labels.root / "codec.json"

    def labels_codec_file(self, suffix: str) -> Path:
        """A codec's own file beside codec.json: `codec_<suffix>` (e.g. suffix "pq.faiss")."""
        return self.labels.root / f"codec_{suffix}"

    @property
    def labels_region_index(self) -> Path:
        """The optional FAISS index over the teacher's region embeddings (label.region_index)."""
        return self.labels.root / "regions.faiss"

    @property
    def labels_region_ids(self) -> Path:
        """Row i of regions.faiss is region `region` of sample `key`."""
        return self.labels.root / "regions.parquet"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def show_png(self, key: str) -> Path:
        """`regionclip show`'s picture of one sample's proposals and pseudo-labels."""
        return self.eval / "show" / f"{key}.png"

    def eval_metrics(self, name: str) -> Path:
        """evaluate's metrics of one model, e.g. `detector_pretrain`, `zeroshot_teacher`."""
        return self.eval / f"metrics_{name}.json"

    def eval_detections(self, name: str) -> Path:
        """evaluate's COCO-format detections (results list) of one model / mode."""
        return self.eval / f"detections_{name}.json"

    def eval_picture(self, name: str) -> Path:
        """evaluate's picture of one model's detections on a few val images."""
        return self.eval / f"detections_{name}.png"

    @property
    def eval_detections_picture(self) -> Path:
        """evaluate's side-by-side picture: val images (rows) x ground truth and each model (columns)."""
        return self.eval / "detections.png"

    def detect_output(self, stem: str, suffix: str) -> Path:
        """`regionclip detect`'s default outputs (without --out): eval/detect/<stem><suffix>."""
        return self.eval / "detect" / f"{stem}{suffix}"

    @property
    def summary_json(self) -> Path:
        return self.eval / "summary.json"

    # -- region search and the run report ----------------------------------------------------------
    @property
    def search(self) -> Path:
        """`regionclip search`'s folder: its region indexes (index/) and each search's contact sheet."""
        return self.root / "search"

    def search_index(self, which: str) -> Path:
        """The region index `search` builds over one model's region embeddings (`student`, `teacher`)."""
        return self.search / "index" / f"{which}.faiss"

    def search_index_ids(self, which: str) -> Path:
        """Row i of search_index(which) is region `region` of sample `key`."""
        return self.search / "index" / f"{which}.parquet"

    def search_index_identity(self, which: str) -> Path:
        """What search_index(which) was built from (model checksum, proposals, scale): a change rebuilds it."""
        return self.search / "index" / f"{which}.json"

    def search_result(self, name: str, suffix: str) -> Path:
        """One search's outputs: search/<name>.png (the contact sheet), search/<name>.jsonl (the hits)."""
        return self.search / f"{name}{suffix}"

    @property
    def report_html(self) -> Path:
        """`regionclip report`'s page (pictures inline)."""
        return self.root / "report.html"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def synthetic_world(manifest) -> Path:
    """The folder of the synthetic world: corpus.path, or <output_dir>/synth."""
    return Path(manifest.resolve(manifest.corpus.path) or RunLayout.of(manifest).synth)
