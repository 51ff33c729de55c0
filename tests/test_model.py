"""Models: predictions independent of batch composition; registry errors; offline hub error."""

from __future__ import annotations

import pytest
import torch

from cxrlt.errors import DataError
from cxrlt.models import ModelConfig, build_model

TINY = ModelConfig(backbone="resnet10t", head="linear")


def test_prediction_does_not_depend_on_batch_mates():
    torch.manual_seed(0)
    model = build_model(TINY, 5)
    model.train()
    model(torch.randint(0, 255, (8, 48, 48), dtype=torch.uint8))  # move BN running stats
    model.eval()
    x = torch.randint(0, 255, (6, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
        shuffled = model(x.flip(0)).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together, shuffled, rtol=1e-4, atol=1e-5)


def test_uint8_and_normalised_inputs_agree():
    model = build_model(TINY, 3).eval()
    x = torch.randint(0, 255, (2, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(model.normalise(x)))


def test_unknown_names_are_clear():
    with pytest.raises(DataError, match="timm has no model"):
        build_model(ModelConfig(backbone="no_such_net"), 3)
    with pytest.raises(DataError, match="valid heads: linear"):
        build_model(ModelConfig(backbone="resnet10t", head="nope"), 3)


def test_offline_pretrained_is_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="cannot download pretrained weights"):
        build_model(ModelConfig(backbone="resnet10t", pretrained=True), 3)


def test_channels_last_is_the_same_function():
    """The memory layout changes speed only: same weights give the same logits and the same
    state dict keys and shapes (checkpoints move between the layouts)."""
    import dataclasses

    torch.manual_seed(0)
    plain = build_model(dataclasses.replace(TINY, backbone="mobilenetv3_small_050"), 4).eval()
    nhwc = build_model(dataclasses.replace(plain.cfg, channels_last=True), 4).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = next(p for p in nhwc.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-5)
