"""Stage pretrain: the stage-1 backbone trained on the external sources (pretrain.sources)."""

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cxrlt.gpus import claims_gpus
from cxrlt.params import load_params
from cxrlt.stage import run_stage
from cxrlt.training.pretrain import pretrain


@claims_gpus("train")
def main() -> None:
    params = load_params()
    info = pretrain(params)
    out = params["pretrain"]["checkpoint"]
    if rank_zero_only.rank != 0:  # under DDP every rank holds the same result; one reports it
        return
    if "skipped" in info:
        print(f"pretrain: skipped, {info['skipped']} -> {out}")
        return
    print(f"pretrain: {', '.join(info['sources'])}: {info['images']['train']} training images, "
          f"{len(info['classes'])} classes; best val mAP {info['val_mAP']:.4f} at epoch "
          f"{info['best_epoch'] + 1} -> {out}")


if __name__ == "__main__":
    run_stage(main)
