"""Load a trained checkpoint and predict probabilities for manifest rows from the cache.

The model runs in eval mode, so an image's prediction never depends on its batch-mates
(BatchNorm uses running statistics); a test pins this. Checkpoints are read with
`weights_only=True`: unpickling may build tensors and plain containers only, so a crafted
file cannot run code; anything else is refused with one line naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlt.data.cache import ImageCache
from cxrlt.errors import DataError
from cxrlt.models import Classifier, ModelConfig

REQUIRED_KEYS = ("state_dict", "model", "classes")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config; weights must match exactly."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} not found (run the train stage)")
    bad = f"checkpoint {path} is not a valid cxrlt checkpoint"
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers (e.g. code to run).
        raise DataError(f"{bad}: it holds objects other than weights and plain data "
                        f"({_one_line(exc, 160)})") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{bad}: {_one_line(exc)}") from None
    if not isinstance(ckpt, dict):
        raise DataError(f"{bad}: expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise DataError(f"{bad}: missing keys {missing}")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["classes"], list):
        raise DataError(f"{bad}: 'model' must be a dict and 'classes' a list")
    try:
        cfg = ModelConfig(**{**ckpt["model"], "pretrained": False})
        model = Classifier(cfg, len(ckpt["classes"]))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except DataError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        # Unknown config keys, an unknown backbone, or weights of another shape or model.
        raise DataError(f"{bad}: the weights do not fit its model config: {_one_line(exc)}") from None
    model.eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, info


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto`: cuda if available, else mps if available, else cpu; or an explicit device."""
    if str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"params predict.device: {spec!r} is not a device ({_one_line(exc, 120)}); "
                        "use auto, cpu, cuda, cuda:<n> or mps") from None  # fmt: skip
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):  # fmt: skip
        raise DataError(f"params predict.device: {spec!r} is not available on this machine "
                        f"({torch.cuda.device_count()} CUDA devices); use auto or cpu")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"params predict.device: {spec!r} is not available on this machine; use auto or cpu")
    return device


@torch.inference_mode()
def predict(
    model: Classifier,
    cache: ImageCache,
    image_ids: pd.Series | list[str],
    batch_size: int = 128,
    tta_hflip: bool = False,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """(n, C) probabilities; with `tta_hflip` the mean of the image and its mirror.

    `device` may be `auto` (see `resolve_device`); the model is moved there and uint8 batches
    are sent as they are (4x less traffic than float), normalised on the device by the model.
    """
    device = resolve_device(device)
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
