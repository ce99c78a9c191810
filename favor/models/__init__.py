"""Performer models: a bidirectional encoder and a causal language model."""

from .config import POSITIONS, PerformerConfig
from .performer import PerformerEncoder, PerformerLM, sample

__all__ = ["PerformerConfig", "PerformerEncoder", "PerformerLM", "POSITIONS", "sample"]
