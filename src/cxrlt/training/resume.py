"""Resumable training: a killed `train` run continues from its last finished epoch.

Why and how:
- Every epoch, after validation, Lightning's full checkpoint (model with its EMA copy,
  optimizer, LR schedule, loop counters, callback states including `BestWeights`) is written
  to `<train.state_dir>/last.ckpt`, together with what Lightning does not keep: the global RNG
  states, the module's augmentation generator (`on_save_checkpoint` of the module) and the
  dvclive files as they were at that moment, so a resumed run logs the same curves as an
  uninterrupted one (rows logged after the checkpoint by the killed run are dropped).
  Samplers and DRW need nothing: they derive each epoch from (seed, epoch).
- A state is resumed only if it belongs to this very run: `fingerprint.json` beside it holds
  a hash of the params training reads, the classes, the manifest, the cache's identity (its
  index and report files, the images' shape, size and modification time), the package's
  source and the torch/Lightning versions. Any difference, or a checkpoint that does not load,
  is logged and the state is deleted; the run starts fresh. A successful run deletes its
  state, so the next run (`dvc repro -f`) trains from scratch.
- Lightning's own writer goes through a temp file in the system temp folder that is *copied*
  when that folder is on another file system; checkpoints here go through `atomic_path`
  (a temp file beside the target, renamed), so `last.ckpt` is always a whole file.
- The folder is not a DVC output: an output with `persist: true` switches DVC's run cache off
  for the whole stage, and experiments restore trained models from it. DVC never deletes a
  folder it does not know, which is all that resuming needs.
- DDP: rank 0 alone writes (Lightning's strategy) and alone deletes; every rank reads the
  same file. Ranks agree by construction (rank 0 deletes a stale checkpoint before it writes
  the new fingerprint), and check it once the process group exists: a rank that cannot see
  the state (no shared file system) stops the run with a clear error instead of diverging.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cxrlt.errors import DataError
from cxrlt.io import atomic_path, write_json

log = logging.getLogger(__name__)

CKPT = "last.ckpt"
FINGERPRINT = "fingerprint.json"
LIVE = "live.json"
# train.* keys that cannot change the trained weights or the logged curves.
NOT_FINGERPRINTED = ("state_dir", "checkpoint", "live_dir", "progress_bar")
_PACKAGE = Path(__file__).resolve().parents[1]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> str:
    """The `cxrlt` package's Python sources, with the torch and Lightning versions."""
    h = hashlib.sha256(f"torch {torch.__version__} lightning {L.__version__}".encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_identity(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Cheap identity of a built cache: the small files hashed, the image array by its header
    facts and stat (hashing it would read the whole data set)."""
    cache_dir = Path(cache_dir)
    out: dict[str, Any] = {}
    for name in ("index.parquet", "report.json"):
        p = cache_dir / name
        out[name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    raw = cache_dir / "images.npy"
    if raw.exists():
        st = raw.stat()
        arr = np.load(raw, mmap_mode="r")
        out["images.npy"] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": st.st_size,
                             "mtime_ns": st.st_mtime_ns}  # fmt: skip
    # A compressed cache (`cache.format: jpeg | png`): its offset table hashed (small), the
    # encoded bytes by stat.
    table = cache_dir / "offsets.npy"
    if table.exists():
        out["offsets.npy"] = hashlib.sha256(table.read_bytes()).hexdigest()
    packed = cache_dir / "images.bin"
    if packed.exists():
        st = packed.stat()
        out["images.bin"] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not raw.exists() and not packed.exists():
        raise DataError(f"{cache_dir}: no images.npy or images.bin; run the cache stage first (dvc repro cache)")
    return out


def manifest_identity(manifest: pd.DataFrame) -> str:
    h = hashlib.sha256(json.dumps([str(c) for c in manifest.columns]).encode())
    h.update(pd.util.hash_pandas_object(manifest, index=True).to_numpy().tobytes())
    return h.hexdigest()


def fingerprint(
    params: Mapping[str, Any], classes: list[str], manifest: pd.DataFrame, cache_dir: str | os.PathLike,
    init: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that decides a training run, each part hashed, so a mismatch can be named."""
    train = {k: v for k, v in dict(params["train"]).items() if k not in NOT_FINGERPRINTED}
    # The train stage's params sections (dvc.yaml); `text` only matters with text queries.
    read = {k: params.get(k) for k in ("seed", "task", "loss", "losses", "sampler", "samplers", "model", "text")}
    parts = {
        "params": _digest({**read, "train": train}),
        "classes": _digest(list(classes)),
        "manifest": manifest_identity(manifest),
        "cache": _digest(cache_identity(cache_dir)),
        "code": code_version(),
    }
    if init is not None and init.get("kind", "scratch") != "scratch":  # the starting weights' contents
        parts["init"] = _digest(dict(init))
    head_args = (params.get("model") or {}).get("head_args") or {}
    out = (params.get("text") or {}).get("out")
    if head_args.get("queries") == "text" and out and os.path.isfile(out):
        # text queries: the embeddings' contents, not only the params that name them
        parts["text"] = hashlib.sha256(Path(out).read_bytes()).hexdigest()
    return {"digest": _digest(parts), "parts": parts}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file beside the target and renamed into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_path(path, suffix=".tmp") as tmp:
            tmp.write_bytes(buffer.getvalue())


def _rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain data (the checkpoint loads with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                            "pos": int(np_state["state"]["pos"])},
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": [version, list(state), gauss],
    }  # fmt: skip


def _set_rng_states(s: Mapping[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["state"]["key"].numpy().astype(np.uint32), "pos": n["state"]["pos"]}})  # fmt: skip
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))


def _live_files(live_dir: Path | None) -> dict[str, str]:
    """dvclive's metrics and curve files, by path relative to `live_dir`."""
    if live_dir is None or not live_dir.is_dir():
        return {}
    files = [live_dir / "metrics.json", *sorted((live_dir / "plots" / "metrics").rglob("*.tsv"))]
    return {p.relative_to(live_dir).as_posix(): p.read_text() for p in files if p.is_file()}


class EpochState(L.Callback):
    """Writes the run's state after every validation; restores what Lightning does not.

    The checkpoint is taken where Lightning resumes reliably, after validation, but before
    Lightning logs the epoch's training metrics (a restored epoch is not logged again). So the
    dvclive files are also saved when the next epoch starts, and when training ends, as
    `live.json`, tagged with the global step they belong to; the snapshot inside the checkpoint
    only serves a run killed between the two writes (it lacks that epoch's training means)."""

    def __init__(self, path: Path, digest: str, resuming: bool, live_dir: Path | None):
        self.path, self.digest, self.resuming, self.live_dir = path, digest, resuming, live_dir
        self.rank = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        if trainer.world_size > 1:
            first = trainer.strategy.broadcast(self.resuming, src=0)
            if first != self.resuming:
                raise DataError(
                    f"{self.path}: rank {trainer.global_rank} {'sees' if self.resuming else 'cannot see'} the "
                    f"resumable state that rank 0 {'cannot see' if self.resuming else 'sees'}; under DDP "
                    f"train.state_dir must be on a file system shared by every node"
                )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After BestWeights (callbacks run in list order): the checkpoint holds this epoch's pick.
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)

    def _save_live(self, trainer: L.Trainer) -> None:
        if self.rank == 0 and self.live_dir is not None:
            write_json(self.path.parent / LIVE, {"global_step": trainer.global_step,
                                                 "files": _live_files(self.live_dir)})  # fmt: skip

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._save_live(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_live(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.digest, "rng": _rng_states(),
                "live": _live_files(self.live_dir) if self.rank == 0 else {}}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _set_rng_states(state_dict["rng"])


class TrainState:
    """The state folder of one run: decides whether to resume, and clears it when done."""

    def __init__(self, state_dir: str | os.PathLike, fp: Mapping[str, Any], rank: int = 0):
        self.dir, self.fp, self.rank = Path(state_dir), dict(fp), int(rank)
        self.ckpt = self.dir / CKPT
        self.resume_from: Path | None = None
        self.epoch: int | None = None  # the first epoch the resumed run trains (0-based; = epochs: done)
        self.live: dict[str, str] = {}

    def prepare(self) -> Path | None:
        """The checkpoint to resume from, or None (stale or broken state deleted, by rank 0)."""
        reason = self._check()
        if reason is None:
            log.info("train: resuming from %s at epoch %d", self.ckpt, self.epoch)
            self.resume_from = self.ckpt
            return self.ckpt
        if reason:
            log.warning("train: not resuming %s (%s); starting fresh", self.dir, reason)
        if self.rank == 0:
            self.clear()  # the checkpoint first: no rank may pair it with the new fingerprint
            write_json(self.dir / FINGERPRINT, self.fp)
        return None

    def _check(self) -> str | None:
        """None: resumable; "": nothing there; else why the state is not resumed."""
        if not self.ckpt.exists():
            return ""
        try:
            saved = json.loads((self.dir / FINGERPRINT).read_text())
        except (OSError, ValueError) as e:
            return f"{FINGERPRINT} unreadable: {e}"
        if not isinstance(saved, dict):
            return f"{FINGERPRINT} is not a fingerprint"
        if saved.get("digest") != self.fp["digest"]:
            changed = sorted(k for k, v in self.fp["parts"].items() if (saved.get("parts") or {}).get(k) != v)
            return f"it was written by a different run; changed: {', '.join(changed) or 'fingerprint format'}"
        try:
            # mmap: the archive's structure is checked without reading every tensor twice
            ckpt = torch.load(self.ckpt, map_location="cpu", weights_only=True, mmap=True)
            state = ckpt["callbacks"][EpochState.__qualname__]
            epoch = int(ckpt["epoch"])
        except Exception as e:  # a truncated or foreign file: never trusted
            return f"{CKPT} cannot be read: {type(e).__name__}: {e}"
        if state.get("fingerprint") != self.fp["digest"]:
            return f"{CKPT} does not belong to {FINGERPRINT}"
        self.epoch, self.live = epoch + 1, dict(state.get("live") or {})
        try:
            later = json.loads((self.dir / LIVE).read_text())
            if later["global_step"] == ckpt["global_step"]:
                self.live = dict(later["files"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or of another epoch: the checkpoint's own copy
        return None

    def restore_live(self, live_dir: str | os.PathLike) -> None:
        """Put back dvclive's files as they were at the checkpoint (rank 0, before dvclive starts)."""
        live_dir = Path(live_dir)
        shutil.rmtree(live_dir / "plots" / "metrics", ignore_errors=True)
        for rel, text in self.live.items():
            target = live_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_text(text)

    def clear(self) -> None:
        """Delete the state (rank 0); the folder stays, empty."""
        if self.rank != 0:
            return
        for p in (self.ckpt, self.dir / LIVE, self.dir / FINGERPRINT):
            p.unlink(missing_ok=True)
        for tmp in self.dir.glob(f".{CKPT}.*") if self.dir.is_dir() else ():
            tmp.unlink(missing_ok=True)  # a write that was killed
