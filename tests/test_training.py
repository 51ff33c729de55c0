"""Training: deterministic for a seed on CPU, checkpoint round trip, unknown labels tolerated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlt.data.cache import ImageCache, Preprocessing, build_cache
from cxrlt.data.mimic import read_cxrlt
from cxrlt.data.splits import patient_val_split
from cxrlt.errors import DataError
from cxrlt.inference import load_checkpoint, predict
from cxrlt.labels import TASK1_CLASSES
from cxrlt.training.fit import fit

CLASSES = list(TASK1_CLASSES)


@pytest.fixture(scope="module")
def prepared(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    df = read_cxrlt(tiny_synth / "cxr-lt-2024", tiny_synth / "mimic-cxr-jpg", "task1")
    df["split"] = patient_val_split(df, CLASSES, 0.2, seed=0)
    cache_dir = tmp_path_factory.mktemp("cache") / "mimic"
    build_cache(df, cache_dir, 40, workers=1, progress=False)
    return df, cache_dir


def _params(loss: str = "bce") -> dict:
    return {
        "seed": 7, "loss": loss, "losses": {"asl": {"gamma_neg": 2.0}},
        "model": {"backbone": "mobilenetv3_small_050", "pretrained": False, "head": "linear"},
        "train": {"epochs": 1, "batch_size": 16, "progress_bar": False, "limit_train_batches": 4,
                  "optim": {"lr": 0.003}},
    }  # fmt: skip


def test_same_seed_same_weights_and_predictions(prepared, tmp_path: Path):
    df, cache_dir = prepared
    fit(df, CLASSES, cache_dir, _params(), tmp_path / "a.pt")
    fit(df, CLASSES, cache_dir, _params(), tmp_path / "b.pt")
    # Byte-identical checkpoints: DVC sees the same output hash for the same run.
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    a = torch.load(tmp_path / "a.pt", weights_only=True)  # plain data only: loads safely
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)
    model, info = load_checkpoint(tmp_path / "a.pt")
    assert info["classes"] == CLASSES and info["n_train_images"] == int((df["split"] == "train").sum())
    # how the pixels were made travels with the weights (cxrlt predict reads it)
    assert Preprocessing.from_checkpoint(info, "a.pt") == Preprocessing(40, 16, 16)
    test_ids = df.loc[df["split"] == "test", "image_id"]
    p = predict(model, ImageCache(cache_dir), test_ids, batch_size=7)
    p_big = predict(model, ImageCache(cache_dir), test_ids, batch_size=64)
    np.testing.assert_allclose(p, p_big, rtol=1e-5, atol=1e-6)  # batch composition does not matter
    assert p.shape == (len(test_ids), len(CLASSES)) and ((p > 0) & (p < 1)).all()


def test_unknown_labels_and_another_loss_train(prepared, tmp_path: Path):
    df, cache_dir = prepared
    df = df.copy()
    df.loc[df.index[::3], CLASSES[:10]] = np.nan  # a source that does not annotate some classes
    info = fit(df, CLASSES, cache_dir, _params("asl"), tmp_path / "c.pt")
    assert info["loss"] == "asl" and info["val_mAP"] is not None
    assert np.isfinite(info["train_counts"]).all()


def test_checkpoint_must_match_exactly(prepared, tmp_path: Path):
    df, cache_dir = prepared
    fit(df, CLASSES, cache_dir, _params(), tmp_path / "d.pt")
    ckpt = torch.load(tmp_path / "d.pt", weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(DataError, match=r"broken\.pt is not a valid .*Missing key"):
        load_checkpoint(tmp_path / "broken.pt")


DDP_SCRIPT = """
import hashlib, json, sys
import pandas as pd
import torch.distributed as dist
import cxrlt.training.fit as F
from cxrlt.labels import TASK1_CLASSES

def state_hash(state):
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

if __name__ == "__main__":
    df = pd.read_parquet(sys.argv[1])
    params = json.loads(sys.argv[3])
    out = sys.argv[4]
    trained = {}
    train_model = F.train_model
    def spy(*args, **kwargs):  # the real train_model; keeps what this rank ends with
        trained["t"] = train_model(*args, **kwargs)
        return trained["t"]
    F.train_model = spy
    info = F.fit(df, list(TASK1_CLASSES), sys.argv[2], params, out + "/ddp.pt", live_dir=out + "/live")
    t = trained["t"]
    with open(f"{out}/rank{t.global_rank}.json", "w") as f:
        json.dump({"hash": state_hash(t.module.model.state_dict()), "history": t.history,
                   "best_epoch": info["best_epoch"], "val_mAP": info["val_mAP"]}, f)
    dist.barrier()  # rank 0 (the launcher) returns only once every rank has reported
"""


@pytest.fixture(scope="module")
def ddp_run(prepared, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """One Lightning DDP fit on 2 CPU processes (gloo), 2 epochs; each rank reports its weights."""
    import json
    import subprocess
    import sys

    df, cache_dir = prepared
    out = tmp_path_factory.mktemp("ddp")
    val = df[df["split"] == "val"]
    if len(val) % 2 == 0:  # an odd count makes DistributedSampler pad one rank with a repeat
        df = df.drop(index=val.index[0])
    df.to_parquet(out / "m.parquet")
    params = _params()
    params["train"].update({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "epochs": 2})
    script = out / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(out / "m.parquet"), str(cache_dir),
                          json.dumps(params), str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return df, out


def test_ddp_on_two_cpu_processes_gathers_validation_once(prepared, ddp_run):
    """Lightning DDP (2 CPU processes, gloo): val mAP is computed on all val images, each once."""
    from cxrlt import metrics
    from cxrlt.data.manifest import label_matrix

    _, cache_dir = prepared
    df, out = ddp_run
    model, info = load_checkpoint(out / "ddp.pt")
    val = df[df["split"] == "val"]
    p = predict(model, ImageCache(cache_dir), val["image_id"])
    expected = float(np.nanmean(metrics.average_precision(label_matrix(val, CLASSES), p)))
    assert info["val_mAP"] == pytest.approx(expected, abs=1e-4)


def test_ddp_ranks_end_with_the_best_epochs_weights_and_rank_0_saves_them(ddp_run):
    """No file exchange between ranks: each holds the best epoch's weights, identical everywhere.

    The old selection made every rank read rank 0's temporary best-checkpoint file, which rank
    0 could delete first (a rank 1 slowed by 5 s died of FileNotFoundError) and which another
    node never sees. A rank that dies writes no report here.
    """
    import hashlib
    import json

    _, out = ddp_run
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    saved = torch.load(out / "ddp.pt", weights_only=True)
    h = hashlib.sha256()
    for k, v in saved["state_dict"].items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    assert ranks[0]["hash"] == ranks[1]["hash"] == h.hexdigest()
    history = ranks[0]["history"]
    assert len(history) == 2 and ranks[1]["history"] == history
    assert saved["best_epoch"] == int(np.argmax(history)) == ranks[1]["best_epoch"]
    assert saved["val_mAP"] == max(history) == ranks[1]["val_mAP"]
    assert not list(out.glob("**/*.ckpt"))  # nothing written for the selection


def test_ddp_logs_once_from_rank_0(ddp_run):
    """dvclive runs on rank 0 only (it refuses to start elsewhere, which would kill rank 1):
    one val mAP row per epoch, the values every rank selected from."""
    import json

    _, out = ddp_run
    rows = (out / "live" / "plots" / "metrics" / "val" / "mAP.tsv").read_text().splitlines()
    history = json.loads((out / "rank0.json").read_text())["history"]
    assert rows[0].split("\t") == ["step", "mAP"] and len(rows) == 1 + len(history)
    logged = [float(r.split("\t")[1]) for r in rows[1:]]
    np.testing.assert_allclose(logged, history, rtol=1e-6)


def test_ema_and_deferred_reweighting_train_and_the_saved_model_is_the_ema(prepared, tmp_path: Path):
    from cxrlt.training.fit import train_model

    df, cache_dir = prepared
    params = _params("wbce")
    params["train"].update({"epochs": 2, "drw_epoch": 1, "ema_decay": 0.5})
    trained = train_model(df, CLASSES, cache_dir, params)
    module = trained.module
    assert trained.info["drw_epoch"] == 1 and trained.info["ema_decay"] == 0.5
    assert module.criterion.weighting  # switched on at epoch 1 (0-based)
    for (name, a), b in zip(module.model.state_dict().items(), module.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"drw_epoch": 1}, "has none"),  # bce has no class weights to defer
        ({"drw_epoch": -1}, "drw_epoch must be null or an epoch number"),
        ({"ema_decay": 1.0}, "ema_decay must be 0"),
    ],
)
def test_bad_schedules_are_one_line_errors(prepared, tmp_path: Path, update, message):
    from cxrlt.errors import DataError

    df, cache_dir = prepared
    params = _params()
    params["train"].update(update)
    with pytest.raises(DataError, match=message):
        fit(df, CLASSES, cache_dir, params, tmp_path / "x.pt")


def test_lightning_tells_the_sampler_each_epoch(prepared, monkeypatch: pytest.MonkeyPatch):
    """Without set_epoch every epoch would repeat the first epoch's order."""
    from cxrlt.training import fit as fit_module

    seen: list[int] = []
    real = fit_module.build_sampler

    def recording(*args, **kwargs):
        sampler = real(*args, **kwargs)
        original = sampler.set_epoch
        sampler.set_epoch = lambda e: (seen.append(e), original(e))[1]
        return sampler

    monkeypatch.setattr(fit_module, "build_sampler", recording)
    df, cache_dir = prepared
    params = _params()
    params["sampler"] = "repeat_factor"
    params["train"].update({"epochs": 3})
    info = fit_module.train_model(df, CLASSES, cache_dir, params).info
    assert sorted(set(seen)) == [0, 1, 2] and info["sampler"] == "repeat_factor"


def test_crt_retrains_only_the_head_and_records_it(prepared, tmp_path: Path):
    """cRT: the backbone (weights and BatchNorm buffers) is the stage-1 one, bit for bit; the
    head is new, the kept cRT epoch is the best by val mAP, and the run is reproducible."""
    from cxrlt.training.fit import train_model

    df, cache_dir = prepared
    params = _params()
    # the tiny set lacks positives of some classes, so cRT draws at random here
    params["train"]["crt"] = {"epochs": 3, "sampler": "random", "lr": 0.01, "batch_size": 8}
    fit(df, CLASSES, cache_dir, params, tmp_path / "crt.pt")
    fit(df, CLASSES, cache_dir, params, tmp_path / "crt2.pt")
    assert (tmp_path / "crt.pt").read_bytes() == (tmp_path / "crt2.pt").read_bytes()
    ckpt = torch.load(tmp_path / "crt.pt", weights_only=True)
    ref = train_model(df, CLASSES, cache_dir, _params())
    ref_state = ref.module.model.state_dict()
    for k, v in ref_state.items():
        if k.startswith("backbone."):
            torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(ckpt["state_dict"]["head.fc.weight"], ref_state["head.fc.weight"])
    crt = ckpt["crt"]
    assert crt["epochs"] == 3 and len(crt["history"]) == 3 and crt["sampler"] == "random"
    assert crt["val_mAP"] == max(crt["history"]) and crt["best_epoch"] == int(np.argmax(crt["history"]))
    assert crt["val_mAP_before"] == ref.info["val_mAP"]
    assert "crt" not in torch.load(tmp_path / "crt.pt", weights_only=True)["state_dict"]


def test_crt_features_are_what_the_head_sees(prepared):
    """The cached head inputs give the model's own logits (pooling first is exact for the
    linear head), whatever the batch size of the feature pass."""
    from cxrlt.training.crt import head_inputs
    from cxrlt.training.data import CachedImages

    df, cache_dir = prepared
    from cxrlt.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenetv3_small_050", channels_last=True), len(CLASSES)).eval()
    data = CachedImages(ImageCache(cache_dir), df.iloc[::-2], CLASSES)  # out of file order
    feats = head_inputs(model, data, batch_size=5)
    assert feats.shape[2:] == (1, 1)
    torch.testing.assert_close(feats, head_inputs(model, data, batch_size=64), rtol=0, atol=1e-6)
    x = torch.from_numpy(data.cache.read(data.rows))
    with torch.no_grad():
        torch.testing.assert_close(model.head(feats), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("crt", "message"),
    [
        ({"epochs": -1}, "crt.epochs must be an integer"),
        ({"epochs": 2, "sampler": "balanced"}, "unknown sampler 'balanced'"),
        ({"epochs": 2, "rate": 0.1}, r"unknown keys \['rate'\]"),
    ],
)
def test_bad_crt_settings_fail_before_data_loads(crt, message, tmp_path: Path):
    df = pd.DataFrame({"image_id": ["x"], "split": ["train"]})  # never read: the check is first
    params = _params()
    params["train"]["crt"] = crt
    with pytest.raises(DataError, match=message):
        fit(df, CLASSES, tmp_path / "no-cache", params, tmp_path / "x.pt")


def test_fewer_training_images_than_a_batch_is_one_clear_error(prepared, tmp_path: Path):
    df, cache_dir = prepared
    small = df[(df["split"] != "train") | df.index.isin(df.index[df["split"] == "train"][:5])]
    with pytest.raises(DataError, match="5 training images per epoch, fewer than train.batch_size 16"):
        fit(small, CLASSES, cache_dir, _params(), tmp_path / "x.pt")
