"""Stage embed: the label-text embeddings of every task's classes (fixed ML-Decoder queries)."""

from cxrlt.params import load_params, section
from cxrlt.stage import run_stage
from cxrlt.text.embeddings import save_label_embeddings
from cxrlt.text.encoder import TextConfig, TextEncoder, embed_labels, label_names


def main() -> None:
    params = load_params()
    t = section(params, "text")
    classes = label_names()
    cfg = TextConfig.from_params(t, classes)
    emb = embed_labels(TextEncoder(cfg.encoder, cfg.trust_remote_code), classes, cfg)
    save_label_embeddings(section(params, "text.out"), emb, section(params, "text.record"))
    print(f"embed: {len(classes)} classes x {len(cfg.templates)} templates through {cfg.encoder} "
          f"(dim {emb.record['dim']}, mean pooling) -> {t['out']}")


if __name__ == "__main__":
    run_stage(main)
