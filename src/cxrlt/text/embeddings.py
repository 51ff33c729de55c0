"""The cached label-text embeddings (the embed stage's output) and how training finds them.

One safetensors file: a float32 tensor `embeddings` (K, E), one L2-normalised row per class,
and as its only metadata entry the record (classes in row order, encoder, a fingerprint of the
encoder's weights, templates, ...) as JSON. Reading it cannot run code; rows are picked by class
name, never by position, so a model trained on Task 1 can later be given Task 3's rows. The
file is split from the encoder so that training does not depend on transformers code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrlt.errors import DataError
from cxrlt.io import atomic_path, write_json
from cxrlt.params import section

TENSOR = "embeddings"
METADATA = "record"
# What must agree between the embeddings a head was trained with and those of a new label set:
# another encoder, template set or pooling gives vectors the trained projection never saw.
RECIPE_KEYS = ("encoder", "encoder_sha256", "dim", "templates", "max_length", "pooling", "normalised")


@dataclass(frozen=True)
class LabelEmbeddings:
    classes: tuple[str, ...]
    vectors: torch.Tensor  # (K, E) float32
    record: dict[str, Any]  # how they were made; "classes" lists the rows

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.classes):
            raise ValueError(f"label embeddings: {len(self.classes)} classes but vectors of shape "
                             f"{tuple(self.vectors.shape)}")  # fmt: skip

    @property
    def recipe(self) -> dict[str, Any]:
        return {k: self.record.get(k) for k in RECIPE_KEYS}

    def select(self, classes: Sequence[str], where: str = "label embeddings") -> LabelEmbeddings:
        """The rows of `classes`, in that order; a class without a row is named in the error."""
        index = {c: i for i, c in enumerate(self.classes)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise DataError(f"{where}: no embedding for classes {missing} (it holds {len(index)} "
                            "classes; add them to the embed stage's classes and rerun it)")  # fmt: skip
        rows = torch.as_tensor([index[c] for c in classes], dtype=torch.long)
        record = {**self.record, "classes": list(classes)}
        return LabelEmbeddings(tuple(classes), self.vectors[rows].clone(), record)


def save_label_embeddings(
    path: str | os.PathLike, emb: LabelEmbeddings, record_path: str | os.PathLike | None = None
) -> None:
    """Atomic and byte-reproducible (same vectors and record -> same bytes); `record_path` gets
    a readable JSON copy of the record."""
    from safetensors.torch import save

    record = {**emb.record, "classes": list(emb.classes)}
    vectors = emb.vectors.detach().to(torch.float32).contiguous().cpu()
    blob = save({TENSOR: vectors}, metadata={METADATA: json.dumps(record, allow_nan=False)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    if record_path is not None:
        write_json(record_path, record)


def load_label_embeddings(path: str | os.PathLike, key: str = "text.out") -> LabelEmbeddings:
    """`key`: the params entry naming the file, for the error message."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise DataError(f"{path}: label embeddings not found (params {key}; run `dvc repro embed`)")
    bad = f"{path}: not a label-embeddings file (params {key})"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR not in set(f.keys()) or METADATA not in meta:
                raise DataError(f"{bad}: expected tensor {TENSOR!r} and metadata {METADATA!r}")
            vectors = f.get_tensor(TENSOR)
        record = json.loads(meta[METADATA])
        classes = tuple(record["classes"])
        return LabelEmbeddings(classes, vectors.float(), record)
    except DataError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{bad}: {' '.join(str(exc).split())[:200]}") from None


def text_queries(params: Mapping[str, Any], classes: Sequence[str]) -> LabelEmbeddings | None:
    """The embeddings of `classes` when `model.head_args.queries` is `text`, else None."""
    head_args = (params.get("model") or {}).get("head_args") or {}
    if head_args.get("queries") != "text":
        return None
    path = section(params, "text.out")
    return load_label_embeddings(path).select(classes, where=f"{path} (params text.out)")
