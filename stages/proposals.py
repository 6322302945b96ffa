"""Stage `proposals`: the frozen class-agnostic RPN over every written shard image (docs/method.md §2).

Canonical scale (proposals.min_size / max_size, paper: 800 / 1333), top post_nms_top_n boxes (300)
after NMS (0.5), with objectness logits, in original-image pixels -> proposals/NNNNN.parquet
(docs/proposals.md). Ray Data with an actor pool that holds the RPN (a GPU per actor when the cluster
has GPUs); each actor writes whole shards and their markers, so a killed run resumes with the
missing shards only.
"""
from __future__ import annotations

from pipeline.layout import RunLayout
from pipeline.runner import Stage, StageRun
from stages.resolve import rpn_from_train_rpn


def reads(manifest) -> tuple[str, ...]:
    return ("shard",) + (("train-rpn",) if rpn_from_train_rpn(manifest, "proposals") else ())


def rpn_checksum(run: StageRun) -> dict:
    from pipeline.io import sha256_file
    from stages.resolve import rpn_checkpoint_path

    checkpoint = run.memo["checkpoint"] = rpn_checkpoint_path(run.manifest, "proposals")
    return {"checkpoint": {"sha256": sha256_file(checkpoint)}}  # content, not path: runs move


def rpn_and_precision(run: StageRun) -> dict:
    """What the section's settings do not say: the RPN's checksum, and `precision` as the actors will run
    it (`auto` resolved: bf16 on GPUs, fp32 on CPUs)."""
    from stages.resolve import actor_precision

    precision = run.memo["precision"] = actor_precision(run.manifest, "proposals")
    return {**rpn_checksum(run), "proposals": {**run.settings["proposals"], "precision": precision}}


def shards_done(run: StageRun) -> bool:
    return not run.markers().pending(run.shard_ids())


def proposal_job(manifest, checkpoint, *, fingerprint: str = "", rpn_loader: str | None = None,
                 decode_threads: int = 1, device: str = "auto",
                 precision: str | None = None) -> "ProposalJob":  # noqa: F821
    """What a proposal worker needs, from the manifest's `proposals` section (`precision`: the resolved
    one the stage fingerprinted; default the section's)."""
    from trainer.offline.proposals import DEFAULT_RPN_LOADER, ProposalJob

    cfg = manifest.proposals
    return ProposalJob(run_root=str(RunLayout.of(manifest).root), checkpoint=str(checkpoint),
                       min_size=cfg.min_size, max_size=cfg.max_size, pre_nms_top_n=cfg.pre_nms_top_n,
                       post_nms_top_n=cfg.post_nms_top_n, nms_thresh=cfg.nms_thresh, batch_size=cfg.batch_size,
                       fingerprint=fingerprint, rpn_loader=rpn_loader or DEFAULT_RPN_LOADER, device=device,
                       precision=precision or cfg.precision, decode_threads=decode_threads)


def propose(run: StageRun) -> dict:
    from pipeline.ray_runtime import init_ray, map_with_actor_pool, plan_actor_pool
    from trainer.offline.proposals import DEFAULT_RPN_LOADER, ProposalShardWorker

    cfg, checkpoint = run.manifest.proposals, run.memo["checkpoint"]
    shard_ids, markers = run.shard_ids(), run.markers()
    pending, nodes = markers.start_pending(shard_ids), set()
    print(f"proposals: {len(shard_ids)} shards ({len(pending)} to do), RPN {checkpoint}")
    if pending:
        init_ray(run.manifest.ray)
        plan = plan_actor_pool("proposals", cfg, run.manifest.ray)
        job = proposal_job(run.manifest, checkpoint, fingerprint=run.fingerprint,
                           rpn_loader=run.options.get("rpn_loader", DEFAULT_RPN_LOADER),
                           decode_threads=plan.decode_threads, precision=run.memo["precision"])
        for row in map_with_actor_pool(ProposalShardWorker, [{"shard": s} for s in pending], plan,
                                       constructor_args=(job,), desc="proposals"):
            nodes.add(str(row["node"]))
    return {**markers.summary(shard_ids), "ray_nodes": sorted(nodes)}


STAGE = Stage(
    name="proposals", help="class-agnostic RPN boxes (top 300 after NMS) per shard image -> proposals/ (Ray actors)",
    reads=reads, sections=("proposals",), identify=rpn_and_precision, current=shards_done, work=propose)
run = STAGE.run
