"""Reading checkpoint files and fitting their tensors to a model: the layer under every model of
trainer/models. It imports no model, and models import it (as detectron2's checkpoint package
imports no modeling code).

    obj = load_checkpoint_file(path)            # torch.load(weights_only=True): tensors and plain data only
    state, metadata = read_safetensors(path)    # tensors and a text header only
    state = read_torchscript_state_dict(path)   # a TorchScript archive runs code: trusted files only
    state = reference_state_dict(obj)           # detectron2's {"model": state dict}, or None
    report = load_fitting(model, state, LoadReport(source=path, format=...), name, advice, allow_partial)

Nothing here downloads or executes a file's code: torch.save files are read with
`torch.load(weights_only=True)`, so a file that pickles Python objects is refused, never executed.
A TorchScript archive is a program (loading it runs its code); callers read one only when the user
said the file is trusted (`is_torchscript_archive` tells it apart first), and `convert_torchscript`
turns a trusted one, once, into safetensors.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from pipeline.io import atomic_path

PathLike = Union[str, os.PathLike]

_MAX_LISTED_KEYS = 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what is wrong and how to fix it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class TorchScriptRefusedError(CheckpointError):
    """A TorchScript archive read without trust_torchscript."""


# What torch.load(weights_only=True) raises for a corrupt, truncated or foreign file (a text file: KeyError,
# a cut-off zip: OSError, a flipped byte: UnicodeDecodeError, a TorchScript archive: RuntimeError):
# load_checkpoint_file makes each a CheckpointError. A MemoryError or KeyboardInterrupt is no property
# of the file and passes through.
UNREADABLE_CHECKPOINT_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)

# What convert_torchscript records in the safetensors header, so that the file reads back as the
# format it came from (OpenAI's weights need QuickGELU).
SAFETENSORS_SOURCE_KEY = "regionclip_source_format"


# -- reading files -------------------------------------------------------------------------------------

def load_checkpoint_file(path: PathLike):
    """What torch.save wrote at `path`, read with torch.load(weights_only=True): tensors and plain data
    only. A file that pickles Python objects, or a corrupt, truncated or foreign one, is a CheckpointError
    saying so; anything else (a MemoryError, a KeyboardInterrupt) passes through."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: the file pickles Python objects, and checkpoints are only read with "
            f"torch.load(weights_only=True) ({first_line}). Re-save it as plain tensors and plain data, "
            "e.g. torch.save({'state_dict': model.state_dict()}, path).") from None
    except UNREADABLE_CHECKPOINT_ERRORS as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") \
            from None


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its header's metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return state_dict, metadata


def is_torchscript_archive(path: PathLike) -> bool:
    """Whether `path` is laid out as a TorchScript archive (told from the zip's names, nothing loaded)."""
    # A TorchScript archive is a zip with the module's code; torch.save's zips have no code/ folder.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.startswith("code/") or n.endswith("/constants.pkl")
                   for n in archive.namelist())


def read_torchscript_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive. torch.jit.load unpickles the archive's constants and
    compiles its code, so this is for trusted files only (callers check trust_torchscript)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are not
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def convert_torchscript(source: PathLike, dest: PathLike) -> Path:
    """Write the tensors of the trusted TorchScript archive `source` to the safetensors file `dest`
    (atomically), unchanged: same keys, dtypes and values. The result loads with load_clip without
    running anything: safetensors holds tensors and a text header only."""
    from safetensors.torch import save_file

    source, dest = Path(source).expanduser(), Path(dest)
    if not is_torchscript_archive(source):
        raise CheckpointError(f"{source}: not a TorchScript archive; it needs no conversion (it loads with "
                              "torch.load(weights_only=True) as it is)")
    if dest.suffix != ".safetensors":
        raise ValueError(f"{dest}: the converted file is safetensors; name it *.safetensors")
    # clone: safetensors refuses tensors that share storage, and the archive's may.
    tensors = {k: v.detach().clone().contiguous() for k, v in read_torchscript_state_dict(source).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:  # a temporary file, fsync, then rename
        save_file(tensors, str(tmp), metadata={"format": "pt", SAFETENSORS_SOURCE_KEY: "openai-torchscript"})
    return dest


# -- what a file holds -----------------------------------------------------------------------------------

def reference_state_dict(obj) -> Optional[dict[str, torch.Tensor]]:
    """The state dict of a detectron2 checkpoint (`{"model": {name: tensor}, ...}`, as RegionCLIP
    releases its weights) already read with load_checkpoint_file, or None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or "state_dict" in obj:
        return None
    state = obj["model"]
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return dict(state)


def without_module_prefix(state_dict: dict) -> dict:
    """The state dict with DDP's `module.` prefixes removed (training scripts save models wrapped)."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


# -- fitting tensors to a model ----------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What a checkpoint held compared with the model it was loaded into."""
    source: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, file shape, model shape

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, arch: str) -> str:
        def listing(title, items):
            shown = ", ".join(items[:_MAX_LISTED_KEYS]) + (", ..." if len(items) > _MAX_LISTED_KEYS else "")
            return [f"  {title} ({len(items)}): {shown}"] if items else []
        lines = [f"{self.source}: the checkpoint ({self.format}) does not fit the architecture {arch}: "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} with other shapes"]
        lines += listing("missing from the checkpoint", self.missing)
        lines += listing("unexpected in the checkpoint", self.unexpected)
        lines += listing("other shape (file vs model)",
                         [f"{k} {list(a)} vs {list(b)}" for k, a, b in self.mismatched])
        return "\n".join(lines)


def load_fitting(model: nn.Module, state_dict: dict, report: LoadReport, name: str, advice: str,
                 allow_partial: bool, optional=lambda key: False) -> LoadReport:
    """Load `state_dict` into `model` when every key and shape fits; otherwise a CheckpointError listing
    the missing, unexpected and reshaped keys (with `advice`), or, with allow_partial, a warning and
    only the tensors that fit. Keys of the model for which `optional(key)` holds may be absent."""
    model_state = model.state_dict()
    report.missing = [k for k in model_state if k not in state_dict and not optional(k)]
    report.unexpected = [k for k in state_dict if k not in model_state]
    report.mismatched = [(k, tuple(v.shape), tuple(model_state[k].shape)) for k, v in state_dict.items()
                         if k in model_state and v.shape != model_state[k].shape]
    if not report.complete:
        message = report.describe(name)
        if not allow_partial:
            raise CheckpointError(f"{message}\n{advice}")
        warnings.warn("partial load (allow_partial): " + message, stacklevel=3)
    skipped = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in state_dict.items() if k in model_state and k not in skipped},
                          strict=False)
    return report
