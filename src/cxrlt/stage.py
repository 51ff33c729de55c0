"""Shared entry point of the stage scripts: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from cxrlt.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def run_stage(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except DataError as e:
        # Bad input or params: one clear line, not a traceback from deep inside pandas/torch.
        # Messages that embed a library's text can hold newlines; the user gets one line.
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


def read_parquet(path: str | os.PathLike, key: str, stage: str) -> pd.DataFrame:
    """A stage's Parquet input; a missing or unreadable file is one line naming it.

    `key` is the params entry that names the file, `stage` the stage that writes it, so the
    message says what to fix (the param) or what to run (the stage).
    """
    import pandas as pd

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (params {key}; run `dvc repro {stage}`)")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({e}; params {key})") from None
