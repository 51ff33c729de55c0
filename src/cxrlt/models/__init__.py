"""Models: a timm backbone plus a classification head chosen by name."""

from cxrlt.models.classifier import Classifier, ModelConfig, build_model

__all__ = ["Classifier", "ModelConfig", "build_model"]
