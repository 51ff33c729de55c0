"""Stage fuse: train the study-level multi-view fusion model on the stage-1 backbone."""

from cxrlt.gpus import claims_gpus
from cxrlt.labels import training_classes
from cxrlt.params import load_params, section
from cxrlt.stage import read_parquet, run_stage
from cxrlt.training.fusion import fit_fusion, fuse_settings


@claims_gpus("fuse")
def main() -> None:
    params = load_params()
    fuse_settings(params)  # bad settings fail before any data loads
    classes = list(training_classes(params["task"]))
    manifest = read_parquet(section(params, "data.manifest"), "data.manifest", "prepare")
    f = params["fuse"]
    info = fit_fusion(manifest, classes, section(params, "cache.dir"), section(params, "train.checkpoint"),
                      params, f["checkpoint"], live_dir=f["live_dir"])  # fmt: skip
    print(f"fuse: {info['n_train_studies']} training studies, best val mAP {info['val_mAP']:.4f} at epoch "
          f"{info['best_epoch'] + 1} (stage 1: {info['stage1_val_mAP']:.4f}) -> {f['checkpoint']}")


if __name__ == "__main__":
    run_stage(main)
