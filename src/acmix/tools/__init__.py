"""Tools that put ACmix into networks the user already has (above :mod:`acmix.analysis`, which they report with)."""

from .convert import ACmixNormAct, ConversionReport, Replaced, Skipped, choose_heads, convert_model

__all__ = ["ACmixNormAct", "ConversionReport", "Replaced", "Skipped", "choose_heads", "convert_model"]
