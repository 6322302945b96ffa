"""Rows doubling: the corpus reader and the shard writer on many captions per image.

    python bench/linear_rows.py --quick          # 12,500 -> 100,000 rows
    python bench/linear_rows.py                  # 25,000 -> 400,000 rows

Three corpora per size n, in one process: a caption TSV of n rows naming 10 images (n/10 captions each:
the reader's merge and duplicate check, then the shard writer's caption check), the same TSV with every
row repeated (half the rows are duplicates: the duplicate check), and a Parquet table of one row whose
caption column is a list of n captions (the shard writer alone). Each run reads the corpus
(pipeline.readers.read_corpus) and writes it as one shard (pipeline.shard_writer.write_shard); the least
time of --repeat runs (more for short ones) is kept. A per-row path that is linear gives a time ratio of
about 2 per doubling, a quadratic one about 4: the figure is 2 ** the slope of log time over log rows,
fitted over every size, beside each ratio between two sizes (which carries the noise of two
measurements). Times are the process's CPU seconds (time.process_time: other jobs on a shared machine
weigh on them far less than on wall time; wall seconds beside them), with Python's cyclic garbage
collector paused while timing, as timeit does (its full collections fall at other points at each size:
amortized linear, but up to 1.7x between two sizes). Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGES = 10


def write_corpus(folder: Path, kind: str, n: int) -> Path:
    """The corpus file of one kind and size, with its images beside it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(IMAGES):
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG")
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())
    if kind == "list":
        path = folder / "captions.parquet"
        pq.write_table(pa.table({"caption": [[f"a picture, caption {j}" for j in range(n)]], "url": ["0.jpg"]}),
                       path)
        return path
    path = folder / "captions.tsv"
    with open(path, "w") as f:
        f.write("caption\turl\n")
        for j in range(n // 2 if kind == "repeated" else n):
            line = f"a picture, caption {j}\t{j % IMAGES}.jpg\n"
            f.write(line * (2 if kind == "repeated" else 1))
    return path


def time_corpus(root: Path, kind: str, n: int, repeat: int) -> dict:
    from pipeline.config import parse_manifest
    from pipeline.layout import RunLayout
    from pipeline.readers import read_corpus
    from pipeline.shard_writer import write_shard
    from stages.shard import shard_options

    path = write_corpus(root / f"{kind}-{n}" / "corpus", kind, n)
    best = {"read_s": float("inf"), "write_s": float("inf"), "wall_s": float("inf")}
    spent, attempt = 0.0, 0
    # at least `repeat` runs, and more (up to 20) until a second has been measured: the least of many
    # runs of a few milliseconds is as steady as that of a few of a second
    while attempt < repeat or (spent < 1.0 and attempt < 20):
        attempt += 1
        manifest = parse_manifest({"name": "bench", "output_dir": str(root / f"{kind}-{n}" / f"run{attempt}"),
                                   "corpus": {"format": "cc3m_tsv", "path": str(path)},
                                   "shard": {"samples_per_shard": IMAGES}})
        gc.collect()
        gc.disable()
        try:
            wall, started = time.perf_counter(), time.process_time()
            rows = read_corpus(manifest)
            read_s = time.process_time() - started
            layout = RunLayout.of(manifest)
            started = time.process_time()
            stats = write_shard(0, rows, shard_options(manifest), layout.shards, layout.shard_tar(0), "bench")
            write_s = time.process_time() - started
        finally:
            gc.enable()
        spent += read_s + write_s
        if read_s + write_s < best["read_s"] + best["write_s"]:
            best = {"read_s": read_s, "write_s": write_s, "wall_s": time.perf_counter() - wall}
    return {"rows": n, "samples": stats["successes"], "runs": attempt, **{k: round(v, 4) for k, v in best.items()},
            "total_s": round(best["read_s"] + best["write_s"], 4)}


def fitted_exponent(rows: list[int], seconds: list[float]) -> float:
    """The slope of log(seconds) over log(rows), least squares: 1 linear, 2 quadratic. Steadier than any
    one ratio between two sizes, each of which carries the noise of two measurements."""
    xs, ys = [math.log(r) for r in rows], [math.log(max(s, 1e-9)) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12,500 -> 100,000 rows")
    parser.add_argument("--start", type=int, default=25_000, help="rows of the smallest corpus")
    parser.add_argument("--doublings", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (the least CPU time is kept)")
    args = parser.parse_args()
    if args.quick:
        args.start, args.repeat = 12_500, 2
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("rows", "repeated", "list"):
            sizes = [time_corpus(Path(tmp), kind, args.start * 2 ** d, args.repeat) for d in range(args.doublings + 1)]
            ratios = [round(b["total_s"] / a["total_s"], 2) for a, b in zip(sizes, sizes[1:])]
            fitted = round(2 ** fitted_exponent([s["rows"] for s in sizes], [s["total_s"] for s in sizes]), 2)
            results[kind] = {"sizes": sizes, "ratio_per_doubling": ratios, "fitted_ratio_per_doubling": fitted}
            print(f"{kind}: " + ", ".join(f"{s['rows']} rows {s['total_s']:.2f} s (read {s['read_s']:.2f}, write "
                                          f"{s['write_s']:.2f}; wall {s['wall_s']:.2f})" for s in sizes)
                  + f"; ratio per doubling {ratios}, fitted {fitted}",
                  flush=True)
    load_after = os.getloadavg()[0]
    print(json.dumps({"bench": "linear_rows", "clock": "process CPU seconds, gc paused", "images": IMAGES, "start_rows": args.start, "doublings": args.doublings,
                      "load_average_1m": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
                      "max_fitted_ratio_per_doubling": max(r["fitted_ratio_per_doubling"] for r in results.values()),
                      "max_ratio_between_two_sizes": max(max(r["ratio_per_doubling"]) for r in results.values()),
                      **results}))


if __name__ == "__main__":
    main()
