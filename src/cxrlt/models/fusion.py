"""Study-level multi-view fusion: every view of one study, read together by a transformer.

A stage-1 `Classifier` supplies the backbone (and its pixel normalisation). Each view's
feature map becomes a grid of tokens; tokens carry where they are (fixed 2-D sinusoidal
encoding), which kind of view they come from (frontal / lateral / unknown) and which slot
of the study they sit in. A transformer encoder attends across all views of one study, and
a head (ML-Decoder or masked mean + linear) turns the tokens into one logit per class.

Invariants the tests hold this module to: a study's logits depend on that study only (not
on its batch-mates, the batch size or how many padding slots the batch needs), and padded
slots' pixels and view types change nothing, in eval and in train mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlt.data.manifest import VIEWS, label_matrix
from cxrlt.errors import DataError
from cxrlt.models.classifier import Classifier, normalise_pixels
from cxrlt.models.heads import MLDecoderHead, build_head, check_key_padding_mask

# view_type codes of the model's input: the manifest's `view` words in VIEWS order.
VIEW_CODES: dict[str, int] = {v: i for i, v in enumerate(VIEWS)}  # frontal 0, lateral 1, unknown 2
UNKNOWN_VIEW = VIEW_CODES["unknown"]


def view_code(view: object) -> int:
    """Anything that is not 'frontal' or 'lateral' (NaN, a typo) counts as unknown."""
    return VIEW_CODES.get(view, UNKNOWN_VIEW) if isinstance(view, str) else UNKNOWN_VIEW


@dataclass(frozen=True)
class FusionConfig:
    tokens_dim: int = 256
    # Kernel = stride of the conv that turns the feature map into tokens: 2 gives 4x fewer
    # tokens per view (attention cost is quadratic in the study's token count).
    token_stride: int = 1
    layers: int = 2
    heads: int = 8
    ff_dim: int = 1024
    dropout: float = 0.1
    max_views: int = 4
    # Frozen: the stage-1 backbone is a fixed feature extractor (weights, BatchNorm
    # statistics and drop-path all fixed, even in train mode).
    freeze_backbone: bool = True
    head: str = "ml_decoder"  # or "linear": masked mean of the tokens + nn.Linear
    head_args: dict[str, Any] = field(default_factory=dict)
    # Residual: the fusion head's output (zero at the start) is added to the mean over the
    # study's views of the frozen stage-1 head's logits, so training starts from a plain
    # view aggregation and learns what the views together add.
    residual: bool = False

    def __post_init__(self) -> None:
        if self.tokens_dim < 4 or self.tokens_dim % 4:
            raise DataError(f"fusion tokens_dim must be a positive multiple of 4, got {self.tokens_dim}")
        if self.heads < 1 or self.tokens_dim % self.heads:
            raise DataError(f"fusion tokens_dim ({self.tokens_dim}) must be a multiple of heads ({self.heads})")
        if self.token_stride < 1 or self.max_views < 1 or self.layers < 0:
            raise DataError("fusion token_stride and max_views must be >= 1, layers >= 0")
        if self.head not in ("ml_decoder", "linear"):
            raise DataError(f"fusion head {self.head!r}; valid: linear, ml_decoder")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FusionConfig:
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(f"params fusion: unknown keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(height * width, dim) fixed encoding of a token grid flattened row-major
    (token t = row * width + col). Channels [0, dim/2) encode the row, [dim/2, dim) the
    column, so the encoding tells (r, c) from (c, r) and varies along both axes."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    rows = torch.arange(height, device=device, dtype=torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)
    r, c = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each, row-major when flattened
    ar = r.reshape(-1, 1) * omega
    ac = c.reshape(-1, 1) * omega
    pe = torch.cat([ar.sin(), ar.cos(), ac.sin(), ac.cos()], dim=1)
    return pe.to(dtype)


class MaskedMeanHead(nn.Module):
    """Mean over the study's real tokens (padding excluded) + dropout + one linear layer."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward_tokens(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = tokens.shape
        check_key_padding_mask(key_padding_mask, b, n)
        if key_padding_mask is None:
            pooled = tokens.mean(dim=1)
        else:
            keep = (~key_padding_mask).unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * keep).sum(dim=1) / keep.sum(dim=1)
        return self.fc(self.drop(pooled))


class FusionModel(nn.Module):
    """(images (B, V, H, W), view_type (B, V), pad_mask (B, V)) -> (B, num_classes) logits.

    The batch dimension is the study: attention never crosses studies. `images` is uint8
    (normalised here, like `Classifier`) or already-normalised float (B, V, C, H, W).
    `view_type`: 0 frontal, 1 lateral, 2 unknown (ignored on padded slots); `pad_mask`:
    True where the slot holds no view. The classifier's backbone module is shared, not
    copied; its head is not used.
    """

    def __init__(self, classifier: Classifier, cfg: FusionConfig, num_classes: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.model_cfg = classifier.cfg
        self.num_classes = int(num_classes if num_classes is not None else classifier.num_classes)
        self.backbone = classifier.backbone
        d = cfg.tokens_dim
        self.tokenizer = nn.Conv2d(classifier.num_features, d, kernel_size=cfg.token_stride, stride=cfg.token_stride)
        self.view_embed = nn.Embedding(len(VIEWS), d)
        self.slot_embed = nn.Embedding(cfg.max_views, d)
        nn.init.normal_(self.view_embed.weight, std=0.02)
        nn.init.normal_(self.slot_embed.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.ff_dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # Nested tensors off: one code path in train and eval, no fast-path warning.
        self.encoder = nn.TransformerEncoder(
            layer, cfg.layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head: nn.Module
        if cfg.head == "ml_decoder":
            self.head = build_head("ml_decoder", d, self.num_classes, **cfg.head_args)
        else:
            self.head = MaskedMeanHead(d, self.num_classes, **cfg.head_args)
        if cfg.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
        self.prior: nn.Module | None = None
        if cfg.residual:
            if self.num_classes != classifier.num_classes:
                raise DataError(f"fusion residual: the stage-1 head predicts {classifier.num_classes} classes, "
                                f"the fusion model {self.num_classes}; they must be the same")  # fmt: skip
            self.prior = classifier.head  # shared, frozen, always in eval mode
            for p in self.prior.parameters():
                p.requires_grad_(False)
            self.prior.eval()
            _zero_output(self.head)
        if self.model_cfg.channels_last:
            self.tokenizer.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> FusionModel:
        """A frozen backbone stays in eval mode: train() would otherwise update its
        BatchNorm running statistics and switch drop-path on. The residual's stage-1 head
        is fixed too (no dropout)."""
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbone.eval()
        if self.prior is not None:
            self.prior.eval()
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, V, H, W) -> float normalised (B, V, in_chans, H, W), as stage 1 did."""
        b, v = images.shape[:2]
        x = normalise_pixels(images.reshape(b * v, *images.shape[2:]), self.model_cfg)
        return x.reshape(b, v, *x.shape[1:])

    def positional_encoding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(height * width, tokens_dim), row-major like the token flattening in `fuse`."""
        return sincos_2d(height, width, self.cfg.tokens_dim, device, dtype)

    def _check_inputs(self, images: torch.Tensor, view_type: torch.Tensor, pad_mask: torch.Tensor) -> None:
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (B, V, H, W) or (B, V, C, H, W), got shape {tuple(images.shape)}")
        b, v = images.shape[:2]
        if tuple(view_type.shape) != (b, v) or tuple(pad_mask.shape) != (b, v):
            raise ValueError(
                f"view_type {tuple(view_type.shape)} and pad_mask {tuple(pad_mask.shape)} must be (B, V) = {(b, v)}"
            )
        if pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be bool (True = padding), got {pad_mask.dtype}")
        if v > self.cfg.max_views:
            raise ValueError(f"{v} view slots per study; the model has max_views={self.cfg.max_views}")
        empty = pad_mask.all(dim=1)
        if bool(empty.any()):
            rows = torch.nonzero(empty).flatten()[:5].tolist()
            raise ValueError(f"pad_mask: study(ies) {rows} have every view slot padded; nothing to classify")
        real_types = view_type[~pad_mask]
        if bool(((real_types < 0) | (real_types >= len(VIEWS))).any()):
            raise ValueError("view_type must be 0 (frontal), 1 (lateral) or 2 (unknown) on real slots")

    def token_grids(self, images: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, V, D, H', W') token grids; padded slots are zeros and never reach the backbone,
        so their pixels cannot touch anything (not even training-mode BatchNorm statistics)."""
        return self._grids_and_prior(images, pad_mask)[0]

    def _grids_and_prior(self, images: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if images.dtype == torch.uint8:
            # In the model's own dtype, so a model cast to half / bfloat16 takes raw pixels too.
            images = self.normalise(images).to(self.tokenizer.weight.dtype)
        elif images.dim() == 4:
            images = images.unsqueeze(2).expand(-1, -1, self.model_cfg.in_chans, -1, -1)
        b, v = images.shape[:2]
        real = ~pad_mask.reshape(b * v)
        x = images.reshape(b * v, *images.shape[2:])[real]
        if self.model_cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        frozen = self.cfg.freeze_backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = self.backbone.forward_features(x)
        return self._tokens(feats, real, b, v), self._prior(feats, real, b, v)

    def _prior(self, feats: torch.Tensor, real: torch.Tensor, b: int, v: int) -> torch.Tensor | None:
        """(B, K): the mean over each study's real views of the stage-1 head's logits, or
        None without `residual`. Padded slots are left out of the mean."""
        if self.prior is None:
            return None
        logits = self.prior(feats.to(next(self.prior.parameters()).dtype))
        per_slot = logits.new_zeros(b * v, logits.shape[-1])
        per_slot[real] = logits
        keep = real.reshape(b, v, 1).to(logits.dtype)
        return (per_slot.reshape(b, v, -1) * keep).sum(dim=1) / keep.sum(dim=1)

    def _tokens(self, feats: torch.Tensor, real: torch.Tensor, b: int, v: int) -> torch.Tensor:
        """Feature maps of the real slots -> (B, V, D, H', W') token grids, zeros when padded."""
        s = self.cfg.token_stride
        if feats.shape[-2] < s or feats.shape[-1] < s:
            raise ValueError(
                f"feature map {tuple(feats.shape[-2:])} is smaller than token_stride={s}; use larger images or a smaller stride"
            )
        if self.model_cfg.channels_last:
            feats = feats.contiguous(memory_format=torch.channels_last)
        tok = self.tokenizer(feats.to(self.tokenizer.weight.dtype))
        grid = tok.new_zeros(b * v, *tok.shape[1:])
        grid[real] = tok
        return grid.reshape(b, v, *tok.shape[1:])

    def forward_features(self, features: torch.Tensor, view_type: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's feature maps (B, V, C, h, w), computed beforehand: with a
        frozen backbone they do not change, so stage-2 training computes them once. The
        same function as `forward` on the pixels (a test checks)."""
        b, v = features.shape[:2]
        self._check_inputs(features, view_type, pad_mask)
        real = ~pad_mask.reshape(b * v)
        feats = features.reshape(b * v, *features.shape[2:])[real]
        grids = self._tokens(feats, real, b, v)
        return self.fuse(grids, view_type, pad_mask, self._prior(feats, real, b, v))

    def fuse(self, grids: torch.Tensor, view_type: torch.Tensor, pad_mask: torch.Tensor,
             prior: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V, D, H', W') token grids -> (B, num_classes) logits (+ the residual's prior)."""
        b, v, d, h, w = grids.shape
        if bool(pad_mask.all(dim=1).any()):
            raise ValueError("pad_mask: a study has every view slot padded; nothing to classify")
        tokens = grids.flatten(3).transpose(2, 3)  # (B, V, H'W', D), token t = row * W' + col
        pe = self.positional_encoding(h, w, tokens.device, tokens.dtype)
        vt = view_type.masked_fill(pad_mask, UNKNOWN_VIEW)  # padded slots' type is never read
        slots = torch.arange(v, device=tokens.device)
        tokens = (
            tokens
            + pe
            + self.view_embed(vt).unsqueeze(2).to(tokens.dtype)
            + self.slot_embed(slots)[None, :, None].to(tokens.dtype)
        )
        tokens = tokens.masked_fill(pad_mask[:, :, None, None], 0.0)
        tokens = tokens.reshape(b, v * h * w, d)
        key_mask = pad_mask[:, :, None].expand(b, v, h * w).reshape(b, v * h * w)
        out = self.encoder(tokens, src_key_padding_mask=key_mask)
        out = out.masked_fill(key_mask.unsqueeze(-1), 0.0)
        assert isinstance(self.head, MLDecoderHead | MaskedMeanHead)
        logits = self.head.forward_tokens(out, key_mask)
        if self.prior is not None:
            if prior is None:
                raise ValueError("a residual fusion model needs the stage-1 prior (call forward or forward_features)")
            logits = logits + prior.to(logits.dtype)
        return logits

    def forward(self, images: torch.Tensor, view_type: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(images, view_type, pad_mask)
        grids, prior = self._grids_and_prior(images, pad_mask)
        return self.fuse(grids, view_type, pad_mask, prior)


def _zero_output(head: nn.Module) -> None:
    """Zero the head's last layer, so a residual fusion model starts at its prior."""
    if isinstance(head, MaskedMeanHead):
        last: list[torch.Tensor] = [head.fc.weight, head.fc.bias]
    elif isinstance(head, MLDecoderHead) and head.shared_out is not None:
        last = [head.shared_out.weight, head.shared_out.bias]
    elif isinstance(head, MLDecoderHead):
        assert head.group_weight is not None and head.group_bias is not None
        last = [head.group_weight, head.group_bias]
    else:
        raise TypeError(f"fusion head {type(head).__name__} has no known output layer")
    with torch.no_grad():
        for t in last:
            t.zero_()


# ----------------------------------------------------------------------------- view choice


def _view_order(view_types: Sequence[str], image_ids: Sequence[str]) -> list[int]:
    """Frontal, then lateral, then unknown; ties by image_id: independent of row order."""
    return sorted(range(len(image_ids)), key=lambda i: (view_code(view_types[i]), str(image_ids[i])))


def views_for_study(
    view_types: list[str], image_ids: list[str], cap: int, rng: np.random.Generator | None
) -> list[int]:
    """Indices (into the inputs) of the views to feed, in slot order.

    rng None (evaluation): the first `cap` in frontal > lateral > unknown order, ties by
    image_id. With an rng (training): a random subset of min(cap, n) views, still in that
    slot order, so that a slot (and its learned embedding) means the same kind of view in
    training and evaluation; the draw does not depend on the order of the input rows."""
    n = len(image_ids)
    if len(view_types) != n:
        raise ValueError(f"views_for_study: {len(view_types)} view types for {n} image ids")
    if n == 0:
        raise ValueError("views_for_study: a study without images")
    if cap < 1:
        raise ValueError(f"views_for_study: cap must be >= 1, got {cap}")
    order = _view_order(view_types, image_ids)
    if rng is None or n <= cap:
        return order[:cap]
    picked = np.sort(rng.choice(n, size=cap, replace=False))
    return [order[i] for i in picked]


@dataclass(frozen=True)
class Study:
    study_id: str
    image_ids: list[str]  # the views fed to the model, in slot order (evaluation rule)
    views: list[str]  # their manifest `view` words
    view_types: list[int]  # their codes (0 frontal, 1 lateral, 2 unknown)
    all_image_ids: list[str]  # every image of the study (slot order rule), even beyond the cap
    all_views: list[str]
    label: np.ndarray  # (K,) float32: 1 / 0 / NaN, union over the study's images


def group_studies(manifest: pd.DataFrame, classes: Sequence[str], cap: int) -> list[Study]:
    """One `Study` per study_id (sorted by study_id), views chosen by `views_for_study` with
    no rng. Study label per class: the maximum over the images that know it (a finding seen
    on one view is present in the study); NaN only when no image of the study knows it.
    `all_image_ids` lets a caller give every image, even those over the cap, the study's
    prediction."""
    for col in ("image_id", "study_id", "view"):
        if col not in manifest.columns:
            raise DataError(f"manifest lacks column {col!r}")
    if cap < 1:
        raise ValueError(f"group_studies: cap must be >= 1, got {cap}")
    if manifest.empty:
        return []
    study = manifest["study_id"].astype(str).to_numpy(dtype=str)
    image = manifest["image_id"].astype(str).to_numpy(dtype=str)
    views = manifest["view"].to_numpy(dtype=object)
    codes = np.array([view_code(v) for v in views])
    order = np.lexsort((image, codes, study))  # last key is primary: study, view, image_id
    study, image, views, codes = study[order], image[order], views[order], codes[order]
    y = label_matrix(manifest, classes)[order]
    starts = np.flatnonzero(np.r_[True, study[1:] != study[:-1]])
    known = ~np.isnan(y)
    labels = np.maximum.reduceat(np.where(known, y, -np.inf), starts, axis=0)
    labels[~np.logical_or.reduceat(known, starts, axis=0)] = np.nan
    labels = labels.astype(np.float32)
    ends = np.r_[starts[1:], len(study)]
    out = []
    for k, (a, e) in enumerate(zip(starts, ends, strict=True)):
        ids = image[a:e].tolist()
        vw = [v if isinstance(v, str) else "unknown" for v in views[a:e].tolist()]
        out.append(
            Study(
                study_id=str(study[a]),
                image_ids=ids[:cap],
                views=vw[:cap],
                view_types=codes[a:e][:cap].tolist(),
                all_image_ids=ids,
                all_views=vw,
                label=labels[k],
            )
        )
    return out
