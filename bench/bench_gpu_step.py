"""GPU training step: images/s for convnext_small at 1024 px and the demo backbone at 512 px,
bf16 autocast + channels_last + fused AdamW + torch.compile against an fp16, eager baseline in
the same call, and the data path (JPEG-cache decode + batch augmentation) in the same run, so
the table says whether the GPU waits for data.

Usage: python bench/bench_gpu_step.py [--n 64] [--steps 20] [--workers 0 4 8] [--out table.md]
Rows are printed (and the --out table rewritten) as they are measured, so a run cut short keeps
what it finished. Without CUDA it says so, measures the CPU side of the data path only, and exits 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cxrlt.data.cache import ImageCache, build_cache
from cxrlt.speed import GPU_CONFIGS, Row, data_path_rate, format_table, gpu_rows, machine


def jpeg_caches(work: Path, n: int) -> dict[int, Path]:
    """A JPEG cache per size of the GPU configurations, from n smooth-plus-noise originals."""
    rng = np.random.default_rng(0)
    size_max = max(s for _, s, _ in GPU_CONFIGS)
    yy, xx = np.mgrid[0:size_max, 0:size_max].astype(np.float32)
    paths = []
    for i in range(n):
        img = 110 + 60 * np.sin(xx / 60 + i) * np.cos(yy / 70) + rng.normal(0, 2, xx.shape)
        p = work / f"{i}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    manifest = pd.DataFrame({"image_id": [str(i) for i in range(n)], "path": paths})
    caches = {}
    for size in sorted({s for _, s, _ in GPU_CONFIGS}):
        caches[size] = work / f"cache-{size}"
        build_cache(manifest, caches[size], size, workers=1, progress=False, partial_dir=work / "partial",
                    decoder="cv2", fmt="jpeg")  # fmt: skip
    return caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="images in each JPEG cache")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 4, 8],
                    help="DataLoader worker counts for the CPU-decode data path")  # fmt: skip
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        caches = jpeg_caches(Path(tmp), args.n)
        if torch.cuda.is_available():
            rows, note = [], ""
            for row in gpu_rows(caches, steps=args.steps, workers=args.workers):
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
                if args.out:
                    Path(args.out).write_text(f"{format_table(rows)}\n")
        else:
            # The CPU side of the data path still runs here, so this script is not dead code.
            rows = [Row(f"data path {size} px, jpeg cache, batch {batch}", "CPU decode + CPU augmentation",
                        data_path_rate(ImageCache(caches[size]), batch, "cpu", 2, gpu_decode=False), "images/s",
                        None, machine())
                    for _, size, batch in GPU_CONFIGS]  # fmt: skip
            note = "\nNo CUDA device on this machine: the GPU training step was not measured."
    table = f"{format_table(rows)}\n{note}\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
