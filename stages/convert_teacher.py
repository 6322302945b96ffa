"""Command `convert-teacher`: a trusted TorchScript CLIP file (OpenAI's RN50.pt) -> safetensors, once.

    regionclip convert-teacher MANIFEST --set teacher.trust_torchscript=true
    regionclip convert-teacher MANIFEST --set teacher.trust_torchscript=true --checkpoint RN50.pt --out RN50.safetensors

Loading a TorchScript archive runs code from the file, so every stage refuses one unless the manifest
says `teacher.trust_torchscript: true`. This command loads it that one time and writes its tensors,
unchanged, to a safetensors file (tensors and a text header, nothing that runs), then checks that the
file loads into `teacher.arch`. Point `teacher.checkpoint` at it and leave trust_torchscript false.
The source is `--checkpoint` or `teacher.checkpoint`; the output `--out` or the source's name with
`.safetensors`. The source's sha256 is printed: OpenAI's download URLs carry the sha256 of the file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import ManifestError, RunManifest

COMMAND = "convert-teacher"
HELP = ("a trusted TorchScript CLIP file (OpenAI's RN50.pt) -> safetensors that load without running code "
        "(needs teacher.trust_torchscript: true; --checkpoint, --out)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="the TorchScript file (default: teacher.checkpoint)")
    parser.add_argument("--out", help="the safetensors file to write (default: beside the source, .safetensors)")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    # Imported here so that `regionclip --help` does not import torch.
    from pipeline.io import sha256_file
    from trainer.models.checkpoint import convert_torchscript
    from trainer.models.clip import load_clip

    source = Path(args.checkpoint).expanduser() if args.checkpoint else manifest.resolve(manifest.teacher.checkpoint)
    if source is None:
        raise ManifestError("convert-teacher: no file to convert: pass --checkpoint or set teacher.checkpoint")
    if not source.is_file():
        raise FileNotFoundError(f"convert-teacher: {source}: no such file")
    if not manifest.teacher.trust_torchscript:
        raise ManifestError(f"convert-teacher: loading {source} runs code from the file; if you trust it (e.g. "
                            "its sha256 is the one in OpenAI's download URL), say so with "
                            "teacher.trust_torchscript: true (or --set teacher.trust_torchscript=true)")
    out = Path(args.out).expanduser() if args.out else source.with_suffix(".safetensors")
    digest = sha256_file(source)
    convert_torchscript(source, out)
    model, _ = load_clip(manifest.teacher.arch, out, allow_partial=manifest.teacher.allow_partial)
    tensors = len(model.state_dict())
    print(f"convert-teacher: {source} (sha256 {digest}) -> {out} ({out.stat().st_size} bytes); it loads into "
          f"{manifest.teacher.arch} ({tensors} tensors). Set teacher.checkpoint: {out} and "
          "teacher.trust_torchscript: false.")
    return {"source": str(source), "source_sha256": digest, "out": str(out), "arch": manifest.teacher.arch}
