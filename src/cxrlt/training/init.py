"""Where stage-1 training starts: `train.init` is `scratch`, `pretrained` (the pretrain
stage's checkpoint) or the path of any cxrlt checkpoint of the same backbone.

Only the backbone is taken, with strict key matching (a mismatch lists the missing,
unexpected and mis-shaped keys); the head is always new, because its classes differ (the
pretrain head scores the classes the external sources annotate). That is the one allowed
departure from strict loading here, and it is explicit: `head.*` keys are skipped by name.
`scratch` still honours `model.pretrained` (ImageNet weights from the model hub).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrlt.errors import DataError

INIT_CHOICES = ("scratch", "pretrained", "<path of a cxrlt checkpoint>")


@dataclass(frozen=True)
class InitWeights:
    kind: str  # scratch | pretrained | checkpoint
    path: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> InitWeights:
        """From `train.init` (default scratch); the file must exist before any data loads."""
        value = (params.get("train") or {}).get("init", "scratch")
        if value is None or value == "scratch":
            return cls("scratch")
        if not isinstance(value, str) or not value:
            raise DataError(f"params train.init must be one of {', '.join(INIT_CHOICES)}; got {value!r}")
        if value == "pretrained":
            path = str(((params.get("pretrain") or {}).get("checkpoint")) or "")
            if not path:
                raise DataError("params train.init is pretrained but pretrain.checkpoint is not set")
            if not os.path.isfile(path):
                raise DataError(f"params train.init is pretrained but {path} does not exist "
                                "(run the pretrain stage: dvc repro pretrain)")  # fmt: skip
            return cls("pretrained", path)
        if not os.path.isfile(value):
            raise DataError(f"params train.init: no checkpoint file {value!r}; "
                            f"valid: {', '.join(INIT_CHOICES)}")  # fmt: skip
        return cls("checkpoint", value)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must match: the kind and the file's contents."""
        if self.path is None:
            return {"kind": self.kind}
        return {"kind": self.kind, "sha256": hashlib.sha256(Path(self.path).read_bytes()).hexdigest()}

    def apply(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """Load the backbone into `model` (a `Classifier`); None for scratch, else a record
        for the checkpoint (file, digest, the source classes, tensors loaded)."""
        if self.path is None:
            return None
        from cxrlt.inference import read_checkpoint, state_dict_mismatch

        ckpt = read_checkpoint(self.path, stage="pretrain" if self.kind == "pretrained" else "train")
        record: dict[str, Any] = {"kind": self.kind, "file": self.path, **self.identity()}
        if ckpt.get("skipped"):  # the pretrain stage ran with no source: nothing to start from
            return {**record, "skipped": str(ckpt["skipped"])}
        theirs, ours = ckpt["model"], model.cfg
        for key in ("backbone", "in_chans"):
            if theirs.get(key) != getattr(ours, key):
                raise DataError(f"train.init: {self.path} has model.{key} {theirs.get(key)!r}, this run "
                                f"{getattr(ours, key)!r}; the backbone cannot be taken over")  # fmt: skip
        state = ckpt["state_dict"]
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        mismatch = state_dict_mismatch(model.backbone, backbone)
        if mismatch:
            raise DataError(f"train.init: the backbone of {self.path} does not fit: {mismatch}")
        model.backbone.load_state_dict(backbone, strict=True)
        return {**record, "classes": list(ckpt["classes"]), "sources": list(ckpt.get("sources", [])),
                "tensors": len(backbone), "head": "new"}  # fmt: skip
