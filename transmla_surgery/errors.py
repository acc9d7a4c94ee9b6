"""Exceptions with messages that say what was wrong and what is allowed."""

from __future__ import annotations


class TransMLAError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(TransMLAError, ValueError):
    """An `MLAConfig` (or a CLI/recipe field) that cannot be honoured."""


class UnsupportedModelError(TransMLAError, ValueError):
    """A model, architecture or layer variant the conversion cannot keep exact where it promises to."""


class CalibrationError(TransMLAError, ValueError):
    """Calibration data that is empty, malformed, or produces non-finite statistics."""


class ConversionError(TransMLAError, RuntimeError):
    """A failure part-way through a conversion; the model has been restored to its original state."""


class CheckpointError(TransMLAError, ValueError):
    """A checkpoint directory whose weights are missing, truncated, corrupt or do not fit its config; the message
    names the file. Nothing was loaded (no half-loaded model is returned)."""
