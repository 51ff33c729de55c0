"""ML-Decoder head: shapes, group decoding, batch independence, fixed (swappable) label
queries, key padding, and use as a Classifier head."""

from __future__ import annotations

import math

import pytest
import torch

from cxrlt.models import ModelConfig, build_model
from cxrlt.models.heads import HEADS, MLDecoderHead, build_head

SMALL = {"dim": 32, "heads": 4, "ff_dim": 64}


def _head(num_classes: int = 5, in_features: int = 12, **kw: object) -> MLDecoderHead:
    torch.manual_seed(0)
    head = build_head("ml_decoder", in_features, num_classes, **{**SMALL, **kw})
    assert isinstance(head, MLDecoderHead)
    return head


def test_registered_next_to_linear():
    assert {"linear", "ml_decoder"} <= set(HEADS)


def test_output_shape_and_one_query_per_class():
    head = _head(7).eval()
    out = head(torch.randn(3, 12, 4, 5))
    assert out.shape == (3, 7)
    assert head.num_queries == 7


def test_groups_not_dividing_num_classes():
    """7 classes in 3 groups: 3 queries, ceil(7/3) = 3 logits each, the first 7 kept; every
    class's logit comes from its own group's query."""
    head = _head(7, groups=3).eval()
    assert head.num_queries == 3 and head.per_query == math.ceil(7 / 3)
    assert head.group_weight is not None and head.group_weight.shape == (3, 32, 3)
    feats = torch.randn(2, 12, 3, 3)
    out = head(feats)
    assert out.shape == (2, 7)
    # Zeroing group 1's output weights leaves only the bias for its classes 3, 4, 5.
    with torch.no_grad():
        head.group_weight[1].zero_()
    out2 = head(feats)
    torch.testing.assert_close(out2[:, 3:6], head.group_bias[3:6].expand(2, 3).detach())
    torch.testing.assert_close(out2[:, [0, 1, 2, 6]], out[:, [0, 1, 2, 6]])
    with pytest.raises(ValueError, match="groups"):
        _head(4, groups=5)


def test_a_sample_does_not_depend_on_its_batch_mates():
    head = _head(6, groups=4).eval()
    feats = torch.randn(6, 12, 3, 4)
    with torch.no_grad():
        together = head(feats)
        alone = torch.cat([head(feats[i : i + 1]) for i in range(6)])
        shuffled = head(feats.flip(0)).flip(0)
        pair = head(feats[2:4])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, shuffled, rtol=0, atol=1e-5)
    torch.testing.assert_close(together[2:4], pair, rtol=0, atol=1e-5)


def test_channels_last_feature_maps_give_the_same_tokens():
    head = _head(5).eval()
    feats = torch.randn(2, 12, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(feats.contiguous(memory_format=torch.channels_last)), head(feats))
        # And tokens are row-major: the same as flattening by hand.
        tokens = feats.permute(0, 2, 3, 1).reshape(2, 15, 12)
        torch.testing.assert_close(head.forward_tokens(tokens), head(feats))


def test_fixed_query_embeddings_are_a_buffer_and_not_trained():
    emb = torch.randn(5, 10)
    head = _head(5, query_embeddings=emb).train()
    names = dict(head.named_parameters())
    assert "query_embeddings" in dict(head.named_buffers())
    assert "query_embeddings" not in names and "query" not in names
    assert not head.query_embeddings.requires_grad
    before = head.query_embeddings.clone()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    head(torch.randn(4, 12, 2, 2)).pow(2).sum().backward()
    assert head.query_embeddings.grad is None
    assert head.query_proj is not None and head.query_proj.weight.grad is not None
    assert head.query_proj.weight.grad.abs().sum() > 0
    proj_before = head.query_proj.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(head.query_embeddings, before, rtol=0, atol=0)
    assert not torch.equal(head.query_proj.weight, proj_before)
    # The caller's tensor is copied, not aliased.
    assert head.query_embeddings.data_ptr() != emb.data_ptr()
    with pytest.raises(ValueError, match="groups=0"):
        _head(5, groups=2, query_embeddings=emb)
    with pytest.raises(ValueError, match="rows"):
        _head(4, query_embeddings=emb)


def test_swapping_query_embeddings_scores_a_new_label_set():
    emb = torch.randn(5, 10)
    head = _head(5, query_embeddings=emb).eval()
    feats = torch.randn(3, 12, 2, 3)
    weights = {k: v.clone() for k, v in head.named_parameters()}
    with torch.no_grad():
        old = head(feats)
    new_emb = torch.cat([emb[[4, 0, 2]], torch.randn(3, 10)])  # keep 3 classes, 3 new ones
    head.set_query_embeddings(new_emb)
    assert head.num_classes == 6
    with torch.no_grad():
        new = head(feats)
    assert new.shape == (3, 6)
    torch.testing.assert_close(new[:, :3], old[:, [4, 0, 2]], rtol=0, atol=1e-5)
    for k, v in head.named_parameters():
        assert torch.equal(v, weights[k]), k
    with pytest.raises(ValueError, match="width"):
        head.set_query_embeddings(torch.randn(2, 7))
    with pytest.raises(ValueError, match="built with query_embeddings"):
        _head(5).set_query_embeddings(emb)


def test_masked_tokens_change_nothing():
    head = _head(5, groups=2).eval()
    tokens = torch.randn(3, 8, 12)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, :7] = True
    other = tokens.clone()
    other[mask] = torch.randn(int(mask.sum()), 12) * 100
    other[0, 7] = float("inf")  # non-finite padding must not leak either
    with torch.no_grad():
        a = head.forward_tokens(tokens, mask)
        b = head.forward_tokens(other, mask)
        # A masked sample equals the same sample with its padding dropped.
        trimmed = head.forward_tokens(tokens[0:1, :5])
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a[0:1], trimmed, rtol=0, atol=1e-5)


def test_all_masked_row_raises():
    head = _head(5)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    with pytest.raises(ValueError, match=r"every token of sample\(s\) \[1\]"):
        head.forward_tokens(torch.randn(2, 4, 12), mask)
    with pytest.raises(ValueError, match="bool"):
        head.forward_tokens(torch.randn(2, 4, 12), mask.float())


def test_classifier_with_ml_decoder_forwards_and_backprops():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenetv3_small_050", head="ml_decoder", head_args={**SMALL, "groups": 2})
    model = build_model(cfg, 3).train()
    out = model(torch.randint(0, 255, (2, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert model.head.query.grad is not None
    assert model.head.embed.weight.grad is not None
    first_conv = next(p for p in model.backbone.parameters() if p.requires_grad)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
