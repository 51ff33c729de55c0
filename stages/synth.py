"""Stage synth: write the built-in dataset in the MIMIC-CXR-JPG + CXR-LT 2024 layout."""

from cxrlt.data.synth import SynthConfig, write_dataset
from cxrlt.params import load_params
from cxrlt.stage import run_stage


def main() -> None:
    p = load_params()["synth"]
    meta = write_dataset(p["out"], SynthConfig.from_params(p))
    print(f"synth: {len(meta)} images, {meta['study_id'].nunique()} studies, "
          f"{meta['subject_id'].nunique()} patients -> {p['out']}")


if __name__ == "__main__":
    run_stage(main)
