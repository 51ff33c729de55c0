"""Checkpoint files: plain data only (loadable with `torch.load(weights_only=True)`), written
atomically and byte-reproducibly. One place, shared by every stage that saves a model."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlt.io import atomic_path


def _plain(value: Any, where: str) -> Any:
    """Plain Python data (numpy scalars and arrays converted), so the checkpoint loads with
    torch.load(weights_only=True), which refuses any other object."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"checkpoint {where}: {type(value).__name__} is not plain data")


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Atomic and byte-reproducible: torch.save names its zip folder after the file, so the
    archive is built in memory (fixed name) rather than in a randomly named temp file."""
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, **_plain(dict(info), "info")}, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        tmp.write_bytes(buffer.getvalue())
