"""Fuzz the one image opener (pipeline.images.decode_image) longer than the suite does.

    python bench/fuzz_images.py --quick               # 200 mutations per seed file (about 13,000 decodes)
    python bench/fuzz_images.py --mutations 3000 --seed 7

Small files of every format PIL opens (tests/imagefuzz.py: PIL writes most, the rest are built byte by
byte), each mutated `--mutations` times (seeded: flipped bits, edge values in header fields, cuts,
repeats, insertions) and decoded twice: with every format allowed, so that each plugin's decoder meets
the bytes, and with the default shard.image_formats. A crash is any exception other than ImageError
leaving the opener; a hang is a decode running past `--time-limit` seconds. Exit status 1 when either
is found. Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.images import DEFAULT_IMAGE_FORMATS  # noqa: E402
from tests.imagefuzz import fuzz, seed_files  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 mutations per seed file")
    parser.add_argument("--mutations", type=int, default=1000, help="mutations per seed file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pixels", type=int, default=1 << 22, help="the opener's pixel limit")
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds one decode may take")
    args = parser.parse_args()
    if args.quick:
        args.mutations = 200
    seeds = seed_files()
    results = {}
    for label, formats in (("every_format", None), ("default_formats", DEFAULT_IMAGE_FORMATS)):
        report = fuzz(seeds, args.mutations, seed=args.seed, max_pixels=args.max_pixels, formats=formats,
                      time_limit=args.time_limit)
        results[label] = report.as_dict()
        print(f"{label}: {report.decodes} decodes of {len(seeds)} seed files in {report.seconds:.1f} s: "
              f"{len(report.crashes)} crashes, {len(report.hangs)} hangs, slowest {report.slowest[0]:.3f} s "
              f"({report.slowest[1]}); outcomes {dict(report.outcomes.most_common())}", flush=True)
        for crash in report.crashes[:20]:
            print(f"  crash: {crash}")
        for hang in report.hangs[:20]:
            print(f"  hang: {hang}")
    found = sum(r["crashes"] + r["hangs"] for r in results.values())
    print(json.dumps({"bench": "fuzz_images", "seed": args.seed, "mutations_per_seed": args.mutations,
                      "seed_files": len(seeds), "max_pixels": args.max_pixels, "load_average_1m":
                      round(os.getloadavg()[0], 2), "ok": found == 0, **results}))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
