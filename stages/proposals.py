"""Stage `proposals`: the frozen class-agnostic RPN over every written shard image (REFERENCE §2).

Canonical scale (proposals.min_size / max_size, paper: 800 / 1333), top post_nms_top_n boxes (300)
after NMS (0.5), with objectness logits, in original-image pixels -> proposals/NNNNN.parquet
(docs/proposals.md). Ray Data with an actor pool that holds the RPN (a GPU per actor when the cluster
has GPUs); each actor writes whole shards and their markers, so a killed run resumes with the
missing shards only.
"""
from __future__ import annotations

from pipeline.config import RunManifest
from pipeline.io import file_record
from pipeline.layout import RunLayout
from pipeline.ray_runtime import actor_cpus, init_ray, map_with_actor_pool
from pipeline.stage import StageState, require_complete
from stages.resolve import rpn_checkpoint_path
from trainer.offline.proposals import DEFAULT_RPN_LOADER, ProposalJob, ProposalShardWorker

STAGE = "proposals"
RUNTIME_ONLY = ("batch_size", "num_gpus_per_actor", "num_actors", "cpus_per_actor")  # do not change the outputs


def run(manifest: RunManifest, rpn_loader: str = DEFAULT_RPN_LOADER) -> dict:
    layout = RunLayout.of(manifest)
    cfg = manifest.proposals
    shards = require_complete("shard", layout.shards)
    shard_ids = sorted(int(s) for s in shards["shards"])
    checkpoint = rpn_checkpoint_path(manifest)
    settings = {k: v for k, v in manifest.section_dict(STAGE).items() if k not in RUNTIME_ONLY}
    settings["checkpoint"] = {"sha256": file_record(checkpoint)["sha256"]}  # content, not path: runs move
    state = StageState.open(STAGE, layout.proposals, settings, {"shard": shards["fingerprint"]})
    if state.is_done(shard_ids):
        print(f"proposals: up to date ({len(shard_ids)} shards)")
        return state.finish(shard_ids)
    state.clean_temporaries()
    pending, nodes = state.start_pending(shard_ids), set()
    print(f"proposals: {len(shard_ids)} shards ({len(pending)} to do), RPN {checkpoint}")
    init_ray(manifest.ray)
    job = ProposalJob(run_root=str(layout.root), checkpoint=str(checkpoint), min_size=cfg.min_size,
                      max_size=cfg.max_size, pre_nms_top_n=cfg.pre_nms_top_n, post_nms_top_n=cfg.post_nms_top_n,
                      nms_thresh=cfg.nms_thresh, batch_size=cfg.batch_size, fingerprint=state.fingerprint,
                      rpn_loader=rpn_loader, precision=cfg.precision, decode_threads=actor_cpus(cfg.cpus_per_actor))
    for row in map_with_actor_pool(ProposalShardWorker, [{"shard": s} for s in pending], constructor_args=(job,),
                                 num_gpus_per_actor=cfg.num_gpus_per_actor, num_actors=cfg.num_actors,
                                 cpus_per_actor=job.decode_threads, desc="proposals"):
        nodes.add(str(row["node"]))
    return state.finish(shard_ids, extra={"ray_nodes": sorted(nodes)})


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
