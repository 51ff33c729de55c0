"""Stage evaluate: metrics JSON, DVC plot data, figures and a report for dev and test."""

import pandas as pd

from cxrlt.evaluation import run
from cxrlt.inference import load_checkpoint
from cxrlt.params import load_params
from cxrlt.stage import run_stage


def main() -> None:
    params = load_params()
    _, info = load_checkpoint(params["train"]["checkpoint"])
    preds = pd.read_parquet(params["predict"]["out"])
    manifest = pd.read_parquet(params["data"]["manifest"])
    summaries = run(preds, manifest, info, params)
    for split, s in summaries.items():
        shown = ", ".join(f"{k} {_fmt(s.get(k))}" for k in
                          ("mAP", "prevalence_baseline_mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC"))
        print(f"evaluate {split}: {shown}")


def _fmt(x: object) -> str:
    return "undefined" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    run_stage(main)
