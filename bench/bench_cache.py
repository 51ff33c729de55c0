"""Cache build throughput on MIMIC-sized originals (~2,500 x 3,000 px JPEGs).

Compares the cache's reduced-scale JPEG decoding (PIL draft mode) + bilinear resize against
the naive path (full decode + Lanczos resize), per process and with the cache's worker pool.
Usage: python bench/bench_cache.py [--n 60] [--size 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlt.data.cache import build_cache, load_resized


def make_originals(root: Path, n: int, seed: int = 0) -> list[str]:
    """Chest-X-ray-sized JPEGs with smooth structure plus noise (so JPEG size is realistic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:3000, 0:2500].astype(np.float32)
    base = 110 + 60 * np.sin(xx / 170) * np.cos(yy / 210)
    paths = []
    for i in range(n):
        img = base + rng.normal(0, 8, base.shape).astype(np.float32) + rng.uniform(-20, 20)
        p = root / f"{i:04d}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=95)
        paths.append(str(p))
    return paths


def naive(path: str, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L")
        w, h = im.size
        s = size / max(w, h)
        return np.asarray(im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_originals(root, args.n)
        rows = []
        t = time.perf_counter()
        for p in paths:
            naive(p, args.size)
        rows.append(("naive: full decode + Lanczos, 1 process", args.n / (time.perf_counter() - t)))
        t = time.perf_counter()
        for p in paths:
            load_resized(p, args.size)
        rows.append(("cache: draft decode + bilinear, 1 process", args.n / (time.perf_counter() - t)))
        manifest = pd.DataFrame({"image_id": [str(i) for i in range(args.n)], "path": paths})
        for workers in (1, 2):
            rep = build_cache(manifest, root / f"cache{workers}", args.size, workers=workers, progress=False, chunk=4,
                              partial_dir=root / "partial")
            rows.append((f"cache stage (build_cache), {workers} worker(s)", rep.images_per_second))
    print(f"{args.n} JPEGs of 2500x3000 px -> {args.size}px")
    print(f"{'path':48s} {'images/s':>9s}")
    for name, ips in rows:
        print(f"{name:48s} {ips:9.1f}")


if __name__ == "__main__":
    main()
