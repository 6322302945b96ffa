"""Teacher-target codecs: how the label stage stores the teacher's region embeddings compactly, and
how the trainer turns the stored codes back into concept logits on the device.

    codec = load_codec(layout.labels.root)                      # reads labels/codec.json (+ files)
    codes = codec.encode(embeddings)                            # [N, D] float32 L2-normalized -> [N, code_size] uint8
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
  saved beside codec.json). decode: the k stored log-probabilities are scattered into a full row;
  the remaining mass 1 - sum_k p is spread evenly over the other C-k concepts (their logit is
  log((1 - sum_k p) / (C - k)), floored at 1e-12), so softmax(decoded) is a proper distribution
  that equals p_t on the top k. A different temperature T' scales the decoded row by T/T'
  (exact for the top k up to the renormalisation). The concept_embeddings argument is only
  checked for its size: the ids refer to the label run's pool.
"""
from __future__ import annotations

import abc
import functools

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

CODECS = ("pq", "topk", "fp16")


@functools.lru_cache(maxsize=None)
def faiss_gpus() -> int:
    """GPUs the installed FAISS build can use (0 for faiss-cpu, or faiss-gpu on a machine without one).

    faiss-cpu and faiss-gpu-cu12 both install the `faiss` module; with both installed the module is a
    mix of the two, which is refused here (pyproject.toml: the `cpu` or the `gpu` extra, not both)."""
    from importlib.metadata import distributions

    import faiss

    builds = sorted({(d.metadata["Name"] or "").lower() for d in distributions()}
                    & {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12"})
    if len(builds) > 1:
        raise RuntimeError(f"both {' and '.join(builds)} are installed and overwrite each other's `faiss` "
                           "module; uninstall all of them and install one (pip install '.[cpu]' or '.[gpu]')")
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def on_faiss_gpus(index):
    """A flat index copied onto all of FAISS's GPUs for search, or the index itself without them."""
    import faiss

    return faiss.index_cpu_to_all_gpus(index) if faiss_gpus() > 0 else index


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
    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """L2-normalized float32 [N, D] -> uint8 codes [N, code_size]."""

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
        x = _as_float32(embeddings)
        return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(len(x), self.code_size)

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
        # With a GPU FAISS build the k-means assignment step runs on the GPU (the codebook is then equal
        # to the CPU one up to float rounding in the distances).
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

    def encode(self, embeddings):
        x = torch.from_numpy(_as_float32(embeddings))
        logp = torch.log_softmax(x @ torch.from_numpy(self.concepts).t() / self.temperature, dim=-1)
        values, ids = torch.topk(logp, self.k, dim=-1)           # sorted, most probable first
        n = len(x)
        ids_b = ids.numpy().astype(self.id_dtype).view(np.uint8).reshape(n, -1)
        val_b = values.numpy().astype("<f2").view(np.uint8).reshape(n, -1)
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
