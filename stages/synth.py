"""Stage synth: write the built-in dataset in the MIMIC-CXR-JPG + CXR-LT 2024 layout."""

from cxrlt.params import load_params
from cxrlt.stage import run_stage
from cxrlt.synth.external import write_external
from cxrlt.synth.mimic import SynthConfig, write_dataset


def main() -> None:
    p = load_params()["synth"]
    meta = write_dataset(p["out"], SynthConfig.from_params(p))
    tables = write_external(p["out"], p.get("external", {}))
    print(f"synth: {len(meta)} images, {meta['study_id'].nunique()} studies, "
          f"{meta['subject_id'].nunique()} patients -> {p['out']}; external: "
          + ", ".join(f"{k} {len(v)} rows" for k, v in tables.items()))


if __name__ == "__main__":
    run_stage(main)
