"""Teacher-target codecs on a run's regions: bytes per region, top-1 pseudo-label agreement and mean
KL(full teacher distribution || decoded one), over the whole pool of regions (every proposal of
every shard, plus the whole-image boxes).

    python bench/codec.py [MANIFEST] [--set section.key=value ...] [--max-shards N]

Needs the run's proposals, concept embeddings and teacher (e.g. `regionclip run manifests/demo.yaml`
up to `proposals`). The teacher's region embeddings are computed here, in this process, exactly as
the label stage does (trainer/offline/labels.py); each codec is built as the stage builds it (PQ:
trained on a seeded sample of label.pq_train_regions regions, taken from the first shards), then
every region is encoded and decoded with `decode_logits` at the label temperature.
Prints a table, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_manifest  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.sidecars import read_proposals, read_shard_images, sidecar_shards  # noqa: E402
from stages.resolve import load_model_ref, teacher_scale  # noqa: E402
from trainer.offline.codecs import build_codec  # noqa: E402
from trainer.offline.labels import Teacher, chunks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = {"top1_agreement": 0.99, "mean_kl_nats": 0.02}   # the smallest codec meeting both is the one to use


def region_embeddings(manifest, layout, max_shards):
    model, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
    concepts = np.load(layout.concept_embeddings)
    teacher = Teacher(model, concepts, **teacher_scale(manifest),
                      temperature=manifest.label.temperature, device="auto")
    shards = sidecar_shards(layout.proposals)[:max_shards]
    parts, images = [], 0
    for s in shards:
        props = read_proposals(layout.proposals, s)
        keys = list(props)
        blobs = read_shard_images(layout.shard_tar(s), keys)
        for part in chunks(len(keys), manifest.label.batch_size):
            out = teacher.embed([load_rgb(blobs[keys[i]]) for i in part], [props[keys[i]].boxes for i in part])
            for r, im in zip(out.regions, out.images):
                parts.append(r.cpu().numpy())
                parts.append(im[None].cpu().numpy())
            images += len(part)
    return np.concatenate(parts), concepts, images, len(shards)


def measure(codec, emb, concepts, temperature, batch=8192):
    c = torch.from_numpy(concepts)
    agree, kl = 0, 0.0
    for i in range(0, len(emb), batch):
        x = torch.from_numpy(emb[i:i + batch])
        full = x @ c.t() / temperature
        codes = torch.from_numpy(codec.encode(emb[i:i + batch]))
        dec = codec.decode_logits(codes, c, temperature=temperature)
        logp, logq = torch.log_softmax(full, -1), torch.log_softmax(dec, -1)
        kl += float((logp.exp() * (logp - logq)).sum(-1).sum())
        agree += int((dec.argmax(-1) == full.argmax(-1)).sum())
    return {"bytes_per_region": codec.code_size, "top1_agreement": agree / len(emb), "mean_kl_nats": kl / len(emb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", nargs="?", default=str(REPO / "manifests" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--max-shards", type=int, default=None)
    parser.add_argument("--pq", default="16x8,32x8,64x6,64x8", help="MxBITS list")
    parser.add_argument("--topk", default="8,16,32", help="k list")
    args = parser.parse_args()
    manifest = load_manifest(args.manifest, args.overrides)
    layout = RunLayout.of(manifest)
    cfg = manifest.label
    started = time.time()
    emb, concepts, images, shards = region_embeddings(manifest, layout, args.max_shards)
    dim = emb.shape[1]
    print(f"codec bench: {len(emb)} regions (incl. {images} whole images) from {shards} shards, D={dim}, "
          f"{len(concepts)} concepts, T={cfg.temperature} ({time.time() - started:.1f}s to embed)")
    # The stage's PQ sample: a seeded draw of pq_train_regions from the first shards' regions.
    rng = np.random.default_rng(manifest.seed)
    sample = emb[np.sort(rng.choice(len(emb), min(cfg.pq_train_regions, len(emb)), replace=False))] \
        if len(emb) > cfg.pq_train_regions else emb
    configs = [("fp16", {})]
    for spec in filter(None, args.pq.split(",")):
        m, bits = (int(v) for v in spec.lower().split("x"))
        if dim % m == 0:
            configs.append(("pq", {"pq_subquantizers": m, "pq_bits": bits}))
    configs += [("topk", {"topk": int(k)}) for k in filter(None, args.topk.split(","))]
    default = ("pq", {"pq_subquantizers": cfg.pq_subquantizers, "pq_bits": cfg.pq_bits}) if cfg.codec == "pq" else \
        ("topk", {"topk": cfg.topk}) if cfg.codec == "topk" else ("fp16", {})
    if default not in configs:
        configs.append(default)
    rows = []
    print(f"{'codec':<14} {'bytes/region':>12} {'top1 agree':>11} {'mean KL (nats)':>15}  meets target")
    for kind, params in configs:
        t = time.time()
        codec = build_codec(kind, dim=dim, concept_embeddings=concepts, temperature=cfg.temperature,
                            sample=sample, seed=manifest.seed, **params)
        r = measure(codec, emb, concepts, cfg.temperature)
        name = kind + ("" if not params else " " + ("x".join(str(v) for v in params.values())))
        ok = r["top1_agreement"] >= TARGET["top1_agreement"] and r["mean_kl_nats"] <= TARGET["mean_kl_nats"]
        rows.append({"codec": kind, "params": params, "name": name, **r, "meets_target": ok,
                     "is_default": (kind, params) == default, "seconds": round(time.time() - t, 2)})
        print(f"{name:<14} {r['bytes_per_region']:>12} {r['top1_agreement']:>11.4f} {r['mean_kl_nats']:>15.5f}  "
              f"{'yes' if ok else 'no'}{'   <- manifest setting' if (kind, params) == default else ''}")
    d = next(r for r in rows if r["is_default"])
    good = sorted((r for r in rows if r["meets_target"]), key=lambda r: r["bytes_per_region"])
    smallest = good[0]["name"] if good else None
    print(f"target: >= {TARGET['top1_agreement']:.0%} agreement and KL <= {TARGET['mean_kl_nats']} nats; smallest "
          f"codec meeting it: {smallest or 'none'}; the manifest's codec ({d['name']}) "
          f"{'meets' if d['meets_target'] else 'MISSES'} it")
    print(json.dumps({"regions": int(len(emb)), "images": images, "embedding_dim": int(dim),
                      "num_concepts": int(len(concepts)), "temperature": cfg.temperature,
                      "codecs": [{k: v for k, v in r.items() if k != "params"} | {"params": r["params"]} for r in rows],
                      "smallest_meeting_target": smallest,
                      "default_codec": d["name"], "default_bytes_per_region": d["bytes_per_region"],
                      "default_top1_agreement": d["top1_agreement"], "default_mean_kl_nats": d["mean_kl_nats"],
                      "default_meets_target": d["meets_target"]}))


if __name__ == "__main__":
    main()
