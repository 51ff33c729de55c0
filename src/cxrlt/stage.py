"""Shared entry point of the stage scripts: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from cxrlt.errors import DataError


def run_stage(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except DataError as e:
        # Bad input or params: one clear line, not a traceback from deep inside pandas/torch.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
