"""Judges label model outputs: harmful, refusal, broken-down or benign answer."""
from .refusal import is_refusal

__all__ = ["is_refusal"]
