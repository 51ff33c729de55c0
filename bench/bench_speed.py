"""Speed at real scale in one table: cache build (512 and 1024 px), cache size, loader (0/1/2
workers) and, on a CUDA machine, the GPU training step — each as a ratio to the reference path
(colour decode + LANCZOS4 + one JPEG file per image) measured in the same run on the same files.

Usage: python bench/bench_speed.py [--n 40] [--sizes 512,1024] [--repeats 2] [--out table.md]
(`make bench` runs it). The originals are synthetic 2,500 x 3,000 JPEGs (MIMIC's size).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from cxrlt.speed import (
    bench_build,
    bench_loader,
    bench_size,
    format_table,
    gpu_rows,
    machine,
    make_originals,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="originals (tens are enough; each pass reads all)")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--repeats", type=int, default=2, help="passes per method; the fastest counts")
    ap.add_argument("--workers", type=int, default=2, help="processes of the parallel build rows")
    ap.add_argument("--noise", type=float, default=2.0, help="grey levels of pixel noise (sets JPEG size)")
    ap.add_argument("--loader-images", type=int, default=256, help="images per timed loader pass")
    ap.add_argument("--gpu-steps", type=int, default=20)
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_originals(work / "originals", args.n, args.noise)
        mb = np.mean([Path(p).stat().st_size for p in paths]) / 1e6
        caches = {}
        for size in sizes:
            build, ref_dir, jpeg_dir = bench_build(paths, size, work, args.workers, args.repeats)
            rows += build + bench_size(size, ref_dir, work)
            rows += bench_loader(size, ref_dir, work, min_images=args.loader_images, repeats=args.repeats)
            caches[size] = jpeg_dir
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        if cuda:
            rows += gpu_rows(caches, steps=args.gpu_steps)
        note = "" if cuda else "\nGPU training step: not measured (no CUDA device on this machine; see bench/bench_gpu_step.py)."
        head = (f"{args.n} synthetic 2,500 x 3,000 JPEGs (quality 95, mean {mb:.2f} MB); best of {args.repeats} "
                f"interleaved passes per method; machine: {machine()}")
        table = f"{head}\n\n{format_table(rows)}\n{note}\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
