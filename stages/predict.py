"""Stage predict: probabilities for val/dev/test images and the CXR-LT test submission.

The image model's output is aggregated to `predict.level` (per study; `fused`: the stage-2
fusion model's study prediction) and calibrated per class (`calibrate`, fitted on val labels
only). The predictions file also keeps the raw image-level (`image:`) and fused (`fused:`)
outputs, from which evaluate compares every level; the calibration goes to its own JSON.
"""

from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.gpus import claims_gpus
from cxrlt.inference import (
    StudyTable,
    load_checkpoint,
    load_fusion_checkpoint,
    predict,
    resolve_device,
)
from cxrlt.io import write_json, write_parquet
from cxrlt.params import load_params
from cxrlt.postprocess import postprocess, settings
from cxrlt.stage import read_parquet, run_stage
from cxrlt.submission import predictions_frame, submission_path, write_submission


@claims_gpus("predict")
def main() -> None:
    params = load_params()
    p = params["predict"]
    level, calibrate = settings(params)  # a bad setting fails before the model loads
    model, info = load_checkpoint(params["train"]["checkpoint"])
    classes = info["classes"]
    manifest = read_parquet(params["data"]["manifest"], "data.manifest", "prepare")
    rows = manifest[manifest["split"].isin(["val", "dev", "test"])].reset_index(drop=True)
    device = resolve_device(p.get("device", "auto"))
    cache = ImageCache(params["cache"]["dir"])
    probs = predict(model, cache, rows["image_id"],
                    batch_size=int(p["batch_size"]), tta_hflip=bool(p["tta_hflip"]), device=device)
    fusion, finfo = load_fusion_checkpoint(params["fuse"]["checkpoint"])
    if list(finfo["classes"]) != list(classes):
        raise DataError(f"{params['fuse']['checkpoint']}: classes differ from {params['train']['checkpoint']}'s "
                        "(re-run the fuse stage)")  # fmt: skip
    table = StudyTable(rows, classes, int(finfo["fusion"]["max_views"]))
    fused = table.predict(fusion.to(device), cache, int(p["batch_size"]), device)
    y_val = label_matrix(rows[rows["split"] == "val"], classes)  # the only labels used here
    post = postprocess(probs, rows, y_val, classes, level, calibrate, fused=fused)
    preds = predictions_frame(rows, classes, post.probs, image_probs=probs, fused_probs=fused)
    write_parquet(p["out"], preds)
    write_json(p["calibration_out"], {"level": level, **post.calibration.to_dict()})
    test = preds[preds["split"] == "test"]
    submission = submission_path(p["submission_dir"], params["task"])
    write_submission(submission, test, classes)
    print(f"predict on {device}: {len(preds)} images at level {level}, calibration {calibrate} "
          f"-> {p['out']}; {len(test)} test rows -> {submission}")


if __name__ == "__main__":
    run_stage(main)
