"""Stage evaluate: metrics JSON, DVC plot data, figures and a report for dev and test."""

from cxrlt.evaluation import run
from cxrlt.inference import read_checkpoint
from cxrlt.params import load_params, section
from cxrlt.stage import read_parquet, run_stage


def main() -> None:
    params = load_params()
    # The record (classes, training counts, recipe) is all the report needs: reading it without
    # building the model skips the backbone library's import (a few seconds per run).
    ckpt = read_checkpoint(section(params, "train.checkpoint"))
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    preds = read_parquet(section(params, "predict.out"), "predict.out", "predict")
    manifest = read_parquet(section(params, "data.manifest"), "data.manifest", "prepare")
    summaries = run(preds, manifest, info, params)
    for split, s in summaries.items():
        if not s["labelled"]:
            print(f"evaluate {split}: unlabelled ({s['n_images']} images; predictions only)")
            continue
        shown = ", ".join(f"{k} {_fmt(s.get(k))}" for k in
                          ("mAP", "prevalence_baseline_mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC"))
        print(f"evaluate {split}: {shown}")


def _fmt(x: object) -> str:
    return "undefined" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    run_stage(main)
