"""Atomic writes: a killed run never leaves a half-written file that a rerun would trust."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=suffix or (path.suffix + ".tmp")
    )
    os.close(fd)
    # mkstemp creates 0600 files; give the final file the usual umask-based mode.
    os.chmod(tmp, 0o666 & ~_UMASK)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_parquet(path: str | os.PathLike, df) -> None:  # noqa: ANN001 - pandas DataFrame
    with atomic_path(path, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(path: str | os.PathLike, df, **kwargs: Any) -> None:  # noqa: ANN001
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False, **kwargs)
