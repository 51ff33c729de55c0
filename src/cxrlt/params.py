"""params.yaml access for the stage scripts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cxrlt.errors import DataError


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: params file not found (run from the repository root)")
    with open(path) as f:
        try:
            params = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, Mapping):
        raise DataError(f"{path}: expected a mapping at the top level")
    return dict(params)


def section(params: Mapping[str, Any], key: str) -> Any:
    """params[key] with an error that names the missing key."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DataError(f"params.yaml: missing key {key!r}")
        node = node[part]
    return node
