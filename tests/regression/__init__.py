"""Regression suite: pinned tiny-model trajectories and training invariants (pytest -m regression)."""
