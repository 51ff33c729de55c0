"""Zero-shot Task 3: score findings no label of which was ever trained on, from their names.

An ML-Decoder head whose class queries are the label-text embeddings (through one shared
projection, `models.heads.MLDecoderHead`) learns, on the frozen stage-1 backbone's spatial
feature maps and the Task 1 training labels only, to match a finding's text vector with
where and how it shows. Swapping in the embeddings of the Task 3 names then scores those
findings with the same weights. Task 3 labels are read only to measure the result (and to
fit the clearly separate supervised reference, on dev, evaluated on test); nothing they
hold reaches the zero-shot model, its epoch choice or its probabilities (a test flips them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlt.data.cache import ImageCache
from cxrlt.errors import DataError
from cxrlt.inference import _read_images
from cxrlt.metrics import average_precision
from cxrlt.models.classifier import Classifier
from cxrlt.models.heads import MLDecoderHead


@dataclass(frozen=True)
class ZeroShotConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.002
    weight_decay: float = 0.0001
    dim: int = 128
    heads: int = 4
    ff_dim: int = 256
    dropout: float = 0.1
    feature_batch_size: int = 128
    device: str = "auto"

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> ZeroShotConfig:
        params = dict(params or {})
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise DataError(f"params zeroshot: unknown keys {unknown}; valid: {sorted(valid)}")
        cfg = cls(**params)
        for name in ("epochs", "batch_size", "dim", "heads", "ff_dim", "feature_batch_size"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"params zeroshot.{name} must be an integer >= 1, got {value!r}")
        if cfg.dim % cfg.heads:
            raise DataError(f"params zeroshot.dim ({cfg.dim}) must be a multiple of zeroshot.heads ({cfg.heads})")
        if not 0 <= cfg.dropout < 1:
            raise DataError(f"params zeroshot.dropout must be in [0, 1), got {cfg.dropout!r}")
        return cfg


@torch.no_grad()
def feature_maps(
    model: Classifier, cache: ImageCache, image_ids: Sequence[str], batch_size: int, device: torch.device
) -> torch.Tensor:
    """(n, C, h, w) float32 spatial features of the frozen backbone (eval mode), on the CPU."""
    model = model.to(device).eval()
    parts = []
    for start in range(0, len(image_ids), batch_size):
        x = torch.from_numpy(_read_images(cache, list(image_ids[start : start + batch_size]))).to(device)
        parts.append(model.features(model.normalise(x)).float().cpu())
    if not parts:
        return torch.empty(0)
    return torch.cat(parts).contiguous()


def build_head(in_features: int, queries: torch.Tensor, cfg: ZeroShotConfig) -> MLDecoderHead:
    return MLDecoderHead(in_features, queries.shape[0], dim=cfg.dim, heads=cfg.heads, ff_dim=cfg.ff_dim,
                         dropout=cfg.dropout, query_embeddings=queries)  # fmt: skip


@torch.no_grad()
def score(head: MLDecoderHead, feats: torch.Tensor, queries: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """(n, K') probabilities of the label set whose embeddings are `queries` (K', E). Each
    image is scored alone (no batch statistics), so batch composition does not matter."""
    head.set_query_embeddings(queries)
    head.eval()
    out = [torch.sigmoid(head(feats[s : s + batch_size]).float()) for s in range(0, len(feats), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, queries.shape[0]))


def _val_map(y: np.ndarray, p: np.ndarray) -> float:
    ap = average_precision(y, p)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def fit_zeroshot(
    feats: torch.Tensor,
    y: np.ndarray,
    val_feats: torch.Tensor,
    y_val: np.ndarray,
    queries: torch.Tensor,
    cfg: ZeroShotConfig,
    seed: int,
    device: torch.device,
) -> tuple[MLDecoderHead, dict[str, Any]]:
    """Train the text-query head on the training classes' labels (NaN = unknown, masked);
    keep the epoch with the best val mAP on those same classes (first on ties)."""
    if len(feats) == 0 or len(val_feats) == 0:
        raise DataError("zeroshot: need training and val images")
    torch.manual_seed(seed)
    head = build_head(feats.shape[1], queries, cfg).to(device)
    known = torch.from_numpy(~np.isnan(y))
    target = torch.from_numpy(np.nan_to_num(y, nan=0.0).astype(np.float32))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(feats) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history = []
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(feats)))
        head.train()
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            logits = head(feats[idx].to(device))
            m = known[idx].to(device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[m], target[idx].to(device)[m], reduction="mean")  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        val = _val_map(y_val, score(head, val_feats.to(device), queries.to(device)))
        history.append(val)
        if best is None or val > best[0]:
            best = (val, epoch, {k: v.detach().cpu().clone() for k, v in head.state_dict().items()})
    assert best is not None
    head.load_state_dict(best[2])
    head.set_query_embeddings(queries)
    return head, {"val_mAP": best[0], "best_epoch": best[1], "history": history, "config": asdict(cfg)}


def supervised_reference(
    dev_feats: torch.Tensor, y_dev: np.ndarray, test_feats: torch.Tensor, seed: int
) -> np.ndarray:
    """A supervised bound for comparison, never a zero-shot input: per class, an L2 logistic
    regression on the same frozen features (global average pooled), fitted on the labelled
    dev split and scored on test. Classes with no positive or no negative on dev get the dev
    prevalence."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xd = dev_feats.mean(dim=(2, 3)).numpy().astype(np.float64)
    xt = test_feats.mean(dim=(2, 3)).numpy().astype(np.float64)
    scaler = StandardScaler().fit(xd)
    xd, xt = scaler.transform(xd), scaler.transform(xt)
    out = np.empty((len(xt), y_dev.shape[1]))
    for k in range(y_dev.shape[1]):
        keep = ~np.isnan(y_dev[:, k])
        yk = y_dev[keep, k]
        if yk.size == 0 or yk.min() == yk.max():
            out[:, k] = float(yk.mean()) if yk.size else 0.0
            continue
        clf = LogisticRegression(C=0.1, max_iter=2000, random_state=seed)
        out[:, k] = clf.fit(xd[keep], yk).predict_proba(xt)[:, 1]
    return out


def task3_rows(labels: pd.DataFrame, manifest: pd.DataFrame, classes: Sequence[str], where: str) -> pd.DataFrame:
    """The manifest's rows (ids, study, patient, split, view) of the images in a Task 3 label
    file, in its order, with its `classes` as float labels (NaN: not released)."""
    index = pd.Index(manifest["image_id"].astype(str))
    pos = index.get_indexer(labels["dicom_id"].astype(str))
    if (pos < 0).any():
        bad = labels["dicom_id"].iloc[int(np.flatnonzero(pos < 0)[0])]
        raise DataError(f"{where}: dicom_id {bad!r} is not an image of the manifest (params data.manifest): "
                        "Task 3 dev/test images must be Task 1's")  # fmt: skip
    rows = manifest.iloc[pos].drop(columns=[c for c in classes if c in manifest.columns]).reset_index(drop=True)
    for c in classes:
        rows[c] = labels[c].to_numpy(dtype=np.float32) if c in labels.columns else np.nan
    return rows


def _chance(y: np.ndarray) -> float | None:
    """mAP of a constant score: the mean prevalence over classes with a positive."""
    prevalence = np.nanmean(y, axis=0) if len(y) else np.zeros(y.shape[1])
    defined = prevalence > 0
    return float(prevalence[defined].mean()) if defined.any() else None


def run(params: Mapping[str, Any]) -> dict[str, Any]:
    """The zeroshot stage: train on Task 1, score Task 3 on dev and test, write the
    submission, predictions, metrics (summary files for DVC, full report) and the head."""
    from pathlib import Path

    from cxrlt.checkpoint import save_checkpoint
    from cxrlt.data.manifest import label_matrix
    from cxrlt.data.mimic import TASK_FILES, read_labels_csv
    from cxrlt.inference import load_checkpoint, resolve_device
    from cxrlt.io import write_json, write_parquet
    from cxrlt.labels import TASK3_CLASSES, task_classes
    from cxrlt.metrics import evaluate
    from cxrlt.params import section
    from cxrlt.stage import read_parquet
    from cxrlt.submission import predictions_frame, submission_path, write_submission
    from cxrlt.text.embeddings import load_label_embeddings

    z = section(params, "zeroshot")
    cfg = ZeroShotConfig.from_params(z["head"])  # bad settings fail before any data loads
    seed = int(section(params, "seed"))
    e = section(params, "evaluate")
    classes, targets = list(task_classes("task1")), list(TASK3_CLASSES)
    ckpt = section(params, "train.checkpoint")
    model, info1 = load_checkpoint(ckpt)
    if list(info1["classes"]) != classes:
        raise DataError(f"{ckpt}: zero-shot Task 3 learns from the Task 1 classes; this model has "
                        f"{len(info1['classes'])} others (params task: task1)")  # fmt: skip
    emb = load_label_embeddings(section(params, "text.out"))
    seen, unseen = emb.select(classes).vectors, emb.select(targets).vectors
    manifest = read_parquet(section(params, "data.manifest"), "data.manifest", "prepare")
    root = Path(section(params, "data.cxrlt_root"))
    files = dict(TASK_FILES["task3"])
    rows = {s: task3_rows(read_labels_csv(root / files[s], targets, allow_unlabelled=s == "test"),
                          manifest, targets, str(root / files[s]))
            for s in ("dev", "test")}  # fmt: skip
    part = {"train": manifest[manifest["split"] == "train"], "val": manifest[manifest["split"] == "val"], **rows}
    device = resolve_device(cfg.device)
    cache = ImageCache(section(params, "cache.dir"))
    feats = {s: feature_maps(model, cache, list(df["image_id"]), cfg.feature_batch_size, device)
             for s, df in part.items()}  # fmt: skip
    head, info = fit_zeroshot(feats["train"], label_matrix(part["train"], classes), feats["val"],
                              label_matrix(part["val"], classes), seen, cfg, seed, device)  # fmt: skip
    probs = {s: score(head, feats[s].to(device), unseen.to(device)) for s in rows}
    y = {s: label_matrix(rows[s], targets) for s in rows}
    reference = supervised_reference(feats["dev"], y["dev"], feats["test"], seed)

    def metrics(split: str, scores: np.ndarray) -> dict[str, Any]:
        return evaluate(y[split], scores, targets, None, ids=rows[split][e["cluster"]].to_numpy(),
                        n_bootstrap=int(e["n_bootstrap"]), seed=seed, ci=float(e["ci"]),
                        ci_method=e["ci_method"])  # fmt: skip

    report: dict[str, Any] = {"classes": targets, "trained_on": classes, "text": emb.record, **info}
    for split in rows:
        report[split] = metrics(split, probs[split])
        summary = {k: report[split].get(k) for k in ("mAP", "mAUROC")}  # few: `dvc exp show` stays readable
        summary["prevalence_baseline_mAP"] = _chance(y[split])
        if split == "test":
            report["supervised_reference_test"] = metrics("test", reference)
            summary["supervised_reference_mAP"] = report["supervised_reference_test"]["mAP"]
        write_json(Path(z["metrics_dir"]) / f"zeroshot_{split}.json", summary)
    write_json(z["report"], report)
    frames = {s: predictions_frame(rows[s], targets, probs[s]) for s in rows}
    write_parquet(z["predictions"], pd.concat([frames["dev"], frames["test"]], ignore_index=True))
    submission = submission_path(section(params, "predict.submission_dir"), "task3")
    write_submission(submission, frames["test"], targets)
    head.set_query_embeddings(seen)  # saved as trained: the Task 1 queries
    save_checkpoint(z["checkpoint"], head.state_dict(),
                    {**info, "classes": classes, "task3_classes": targets, "text": emb.record,
                     "backbone_checkpoint": str(ckpt)})  # fmt: skip
    return {"encoder": emb.record.get("encoder"), "val_mAP": info["val_mAP"], "test_mAP": report["test"]["mAP"],
            "test_prevalence_mAP": _chance(y["test"]), "reference_mAP": report["supervised_reference_test"]["mAP"],
            "submission": str(submission)}  # fmt: skip
