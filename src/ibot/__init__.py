"""iBOT self-supervised pre-training of Vision Transformers, and frozen-feature evaluation."""

__version__ = "0.1.0"
