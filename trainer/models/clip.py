"""CLIP models: an open_clip architecture (or a model config JSON of ours) plus weights from a local file.

Nothing here downloads. Weights come from a file the user put on disk, in one of these formats:
  - OpenAI's release (a TorchScript archive such as RN50.pt, or its state dict saved with torch.save),
  - a plain state dict with open_clip's key names,
  - an open_clip training checkpoint ({"state_dict": ..., "epoch": ...}, keys maybe prefixed `module.`),
  - open_clip's safetensors release (`open_clip_model.safetensors`, a file ending in .safetensors), or
    what `regionclip convert-teacher` makes of a TorchScript archive,
  - a pretrained RegionCLIP region encoder (regionclip_pretrained-cc_rn50.pth, detectron2's
    {"model": ...}; its keys are mapped by trainer/models/reference_weights.py).
For ResNet CLIPs open_clip's `CLIP` class uses OpenAI's key names, so converting is prefix stripping.
torch.save files are read with `torch.load(weights_only=True)`: a file that pickles Python objects is
refused, never executed (safetensors holds tensors only). A TorchScript archive is a program (loading
it runs its code), so it is read only when the caller says the file is trusted (`trust_torchscript`,
the manifest's `teacher.trust_torchscript`); `convert_torchscript` turns a trusted one, once, into
safetensors. The files are read by trainer/models/checkpoint.py, the checkpoint layer every model shares.

    model, tokenizer = load_clip("RN50", "weights/RN50.pt")
    model, tokenizer = create_clip("RN50-tiny")          # random weights, for tests and the demo

QuickGELU: OpenAI's CLIPs use it in the text transformer; open_clip's plain names (RN50) do not.
load_clip switches it on for OpenAI files it recognises (TorchScript, float16 or metadata keys) and
for our checkpoints that recorded it; for OpenAI weights re-saved as a float32 state dict, name the
architecture "RN50-quickgelu" (open_clip's config) so the text embeddings come out right.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
from torch import nn

from pipeline.io import atomic_path
from trainer.models.checkpoint import (SAFETENSORS_SOURCE_KEY, CheckpointError, CheckpointNotFoundError,
                                       LoadReport, PathLike, TorchScriptRefusedError, is_torchscript_archive,
                                       load_checkpoint_file, load_fitting, read_safetensors,
                                       read_torchscript_state_dict, reference_state_dict, without_module_prefix)
from trainer.models.reference_weights import REFERENCE_FORMAT, load_region_encoder_weights

# Our own model configs (tiny ResNet CLIPs for tests and the CPU demo). Registered with open_clip so
# that `open_clip.create_model("RN50-tiny", pretrained=path)` works too, with no code of ours.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# Keys in OpenAI's files that are hyperparameters, not weights (open_clip drops them the same way).
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


class EmbeddingDimError(ValueError):
    """Embeddings made by one model used with another of a different width."""


# -- architectures ---------------------------------------------------------------------------------

def our_model_configs() -> list[str]:
    """The names of the model configs shipped in trainer/models/model_configs."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def resolve_arch(arch: str) -> str:
    """The open_clip model name for `arch`: a registered name, or a path to a model config JSON.

    A JSON file is registered with open_clip under its file stem; a stem that names a different
    built-in config is refused rather than silently replacing it.
    """
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ValueError(f"model config {arch!r}: no such file")
        config = json.loads(path.read_text(encoding="utf-8"))
        if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"model config {arch}: not an open_clip model config "
                             "(needs embed_dim, vision_cfg and text_cfg)")
        name = path.stem
        known = open_clip.get_model_config(name)
        if known is not None and known != config:
            raise ValueError(f"model config {arch}: its name {name!r} is taken by another config; "
                             "rename the file")
        open_clip.add_model_config(path)
        return name
    if arch in open_clip.list_models():
        return arch
    resnets = [m for m in open_clip.list_models() if m.startswith("RN")]
    raise ValueError(f"unknown CLIP architecture {arch!r}; use an open_clip name ({', '.join(resnets)}) "
                     f"or a model config JSON (ours: {', '.join(our_model_configs())})")


@contextmanager
def _no_random_init_warning():
    # open_clip warns "No pretrained weights loaded ... initialized randomly" on pretrained=None;
    # load_clip loads weights right after, so the warning would only mislead.
    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def create_clip(arch: str, quick_gelu: bool = False, device: Union[str, torch.device] = "cpu"):
    """A randomly initialised open_clip model and its tokenizer.

    `quick_gelu`: OpenAI trained its CLIPs with QuickGELU in the text transformer; open_clip's plain
    names (RN50) use nn.GELU. Weights from OpenAI need it (load_clip switches it on for them).
    """
    name = resolve_arch(arch)
    with _no_random_init_warning():
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, device=device)
    # Remembered so that save_clip_checkpoint can write the architecture name beside the weights.
    model.regionclip_arch = arch
    return model, open_clip.get_tokenizer(name)


# -- reading checkpoint files -----------------------------------------------------------------------

def _missing_checkpoint_message(path: Path, arch: str) -> str:
    try:
        url = open_clip.pretrained.get_pretrained_url(arch, "openai")  # a table lookup, no download
    except Exception:  # noqa: BLE001 - only a hint
        url = ""
    where = f" (OpenAI's file: {url})" if url else ""
    return (f"{path}: no such checkpoint file. CLIP weights are never downloaded at run time: download "
            f"OpenAI's {arch} weights{where} to this path, or let the train-teacher stage train a teacher "
            "on your shards (train_teacher.enabled: true, teacher.checkpoint: null).")


def _torchscript_refusal(path: Path) -> str:
    return (f"{path}: refused: a TorchScript archive (OpenAI's release format), and loading one runs code "
            "from the file. Convert it once into weights that load safely from then on: "
            f"`regionclip convert-teacher MANIFEST --checkpoint {path} --set teacher.trust_torchscript=true` "
            f"writes {path.with_suffix('.safetensors').name} beside it; then use that file instead (e.g. as "
            "teacher.checkpoint). "
            "Or, for a file you trust, set teacher.trust_torchscript: true in the manifest to load it as it is.")


def read_clip_state_dict(path: PathLike, trust_torchscript: bool = False) -> tuple[dict[str, torch.Tensor], str, dict]:
    """The tensors of a checkpoint file, its format ('openai-torchscript', 'openai-state-dict',
    'open_clip-checkpoint', 'open_clip-safetensors', 'state-dict' or reference_weights'
    REFERENCE_FORMAT) and the checkpoint's other entries (name, epoch, ...). Keys come back without
    `module.` prefixes; a RegionCLIP file's keys come back as the reference names them. A TorchScript
    archive is refused (TorchScriptRefusedError) unless `trust_torchscript`."""
    path = Path(path).expanduser()
    info: dict = {}
    if is_torchscript_archive(path):
        if not trust_torchscript:
            raise TorchScriptRefusedError(_torchscript_refusal(path))
        state_dict, fmt = read_torchscript_state_dict(path), "openai-torchscript"
    elif path.suffix == ".safetensors":
        state_dict, metadata = read_safetensors(path)
        # convert_torchscript records where the tensors came from: OpenAI's weights need QuickGELU.
        fmt = "openai-state-dict" if metadata.get(SAFETENSORS_SOURCE_KEY, "").startswith("openai") \
            else "open_clip-safetensors"
    else:
        obj = load_checkpoint_file(path)
        reference = reference_state_dict(obj)
        if reference is not None:   # detectron2's {"model": ...}: renamed by the region encoder's key map
            return reference, REFERENCE_FORMAT, {k: v for k, v in obj.items() if k == "iteration"}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            state_dict, fmt = dict(obj["state_dict"]), "open_clip-checkpoint"
            info = {k: v for k, v in obj.items() if k != "state_dict"}
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state_dict, fmt = dict(obj), "state-dict"
        else:
            top = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: no weights found: expected a state dict or a dict with "
                                  f"'state_dict' (or a detectron2 file with 'model'), got {top}")
    state_dict = without_module_prefix(state_dict)    # open_clip's trainer saves DDP's prefixes
    # OpenAI's files carry hyperparameters as tensors and keep most weights in float16.
    conv1 = state_dict.get("visual.conv1.weight")
    if any(k in state_dict for k in _OPENAI_META_KEYS) or (conv1 is not None and conv1.dtype == torch.float16):
        if fmt in ("state-dict", "open_clip-safetensors"):
            fmt = "openai-state-dict"
    for key in _OPENAI_META_KEYS:
        state_dict.pop(key, None)
    return state_dict, fmt, info


# -- loading weights into a model --------------------------------------------------------------------

def load_clip_state_dict(model: nn.Module, state_dict: dict, *, allow_partial: bool = False,
                         source: str = "<state dict>", fmt: str = "state-dict", arch: str = "") -> LoadReport:
    """Load `state_dict` into an open_clip model, refusing anything but an exact fit unless allow_partial.

    With allow_partial the tensors that fit are loaded, the rest of the model keeps its current
    values, and a warning lists what was skipped.
    """
    arch = arch or getattr(model, "regionclip_arch", type(model).__name__)
    # The same massaging as open_clip's load_checkpoint: text tower keys for CustomTextCLIP, and
    # logit_scale stored as a scalar or a 1-element tensor.
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = open_clip.model.convert_to_custom_text_state_dict(state_dict)
    model_state = model.state_dict()
    # TorchScript archives also hold the model's non-persistent buffers (open_clip's attn_mask);
    # they are rebuilt by the model, not weights.
    persistent = set(model_state)
    state_dict = {k: v for k, v in state_dict.items()
                  if k in persistent or k not in dict(model.named_buffers())}
    if "logit_scale" in state_dict and "logit_scale" in model_state:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model_state["logit_scale"].shape)

    report = LoadReport(source=str(source), format=fmt)
    advice = ("Check that the architecture (e.g. teacher.arch) is the one these weights were trained with. "
              "To load only the tensors that fit and keep the rest random, set allow_partial: true.")
    # BatchNorm's step counter is bookkeeping: absent from frozen-BN files and filled in by torch.
    # load_state_dict's copy_ casts OpenAI's float16 to the model's dtype.
    return load_fitting(model, state_dict, report, arch, advice, allow_partial,
                        optional=lambda k: k.endswith("num_batches_tracked"))


def load_clip(arch: str, checkpoint: PathLike, allow_partial: bool = False,
              device: Union[str, torch.device] = "cpu", quick_gelu: Optional[bool] = None,
              trust_torchscript: bool = False):
    """An open_clip model `arch` with weights from the local file `checkpoint`, in eval mode, and its
    tokenizer. `quick_gelu=None`: QuickGELU for OpenAI files (how OpenAI trained them), RegionCLIP's
    files (OpenAI's text encoder) and our checkpoints that recorded it; nn.GELU otherwise. A TorchScript
    archive loads only with `trust_torchscript` (the manifest's teacher.trust_torchscript)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(_missing_checkpoint_message(path, arch))
    state_dict, fmt, info = read_clip_state_dict(path, trust_torchscript=trust_torchscript)
    if quick_gelu is None:   # RegionCLIP keeps OpenAI's text encoder (QuickGELU) frozen
        quick_gelu = fmt.startswith("openai") or fmt == REFERENCE_FORMAT or bool(info.get("quick_gelu", False))
    model, tokenizer = create_clip(arch, quick_gelu=quick_gelu)
    try:
        if fmt == REFERENCE_FORMAT:
            report = load_region_encoder_weights(model, state_dict, source=str(path), arch=arch,
                                                 allow_partial=allow_partial)
        else:
            report = load_clip_state_dict(model, state_dict, allow_partial=allow_partial, source=str(path),
                                          fmt=fmt, arch=arch)
    except CheckpointError as err:
        saved_as = info.get("name")
        if isinstance(saved_as, str) and saved_as != arch:
            raise CheckpointError(f"{err}\nThe checkpoint says it was saved from {saved_as!r}.") from None
        raise
    model.regionclip_load_report = report
    return model.to(device).eval(), tokenizer


# -- writing checkpoints -------------------------------------------------------------------------------

def save_clip_checkpoint(model: nn.Module, path: PathLike, arch: Optional[str] = None, **extra) -> Path:
    """Write `{"state_dict": ..., "name": arch, **extra}` atomically (a temporary file, then a rename).

    The file loads with load_clip and with `open_clip.create_model(arch, pretrained=path)` unchanged.
    `extra` values must be plain data or tensors: the file is read back with weights_only=True.
    """
    model = getattr(model, "module", model)  # DDP / DataParallel
    arch = arch or getattr(model, "regionclip_arch", None)
    if arch is None:
        raise ValueError("save_clip_checkpoint: pass arch= (the model was not made by create_clip)")
    if "state_dict" in extra or "name" in extra:
        raise ValueError("save_clip_checkpoint: 'state_dict' and 'name' are written by the function")
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # open_clip's plain names (RN50) mean nn.GELU; a model loaded from OpenAI weights runs QuickGELU.
    # Recorded so that load_clip rebuilds the same text tower (open_clip itself ignores the entry).
    extra.setdefault("quick_gelu", uses_quick_gelu(model))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a temporary file, fsync, then rename
        torch.save({"state_dict": state_dict, "name": arch, **extra}, tmp)
    return path


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the model's text transformer uses OpenAI's QuickGELU activation."""
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


# -- embedding widths ------------------------------------------------------------------------------------

def embedding_dim(model: nn.Module) -> int:
    """The width of the joint image-text embedding space of a CLIP model or a region encoder."""
    model = getattr(model, "module", model)
    for candidate in (model, getattr(model, "visual", None)):
        dim = getattr(candidate, "output_dim", None)
        if isinstance(dim, int):
            return dim
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return projection.shape[1]
    if isinstance(projection, nn.Linear):
        return projection.out_features
    raise TypeError(f"cannot tell the embedding width of {type(model).__name__}")


def check_embedding_dim(expected: int, got: int, what: str, model_name: str = "",
                        hint: str = "rerun the embed stage with the same teacher (teacher.arch and "
                                    "teacher.checkpoint)") -> None:
    """Raise EmbeddingDimError when `what` (e.g. "concept embeddings", of width `got`) does not match
    the model's width `expected` -- the silent mistake behind near-zero scores."""
    if int(expected) != int(got):
        model = f"the model {model_name}" if model_name else "the model"
        raise EmbeddingDimError(f"{what} have dim {int(got)} but {model} outputs {int(expected)}; {hint}")
