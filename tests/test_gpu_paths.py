"""The GPU stages' compute paths, checked on a CPU where that can show them (and on CUDA, `gpu` mark):
RoIAlign on torchvision's native kernel under the flags an actor sets, TF32 only inside a bf16 region,
FAISS on a GPU only where its build has kernels for it, the topk codec encoding where the embeddings
are, `precision: auto` resolved before it is fingerprinted, and the trainer's pinned copies."""
from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch

from trainer.models.clip import create_clip
from trainer.models.region_encoder import RegionEncoder
from trainer.offline import faiss_gpu
from trainer.offline.codecs import FP16Codec, TopKCodec
from trainer.offline.streaming import autocast, configure_precision, resolved_precision

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def process_flags():
    """The process-wide flags configure_precision and autocast may set, restored after the test."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[2:]


# -- RoIAlign -------------------------------------------------------------------------------------------

class ReportsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: torchvision's roi_align chooses its implementation from
    `input.is_cuda`, so this shows the choice it makes for a CUDA input without a GPU."""

    @property
    def is_cuda(self):
        return True


def _fallback_calls(monkeypatch) -> list:
    """Records each call of torchvision's pure-Python RoIAlign (the torch.compile'd fallback)."""
    module = importlib.import_module("torchvision.ops.roi_align")
    calls = []

    def fallback(*args, **kwargs):
        calls.append(args[0].shape)
        return torch.ops.torchvision.roi_align(*(a.as_subclass(torch.Tensor) if torch.is_tensor(a) else a
                                                 for a in args))

    monkeypatch.setattr(module, "_roi_align", fallback)
    return calls


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_roi_align_runs_its_native_kernel_under_the_flags_a_gpu_actor_sets(process_flags, monkeypatch, precision):
    torch.manual_seed(0)
    encoder = RegionEncoder.from_clip(create_clip("RN50-tiny")[0]).eval()
    with torch.no_grad():
        res4 = encoder.features(torch.randn(1, 3, 64, 96)).as_subclass(ReportsCuda)
    boxes = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [0.0, 0.0, 96.0, 64.0]])]
    calls = _fallback_calls(monkeypatch)

    configure_precision(CUDA, precision)          # what a proposals or label actor on a GPU does
    assert not torch.are_deterministic_algorithms_enabled()
    with torch.no_grad():
        native = encoder.pool_regions(res4, boxes)
    assert calls == []

    # The same call under deterministic algorithms takes the fallback: the check above can fail.
    torch.use_deterministic_algorithms(True, warn_only=True)
    with torch.no_grad():
        fallback = encoder.pool_regions(res4, boxes)
    assert len(calls) == 1
    torch.testing.assert_close(fallback.as_subclass(torch.Tensor), native.as_subclass(torch.Tensor))


def test_configure_precision_keeps_cudnn_reproducible_for_inference(process_flags):
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    assert configure_precision(torch.device("cpu"), "auto") is None
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)


# -- TF32 -----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:CUDA is not available")   # CUDA autocast on a CPU-only machine: a no-op
def test_tf32_is_allowed_inside_a_bf16_region_only(process_flags):
    def tf32():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = configure_precision(CUDA, "bf16")
    assert dtype == torch.bfloat16
    assert tf32() == (False, False)            # the teacher's logits matmul, outside the region: IEEE fp32
    with autocast(CUDA, dtype):
        assert tf32() == (True, True)          # the backbone's fp32 leftovers in the bf16 region
    assert tf32() == (False, False)
    with pytest.raises(RuntimeError, match="inside"):
        with autocast(CUDA, dtype):
            raise RuntimeError("inside")
    assert tf32() == (False, False)            # restored when the region ends in an error too
    assert configure_precision(CUDA, "fp32") is None
    with autocast(CUDA, None):
        assert tf32() == (False, False)        # fp32: no TF32 anywhere


# -- FAISS's devices --------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine whose FAISS build sees `count` GPUs of compute capability `capability` (set them on the
    returned object); faiss_gpus' per-process decision is cleared before and after."""
    import faiss

    class Machine:
        count, capability, build = 1, (9, 0), "faiss-gpu-cu12"

    machine = Machine()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: machine.count, raising=False)
    monkeypatch.setattr(faiss_gpu, "installed_faiss_build", lambda: machine.build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: machine.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: machine.count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: machine.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H100 80GB HBM3")
    faiss_gpu.faiss_gpus.cache_clear()
    yield machine
    faiss_gpu.faiss_gpus.cache_clear()


def test_faiss_on_a_gpu_its_wheel_has_no_kernels_for_runs_on_the_cpu_with_one_warning(fake_gpus, caplog):
    import faiss

    index = faiss.IndexFlatIP(8)
    with caplog.at_level(logging.WARNING, logger=faiss_gpu.__name__):
        assert faiss_gpu.faiss_gpus() == 0
        assert faiss_gpu.index_on_gpus(index) is index
        assert faiss_gpu.index_on_gpus(index, torch.device("cuda", 0)) is index
        assert faiss_gpu.faiss_gpus() == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings           # decided once per process
    assert "faiss-gpu-cu12" in warnings[0] and "7.0-8.9" in warnings[0] and "9.0" in warnings[0]


@pytest.mark.parametrize("build, capability, count, expected", [
    ("faiss-gpu-cu12", (8, 9), 2, 2),     # Ada Lovelace: the wheel's newest
    ("faiss-gpu-cu12", (7, 0), 1, 1),     # Volta: its oldest
    ("faiss-gpu-cu12", (6, 1), 1, 0),     # Pascal: too old
    ("faiss-gpu-cu11", (9, 0), 1, 0),     # Hopper
    ("faiss-gpu", (9, 0), 1, 1),          # Meta's wheel (the gpu extra): Hopper code
    ("faiss-gpu", (12, 0), 1, 1),         # and PTX for newer GPUs
    ("faiss-gpu", (6, 1), 1, 0),          # but nothing older than Volta
    (None, (9, 0), 1, 1),                 # a build pip does not know (conda, source): trusted
    ("faiss-gpu-cu12", (8, 0), 0, 0),     # FAISS sees no GPU
])
def test_faiss_gpus_compares_the_devices_with_the_build(fake_gpus, build, capability, count, expected):
    fake_gpus.build, fake_gpus.capability, fake_gpus.count = build, capability, count
    assert faiss_gpu.faiss_gpus() == expected


def test_a_region_index_is_sharded_over_the_gpus_and_the_teachers_goes_to_its_own(fake_gpus, monkeypatch):
    import faiss

    fake_gpus.capability, fake_gpus.count = (8, 6), 4
    copies = []

    class ClonerOptions:
        shard = False

    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus",
                        lambda index, co=None, ngpu=-1: copies.append(("all", co.shard, ngpu)) or "sharded",
                        raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu",
                        lambda resources, gpu, index: copies.append(("one", gpu)) or "on one GPU", raising=False)
    index = faiss.IndexFlatIP(8)
    assert faiss_gpu.index_on_gpus(index) == "sharded"
    assert faiss_gpu.index_on_gpus(index, torch.device("cuda", 2)) == "on one GPU"
    assert faiss_gpu.index_on_gpus(index, torch.device("cpu")) is index    # a CPU actor's teacher
    assert copies == [("all", True, 4), ("one", 2)]


def test_both_faiss_builds_installed_is_refused(monkeypatch):
    import importlib.metadata as metadata

    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    monkeypatch.setattr(metadata, "distributions", lambda: [Dist("faiss-cpu"), Dist("faiss-gpu-cu12"), Dist("numpy")])
    with pytest.raises(RuntimeError, match="both faiss-cpu and faiss-gpu-cu12 are installed"):
        faiss_gpu.installed_faiss_build()


# -- the topk codec where the embeddings are ----------------------------------------------------------------

def _embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _topk_codes_on_the_cpu(codec: TopKCodec, embeddings: np.ndarray) -> np.ndarray:
    """The topk codes as the codec computed them before it encoded on the embeddings' device: a NumPy
    array in, the full log-softmax on the CPU."""
    x = torch.from_numpy(embeddings)
    logp = torch.log_softmax(x @ torch.from_numpy(codec.concepts).t() / codec.temperature, dim=-1)
    values, ids = torch.topk(logp, codec.k, dim=-1)
    n = len(x)
    return np.concatenate([ids.numpy().astype(codec.id_dtype).view(np.uint8).reshape(n, -1),
                           values.numpy().astype("<f2").view(np.uint8).reshape(n, -1)], axis=1)


def test_codes_from_tensors_equal_the_cpu_computation():
    concepts, emb = _embeddings(300, 32, 0), _embeddings(50, 32, 1)
    topk = TopKCodec(8, concepts, temperature=0.01)
    expected = _topk_codes_on_the_cpu(topk, emb)
    np.testing.assert_array_equal(topk.encode(torch.from_numpy(emb)), expected)
    np.testing.assert_array_equal(topk.encode(emb), expected)
    assert topk.encode(torch.zeros(0, 32)).shape == (0, topk.code_size)
    fp16 = FP16Codec(32)
    tiny = np.concatenate([emb, np.full((1, 32), 1e-6, np.float32)])   # half subnormals round the same way
    np.testing.assert_array_equal(fp16.encode(torch.from_numpy(tiny)), fp16.encode(tiny))


def test_label_batch_encodes_the_teachers_tensors_where_they_are():
    """label_batch hands the codec the teacher's embeddings as tensors on the teacher's device (on a GPU
    only the top k come back), and the codes are those of the CPU computation."""
    from trainer.data.images import image_tensor
    from trainer.offline.labels import Teacher, label_batch
    from PIL import Image

    torch.manual_seed(0)
    model, _ = create_clip("RN50-tiny")
    concepts = _embeddings(40, 64, 2)
    teacher = Teacher(model, concepts, min_size=64, max_size=96, device="cpu")
    topk = TopKCodec(5, concepts, temperature=0.01)
    seen = []

    class Recording:
        def encode(self, embeddings):
            seen.append(embeddings)
            return topk.encode(embeddings)

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 80), (72, 64))]
    boxes = [np.array([[2, 2, 40, 30], [10, 5, 70, 60]], np.float32), np.array([[0, 0, 30, 30]], np.float32)]
    cols = label_batch(teacher, Recording(), [image_tensor(teacher.resize(i)) for i in images],
                       [i.size for i in images], boxes)
    assert len(seen) == 2 and all(torch.is_tensor(e) and e.device == teacher.device for e in seen)
    out = teacher.embed(images, boxes)
    regions = _topk_codes_on_the_cpu(topk, torch.cat(out.regions).numpy())
    assert b"".join(cols["region_codes"]) == regions.tobytes()
    assert b"".join(cols["image_code"]) == _topk_codes_on_the_cpu(topk, out.images.numpy()).tobytes()


@pytest.mark.gpu
@needs_cuda
def test_topk_codes_on_cuda_agree_with_the_cpu():
    concepts, emb = _embeddings(6790, 1024, 0), _embeddings(600, 1024, 1)
    topk = TopKCodec(64, concepts, temperature=0.01)
    on_gpu = topk.encode(torch.from_numpy(emb).to("cuda"))
    on_cpu = topk.encode(emb)
    ids_gpu, logp_gpu = topk.split(torch.from_numpy(on_gpu))
    ids_cpu, logp_cpu = topk.split(torch.from_numpy(on_cpu))
    assert (ids_gpu[:, 0] == ids_cpu[:, 0]).float().mean() >= 0.99
    torch.testing.assert_close(logp_gpu[:, 0], logp_cpu[:, 0], atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_roi_align_on_cuda_takes_the_native_kernel(process_flags, monkeypatch):
    calls = _fallback_calls(monkeypatch)
    configure_precision(CUDA, "auto")
    from torchvision.ops import roi_align

    x = torch.randn(2, 8, 32, 32, device="cuda")
    roi_align(x, [torch.tensor([[0.0, 0.0, 16.0, 16.0]], device="cuda")] * 2, output_size=7, aligned=True)
    assert calls == []


# -- precision: auto, resolved before it is fingerprinted ------------------------------------------------------

def test_auto_precision_is_bf16_on_gpus_and_fp32_on_cpus():
    assert resolved_precision("auto", uses_gpu=True) == "bf16"
    assert resolved_precision("auto", uses_gpu=False) == "fp32"
    assert resolved_precision("fp32", uses_gpu=True) == "fp32"
    assert resolved_precision("bf16", uses_gpu=False) == "bf16"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolved_precision("fp16", uses_gpu=True)


@pytest.mark.parametrize("nodes, gpus_per_actor, precision, expected", [
    ([("head", 4, 0)], 1.0, "auto", "fp32"),                     # no GPU anywhere: the model runs on CPUs
    ([("head", 4, 0), ("gpu", 8, 1)], 1.0, "auto", "bf16"),      # a GPU node: the actors get GPUs
    ([("head", 4, 0), ("gpu", 8, 1)], 0.0, "auto", "fp32"),      # num_gpus_per_actor 0: CPUs
    ([("head", 4, 0)], 1.0, "bf16", "bf16"),                     # a fixed setting is itself
])
def test_a_gpu_stage_resolves_auto_from_its_actor_plan(monkeypatch, tmp_path, nodes, gpus_per_actor, precision,
                                                       expected):
    from pipeline import ray_runtime
    from pipeline.config import parse_manifest
    from stages.resolve import actor_precision

    monkeypatch.setattr(ray_runtime, "init_ray", lambda cfg: None)
    monkeypatch.setattr(ray_runtime, "alive_nodes",
                        lambda: [ray_runtime.NodeResources(name, cpus, gpus) for name, cpus, gpus in nodes])
    for section in ("proposals", "label"):
        manifest = parse_manifest({"name": "t", "output_dir": str(tmp_path),
                                   section: {"precision": precision, "num_gpus_per_actor": gpus_per_actor}})
        assert actor_precision(manifest, section) == expected


# -- the trainer's host-to-device copies ---------------------------------------------------------------------

def test_the_pretrain_step_copies_the_loaders_tensors_whole(tmp_path):
    """Every non_blocking copy in a pretraining step starts from a tensor of the loader's batch itself:
    those are pinned (pin_memory on CUDA), so the copies are asynchronous. A slice or mask taken on the
    host first would be a new, pageable tensor, and its copy synchronous."""
    from torch.overrides import TorchFunctionMode

    from pipeline.config import PretrainConfig
    from tests.pretrain_world import make_world
    from trainer.data.pretrain_stream import shard_sources
    from trainer.tasks.pretrain import PretrainPaths, PretrainTrainer

    world = make_world(tmp_path / "world", boxes=12)   # 12 of 16 region slots used: padding to skip
    torch.manual_seed(0)
    cfg = PretrainConfig(batch_size=2, regions_per_image=16, min_size=64, max_size=96, steps=1, device="cpu",
                         log_every=1, checkpoint_every=100)
    paths = PretrainPaths(*(tmp_path / name for name in ("last.pt", "student.pt", "tb", "last.png")))
    trainer = PretrainTrainer(cfg, create_clip("RN50-tiny")[0], world["concepts"], paths, progress=False,
                              sources=shard_sources(world["layout"], world["shard_ids"]), codec=world["codec"])
    batch = next(trainer.loader())
    copied = []

    class Copies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and kwargs.get("non_blocking"):
                copied.append(args[0])
            return func(*args, **kwargs)

    with Copies():
        losses = trainer.compute_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sources = {id(v): name for name, v in batch.items() if torch.is_tensor(v)}
    assert copied and all(id(t) in sources for t in copied), [tuple(t.shape) for t in copied if id(t) not in sources]
    assert {"images", "boxes", "codes", "pseudo_labels", "pseudo_probs"} <= {sources[id(t)] for t in copied}
