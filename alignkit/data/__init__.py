"""One data layer: sources (files, folders, Hub ids), mixtures, splits, per-stage schema checks, chat templates."""

from alignkit.data.schemas import CPT, DPO, SFT, Schema
from alignkit.data.sources import load_datasets, load_source_split, mixture_indices
from alignkit.data.templates import CHATML, CHATML_EOS, check_turn_ends, resolve_chat_template

__all__ = [
    "CHATML",
    "CPT",
    "DPO",
    "SFT",
    "Schema",
    "load_datasets",
    "load_source_split",
    "check_turn_ends",
    "CHATML_EOS",
    "mixture_indices",
    "resolve_chat_template",
]
