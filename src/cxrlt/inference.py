"""Load a trained checkpoint and predict probabilities for manifest rows from the cache.

The model runs in eval mode, so an image's prediction never depends on its batch-mates
(BatchNorm uses running statistics); a test pins this.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlt.data.cache import ImageCache
from cxrlt.errors import DataError
from cxrlt.models import Classifier, ModelConfig


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config; weights must match exactly."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} not found (run the train stage)")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    cfg = ModelConfig(**{**ckpt["model"], "pretrained": False})
    model = Classifier(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, info


@torch.inference_mode()
def predict(
    model: Classifier,
    cache: ImageCache,
    image_ids: pd.Series | list[str],
    batch_size: int = 128,
    tta_hflip: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """(n, C) probabilities; with `tta_hflip` the mean of the image and its mirror."""
    model = model.to(device).eval()
    rows = cache.rows(image_ids)
    out = np.empty((len(rows), model.num_classes), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        order = np.argsort(idx)  # memmap reads are faster in file order
        batch = np.empty((len(idx), cache.size, cache.size), dtype=np.uint8)
        batch[order] = cache.images[idx[order]]
        x = torch.from_numpy(batch).to(device)
        p = torch.sigmoid(model(x).float())
        if tta_hflip:
            p = 0.5 * (p + torch.sigmoid(model(torch.flip(x, dims=[-1])).float()))
        out[start : start + len(idx)] = p.cpu().numpy()
    return out
