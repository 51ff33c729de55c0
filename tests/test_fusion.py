"""Multi-view fusion: studies are independent of their batch, padding is inert, the 2-D
positional encoding is not symmetric, a frozen backbone stays frozen in train mode, and
view choice / study grouping are deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlt.errors import DataError
from cxrlt.models import Classifier, ModelConfig
from cxrlt.models.fusion import (
    FusionConfig,
    FusionModel,
    group_studies,
    sincos_2d,
    views_for_study,
)

BACKBONE = ModelConfig(backbone="mobilenetv3_small_050", head="linear")
SMALL = FusionConfig(
    tokens_dim=32, heads=4, ff_dim=64, layers=2, max_views=4, head_args={"dim": 32, "heads": 4, "ff_dim": 64}
)


def _model(cfg: FusionConfig = SMALL, num_classes: int = 5, seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(Classifier(BACKBONE, num_classes), cfg)


def _studies(seed: int = 1):
    """4 studies x 3 slots; study 2 has one real view, study 3 a padded first slot."""
    b, v = 4, 3
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (b, v, 64, 64), dtype=torch.uint8, generator=g)
    view_type = torch.randint(0, 3, (b, v), generator=g)
    pad = torch.zeros(b, v, dtype=torch.bool)
    pad[1, 2] = True
    pad[2, 1:] = True
    pad[3, 0] = True  # padding need not be trailing
    return images, view_type, pad


@pytest.fixture(scope="module")
def model() -> FusionModel:
    m = _model()
    # Move the backbone's BatchNorm statistics away from their initial values first.
    m.backbone.train()
    with torch.no_grad():
        m.backbone.forward_features(torch.randn(8, 1, 64, 64))
    return m.eval()


@pytest.mark.parametrize("head", ["ml_decoder", "linear"])
def test_a_study_does_not_depend_on_its_batch(model: FusionModel, head: str):
    m = model
    if head == "linear":
        m = _model(dataclasses.replace(SMALL, head="linear", head_args={})).eval()
    images, vt, pad = _studies()
    with torch.no_grad():
        together = m(images, vt, pad)
        alone = torch.cat([m(images[i : i + 1], vt[i : i + 1], pad[i : i + 1]) for i in range(4)])
        order = torch.tensor([2, 0, 3, 1])
        shuffled = m(images[order], vt[order], pad[order])[order.argsort()]
        # Study 2 has one real view: alone in a batch that needs a single slot, no padding at all.
        single_slot = m(images[2:3, :1], vt[2:3, :1], pad[2:3, :1])
    assert together.shape == (4, 5) and torch.isfinite(together).all()
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, shuffled, rtol=0, atol=1e-5)
    torch.testing.assert_close(together[2:3], single_slot, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("train", "freeze"), [(False, True), (True, True), (True, False)])
def test_padded_slots_change_nothing(model: FusionModel, train: bool, freeze: bool):
    """Also in train mode with a trainable backbone, where BatchNorm uses batch statistics:
    padded slots must not even reach the backbone."""
    if not freeze:
        model = _model(dataclasses.replace(SMALL, freeze_backbone=False))
    images, vt, pad = _studies()
    other_images, other_vt = images.clone(), vt.clone()
    other_images[pad] = torch.randint(0, 255, (int(pad.sum()), 64, 64), dtype=torch.uint8)
    other_vt[pad] = torch.tensor([2, -1, 7, 0])[: int(pad.sum())]  # anything, even out of range
    model.train(train)
    try:
        with torch.no_grad():
            torch.manual_seed(5)
            a = model(images, vt, pad)
            torch.manual_seed(5)  # same dropout draws
            b = model(other_images, other_vt, pad)
    finally:
        model.eval()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_inputs_are_clear_errors(model: FusionModel):
    images, vt, pad = _studies()
    pad[1] = True
    with pytest.raises(ValueError, match=r"study\(ies\) \[1\] have every view slot padded"):
        model(images, vt, pad)
    with pytest.raises(ValueError, match="max_views"):
        model(torch.zeros(1, 5, 64, 64, dtype=torch.uint8), torch.zeros(1, 5, dtype=torch.long),
              torch.zeros(1, 5, dtype=torch.bool))
    images, vt, pad = _studies()
    vt[0, 0] = 3
    with pytest.raises(ValueError, match="view_type"):
        model(images, vt, pad)


def test_non_finite_padded_grids_stay_out(model: FusionModel):
    """`fuse` zeroes padded slots itself: NaN there would otherwise spread through attention
    (a zero weight times NaN is NaN)."""
    grids = torch.randn(2, 3, 32, 2, 2)
    vt = torch.tensor([[0, 1, 2], [1, 0, 0]])
    pad = torch.tensor([[False, True, False], [False, False, True]])
    bad = grids.clone()
    bad[pad] = float("nan")
    with torch.no_grad():
        out = model.fuse(bad, vt, pad)
        torch.testing.assert_close(out, model.fuse(grids, vt, pad), rtol=0, atol=1e-6)


def test_positional_encoding_varies_along_both_axes_row_major():
    h, w, d = 3, 5, 16
    pe = sincos_2d(h, w, d).reshape(h, w, d)  # token t = row * w + col
    rows = [pe[i] for i in range(h)]
    cols = [pe[:, j] for j in range(w)]
    assert all(not torch.allclose(rows[i], rows[k]) for i in range(h) for k in range(i + 1, h))
    assert all(not torch.allclose(cols[j], cols[k]) for j in range(w) for k in range(j + 1, w))
    # First half: the row only (constant along a row); second half: the column only.
    torch.testing.assert_close(pe[:, :, : d // 2], pe[:, :1, : d // 2].expand(h, w, d // 2))
    torch.testing.assert_close(pe[:, :, d // 2 :], pe[:1, :, d // 2 :].expand(h, w, d // 2))
    # (r, c) and (c, r) differ: the grid's transpose is not the same encoding.
    sq = sincos_2d(4, 4, d).reshape(4, 4, d)
    assert not torch.allclose(sq, sq.transpose(0, 1))


def test_transposing_the_token_grid_changes_the_output(model: FusionModel, monkeypatch: pytest.MonkeyPatch):
    g = torch.Generator().manual_seed(3)
    grids = torch.randn(2, 2, 32, 3, 3, generator=g)
    vt = torch.tensor([[0, 1], [2, 0]])
    pad = torch.tensor([[False, False], [False, True]])
    with torch.no_grad():
        out = model.fuse(grids, vt, pad)
        out_t = model.fuse(grids.transpose(-1, -2), vt, pad)
    assert (out - out_t).abs().max() > 1e-4
    # Control: with a symmetric encoding pe(r, c) = pe(c, r) (or none), tokens are a set and
    # the transpose is invisible, so the check above does test the encoding.
    def symmetric(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        pe = sincos_2d(h, w, 32, device, dtype).reshape(h, w, 32)
        return (pe + pe.transpose(0, 1)).reshape(h * w, 32)

    monkeypatch.setattr(model, "positional_encoding", symmetric)
    with torch.no_grad():
        torch.testing.assert_close(model.fuse(grids, vt, pad), model.fuse(grids.transpose(-1, -2), vt, pad),
                                   rtol=0, atol=1e-5)


def test_non_square_images_and_token_stride():
    m = _model(dataclasses.replace(SMALL, token_stride=2)).eval()
    images = torch.randint(0, 255, (2, 2, 128, 64), dtype=torch.uint8)  # 4 x 2 map -> 2 x 1 tokens
    pad = torch.tensor([[False, False], [False, True]])
    with torch.no_grad():
        assert m.token_grids(images, pad).shape == (2, 2, 32, 2, 1)
        assert m(images, torch.zeros(2, 2, dtype=torch.long), pad).shape == (2, 5)
    with pytest.raises(ValueError, match="token_stride"):
        m(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.long),
          torch.zeros(1, 1, dtype=torch.bool))


def _bn_stats(m: FusionModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.backbone.state_dict().items() if "running" in k}


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_backbone_stays_frozen_in_train_mode(freeze: bool):
    m = _model(dataclasses.replace(SMALL, freeze_backbone=freeze))
    stats = _bn_stats(m)
    weights = {k: v.clone() for k, v in m.backbone.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    assert m.training and m.tokenizer.training and m.backbone.training is not freeze
    images, vt, pad = _studies()
    m(images, vt, pad).pow(2).mean().backward()
    opt.step()
    grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
    changed = [k for k, v in _bn_stats(m).items() if not torch.equal(v, stats[k])]
    moved = [k for k, v in m.backbone.named_parameters() if not torch.equal(v, weights[k])]
    assert m.tokenizer.weight.grad is not None
    if freeze:
        assert not grads and not changed and not moved
        assert not any(p.requires_grad for p in m.backbone.parameters())
    else:
        assert grads and changed and moved


def test_evaluation_view_choice_is_deterministic_and_frontal_first():
    views = ["lateral", "unknown", "frontal", "lateral", "frontal"]
    ids = ["e", "a", "d", "b", "c"]
    chosen = views_for_study(views, ids, cap=3, rng=None)
    assert [ids[i] for i in chosen] == ["c", "d", "b"]
    perm = [3, 0, 4, 2, 1]
    chosen2 = views_for_study([views[i] for i in perm], [ids[i] for i in perm], cap=3, rng=None)
    assert [ids[perm[i]] for i in chosen2] == ["c", "d", "b"]
    assert [ids[i] for i in views_for_study(views, ids, cap=10, rng=None)] == ["c", "d", "b", "e", "a"]


def test_training_view_choice_is_a_random_subset_in_slot_order():
    views = ["lateral", "unknown", "frontal", "lateral", "frontal"]
    ids = ["e", "a", "d", "b", "c"]
    rank = {"c": 0, "d": 1, "b": 2, "e": 3, "a": 4}
    seen = set()
    for seed in range(20):
        picked = [ids[i] for i in views_for_study(views, ids, cap=2, rng=np.random.default_rng(seed))]
        assert len(picked) == 2 == len(set(picked))
        assert [rank[x] for x in picked] == sorted(rank[x] for x in picked)
        seen.add(tuple(picked))
        # The draw does not depend on the input row order.
        perm = [4, 2, 0, 1, 3]
        again = views_for_study([views[i] for i in perm], [ids[i] for i in perm], 2, np.random.default_rng(seed))
        assert [ids[perm[i]] for i in again] == picked
    assert len(seen) > 3
    assert len(views_for_study(views[:1], ids[:1], cap=3, rng=np.random.default_rng(0))) == 1


def _manifest() -> pd.DataFrame:
    nan = np.nan
    rows = [
        # image_id, study_id, view, A, B, C, D
        ("s1_l1", "s1", "lateral", 1, nan, nan, 0),
        ("s1_f2", "s1", "frontal", 0, 0, nan, 0),
        ("s1_u", "s1", "unknown", nan, nan, nan, 0),
        ("s1_f1", "s1", "frontal", nan, nan, nan, 0),
        ("s1_l0", "s1", "lateral", 0, nan, nan, nan),
        ("s0_x", "s0", "frontal", nan, 1, 0, nan),
    ]
    return pd.DataFrame(rows, columns=["image_id", "study_id", "view", "A", "B", "C", "D"])


def test_group_studies_lists_every_image_and_unions_labels():
    studies = group_studies(_manifest(), ["A", "B", "C", "D"], cap=3)
    assert [s.study_id for s in studies] == ["s0", "s1"]
    s1 = studies[1]
    assert s1.image_ids == ["s1_f1", "s1_f2", "s1_l0"]
    assert s1.views == ["frontal", "frontal", "lateral"] and s1.view_types == [0, 0, 1]
    assert sorted(s1.all_image_ids) == sorted(["s1_l1", "s1_f2", "s1_u", "s1_f1", "s1_l0"])
    assert s1.all_image_ids[:3] == s1.image_ids and len(s1.all_views) == 5
    # A: 1 on one view -> 1; B: only 0 known -> 0; C: unknown everywhere -> NaN; D: 0.
    np.testing.assert_array_equal(s1.label, np.array([1, 0, np.nan, 0], dtype=np.float32))
    assert s1.label.dtype == np.float32
    np.testing.assert_array_equal(studies[0].label, np.array([np.nan, 1, 0, np.nan], dtype=np.float32))
    assert studies[0].image_ids == studies[0].all_image_ids == ["s0_x"]


def test_group_studies_ignores_row_order():
    df = _manifest()
    a = group_studies(df, ["A", "B", "C", "D"], cap=2)
    b = group_studies(df.sample(frac=1.0, random_state=4).reset_index(drop=True), ["A", "B", "C", "D"], cap=2)
    for x, y in zip(a, b, strict=True):
        assert (x.study_id, x.image_ids, x.all_image_ids, x.view_types) == (y.study_id, y.image_ids, y.all_image_ids, y.view_types)
        np.testing.assert_array_equal(x.label, y.label)


RESIDUAL = dataclasses.replace(SMALL, residual=True)


@pytest.mark.parametrize("head", ["ml_decoder", "linear"])
def test_residual_model_starts_at_the_mean_of_the_stage1_logits(head: str):
    cfg = RESIDUAL if head == "ml_decoder" else dataclasses.replace(RESIDUAL, head="linear", head_args={})
    torch.manual_seed(0)
    clf = Classifier(BACKBONE, 5).eval()
    m = FusionModel(clf, cfg).eval()
    images, vt, pad = _studies()
    with torch.no_grad():
        fused = m(images, vt, pad)
        per_view = [[clf(images[i, j : j + 1, None]) for j in range(3) if not pad[i, j]] for i in range(4)]
    expected = torch.cat([torch.cat(v).mean(dim=0, keepdim=True) for v in per_view])
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


def test_residual_model_is_batch_independent_padding_inert_and_its_prior_fixed():
    m = _model(RESIDUAL)
    images, vt, pad = _studies()
    other = images.clone()
    other[pad] = 0
    prior = {k: v.clone() for k, v in m.prior.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    assert not m.prior.training and not any(p.requires_grad for p in m.prior.parameters())
    m(images, vt, pad).pow(2).mean().backward()
    opt.step()
    assert all(p.grad is None for p in m.prior.parameters())
    assert all(torch.equal(v, prior[k]) for k, v in m.prior.state_dict().items())
    m.eval()
    with torch.no_grad():
        together = m(images, vt, pad)
        alone = torch.cat([m(images[i : i + 1], vt[i : i + 1], pad[i : i + 1]) for i in range(4)])
        padded_other = m(other, vt, pad)
        feats = m.backbone.forward_features(m.normalise(images).flatten(0, 1)).unflatten(0, (4, 3))
        from_features = m.forward_features(feats, vt, pad)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(together, padded_other, rtol=0, atol=1e-6)
    torch.testing.assert_close(together, from_features, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the stage-1 prior"):
        m.fuse(m.token_grids(images, pad), vt, pad)
    with pytest.raises(DataError, match="stage-1 head predicts 5 classes, the fusion model 3"):
        FusionModel(Classifier(BACKBONE, 5), RESIDUAL, num_classes=3)
