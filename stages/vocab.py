"""Command `vocab`: a class list -> an embedding file for the detector and zero-shot commands.

    regionclip vocab MANIFEST --classes coco.json --out coco65.npz
    regionclip vocab MANIFEST --classes "cat,dog,hot dog" --out pets.npz

`--classes`: a text file (one name per line), a COCO/LVIS JSON (its `categories`, by id), or a comma
list. Each name goes through the 81 templates of the teacher's text encoder (`teacher` section,
`embed.ensemble`). The .npz holds `names`, `embeddings` (float32 [C, D], L2-normalized), `arch`,
`dim`, `ensemble`, and `category_ids` for a JSON. Consumers read it with
`trainer.offline.text_embed.load_vocabulary(path, expected_dim, model_name)`, which refuses a wrong width.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import RunManifest

COMMAND = "vocab"
HELP = "class list (text, comma list, COCO/LVIS JSON) -> class embeddings .npz (--classes, --out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", required=True,
                        help="class names: a text file (one per line), a COCO/LVIS JSON, or 'cat,dog,...'")
    parser.add_argument("--out", required=True, help="output file (.npz)")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    # Imported here so that `regionclip --help` does not import torch.
    from pipeline.concepts import read_vocabulary
    from trainer.engine.device import resolve_device
    from stages.resolve import load_teacher_clip, teacher_checkpoint_path
    from trainer.offline.text_embed import checkpoint_identity, embed_names, save_vocabulary

    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: a vocabulary file ends in .npz")
    vocab = read_vocabulary(args.classes)
    device = resolve_device(manifest.embed.device)
    model, tokenizer = load_teacher_clip(manifest, device=device)
    emb = embed_names(model, tokenizer, vocab.names, manifest.embed.ensemble,
                      batch_size=manifest.embed.batch_size, device=device)
    checkpoint = checkpoint_identity(teacher_checkpoint_path(manifest))
    save_vocabulary(out, vocab.names, emb, manifest.teacher.arch, manifest.embed.ensemble,
                    vocab.category_ids, checkpoint.get("sha256", ""))
    print(f"vocab: {len(vocab.names)} classes from {vocab.source} -> {out} "
          f"(float32 [{emb.shape[0]}, {emb.shape[1]}], {manifest.teacher.arch})")
    return {"out": str(out), "classes": len(vocab.names), "dim": int(emb.shape[1])}
