"""Data: source adapters, the manifest contract, splits and the image cache (the built-in
dataset is `cxrlt.synth`)."""
