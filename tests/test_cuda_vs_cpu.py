"""The GPU stages' models on CUDA against the CPU (`gpu` mark: `make gpu-check` runs them; skipped without
CUDA): the proposals actor's RPN and the label actor's teacher, built by the stages' builders on tiny
random models, in fp32 on both devices, and FAISS's search on a GPU where the installed build supports it.
The comparisons are bench/gpu_check.py's (tested on CPU tensors in tests/test_gpu_check.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.gpu_check import FP32_AGREEMENT, mean_box_agreement, top1_agreement

pytestmark = pytest.mark.gpu

DEVICES = (torch.device("cuda"), torch.device("cpu"))


def uint8_images(count: int, width: int, height: int, seed: int = 0) -> list[torch.Tensor]:
    """Images with a few flat rectangles (something for an RPN to find), uint8 [3, H, W]."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = np.full((height, width, 3), rng.integers(0, 255, 3), np.uint8)
        for _ in range(4):
            x, y = rng.integers(0, width - 24), rng.integers(0, height - 24)
            image[y:y + rng.integers(12, 40), x:x + rng.integers(12, 40)] = rng.integers(0, 255, 3)
        images.append(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    return images


def test_the_proposals_rpn_gives_the_same_boxes_on_cuda_as_on_the_cpu(tmp_path):
    from trainer.models.rpn import RpnConfig, build_rpn, save_rpn_checkpoint
    from trainer.offline.proposals import ProposalJob, Proposer

    torch.manual_seed(0)
    checkpoint = save_rpn_checkpoint(build_rpn(RpnConfig("resnet18_fpn", min_size=128, max_size=192)),
                                     tmp_path / "rpn.pt")
    images = uint8_images(4, 160, 120)
    boxes = {}
    for device in DEVICES:
        proposer = Proposer(ProposalJob(run_root=str(tmp_path), checkpoint=str(checkpoint), min_size=128,
                                        max_size=192, pre_nms_top_n=300, post_nms_top_n=50, nms_thresh=0.5,
                                        batch_size=4, fingerprint="", device=str(device), precision="fp32"))
        pixels = [p.pin_memory() for p in images] if device.type == "cuda" else images
        boxes[device.type] = [b for b, _ in proposer.propose(pixels, [(160, 120)] * len(images))]
    assert all(len(b) > 0 for b in boxes["cpu"])
    assert mean_box_agreement(boxes["cuda"], boxes["cpu"]) >= FP32_AGREEMENT


def test_the_label_teachers_pseudo_labels_on_cuda_agree_with_the_cpu():
    from trainer.models.clip import create_clip, embedding_dim, our_model_configs
    from trainer.offline.labels import Teacher

    our_model_configs()
    torch.manual_seed(0)
    model, _ = create_clip("RN50-tiny")
    rng = np.random.default_rng(0)
    concepts = rng.standard_normal((64, embedding_dim(model))).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    images = uint8_images(3, 96, 64, seed=1)
    boxes = [np.sort(rng.uniform(0, 60, (20, 4)).astype(np.float32).reshape(20, 2, 2), axis=1).reshape(20, 4)
             + np.array([0, 0, 4, 4], np.float32) for _ in images]
    labels = {}
    for device in DEVICES:
        teacher = Teacher(model, concepts, min_size=64, max_size=96, device=device, precision="fp32")
        out = teacher.embed_pixels(images, [(96, 64)] * len(images), boxes)
        labels[device.type], _ = teacher.score(torch.cat(out.regions))
    assert len(labels["cpu"]) == 60
    assert top1_agreement(labels["cuda"], labels["cpu"]) >= FP32_AGREEMENT


def test_faiss_search_on_the_gpu_finds_the_cpus_neighbours_where_the_build_supports_it():
    import faiss

    from trainer.offline.faiss_gpu import faiss_gpus, index_on_gpus

    if faiss_gpus() == 0:
        pytest.skip("the installed FAISS build has no kernels for this GPU (or is faiss-cpu): FAISS runs on "
                    "the CPU, which the rest of the suite tests")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(64)
    index.add(vectors)
    queries = vectors[:50] + 0.01 * rng.standard_normal((50, 64)).astype(np.float32)
    _, on_cpu = index.search(queries, 5)
    _, on_gpu = index_on_gpus(index, torch.device("cuda", 0)).search(queries, 5)
    assert (on_gpu[:, 0] == on_cpu[:, 0]).mean() >= FP32_AGREEMENT
