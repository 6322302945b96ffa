"""Teacher-target codecs: how the label stage stores the teacher's region embeddings compactly, and
how the trainer turns the stored codes back into concept logits on the device.

    codec = load_codec(layout.labels.root)                      # reads labels/codec.json (+ files)
    codes = codec.encode(embeddings)                            # [N, D] float32 L2-normalized (a tensor on
                                                                # any device, or an array) -> [N, code_size] uint8
    logits = codec.decode_logits(codes_u8_on_device, concept_emb_on_device, temperature=0.01)  # [N, C]

`decode_logits` is the single entry point for the trainer; softmax(logits) is the teacher's
distribution p_t over the concept pool (docs/method.md §3, §5b).

Codecs (label.codec):
- `fp16`: the embedding as float16, 2*D bytes. decode: view as half, L2-normalize, cos/T.
- `pq`: a FAISS ProductQuantizer (M = pq_subquantizers, pq_bits bits each; ceil(M*bits/8) bytes)
  trained on a seeded sample of regions. decode: centroid look-up from the codebook held as a torch
  tensor on the device, L2-normalize, cos/T. Any pq_bits (codes are unpacked LSB-first, as FAISS
  packs them).
- `topk`: the k most probable concepts: ids (uint16 when the pool has at most 65536 concepts, else
  uint32) and their log-probabilities log p_t (float16), k*(id bytes + 2) bytes. It is computed
  against the concept embeddings and temperature of the label run (a copy of the embeddings is
  saved beside codec.json), on the device the embeddings are on: only the top k leave a GPU. decode: the k stored log-probabilities are scattered into a full row;
  the remaining mass 1 - sum_k p is spread evenly over the other C-k concepts (their logit is
  log((1 - sum_k p) / (C - k)), floored at 1e-12), so softmax(decoded) is a proper distribution
  that equals p_t on the top k. A different temperature T' scales the decoded row by T/T'
  (exact for the top k up to the renormalisation). The concept_embeddings argument is only
  checked for its size: the ids refer to the label run's pool.
"""
from __future__ import annotations

import abc
import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io import atomic_path, read_json, sha256_file, write_json
from pipeline.layout import RunLayout, inside
from trainer.offline.faiss_gpu import faiss_gpus

CODECS = ("pq", "topk", "fp16")


def _codec_json(labels_dir: str | Path) -> Path:
    """labels/codec.json, given the labels folder or the file itself (the name comes from the layout)."""
    p = Path(labels_dir)
    return p if p.suffix == ".json" else p / RunLayout(Path("/")).labels_codec.name


def _codec_file(codec_json: Path, suffix: str) -> Path:
    """A codec file named by the layout, beside codec.json."""
    return codec_json.parent / RunLayout(Path("/")).labels_codec_file(suffix).name


class TeacherCodec(abc.ABC):
    """What every codec provides; `decode_embeddings` only where embeddings are kept (pq, fp16)."""
    kind: str = ""
    code_size: int = 0
    dim: int = 0

    @abc.abstractmethod
    def encode(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """L2-normalized float32 [N, D] (a tensor on any device, or an array) -> uint8 codes [N, code_size]."""

    @abc.abstractmethod
    def decode_logits(self, codes: torch.Tensor, concept_embeddings: torch.Tensor,
                      temperature: float = 0.01) -> torch.Tensor:
        """uint8 codes [N, code_size] on the device -> teacher logits [N, C] on the same device."""

    def decode_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, D] L2-normalized float32 embeddings (pq, fp16); topk keeps no embedding."""
        # A real answer, not a stub: top-k codes keep concept scores only, so no embedding exists.
        raise ValueError(f"the {self.kind} codec stores no embeddings; use label.codec pq or fp16")

    # -- persistence ---------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"codec": self.kind, "code_size": self.code_size, "dim": self.dim}

    def _save_files(self, codec_json: Path) -> dict[str, Path]:
        return {}

    def save(self, codec_json: str | Path, extra: Optional[dict] = None) -> dict:
        """Write the codec's files, then codec.json (last) with their checksums and a fingerprint."""
        codec_json = Path(codec_json)
        codec_json.parent.mkdir(parents=True, exist_ok=True)
        files = self._save_files(codec_json)
        desc = {**self.describe(), "files": {k: p.name for k, p in files.items()},
                "sha256": {p.name: sha256_file(p) for p in files.values()}, **(extra or {})}
        desc["fingerprint"] = hashlib.sha256(json.dumps(
            {k: desc[k] for k in ("codec", "code_size", "dim", "sha256", "params") if k in desc},
            sort_keys=True).encode()).hexdigest()[:16]
        write_json(codec_json, desc)
        return desc


def _as_float32(embeddings) -> np.ndarray:
    if torch.is_tensor(embeddings):
        embeddings = embeddings.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))


def _check_codes(codes: torch.Tensor, code_size: int) -> torch.Tensor:
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != code_size:
        raise ValueError(f"codes must be uint8 [N, {code_size}], got {codes.dtype} {tuple(codes.shape)}")
    return codes


# -- fp16 ------------------------------------------------------------------------------------------------

class FP16Codec(TeacherCodec):
    kind = "fp16"

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.code_size = 2 * self.dim

    def describe(self) -> dict:
        return {**super().describe(), "params": {}}

    def encode(self, embeddings):
        if torch.is_tensor(embeddings):  # rounded to half where it is (half the bytes leave a GPU)
            x = embeddings.detach().to(torch.float16).cpu().numpy()
        else:
            x = _as_float32(embeddings).astype("<f2")
        return np.ascontiguousarray(x).view(np.uint8).reshape(len(x), self.code_size)

    def decode_embeddings(self, codes):
        codes = _check_codes(codes, self.code_size).contiguous()
        return F.normalize(codes.view(torch.float16).float(), dim=-1)

    def decode_logits(self, codes, concept_embeddings, temperature=0.01):
        return self.decode_embeddings(codes) @ concept_embeddings.float().t() / temperature


# -- product quantizer -------------------------------------------------------------------------------------

class PQCodec(TeacherCodec):
    kind = "pq"

    def __init__(self, pq):
        import faiss

        self.pq = pq
        self.dim, self.m, self.nbits = int(pq.d), int(pq.M), int(pq.nbits)
        self.code_size = int(pq.code_size)
        self._centroids_np = faiss.vector_to_array(pq.centroids).reshape(self.m, 1 << self.nbits, pq.dsub)
        self._centroids: dict = {}

    @classmethod
    def train(cls, sample: np.ndarray, m: int, nbits: int, seed: int = 0) -> "PQCodec":
        import faiss

        sample = _as_float32(sample)
        d = sample.shape[1]
        if d % m:
            raise ValueError(f"label.pq_subquantizers={m} must divide the embedding dim {d}")
        pq = faiss.ProductQuantizer(d, m, nbits)
        pq.cp.seed = int(seed)
        pq.cp.niter = 25
        pq.cp.min_points_per_centroid = 1  # a deliberate sample; no "please provide more points"
        pq.cp.max_points_per_centroid = max(256, math.ceil(len(sample) / (1 << nbits)))
        # All cores: faiss's k-means gives the same centroids on any thread count (each centroid sums its
        # points in one order), so the codebook does not depend on the machine (tests/test_label.py).
        # With a GPU FAISS build that supports this GPU (trainer/offline/faiss_gpu.py) the k-means
        # assignment step runs on the GPU (the codebook is then equal to the CPU one up to float rounding
        # in the distances).
        gpu_index = None
        if faiss_gpus() > 0:
            gpu_index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), pq.dsub)
            pq.assign_index = gpu_index
        try:
            pq.train(sample)
        finally:
            pq.assign_index = None
            del gpu_index
        return cls(pq)

    def describe(self) -> dict:
        return {**super().describe(), "params": {"subquantizers": self.m, "bits": self.nbits}}

    def _save_files(self, codec_json):
        import faiss

        path = _codec_file(codec_json, "pq.faiss")
        with atomic_path(path) as tmp:
            faiss.write_ProductQuantizer(self.pq, str(tmp))
        return {"codebook": path}

    def encode(self, embeddings):
        x = _as_float32(embeddings)
        if len(x) == 0:
            return np.zeros((0, self.code_size), np.uint8)
        return self.pq.compute_codes(x)

    def centroids(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._centroids:
            self._centroids[key] = torch.from_numpy(self._centroids_np).to(device)
        return self._centroids[key]

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, M] int64 sub-quantizer indices from FAISS's LSB-first packed codes."""
        codes = _check_codes(codes, self.code_size)
        if self.nbits == 8:
            return codes.long()
        shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
        bits = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(len(codes), -1)[:, : self.m * self.nbits]
        weights = (1 << torch.arange(self.nbits, device=codes.device, dtype=torch.int64))
        return (bits.reshape(len(codes), self.m, self.nbits).long() * weights).sum(-1)

    def decode_embeddings(self, codes):
        idx = self.unpack(codes)                      # [N, M]
        cents = self.centroids(codes.device)          # [M, K, dsub]
        parts = cents[torch.arange(self.m, device=codes.device), idx]  # [N, M, dsub]
        return F.normalize(parts.reshape(len(codes), self.dim), dim=-1)

    def decode_logits(self, codes, concept_embeddings, temperature=0.01):
        return self.decode_embeddings(codes) @ concept_embeddings.float().t() / temperature


# -- top-k -----------------------------------------------------------------------------------------------

class TopKCodec(TeacherCodec):
    kind = "topk"
    MIN_REST = 1e-12

    def __init__(self, k: int, concept_embeddings: np.ndarray, temperature: float):
        self.concepts = _as_float32(concept_embeddings)
        self.num_concepts, self.dim = self.concepts.shape
        self.k = int(min(k, self.num_concepts))
        self.temperature = float(temperature)
        self.id_dtype = np.dtype("<u2") if self.num_concepts <= 65536 else np.dtype("<u4")
        self.code_size = self.k * (self.id_dtype.itemsize + 2)
        self._concepts_on: dict[str, torch.Tensor] = {}

    def describe(self) -> dict:
        return {**super().describe(), "params": {"k": self.k, "temperature": self.temperature,
                                                 "num_concepts": self.num_concepts,
                                                 "id_bytes": self.id_dtype.itemsize}}

    def _save_files(self, codec_json):
        path = _codec_file(codec_json, "topk_concepts.npy")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.concepts)
        return {"concepts": path}

    def concepts_on(self, device) -> torch.Tensor:
        """The label run's concept embeddings on `device` (copied there once)."""
        key = str(device)
        if key not in self._concepts_on:
            self._concepts_on[key] = torch.from_numpy(self.concepts).to(device)
        return self._concepts_on[key]

    def encode(self, embeddings):
        # Logits, log-softmax and top-k on the embeddings' device (the teacher's GPU in the label stage):
        # [N, k] ids and values come back, not the [N, num_concepts] scores.
        x = embeddings.detach().float() if torch.is_tensor(embeddings) else torch.from_numpy(_as_float32(embeddings))
        logp = torch.log_softmax(x @ self.concepts_on(x.device).t() / self.temperature, dim=-1)
        values, ids = torch.topk(logp, self.k, dim=-1)           # sorted, most probable first
        n = len(x)   # the widths spelled out: a batch of images without proposals has n = 0
        ids_b = ids.cpu().numpy().astype(self.id_dtype).view(np.uint8).reshape(n, self.k * self.id_dtype.itemsize)
        val_b = values.cpu().numpy().astype("<f2").view(np.uint8).reshape(n, 2 * self.k)
        return np.ascontiguousarray(np.concatenate([ids_b, val_b], axis=1))

    def split(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = _check_codes(codes, self.code_size).contiguous()
        id_bytes = self.k * self.id_dtype.itemsize
        raw = codes[:, :id_bytes].contiguous()
        if self.id_dtype.itemsize == 2:
            ids = raw.view(torch.int16).long() & 0xFFFF
        else:
            ids = raw.view(torch.int32).long() & 0xFFFFFFFF
        logp = codes[:, id_bytes:].contiguous().view(torch.float16).float()
        return ids, logp

    def decode_logits(self, codes, concept_embeddings=None, temperature=0.01):
        if concept_embeddings is not None and concept_embeddings.shape[0] != self.num_concepts:
            raise ValueError(f"topk codes index a pool of {self.num_concepts} concepts, got "
                             f"{concept_embeddings.shape[0]} concept embeddings")
        ids, logp = self.split(codes)
        n, c = len(codes), self.num_concepts
        if self.k < c:
            rest = (1.0 - logp.exp().sum(-1)).clamp_min(self.MIN_REST) / (c - self.k)
            out = rest.log().unsqueeze(1).expand(n, c).clone()
        else:
            out = torch.full((n, c), math.log(self.MIN_REST), device=codes.device)
        out.scatter_(1, ids, logp)
        return out * (self.temperature / temperature)


# -- building and loading ------------------------------------------------------------------------------

def build_codec(kind: str, *, dim: int, concept_embeddings: Optional[np.ndarray] = None,
                temperature: float = 0.01, topk: int = 64, pq_subquantizers: int = 64, pq_bits: int = 8,
                sample: Optional[np.ndarray] = None, seed: int = 0) -> TeacherCodec:
    if kind == "fp16":
        return FP16Codec(dim)
    if kind == "topk":
        if concept_embeddings is None:
            raise ValueError("the topk codec needs the concept embeddings")
        return TopKCodec(topk, concept_embeddings, temperature)
    if kind == "pq":
        if sample is None:
            raise ValueError("the pq codec is trained on a sample of region embeddings")
        return PQCodec.train(sample, pq_subquantizers, pq_bits, seed=seed)
    raise ValueError(f"unknown codec {kind!r}; one of {', '.join(CODECS)}")


def codec_from_settings(cfg, dim: int, concept_embeddings=None, sample=None, seed: int = 0) -> TeacherCodec:
    """build_codec from a manifest's `label` section."""
    return build_codec(cfg.codec, dim=dim, concept_embeddings=concept_embeddings,
                       temperature=cfg.temperature, topk=cfg.topk, pq_subquantizers=cfg.pq_subquantizers,
                       pq_bits=cfg.pq_bits, sample=sample, seed=seed)


def read_codec_description(labels_dir: str | Path) -> Optional[dict]:
    try:
        return read_json(_codec_json(labels_dir))
    except FileNotFoundError:
        return None


def load_codec(labels_dir: str | Path) -> TeacherCodec:
    """The label run's codec from `labels/codec.json` (or that file's path) and the files beside it."""
    path = _codec_json(labels_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no codec description; the label stage writes it")
    desc = read_json(path)
    # Every file name in codec.json is resolved inside the labels folder (UnsafeName, a ValueError, if not).
    for name, digest in desc.get("sha256", {}).items():
        if sha256_file(inside(path.parent, name)) != digest:
            raise ValueError(f"{path.parent / name}: checksum differs from {path}; rerun the label stage")
    kind, params = desc["codec"], desc.get("params", {})
    if kind == "fp16":
        return FP16Codec(desc["dim"])
    if kind == "pq":
        import faiss

        return PQCodec(faiss.read_ProductQuantizer(str(inside(path.parent, desc["files"]["codebook"]))))
    if kind == "topk":
        concepts = np.load(inside(path.parent, desc["files"]["concepts"]))
        return TopKCodec(params["k"], concepts, params["temperature"])
    raise ValueError(f"{path}: unknown codec {kind!r}")
