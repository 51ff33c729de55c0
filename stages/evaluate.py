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
        print(f"evaluate {split}: mAP {s['mAP']:.4f} (prevalence baseline {s['prevalence_baseline_mAP']:.4f}), "
              f"head {s.get('mAP_head')}, medium {s.get('mAP_medium')}, tail {s.get('mAP_tail')}, "
              f"mAUROC {s['mAUROC']:.4f}")


if __name__ == "__main__":
    run_stage(main)
