"""Stage convert_vindr: VinDr-CXR DICOMs -> PNGs without patient metadata (16-bit by default).

Converts every image that `train.csv` lists into `external.sources.vindr.png_root`, the
folder the VinDr manifest's paths point at. Settings under `external.dicom`. The folder
persists between runs; `provenance.json` there records what made each PNG, and a PNG made
with other settings or code, or from another source file, is converted again.
"""

from pathlib import Path

from cxrlt.data.dicom import convert_dicoms
from cxrlt.data.vindr import dicom_paths, read_annotations
from cxrlt.params import load_params, section
from cxrlt.stage import run_stage


def main() -> None:
    params = load_params()
    vindr = section(params, "external.sources.vindr")
    opts = section(params, "external.dicom")
    root = Path(vindr["root"])
    ids = sorted(read_annotations(root)["image_id"].unique())
    report = convert_dicoms(
        dicom_paths(root, ids),
        vindr["png_root"],
        bits=int(opts["bits"]),
        workers=int(opts["workers"]),
        on_error=opts["on_error"],
    )
    print(f"convert_vindr: {len(ids)} images -> {vindr['png_root']}: {report}")
    for src, why in list(report.failed.items())[:20]:
        print(f"  failed {src}: {why}")


if __name__ == "__main__":
    run_stage(main)
