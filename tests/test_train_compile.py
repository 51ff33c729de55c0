"""train.compile: torch.compile wraps the model's training forward only, so the weights,
their state_dict keys (checkpoints, resume, init) and the function computed stay the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlt.errors import DataError
from cxrlt.models import ModelConfig
from cxrlt.training.augment import AugmentConfig
from cxrlt.training.launch import Layout
from cxrlt.training.module import ImageClassifierModule, OptimConfig, fused_adamw


def _module(compile_model: bool) -> ImageClassifierModule:
    torch.manual_seed(0)
    return ImageClassifierModule(
        model_cfg=ModelConfig(backbone="mobilenetv3_small_050"), classes=["a", "b", "c"], loss="bce",
        loss_settings={}, prevalence=np.full(3, 0.1, np.float32), optim=OptimConfig(), augment=AugmentConfig(),
        compile_model=compile_model,
    )  # fmt: skip


def test_compile_is_a_checked_boolean_and_off_by_default():
    assert Layout.from_params({}).compile is False
    assert Layout.from_params({"compile": True}).compile is True
    with pytest.raises(DataError, match="train.compile must be true or false, got 'yes'"):
        Layout.from_params({"compile": "yes"})
    assert "compile" not in Layout(compile=True).trainer_kwargs({})


def test_a_compiled_module_has_the_same_weights_and_keys():
    eager, compiled = _module(False), _module(True)
    assert compiled._net is not compiled._logits  # the compiled wrapper is what training calls
    a, b = eager.state_dict(), compiled.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.slow  # inductor compiles forward + backward: 20 s to 2 min on 2 CPU cores
def test_compiled_training_forward_and_gradients_equal_eager():
    eager, compiled = _module(False), _module(True)
    x = torch.randn(4, 1, 32, 32)
    eager.train(), compiled.train()
    a, b = eager._net(x), compiled._net(x)
    # Fused kernels round differently (float32; BatchNorm in train mode on 4 images amplifies it).
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
    a.square().sum().backward()
    b.square().sum().backward()
    ga = torch.cat([p.grad.flatten() for p in eager.model.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.flatten() for p in compiled.model.parameters() if p.grad is not None])
    assert ga.shape == gb.shape and ga.norm() > 0
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.9999
    assert abs(float(gb.norm() / ga.norm()) - 1) < 1e-3


def test_fused_adamw_only_when_every_weight_is_on_a_gpu():
    from types import SimpleNamespace

    cpu = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))]
    gpu = SimpleNamespace(is_cuda=True)
    assert fused_adamw(cpu) is None  # the CPU keeps AdamW's default kernel: results unchanged
    assert fused_adamw([gpu, gpu]) is True
    assert fused_adamw([gpu, cpu[0]]) is None  # mixed devices: the fused kernel would refuse
    assert fused_adamw([]) is None
