"""Image-level classifier: timm backbone (feature map) -> head -> one logit per class."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cxrlt.errors import DataError
from cxrlt.models.heads import MLDecoderHead, build_head

QUERIES = ("learned", "text")  # model.head_args.queries of the ml_decoder head


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "mobilenetv3_small_100"
    pretrained: bool = False
    head: str = "linear"
    head_args: dict[str, Any] = field(default_factory=dict)
    in_chans: int = 1
    drop_path_rate: float = 0.0
    # NHWC memory layout for weights and activations: same function, faster convolutions
    # (about 1.3x for the demo backbone on this project's 2-core CPU; the usual layout for
    # tensor cores on GPUs).
    channels_last: bool = False
    # Intensity normalisation of the uint8 cache, applied inside the model so that every
    # caller (training, evaluation, export) feeds raw pixels.
    mean: float = 0.5
    std: float = 0.25

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(f"params model: unknown keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm model without its classifier; a hub failure becomes one clear line."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": "", "in_chans": cfg.in_chans}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        return timm.create_model(cfg.backbone, pretrained=cfg.pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise DataError(f"params model.backbone: timm has no model {cfg.backbone!r}") from None
        raise
    except OSError as e:
        if cfg.pretrained:
            raise RuntimeError(
                f"cannot download pretrained weights for {cfg.backbone!r} (offline? HF_HUB_OFFLINE?): "
                f"set model.pretrained: false or pre-fill the Hugging Face cache. ({type(e).__name__})"
            ) from None
        raise


def freeze_unused(backbone: nn.Module, in_chans: int) -> list[str]:
    """Stop training parameters that `forward_features` never touches (e.g. timm's `conv_head`
    of MobileNetV3, ConvNeXt's head norm): DDP refuses unused trainable parameters, and the
    optimizer would only decay them. Found by one tiny backward pass; returns their names."""
    was_training = backbone.training
    backbone.eval()  # eval: BatchNorm statistics (pretrained ones too) stay untouched
    x = torch.zeros(1, in_chans, 64, 64)
    backbone.forward_features(x).float().sum().backward()
    unused = []
    for name, p in backbone.named_parameters():
        if p.grad is None and p.requires_grad:
            p.requires_grad_(False)
            unused.append(name)
        p.grad = None
    backbone.train(was_training)
    return unused


def normalise_pixels(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """uint8 (B, H, W) or (B, 1, H, W) -> float normalised (B, in_chans, H, W).

    A function rather than only a method so that models built around a Classifier's
    backbone (the multi-view fusion model) normalise exactly as the backbone was trained."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.float().div_(255.0).sub_(cfg.mean).div_(cfg.std)
    if cfg.in_chans != x.shape[1]:
        x = x.expand(-1, cfg.in_chans, -1, -1)
    return x


def head_kwargs(cfg: ModelConfig, query_embeddings: torch.Tensor | None) -> dict[str, Any]:
    """`cfg.head_args` for the head builder. `queries: text` is the one entry that is not a
    builder argument: it says that the head's class queries are fixed label-text embeddings,
    which are a tensor and so come from the caller (training: the embed stage's file; loading:
    the checkpoint), never from params.yaml."""
    args = dict(cfg.head_args)
    queries = args.pop("queries", "learned")
    if queries not in QUERIES:
        raise DataError(f"params model.head_args.queries: {queries!r}; valid: {', '.join(QUERIES)}")
    if queries == "text":
        if cfg.head != "ml_decoder":
            raise DataError(f"params model.head_args.queries: text needs model.head: ml_decoder, got {cfg.head!r}")
        if query_embeddings is None:
            raise DataError("params model.head_args.queries is text, but no label embeddings were given "
                            "(training reads them from params text.out, written by the embed stage)")  # fmt: skip
        args["query_embeddings"] = query_embeddings
    elif query_embeddings is not None:
        raise ValueError("query_embeddings were given, but model.head_args.queries is not text")
    return args


class Classifier(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, query_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = create_backbone(cfg)
        self.unused_backbone_params = freeze_unused(self.backbone, cfg.in_chans)
        self.num_features = int(self.backbone.num_features)
        self.head = build_head(cfg.head, self.num_features, num_classes, **head_kwargs(cfg, query_embeddings))
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, 1, H, W) -> float normalised (B, in_chans, H, W)."""
        return normalise_pixels(x, self.cfg)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.normalise(x)
        return self.head(self.features(x))

    def set_query_embeddings(self, emb: torch.Tensor) -> None:
        """Score another label set (K', E) with the trained weights (text-query heads only)."""
        if not isinstance(self.head, MLDecoderHead):
            raise ValueError(f"set_query_embeddings needs the ml_decoder head, not {self.cfg.head!r}")
        self.head.set_query_embeddings(emb)
        self.num_classes = self.head.num_classes


def build_model(cfg: ModelConfig, num_classes: int, query_embeddings: torch.Tensor | None = None) -> Classifier:
    return Classifier(cfg, num_classes, query_embeddings)
