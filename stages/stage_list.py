"""The pipeline's stages, in order: `regionclip run` runs the enabled ones in this order, and the
commands that look at every stage (`verify`, `status`) read it here. stages/registry.py adds the
other commands; this module imports the stage modules only, so those commands can import it.
"""
from __future__ import annotations

from stages import (concepts, embed, evaluate, label, pretrain, proposals, shard, synth, train_rpn, train_teacher,
                    transfer)

# Each a pipeline.runner.Stage.
PIPELINE = (synth.STAGE, shard.STAGE, concepts.STAGE, train_teacher.STAGE, embed.STAGE, train_rpn.STAGE,
            proposals.STAGE, label.STAGE, pretrain.STAGE, transfer.STAGE, evaluate.STAGE)


def stage_names() -> list[str]:
    return [stage.name for stage in PIPELINE]
