"""Training: datasets over the image cache, augmentation, the LightningModule and the fit loop."""
