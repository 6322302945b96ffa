"""Every command of the command line: the pipeline's stages (stages/stage_list.py, in order) and the
other commands.

`regionclip --help` (`python -m stages.cli --help`), `regionclip run` and `regionclip status` read it.
Stage modules import nothing heavy at module level (torch, Ray, spaCy are imported inside their work),
so reading this list is cheap.
"""
from __future__ import annotations

from stages import coco_ovd_split, convert_teacher, detect, report, search, show, verify, vocab
from stages.stage_list import PIPELINE

# Commands that are not stages: modules with COMMAND, HELP, add_arguments(parser) and run(manifest, args).
TOOLS = (verify, vocab, show, detect, search, report, coco_ovd_split, convert_teacher)

STAGES = {stage.name: stage for stage in PIPELINE}
TOOL_MODULES = {tool.COMMAND: tool for tool in TOOLS}
