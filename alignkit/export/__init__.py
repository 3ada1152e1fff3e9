"""Adapters out: model cards, merging, pushing."""
