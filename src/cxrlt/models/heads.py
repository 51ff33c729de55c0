"""Classification heads behind a name -> builder registry (`model.head` in params.yaml)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cxrlt.registry import Registry

HEADS = Registry("head")


class LinearHead(nn.Module):
    """Global average pooling + dropout + one linear layer."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: (B, C, H, W) feature map from the backbone.
        return self.fc(self.drop(features.mean(dim=(2, 3))))


@HEADS.register("linear")
def _linear(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    return LinearHead(in_features, num_classes, dropout)


def check_key_padding_mask(mask: torch.Tensor | None, batch: int, n_tokens: int) -> None:
    """A sample whose every token is masked would make attention softmax over nothing and
    return NaN; catch it here with a message instead of letting NaN reach the loss."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (batch, n_tokens):
        raise ValueError(f"key_padding_mask has shape {tuple(mask.shape)}; expected {(batch, n_tokens)}")
    empty = mask.all(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten()[:5].tolist()
        raise ValueError(f"key_padding_mask masks every token of sample(s) {rows}: nothing to attend to")


class MLDecoderHead(nn.Module):
    """ML-Decoder: class queries cross-attend to the spatial tokens in one decoder layer.

    Unlike global pooling, each class looks where its finding is. As in the original design
    the queries do not self-attend (that costs K^2 and does not help), and `groups` < K
    queries can each emit ceil(K / groups) logits through a group-wise linear layer, so the
    cost stops growing with the label space.

    Queries are learned by default. Fixed `query_embeddings` (K, E) (e.g. embeddings of the
    label texts) are a buffer mapped to `dim` by one shared linear layer and scored by one
    shared output layer: nothing is tied to a class index, so `set_query_embeddings` can
    swap in another label set without touching a trained weight. They are a tensor, so they
    cannot come from params.yaml (`model.head_args` stays JSON); pass them to `build_head`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        dim: int = 256,
        heads: int = 8,
        ff_dim: int = 1024,
        groups: int = 0,
        dropout: float = 0.1,
        query_embeddings: torch.Tensor | None = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ml_decoder: num_classes must be >= 1, got {num_classes}")
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"ml_decoder: dim ({dim}) must be a positive multiple of heads ({heads})")
        if not 0 <= groups <= num_classes:
            raise ValueError(f"ml_decoder: groups must be in [0, num_classes={num_classes}], got {groups}")
        self.num_classes = num_classes
        self.groups = groups
        self.num_queries = groups or num_classes
        self.per_query = math.ceil(num_classes / groups) if groups else 1

        self.embed = nn.Linear(in_features, dim)
        self.query: nn.Parameter | None = None
        self.query_proj: nn.Linear | None = None
        self.shared_out: nn.Linear | None = None
        self.group_weight: nn.Parameter | None = None
        self.group_bias: nn.Parameter | None = None
        if query_embeddings is None:
            self.query = nn.Parameter(torch.randn(self.num_queries, dim) * 0.02)
            self.register_buffer("query_embeddings", None)
            bound = 1.0 / math.sqrt(dim)
            self.group_weight = nn.Parameter(
                torch.empty(self.num_queries, dim, self.per_query).uniform_(-bound, bound)
            )
            self.group_bias = nn.Parameter(torch.zeros(num_classes))
        else:
            if groups:
                raise ValueError("ml_decoder: query_embeddings give one query per class; use groups=0")
            emb = self._check_embeddings(query_embeddings)
            if emb.shape[0] != num_classes:
                raise ValueError(
                    f"ml_decoder: query_embeddings has {emb.shape[0]} rows; expected num_classes={num_classes}"
                )
            self.register_buffer("query_embeddings", emb)
            self.query_proj = nn.Linear(emb.shape[1], dim)
            self.shared_out = nn.Linear(dim, 1)

        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim)
        )
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    @staticmethod
    def _check_embeddings(emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not emb.is_floating_point():
            raise ValueError("ml_decoder: query_embeddings must be a float tensor of shape (num_classes, E)")
        return emb.detach().clone()

    def set_query_embeddings(self, emb: torch.Tensor) -> None:
        """Score another label set (K', E) with the same trained weights."""
        if self.query_embeddings is None or self.query_proj is None:
            raise ValueError("ml_decoder: set_query_embeddings needs a head built with query_embeddings")
        if self.groups:
            raise ValueError("ml_decoder: set_query_embeddings needs groups=0 (one query per class)")
        emb = self._check_embeddings(emb)
        if emb.shape[1] != self.query_proj.in_features:
            raise ValueError(
                f"ml_decoder: embeddings have width {emb.shape[1]}; the head was built for "
                f"{self.query_proj.in_features}"
            )
        old = self.query_embeddings
        self.query_embeddings = emb.to(device=old.device, dtype=old.dtype)
        self.num_classes = self.num_queries = emb.shape[0]

    def _queries(self) -> torch.Tensor:
        if self.query is not None:
            return self.query
        assert self.query_proj is not None and self.query_embeddings is not None
        return self.query_proj(self.query_embeddings.to(self.query_proj.weight.dtype))

    def forward_tokens(
        self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, N, in_features); key_padding_mask (B, N) bool, True = padding -> (B, K)."""
        b, n, _ = tokens.shape
        check_key_padding_mask(key_padding_mask, b, n)
        if key_padding_mask is not None:
            # Attention already gives padding zero weight; zeroing the tokens as well keeps
            # non-finite padding content (0 * inf = NaN) out of the weighted sum.
            tokens = tokens.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        memory = self.embed(tokens)
        q = self._queries().to(memory.dtype).unsqueeze(0).expand(b, -1, -1)
        a, _ = self.attn(q, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)
        h = self.norm1(q + self.drop1(a))
        h = self.norm2(h + self.drop2(self.ff(h)))
        if self.shared_out is not None:
            return self.shared_out(h).squeeze(-1)
        assert self.group_weight is not None and self.group_bias is not None
        logits = torch.einsum("bqd,qdk->bqk", h, self.group_weight.to(h.dtype)).flatten(1)
        return logits[:, : self.num_classes] + self.group_bias.to(h.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: (B, C, H, W); flatten/transpose index by shape, so any memory layout
        # (channels_last too) yields row-major tokens.
        return self.forward_tokens(features.flatten(2).transpose(1, 2))


@HEADS.register("ml_decoder")
def _ml_decoder(
    in_features: int,
    num_classes: int,
    dim: int = 256,
    heads: int = 8,
    ff_dim: int = 1024,
    groups: int = 0,
    dropout: float = 0.1,
    query_embeddings: torch.Tensor | None = None,
) -> nn.Module:
    return MLDecoderHead(in_features, num_classes, dim, heads, ff_dim, groups, dropout, query_embeddings)


def build_head(name: str, in_features: int, num_classes: int, **kwargs: object) -> nn.Module:
    return HEADS.get_builder(name)(in_features, num_classes, **kwargs)
