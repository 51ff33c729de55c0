"""Stage train: fit the image-level classifier (loss, model, schedule from params), then the
noisy-student rounds (noisy_student.rounds; 0: none).

In a SLURM batch job with several tasks the stage re-runs itself under srun, one process per
task, before it loads anything (src/cxrlt/training/launch.py).
"""

import os
import sys

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cxrlt.gpus import claims_gpus
from cxrlt.labels import training_classes
from cxrlt.params import load_params
from cxrlt.stage import read_parquet, run_stage
from cxrlt.training.launch import relaunch_under_srun
from cxrlt.training.student import train_stage1


def main() -> None:
    status = relaunch_under_srun(load_params()["train"], os.environ)
    if status is not None:  # the srun tasks trained; rank 0 wrote the outputs
        sys.exit(status)
    train()


@claims_gpus("train")  # after the srun decision: the srun tasks' GPUs are the scheduler's
def train() -> None:
    params = load_params()
    classes = list(training_classes(params["task"]))
    manifest = read_parquet(params["data"]["manifest"], "data.manifest", "prepare")
    t = params["train"]
    info = train_stage1(manifest, classes, params["cache"]["dir"], params, t["checkpoint"], live_dir=t["live_dir"])
    if rank_zero_only.rank != 0:  # under DDP every rank holds the same result; one reports it
        return
    print(f"train: sampler {info['sampler']} ({info['epoch_length']} images per epoch), "
          f"best val mAP {info['val_mAP']:.4f} at epoch {info['best_epoch'] + 1} -> {t['checkpoint']}")
    if "crt" in info:
        c = info["crt"]
        print(f"train: cRT ({c['epochs']} epochs, {c['sampler']} sampler): val mAP "
              f"{c['val_mAP_before']:.4f} -> {c['val_mAP']:.4f} (cRT epoch {c['best_epoch'] + 1})")
    if "noisy_student" in info:
        ns = info["noisy_student"]
        for r in ns["rounds"]:
            print(f"train: noisy student round {r['round']}: {r['pseudo_images']} pseudo-labelled images, "
                  f"val mAP {r['val_mAP']}")
        kept = "the teacher" if ns["selected"] == 0 else f"the round-{ns['selected']} student"
        print(f"train: noisy student: saved {kept} (best val mAP) -> {t['checkpoint']}")


if __name__ == "__main__":
    run_stage(main)
