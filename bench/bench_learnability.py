"""Which findings of the built-in data a small CNN learns in a given budget, per class.

The signal a sign leaves at the training resolution (`bench_conspicuity.py`) does not
predict whether a from-scratch CNN learns it; this probe measures that directly. It trains
the demo's kind of model on the built cache (`dvc repro cache` first) for a fixed budget —
optionally on a subset of classes or views, to separate "the sign is not learnable" from "the
40-class run does not get there" — and prints dev AP, lift over prevalence and AUROC per
class and per frequency group. Plain loop, no DVC, nothing written: a calibration tool for
`cxrlt.synth.findings` and the demo's training defaults. Decide on dev, never on test.

    python bench/bench_learnability.py [--backbone mobilenetv3_small_050] [--epochs 6]
        [--lr 0.004] [--classes "Pneumothorax,Fibrosis"] [--view frontal] [--sampler random]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix
from cxrlt.labels import TASK1_CLASSES, frequency_groups
from cxrlt.losses import build_loss
from cxrlt.metrics import average_precision, roc_auc
from cxrlt.models import ModelConfig, build_model
from cxrlt.training.augment import AugmentConfig, augment_batch
from cxrlt.training.samplers import build_sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", default="data/manifests/mimic.parquet")
    ap.add_argument("--cache", default="data/cache/mimic")
    ap.add_argument("--backbone", default="mobilenetv3_small_050")
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("--lr", type=float, default=0.004)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loss", default="bce")
    ap.add_argument("--sampler", default="random")
    ap.add_argument("--classes", help="comma-separated subset (default: the 40 Task 1 classes)")
    ap.add_argument("--view", choices=["frontal", "lateral"], help="train and score one view only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    classes = args.classes.split(",") if args.classes else list(TASK1_CLASSES)
    manifest = pd.read_parquet(args.manifest)
    if args.view:
        manifest = manifest[manifest["view"] == args.view]
    cache = ImageCache(args.cache)

    def split(name: str) -> tuple[torch.Tensor, np.ndarray]:
        part = manifest[manifest["split"] == name]
        x = torch.from_numpy(cache.read(cache.rows(part["image_id"])))
        return x, label_matrix(part, classes)

    x_train, y_train = split("train")
    x_dev, y_dev = split("dev")
    known = ~np.isnan(y_train)
    targets = torch.from_numpy(np.nan_to_num(y_train)).float()
    mask = torch.from_numpy(known)
    counts = np.nansum(y_train, axis=0)
    model = build_model(ModelConfig(backbone=args.backbone, channels_last=True), len(classes))
    loss_fn = build_loss(args.loss, {}, counts / len(y_train), counts)
    sampler = build_sampler(args.sampler, {}, targets.numpy(), known, classes, args.seed)
    steps = int(args.epochs * sampler.epoch_length / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    )
    aug, gen = AugmentConfig(), torch.Generator().manual_seed(args.seed)
    t0, step, epoch = time.perf_counter(), 0, 0
    model.train()
    while step < steps:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for i in range(0, len(order) - args.batch + 1, args.batch):
            b = order[i : i + args.batch]
            x = augment_batch(model.normalise(x_train[b]), aug, gen, std=model.cfg.std)
            loss = loss_fn(model.head(model.features(x)), targets[b], mask[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        p = torch.cat([torch.sigmoid(model(x_dev[i : i + 256])) for i in range(0, len(x_dev), 256)]).numpy()
    groups = frequency_groups(counts, len(y_train), classes)
    table = pd.DataFrame({
        "group": [groups[c] for c in classes], "train_pos": counts.astype(int),
        "prevalence": np.nanmean(y_dev, axis=0), "AP": average_precision(y_dev, p),
        "AUROC": roc_auc(y_dev, p),
    }, index=classes)  # fmt: skip
    table["lift"] = table["AP"] / table["prevalence"]
    print(f"{args.backbone}, {args.loss}, {args.sampler}: {steps} steps of {args.batch} in {seconds:.0f} s "
          f"({steps * args.batch / seconds:.0f} img/s); dev {len(y_dev)} images")  # fmt: skip
    summary = table.groupby("group")[["AP", "prevalence", "AUROC"]].mean()
    summary["lift"] = summary["AP"] / summary["prevalence"]
    print(summary.round(3).to_string())
    print(f"mAUROC {table['AUROC'].mean():.3f}, mAP {table['AP'].mean():.3f}")
    print(table.sort_values(["group", "AUROC"]).round(3).to_string())


if __name__ == "__main__":
    main()
