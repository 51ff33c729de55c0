"""Stage predict: probabilities for val/dev/test images and the CXR-LT test submission."""

import pandas as pd

from cxrlt.data.cache import ImageCache
from cxrlt.inference import load_checkpoint, predict
from cxrlt.io import write_parquet
from cxrlt.params import load_params
from cxrlt.stage import run_stage
from cxrlt.submission import predictions_frame, write_submission


def main() -> None:
    params = load_params()
    p = params["predict"]
    model, info = load_checkpoint(params["train"]["checkpoint"])
    manifest = pd.read_parquet(params["data"]["manifest"])
    rows = manifest[manifest["split"].isin(["val", "dev", "test"])].reset_index(drop=True)
    probs = predict(model, ImageCache(params["cache"]["dir"]), rows["image_id"],
                    batch_size=int(p["batch_size"]), tta_hflip=bool(p["tta_hflip"]))
    preds = predictions_frame(rows, info["classes"], probs)
    write_parquet(p["out"], preds)
    test = preds[preds["split"] == "test"]
    write_submission(p["submission"], test, info["classes"])
    print(f"predict: {len(preds)} images -> {p['out']}; {len(test)} test rows -> {p['submission']}")


if __name__ == "__main__":
    run_stage(main)
