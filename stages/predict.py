"""Stage predict: probabilities for val/dev/test images and the CXR-LT test submission."""

from cxrlt.data.cache import ImageCache
from cxrlt.inference import load_checkpoint, predict, resolve_device
from cxrlt.io import write_parquet
from cxrlt.params import load_params
from cxrlt.stage import read_parquet, run_stage
from cxrlt.submission import predictions_frame, submission_path, write_submission


def main() -> None:
    params = load_params()
    p = params["predict"]
    model, info = load_checkpoint(params["train"]["checkpoint"])
    manifest = read_parquet(params["data"]["manifest"], "data.manifest", "prepare")
    rows = manifest[manifest["split"].isin(["val", "dev", "test"])].reset_index(drop=True)
    device = resolve_device(p.get("device", "auto"))
    probs = predict(model, ImageCache(params["cache"]["dir"]), rows["image_id"],
                    batch_size=int(p["batch_size"]), tta_hflip=bool(p["tta_hflip"]), device=device)
    preds = predictions_frame(rows, info["classes"], probs)
    write_parquet(p["out"], preds)
    test = preds[preds["split"] == "test"]
    submission = submission_path(p["submission_dir"], params["task"])
    write_submission(submission, test, info["classes"])
    print(f"predict on {device}: {len(preds)} images -> {p['out']}; {len(test)} test rows -> "
          f"{submission}")


if __name__ == "__main__":
    run_stage(main)
