"""Stage cache: decode and resize every manifest image once into a memory-mapped array."""

import pandas as pd

from cxrlt.data.cache import build_cache
from cxrlt.params import load_params
from cxrlt.stage import run_stage


def main() -> None:
    params = load_params()
    c = params["cache"]
    manifest = pd.read_parquet(params["data"]["manifest"])
    report = build_cache(manifest, c["dir"], int(c["size"]), workers=int(c["workers"]),
                         on_error=c["on_error"], partial_dir="data/tmp/cache-partial")
    print(f"cache: {report.n_images} images at {report.size}px in {report.seconds:.1f}s "
          f"({report.images_per_second:.0f} img/s), {len(report.failed)} unreadable")


if __name__ == "__main__":
    run_stage(main)
