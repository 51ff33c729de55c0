"""cxr-lt: long-tailed multi-label chest X-ray classification (CXR-LT 2023/2024)."""

__version__ = "0.1.0"
