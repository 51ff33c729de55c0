"""Data: the built-in dataset, source adapters, the manifest contract, splits and the image cache."""
