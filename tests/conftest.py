"""Shared fixtures: a tiny built-in dataset written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_SYNTH = {"n_patients": 60, "seed": 3, "height": 96, "width_range": [80, 112], "workers": 1,
              "min_positives": {"train": 3, "dev": 2, "test": 2}}


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<root>/mimic-cxr-jpg/files/...` + `<root>/cxr-lt-2024/*.csv` for 60 patients."""
    from cxrlt.synth.mimic import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig.from_params(TINY_SYNTH))
    return root
