"""The one list of the pipeline's stages, in order, and of the other commands.

`regionclip --help`, `regionclip run` (every enabled stage in this order), `regionclip status`,
`regionclip verify` and `python -m stages.<name>` all read it. Stage modules import nothing heavy at
module level (torch, Ray, spaCy are imported inside their work), so reading this list is cheap.
"""
from __future__ import annotations

from stages import (coco_ovd_split, concepts, convert_teacher, detect, embed, evaluate, label, pretrain, proposals,
                    report, search, shard, show, synth, train_rpn, train_teacher, transfer, verify, vocab)

# The pipeline: each a pipeline.runner.Stage; `regionclip run` runs the enabled ones in this order.
PIPELINE = (synth.STAGE, shard.STAGE, concepts.STAGE, train_teacher.STAGE, embed.STAGE, train_rpn.STAGE,
            proposals.STAGE, label.STAGE, pretrain.STAGE, transfer.STAGE, evaluate.STAGE)

# Commands that are not stages: modules with COMMAND, HELP, add_arguments(parser) and run(manifest, args).
TOOLS = (verify, vocab, show, detect, search, report, coco_ovd_split, convert_teacher)

STAGES = {stage.name: stage for stage in PIPELINE}
TOOL_MODULES = {tool.COMMAND: tool for tool in TOOLS}


def stage_names() -> list[str]:
    return [stage.name for stage in PIPELINE]
