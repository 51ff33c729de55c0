"""Load a trained checkpoint and predict probabilities for manifest rows from the cache.

The model runs in eval mode, so an image's prediction never depends on its batch-mates
(BatchNorm uses running statistics); a test pins this. Checkpoints are read with
`weights_only=True`: unpickling may build tensors and plain containers only, so a crafted
file cannot run code; anything else is refused with one line naming the file. Weights load
with strict key matching, and a mismatch lists the missing, unexpected and mis-shaped keys.
The one allowed departure is explicit: `load_checkpoint_for_labels` gives a head with
label-text queries another label set (its query embeddings are replaced, nothing trained is).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlt.data.cache import ImageCache
from cxrlt.errors import DataError
from cxrlt.models import Classifier, ModelConfig
from cxrlt.models.heads import MLDecoderHead

REQUIRED_KEYS = ("state_dict", "model", "classes")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def state_dict_mismatch(model: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """None when `state` fits `model` key for key and shape for shape, else one line listing
    the missing, unexpected and mis-shaped keys (torch's own message is long and multi-line)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    parts = [f"{label} ({len(keys)}): {_keys(keys)}" for label, keys in
             (("Missing keys", missing), ("Unexpected keys", unexpected), ("size mismatch", shapes)) if keys]  # fmt: skip
    return "; ".join(parts) or None


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu", stage: str = "train") -> dict[str, Any]:
    """The checkpoint file as plain data (`weights_only`), with its required keys checked."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} not found (run the {stage} stage)")
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
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint's own config; weights must match exactly."""
    ckpt = read_checkpoint(path, map_location)
    bad = f"checkpoint {path} is not a valid cxrlt checkpoint"
    state = ckpt["state_dict"]
    fit = f"{bad}: the weights do not fit its model config"
    try:
        cfg = ModelConfig(**{**ckpt["model"], "pretrained": False})
        # Text queries are a buffer of the head: the checkpoint carries its own.
        text = isinstance(cfg.head_args, dict) and cfg.head_args.get("queries") == "text"
        queries = state.get("head.query_embeddings") if text and isinstance(state, dict) else None
        if text and queries is None:
            raise DataError(f"{fit}: Missing keys (1): head.query_embeddings (model.head_args.queries is text)")
        model = Classifier(cfg, len(ckpt["classes"]), queries)
        mismatch = state_dict_mismatch(model, state) if isinstance(state, dict) else "state_dict is not a dict"
        if mismatch:
            raise DataError(f"{fit}: {mismatch}")
        model.load_state_dict(state, strict=True)
    except DataError:
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        # Unknown config keys, an unknown backbone, or weights of another shape or model.
        raise DataError(f"{bad}: the weights do not fit its model config: {_one_line(exc)}") from None
    model.eval()
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, info


def load_checkpoint_for_labels(
    path: str | os.PathLike,
    classes: Sequence[str],
    embeddings: torch.Tensor,
    recipe: Mapping[str, Any] | None = None,
    map_location: str = "cpu",
) -> tuple[Classifier, dict[str, Any]]:
    """A checkpoint whose head has label-text queries, made to score `classes` (e.g. Task 3's,
    never seen in training) from their `embeddings` (K', E).

    Every trained weight loads strictly first (`load_checkpoint`); only then are the query
    embeddings, a fixed buffer, replaced. `recipe` (`LabelEmbeddings.recipe`) must match the
    one the model was trained with: vectors from another encoder or other templates would go
    through a projection that never saw their like.
    """
    model, info = load_checkpoint(path, map_location)
    head = model.head
    if not isinstance(head, MLDecoderHead) or head.query_embeddings is None:
        raise DataError(f"checkpoint {path}: its head ({model.cfg.head}) has no label-text queries, "
                        f"so it scores only its own {len(info['classes'])} classes; train with "
                        "model.head: ml_decoder and model.head_args.queries: text")  # fmt: skip
    if embeddings.dim() != 2 or embeddings.shape[0] != len(classes):
        raise DataError(f"{len(classes)} classes need embeddings of shape ({len(classes)}, E), "
                        f"got {tuple(embeddings.shape)}")  # fmt: skip
    trained = info.get("label_embeddings")
    if recipe is not None and isinstance(trained, Mapping):
        differ = [k for k in recipe if trained.get(k) != recipe[k]]
        if differ:
            raise DataError(f"checkpoint {path} was trained with other label embeddings: "
                            f"{', '.join(differ)} differ; embed the new classes as before")  # fmt: skip
    try:
        model.set_query_embeddings(embeddings)
    except ValueError as exc:
        raise DataError(f"checkpoint {path}: {_one_line(exc)}") from None
    return model, {**info, "classes": list(classes), "trained_classes": list(info["classes"])}


def load_fusion_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The stage-2 fusion model (backbone included) from its self-contained checkpoint."""
    from cxrlt.models.fusion import FusionConfig, FusionModel

    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} not found (run the fuse stage)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"checkpoint {path} is not a valid cxrlt fusion checkpoint: {_one_line(exc)}") from None
    missing = [k for k in (*REQUIRED_KEYS, "fusion") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise DataError(f"checkpoint {path} is not a fusion checkpoint: missing keys {missing}")
    try:
        classifier = Classifier(ModelConfig(**{**ckpt["model"], "pretrained": False}), len(ckpt["classes"]))
        model = FusionModel(classifier, FusionConfig(**ckpt["fusion"]), len(ckpt["classes"]))
        mismatch = state_dict_mismatch(model, ckpt["state_dict"])
        if mismatch:
            raise DataError(mismatch)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, DataError) as exc:
        raise DataError(f"checkpoint {path}: the weights do not fit its fusion config: {_one_line(exc)}") from None
    model.eval()
    return model, {k: v for k, v in ckpt.items() if k != "state_dict"}


def resolve_device(spec: str | torch.device = "auto", where: str = "params predict.device") -> torch.device:
    """`auto`: cuda if available, else mps if available, else cpu; or an explicit device.
    `where` names the setting in errors."""
    if str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"{where}: {spec!r} is not a device ({_one_line(exc, 120)}); "
                        "use auto, cpu, cuda, cuda:<n> or mps") from None  # fmt: skip
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):  # fmt: skip
        raise DataError(f"{where}: {spec!r} is not available on this machine "
                        f"({torch.cuda.device_count()} CUDA devices); use auto or cpu")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"{where}: {spec!r} is not available on this machine; use auto or cpu")
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
        out[start : start + len(idx)] = predict_pixels(model, cache.read_tensor(idx, device), tta_hflip, device)
    return out


@torch.inference_mode()
def predict_pixels(
    model: Classifier, batch: np.ndarray | torch.Tensor, tta_hflip: bool, device: torch.device
) -> np.ndarray:
    """(n, C) probabilities of (n, S, S) uint8 pixels for a model already on `device` in eval
    mode: the one forward pass of `predict` and `cxrlt predict`, so the two cannot drift."""
    x = (batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)).to(device)
    p = torch.sigmoid(model(x).float())
    if tta_hflip:
        p = 0.5 * (p + torch.sigmoid(model(torch.flip(x, dims=[-1])).float()))
    return p.cpu().numpy()


# -------------------------------------------------------------------------------------------
# stage 2: image features and study-level prediction with the fusion model


def _read_images(cache: ImageCache, image_ids: list[str]) -> np.ndarray:
    """(n, S, S) uint8 pixels of `image_ids`."""
    return cache.read(cache.rows(image_ids))


@torch.no_grad()
def image_features(
    model: torch.nn.Module, cache: ImageCache, image_ids: list[str], batch_size: int,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """(n, C, h, w) float32 backbone feature maps (eval mode) of a fusion model, on the CPU."""
    was = model.training
    model.eval()
    parts = []
    for start in range(0, len(image_ids), batch_size):
        x = cache.read_tensor(cache.rows(image_ids[start : start + batch_size]), device)
        x = model.normalise(x.unsqueeze(1))[:, 0].to(model.tokenizer.weight.dtype)
        if model.model_cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        parts.append(model.backbone.forward_features(x).float().cpu())
    model.train(was)
    return torch.cat(parts) if parts else torch.empty(0)


class StudyTable:
    """Manifest rows grouped by study for the fusion model: per study the views in slot order
    (`models.fusion.group_studies`), the study label, and for every row its study, so each
    image (also beyond the view cap) gets its study's prediction."""

    def __init__(self, rows: pd.DataFrame, classes: list[str], cap: int):
        from cxrlt.data.manifest import label_matrix
        from cxrlt.models.fusion import group_studies

        self.rows = rows.reset_index(drop=True)
        self.cap = int(cap)
        self.studies = group_studies(self.rows, classes, self.cap)
        position = {s.study_id: k for k, s in enumerate(self.studies)}
        self.row_study = self.rows["study_id"].astype(str).map(position).to_numpy(dtype=np.int64)
        k = len(classes)
        self.labels = np.stack([s.label for s in self.studies]) if self.studies else np.zeros((0, k), np.float32)
        self.image_labels = label_matrix(self.rows, classes)

    def __len__(self) -> int:
        return len(self.studies)

    @property
    def image_ids(self) -> list[str]:
        """Every image a study's evaluation slots use."""
        return [i for s in self.studies for i in s.image_ids]

    def slots(self, rng: np.random.Generator | None = None) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """(image ids per study, view codes (S, cap), padding mask (S, cap)); rng None: the
        evaluation rule, else a random subset for studies over the cap (training)."""
        from cxrlt.models.fusion import view_code, views_for_study

        ids, types = [], np.full((len(self), self.cap), 2, dtype=np.int64)
        pad = np.ones((len(self), self.cap), dtype=bool)
        for k, s in enumerate(self.studies):
            if rng is not None and len(s.all_image_ids) > self.cap:
                pick = views_for_study(s.all_views, s.all_image_ids, self.cap, rng)
                chosen, views = [s.all_image_ids[i] for i in pick], [s.all_views[i] for i in pick]
            else:
                chosen, views = s.image_ids, s.views
            ids.append(chosen)
            types[k, : len(chosen)] = [view_code(v) for v in views]
            pad[k, : len(chosen)] = False
        return ids, types, pad

    def predict(
        self, model: torch.nn.Module, cache: ImageCache, batch_size: int, device: torch.device,
        features: torch.Tensor | None = None, index: dict[str, int] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """(n_rows, K) probabilities: each row holds its study's (eval mode, fixed views)."""
        was = model.training
        model.eval()
        slots = self.slots(None)
        out = np.empty((len(self), model.num_classes), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(self), batch_size):
                idx = np.arange(start, min(start + batch_size, len(self)))
                logits = study_logits(model, cache, slots, idx, device, features, index)
                out[idx] = torch.sigmoid(logits.float()).cpu().numpy()
        model.train(was)
        return out[self.row_study]


def study_logits(
    model: torch.nn.Module,
    cache: ImageCache,
    slots: tuple[list[list[str]], np.ndarray, np.ndarray],
    idx: np.ndarray,
    device: torch.device,
    features: torch.Tensor | None = None,
    index: dict[str, int] | None = None,
) -> torch.Tensor:
    """Logits of the studies `idx`, from precomputed feature maps (`features[index[id]]`) or
    from the cached pixels. Padded slots hold zeros, which the model never reads."""
    ids, types, pad = slots
    chosen = [ids[i] for i in idx]
    view_type = torch.from_numpy(types[idx]).to(device)
    pad_mask = torch.from_numpy(pad[idx]).to(device)
    flat = [i for study in chosen for i in study]
    real = ~pad[idx].reshape(-1)
    if features is not None:
        assert index is not None
        grid = features.new_zeros((real.size, *features.shape[1:]))
        grid[torch.from_numpy(real)] = features[torch.as_tensor([index[i] for i in flat])]
        grid = grid.reshape(len(idx), -1, *features.shape[1:]).to(device)
        return model.forward_features(grid, view_type, pad_mask)
    images = np.zeros((real.size, cache.size, cache.size), dtype=np.uint8)
    images[real] = _read_images(cache, flat)
    x = torch.from_numpy(images.reshape(len(idx), -1, cache.size, cache.size)).to(device)
    return model(x, view_type, pad_mask)
