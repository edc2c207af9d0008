"""Evaluation: representation diagnostics, attacks' results, capability and over-refusal."""
from .diagnostics import representation_similarity

__all__ = ["representation_similarity"]
