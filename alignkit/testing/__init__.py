"""Offline test fixtures: tiny random models and tokenizers built from configs, never downloaded."""

from alignkit.testing.tiny import TINY_KINDS, build_tiny, tiny_model_path

__all__ = ["TINY_KINDS", "build_tiny", "tiny_model_path"]
