"""Text embeddings from the teacher's CLIP text encoder: concepts (81 prompt templates, ensembled),
captions (the end-of-text embedding), class vocabularies (.npz files), and their dimension checks.

Text embedding = the final layer norm's output at the end-of-text token times the text projection,
which is what open_clip's `model.encode_text` returns (docs/method.md §1).

Ensembling over the templates (`embed.ensemble`):
- ``mean_unnormalized``: the reference's: the mean of the 81 unnormalized embeddings;
- ``normalize_mean_normalize``: OpenAI's: normalize each, take the mean.
Either way the stored rows are L2-normalized (the reference normalizes at use time; same vectors).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from pipeline.concepts import clean_name
from pipeline.io import atomic_path, sha256_file
from pipeline.layout import RunLayout

# CLIP's 80 ImageNet prompt templates (the order of OpenAI's notebook) plus the bare "{}." (81).
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
TEMPLATES: tuple[str, ...] = OPENAI_IMAGENET_TEMPLATES + ("{}.",)
ENSEMBLE_MODES = ("mean_unnormalized", "normalize_mean_normalize")

VOCAB_FORMAT = "regionclip-vocab-v1"




# -- the teacher ---------------------------------------------------------------------------------------

def checkpoint_identity(path: Union[str, os.PathLike]) -> dict:
    """Size and sha256 of a weights file (part of the embed stage's fingerprint)."""
    path = Path(path)
    if not path.is_file():
        return {"path": str(path), "missing": True}
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# -- encoding ------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256,
                 device: Union[str, torch.device, None] = None, progress: bool = False,
                 desc: str = "texts") -> torch.Tensor:
    """Unnormalized end-of-text embeddings [N, D] (float32, on CPU) of `texts`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2,
                      dynamic_ncols=True, mininterval=1.0):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        out.append(model.encode_text(tokens).float().cpu())
    if not out:
        return torch.zeros(0, embedding_width(model))
    return torch.cat(out)


def embedding_width(model) -> int:
    from trainer.models.clip import embedding_dim

    return embedding_dim(model)


def prompts_for(name: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    name = clean_name(name)
    return [t.format(name) for t in templates]


def ensemble(embeddings: torch.Tensor, mode: str) -> torch.Tensor:
    """[N, T, D] per-template embeddings -> [N, D] L2-normalized class embeddings."""
    if mode == "mean_unnormalized":
        mean = embeddings.mean(dim=1)
    elif mode == "normalize_mean_normalize":
        mean = torch.nn.functional.normalize(embeddings, dim=-1).mean(dim=1)
    else:
        raise ValueError(f"unknown ensemble mode {mode!r}; use one of {', '.join(ENSEMBLE_MODES)}")
    return torch.nn.functional.normalize(mean, dim=-1)


def embed_names(model, tokenizer, names: Sequence[str], mode: str = "mean_unnormalized",
                templates: Sequence[str] = TEMPLATES, batch_size: int = 256,
                device: Union[str, torch.device, None] = None, progress: bool = True) -> np.ndarray:
    """float32 [len(names), D], L2-normalized: each name through every template, ensembled."""
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; use one of {', '.join(ENSEMBLE_MODES)}")
    dim = embedding_width(model)
    if not names:
        return np.zeros((0, dim), np.float32)
    # Whole names per batch, so that a batch holds about `batch_size` prompts.
    per_batch = max(1, batch_size // len(templates))
    rows = []
    starts = range(0, len(names), per_batch)
    for start in tqdm(starts, desc="concepts", unit="batch", disable=not progress or len(starts) < 2,
                      dynamic_ncols=True, mininterval=1.0):
        chunk = names[start:start + per_batch]
        prompts = [p for n in chunk for p in prompts_for(n, templates)]
        emb = encode_texts(model, tokenizer, prompts, batch_size=len(prompts), device=device)
        rows.append(ensemble(emb.view(len(chunk), len(templates), -1), mode))
    return torch.cat(rows).numpy().astype(np.float32)


def embed_captions(model, tokenizer, captions: Sequence[str], batch_size: int = 256,
                   device: Union[str, torch.device, None] = None, progress: bool = False) -> np.ndarray:
    """float16 [N, D], L2-normalized end-of-text embeddings of the captions (truncated to the text
    encoder's context length by the tokenizer)."""
    emb = encode_texts(model, tokenizer, list(captions), batch_size, device, progress, desc="captions")
    return torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float16)


# -- FAISS ----------------------------------------------------------------------------------------------

def build_faiss_index(embeddings: np.ndarray):
    """An exact inner-product index (cosine on normalized rows); id = row = concept_id."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def write_faiss_index(index, path: Union[str, os.PathLike]) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def write_npy(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# -- dimension checks for consumers ---------------------------------------------------------------------

def _check_dim(expected_dim: Optional[int], got: int, what: str, model_name: str, fix: str) -> None:
    if expected_dim is None:
        return
    from trainer.models.clip import check_embedding_dim

    check_embedding_dim(expected_dim, got, what, model_name, hint=fix)


def load_concept_embeddings(layout: RunLayout, expected_dim: Optional[int] = None,
                            model_name: str = "") -> np.ndarray:
    """The embed stage's float32 [num_concepts, D] matrix, checked against the model's width."""
    path = layout.concept_embeddings
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no concept embeddings; the embed stage writes them")
    emb = np.load(path, allow_pickle=False)
    bad = int((~np.isfinite(emb)).any(axis=1).sum()) if emb.ndim == 2 else -1
    if emb.ndim != 2 or bad:
        raise ValueError(f"{path}: {bad} of {len(emb)} concept embeddings hold NaN or inf (or the array is "
                         f"not [num_concepts, D]); rerun the embed stage")
    _check_dim(expected_dim, emb.shape[1], f"the concept embeddings in {path}", model_name,
               "rerun the embed stage with the teacher whose width the model has "
               "(teacher.arch and teacher.checkpoint)")
    return emb


# -- class vocabularies (.npz) -------------------------------------------------------------------------

def save_vocabulary(path: Union[str, os.PathLike], names: Sequence[str], embeddings: np.ndarray,
                    arch: str, ensemble_mode: str, category_ids: Optional[Sequence[int]] = None,
                    checkpoint_sha256: str = "") -> Path:
    """Write names + float32 L2-normalized embeddings [C, D] with the model's arch and dim."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: a vocabulary file ends in .npz")
    embeddings = np.asarray(embeddings, np.float32)
    payload = dict(names=np.array(list(names), dtype=np.str_), embeddings=embeddings,
                   arch=np.array(arch), dim=np.array(embeddings.shape[1], np.int64),
                   ensemble=np.array(ensemble_mode), format=np.array(VOCAB_FORMAT),
                   checkpoint_sha256=np.array(checkpoint_sha256))
    if category_ids is not None:
        payload["category_ids"] = np.asarray(category_ids, np.int64)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
    return path


def load_vocabulary(path: Union[str, os.PathLike], expected_dim: Optional[int] = None,
                    model_name: str = "") -> dict:
    """A vocabulary file from the vocab command: {names: list[str], embeddings: float32 [C, D],
    arch, dim, category_ids (or None)}. Raises EmbeddingDimError (naming both widths and the fix)
    when D differs from `expected_dim`, the width of the model that will use it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such vocabulary file; make one with the vocab command "
                                "(--classes <file|list> --out FILE.npz)")
    with np.load(path, allow_pickle=False) as data:
        if "names" not in data or "embeddings" not in data:
            raise ValueError(f"{path}: not a vocabulary file (needs 'names' and 'embeddings'); make one "
                             "with the vocab command")
        vocab = {"names": [str(n) for n in data["names"]],
                 "embeddings": data["embeddings"].astype(np.float32),
                 "arch": str(data["arch"]) if "arch" in data else "",
                 "dim": int(data["embeddings"].shape[1]),
                 "category_ids": data["category_ids"].tolist() if "category_ids" in data else None}
    made_by = f" (made with {vocab['arch']})" if vocab["arch"] else ""
    _check_dim(expected_dim, vocab["dim"], f"the class embeddings in {path}{made_by}", model_name,
               f"rerun the vocab command (--classes ... --out {path.name}) with a teacher of "
               f"the model's architecture{' (' + model_name + ')' if model_name else ''}")
    return vocab
