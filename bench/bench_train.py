"""Training-step and inference throughput of the default model on this machine.

Times full optimisation steps (uint8 batch -> normalise -> batch augmentation -> forward ->
loss -> backward -> AdamW step) and eval-mode inference, in images per second.
Usage: python bench/bench_train.py [--backbone mobilenetv3_small_050] [--size 128] [--batch 32]
                                   [--memory-format channels_last|contiguous]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cxrlt.losses import build_loss
from cxrlt.models import ModelConfig, build_model
from cxrlt.training.augment import AugmentConfig, augment_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="mobilenetv3_small_050")
    ap.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    cl = args.memory_format == "channels_last"
    model = build_model(ModelConfig(backbone=args.backbone, channels_last=cl), 40)
    loss_fn = build_loss("asl", {}, np.full(40, 0.05, np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 255, (args.batch, args.size, args.size), dtype=torch.uint8)
    y = (torch.rand(args.batch, 40) < 0.1).float()
    mask = torch.ones_like(y, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    aug = AugmentConfig()

    def step() -> None:
        logits = model.head(model.features(augment_batch(model.normalise(x), aug, gen, model.cfg.std)))
        loss = loss_fn(logits, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_ips = args.steps * args.batch / (time.perf_counter() - t)
    model.eval()
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(args.steps):
            model(x)
        infer_ips = args.steps * args.batch / (time.perf_counter() - t)
    print(f"{args.backbone} @ {args.size}px, {args.memory_format}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"train step: {train_ips:8.1f} images/s")
    print(f"inference:  {infer_ips:8.1f} images/s")


if __name__ == "__main__":
    main()
