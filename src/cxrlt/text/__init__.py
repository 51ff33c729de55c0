"""Label texts as vectors: the encoder (`encoder`, used by the embed stage only) and the cached
embeddings file that training and zero-shot scoring read (`embeddings`, no transformers)."""
