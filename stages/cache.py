"""Stage cache: decode and resize every manifest image once into the image cache
(`cache.format`: a memory-mapped array, or JPEG/PNG bytes in one indexed file).

`python stages/cache.py [--manifest M --out DIR]`: the CXR-LT manifest into `cache.dir` by
default; the external sources pass their own manifest and folder.
"""

import argparse
from pathlib import Path

from cxrlt.data.cache import build_cache
from cxrlt.params import load_params, section
from cxrlt.stage import read_parquet, run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest")
    ap.add_argument("--out")
    args = ap.parse_args()
    params = load_params()
    c = params["cache"]
    manifest_path = args.manifest or params["data"]["manifest"]
    out = args.out or c["dir"]
    manifest = read_parquet(manifest_path, "--manifest" if args.manifest else "data.manifest",
                            "prepare_external" if args.manifest else "prepare")
    report = build_cache(manifest, out, int(c["size"]), workers=int(c["workers"]),
                         on_error=c["on_error"], partial_dir=f"data/tmp/cache-partial/{Path(out).name}",
                         bits_stored=section(params, "cache.bits_stored"), decoder=section(params, "cache.decoder"),
                         fmt=section(params, "cache.format"), quality=section(params, "cache.quality"))
    print(f"cache {manifest_path}: {report.n_images} images at {report.size}px in {report.seconds:.1f}s "
          f"({report.images_per_second:.0f} img/s), {len(report.failed)} unreadable -> {out}")


if __name__ == "__main__":
    run_stage(main)
